package sidecar

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"attache/sidecar/breaker"
	"attache/sidecar/proxy"
)

// TestApplyUpstreams checks what upstream blocks give the proxy and the
// breakers: the fields they set, the flags' values for the rest, "off"
// spelled 0 or -1 in the file turned into each package's own "off".
func TestApplyUpstreams(t *testing.T) {
	ptr := func(n int) *int { return &n }
	rate := 0.0
	tests := []struct {
		name    string
		u       UpstreamSettings
		wantPol *proxy.Policy
		check   func(t *testing.T, c breaker.Config)
		wantErr string
	}{
		{name: "nothing set", u: UpstreamSettings{Listen: "127.0.0.1:9191"}, check: func(t *testing.T, c breaker.Config) {
			if c.ConsecutiveFailures != 7 {
				t.Errorf("the flags' ejection: %d", c.ConsecutiveFailures)
			}
		}},
		{name: "forwarding", u: UpstreamSettings{Balancer: "rr", TryTimeout: time.Second, ReqTimeout: 2 * time.Second, Retries: ptr(0)},
			wantPol: &proxy.Policy{Balancer: proxy.RoundRobin, TryTimeout: time.Second, RequestTimeout: 2 * time.Second, Retries: -1}},
		{name: "breaker", u: UpstreamSettings{EjectAfter: ptr(0), EjectTime: time.Second, SlowCall: time.Second, MaxRequests: ptr(0),
			FailureRate: &rate, Window: 20 * time.Second, OpenTime: 3 * time.Second}, check: func(t *testing.T, c breaker.Config) {
			if c.ConsecutiveFailures != -1 || c.BaseEjectionTime != time.Second || c.SlowCallDuration != time.Second ||
				c.MaxRequests != -1 || c.FailureRateThreshold != -1 || c.Window != 20*time.Second || c.OpenDuration != 3*time.Second {
				t.Errorf("breaker settings %+v", c)
			}
		}},
		{name: "bad", u: UpstreamSettings{TryTimeout: 3 * time.Second, ReqTimeout: time.Second}, wantErr: "try_timeout 3s is longer than request_timeout 1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br, err := breaker.New(breaker.Config{ConsecutiveFailures: 7}, nil, prometheus.NewRegistry())
			if err != nil {
				t.Fatal(err)
			}
			var pc proxy.Config
			err = applyUpstreams(map[string]UpstreamSettings{"users": tt.u}, br, &pc)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := pc.Policies["users"]; (got == nil) != (tt.wantPol == nil) || got != nil && *got != *tt.wantPol {
				t.Errorf("policy %+v, want %+v", got, tt.wantPol)
			}
			if tt.check != nil {
				tt.check(t, br.Service("users").Config())
			}
		})
	}
}
