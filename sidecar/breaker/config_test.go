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

// TestRulesOff: each rule's switch turns it off; a rate outside 0–100 or
// a negative stall count is refused, not read as "off".
func TestRulesOff(t *testing.T) {
	for _, c := range []Config{{PanicThreshold: -1}, {FailureRateThreshold: -1}, {SlowCallRateThreshold: 101}, {MinimumStalledCalls: -1}} {
		if _, err := New(c, nil, nil); err == nil || !strings.Contains(err.Error(), "turns the rule off") {
			t.Errorf("%+v: %v", c, err)
		}
	}
	for _, tt := range []struct {
		name     string
		off      Config
		failures bool // the calls fail (else they are slow)
	}{
		{"failure rate", Config{NoFailureRate: true}, true},
		{"slow-call rate", Config{NoSlowCallRate: true}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, off := range []bool{false, true} {
				cfg := Config{MinimumCalls: 4, FailureRateThreshold: 50, SlowCallRateThreshold: 50, SlowCallDuration: time.Second}
				if off {
					cfg.NoFailureRate, cfg.NoSlowCallRate = tt.off.NoFailureRate, tt.off.NoSlowCallRate
				}
				r, c := newTest(t, cfg)
				s := r.Service("svc")
				took := time.Millisecond
				if !tt.failures {
					took = 2 * time.Second
				}
				run(s, c, 4, tt.failures, took)
				if want := map[bool]string{false: Open, true: Closed}[off]; s.State() != want {
					t.Errorf("off=%v: %s after 4 of 4 calls judged bad, want %s", off, s.State(), want)
				}
			}
		})
	}
}
