package proxy

import (
	"reflect"
	"testing"
)

// TestDefaultConfig: DefaultConfig and the defaults a zero field takes are
// the same values (one table of defaults, not two that drift apart).
func TestDefaultConfig(t *testing.T) {
	got := Config{}.withDefaults()
	got.Logger = nil
	if want := DefaultConfig(); !reflect.DeepEqual(got, want) {
		t.Errorf("zero fields take\n%+v\nDefaultConfig is\n%+v", got, want)
	}
	if d := DefaultConfig().withDefaults(); d.MaxRetries != 2 || d.NoRetries {
		t.Errorf("default retries: %d off %v", d.MaxRetries, d.NoRetries)
	}
	if err := (Config{MaxRetries: -1}).Validate(); err == nil {
		t.Error("MaxRetries -1 accepted: off is NoRetries")
	}
	if l := newLive(Config{NoRetries: true}.withDefaults()); l.maxRetries != 0 {
		t.Errorf("NoRetries: %d retries", l.maxRetries)
	}
}
