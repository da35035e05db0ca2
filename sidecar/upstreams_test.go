package sidecar

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/testcluster"
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
			wantPol: &proxy.Policy{Balancer: proxy.RoundRobin, TryTimeout: time.Second, RequestTimeout: 2 * time.Second, NoRetries: true}},
		{name: "breaker", u: UpstreamSettings{EjectAfter: ptr(0), EjectTime: time.Second, SlowCall: time.Second, MaxRequests: ptr(0),
			FailureRate: &rate, Window: 20 * time.Second, OpenTime: 3 * time.Second}, check: func(t *testing.T, c breaker.Config) {
			if !c.NoEjection || c.BaseEjectionTime != time.Second || c.SlowCallDuration != time.Second ||
				!c.NoRequestLimit || !c.NoFailureRate || c.Window != 20*time.Second || c.OpenDuration != 3*time.Second {
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

// TestUpstreamBlocksAgainstCluster runs a sidecar from a config file whose
// upstream block opens the users listener and sets no retries: against a
// real cluster, each request reaches an instance once, where the flags'
// retries (2) would have tried every failing request three times; and
// with failure_rate = 0 its breaker never opens on them.
func TestUpstreamBlocksAgainstCluster(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	agent := c.Clients[0]
	var hits atomic.Int64
	var regs []string
	for _, id := range []string{"users-1", "users-2"} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.WriteHeader(http.StatusServiceUnavailable)
		}))
		t.Cleanup(srv.Close)
		port := strings.Split(srv.Listener.Addr().String(), ":")[1]
		regs = append(regs, `service {
  name = "users"
  id   = "`+id+`"
  address = "127.0.0.1"
  port = `+port+`
}`)
	}
	dir := t.TempDir()
	svcFile := filepath.Join(dir, "svc.hcl")
	os.WriteFile(svcFile, []byte(strings.Join(regs, "\n")), 0o644)
	upstream := freeAddr(t)
	cfgFile := filepath.Join(dir, "attache.hcl")
	os.WriteFile(cfgFile, []byte(`retries = 2
upstream "users" {
  listen      = "`+upstream+`"
  retries      = -1
  eject_after  = -1
  failure_rate = 0
}
`), 0o644)
	admin, _ := runSidecar(t, "-config", cfgFile, "-consul", agent.HTTPAddr, "-node", "blocks-test", "-service", svcFile)
	eventually(t, "/readyz 200", 15*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	// The first request makes the sidecar watch users (on demand).
	eventually(t, "both users instances in the view", 15*time.Second, func() bool {
		get(upstream, "/x")
		_, body := get(admin, "/v1/snapshot")
		return strings.Contains(body, `"users-1"`) && strings.Contains(body, `"users-2"`)
	})
	hits.Store(0)
	for i := 0; i < 20; i++ {
		if code, _ := get(upstream, "/x"); code != http.StatusServiceUnavailable {
			t.Fatalf("request %d: %d, want the instances' 503", i, code)
		}
	}
	if n := hits.Load(); n != 20 {
		t.Errorf("20 requests reached the instances %d times; the block's retries = -1 allows one try each", n)
	}
	// eject_after = -1: however many failures, no instance is ejected.
	if _, body := get(admin, "/v1/breakers"); strings.Contains(body, `"ejected": true`) {
		t.Errorf("an instance was ejected with eject_after = -1: %s", body)
	}
}
