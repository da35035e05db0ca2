package breaker

import (
	"strings"
	"testing"
	"time"
)

// TestConfigOff: ejection off and no limit are switches of their own; a
// negative count is refused, not read as "off".
func TestConfigOff(t *testing.T) {
	for _, c := range []Config{{ConsecutiveFailures: -1}, {MaxRequests: -1}} {
		if _, err := New(c, nil, nil); err == nil || !strings.Contains(err.Error(), "must not be negative") {
			t.Errorf("%+v: %v", c, err)
		}
	}
	r, err := New(Config{NoEjection: true, NoRequestLimit: true, MaxRequests: 1, ConsecutiveFailures: 1, Disabled: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	s := r.Service("users")
	for i := 0; i < 3; i++ { // more than MaxRequests in flight
		if _, err := s.Allow(now); err != nil {
			t.Fatalf("call %d refused: %v", i, err)
		}
	}
	if err := r.SetConfig(Config{MaxRequests: -5}); err == nil {
		t.Error("SetConfig took a negative MaxRequests")
	}
}
