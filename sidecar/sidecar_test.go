package sidecar

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"

	"attache/demo"
	"attache/internal/testcluster"
	"attache/internal/testrun"
)

// freeAddr returns a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// runSidecar starts a sidecar with args and returns its admin address and a
// function that stops it and returns Run's error.
func runSidecar(t *testing.T, args ...string) (string, func() error) {
	t.Helper()
	admin := freeAddr(t)
	cfg, err := ParseArgs(append([]string{"-admin", admin}, args...), DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Name: "test", Output: testWriter{t}, Level: hclog.Debug}))
	if err != nil {
		t.Fatal(err)
	}
	h := testrun.Start(t, s)
	return admin, h.Stop
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func get(addr, path string) (int, string) {
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func eventually(t *testing.T, what string, timeout time.Duration, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSidecarAgainstCluster runs a sidecar beside a real client agent of a
// three-server cluster: it registers itself and its -service file, stays up
// while the Raft leader is killed, re-registers after the agent loses its
// services, and deregisters on shutdown.
func TestSidecarAgainstCluster(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	agent := c.Clients[0]
	backendSrv := httptest.NewServer(demo.New("users", "users-1"))
	defer backendSrv.Close()
	backend := backendSrv.Listener.Addr().String()
	svcFile := filepath.Join(t.TempDir(), "svc.hcl")
	os.WriteFile(svcFile, []byte(`service {
  name = "users"
  id   = "users-1"
  address = "127.0.0.1"
  port = `+strings.Split(backend, ":")[1]+`
}`), 0o644)
	dnsAddr, upstream, httpProxy, gw := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	admin, stop := runSidecar(t, "-consul", agent.HTTPAddr, "-node", "sidecar-test", "-service", svcFile, "-dns", dnsAddr, "-data-dir", t.TempDir(),
		"-upstream", "users="+upstream, "-http-proxy", httpProxy, "-gateway", gw)

	eventually(t, "/healthz 200", 5*time.Second, func() bool { code, _ := get(admin, "/healthz"); return code == 200 })
	eventually(t, "/readyz 200", 10*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	api := agent.API(t)
	registered := func(id string) bool {
		svcs, err := api.Agent().Services()
		_, ok := svcs[id]
		return err == nil && ok
	}
	for _, id := range []string{"attache", "users-1", "attache-gateway-sidecar-test"} {
		eventually(t, id+" registered", 10*time.Second, func() bool { return registered(id) })
	}
	// The gateway serves, with no routes applied yet: 404 with a JSON body.
	if code, body := get(gw, "/users/1"); code != 404 || !strings.Contains(body, `"error"`) {
		t.Errorf("gateway without routes: %d %s", code, body)
	}
	if code, body := get(admin, "/v1/routes"); code != 200 || !strings.Contains(body, `"routes": []`) {
		t.Errorf("/v1/routes = %d %s", code, body)
	}
	// The self-registration's check goes passing through /healthz.
	eventually(t, "attache passing", 15*time.Second, func() bool {
		entries, _, err := api.Health().Service("attache", "", true, nil)
		return err == nil && len(entries) == 1
	})

	// Its DNS answers from the view: users-1 has no check, so it is passing.
	eventually(t, "users.service.consul from the sidecar's DNS", 10*time.Second, func() bool {
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		in, err := miekg.Exchange(m, dnsAddr)
		return err == nil && len(in.Answer) == 1 && in.Answer[0].(*miekg.A).A.String() == "127.0.0.1"
	})
	if code, body := get(admin, "/v1/snapshot"); code != 200 || !strings.Contains(body, `"users-1"`) {
		t.Errorf("/v1/snapshot = %d %s", code, body)
	}

	// Its proxy listeners reach the instance: the upstream listener, and the
	// HTTP proxy by the request's host.
	if code, body := get(upstream, "/items/1"); code != 200 || !strings.Contains(body, `"instance":"users-1"`) {
		t.Errorf("through the upstream listener: %d %s", code, body)
	}
	pu, _ := url.Parse("http://" + httpProxy)
	pc := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}}
	if resp, err := pc.Get("http://users.service.consul/items/2"); err != nil || resp.StatusCode != 200 {
		t.Errorf("through the HTTP proxy: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if code, body := get(admin, "/v1/breakers"); code != 200 || !strings.Contains(body, "users") {
		t.Errorf("/v1/breakers = %d %s", code, body)
	}

	// Kill the leader: the cluster elects another and the sidecar keeps serving.
	c.Leader(t).Kill()
	c.WaitLeader(t)
	if code, _ := get(admin, "/healthz"); code != 200 {
		t.Fatal("sidecar stopped serving after the leader was killed")
	}

	// The agent forgets a service (as after a restart without data): it comes back.
	if err := api.Agent().ServiceDeregister("users-1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "users-1 re-registered", 20*time.Second, func() bool { return registered("users-1") })

	if err := stop(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	for _, id := range []string{"attache", "users-1", "attache-gateway-sidecar-test"} {
		if registered(id) {
			t.Errorf("%s still registered after shutdown", id)
		}
	}
}

// TestSidecarWithoutConsul: an unreachable Consul is not fatal; the sidecar
// retries and says so on /readyz.
func TestSidecarWithoutConsul(t *testing.T) {
	admin, stop := runSidecar(t, "-consul", freeAddr(t))
	eventually(t, "/readyz to explain", 5*time.Second, func() bool {
		code, body := get(admin, "/readyz")
		var r struct {
			Ready   bool
			Reasons []string
		}
		_ = json.Unmarshal([]byte(body), &r)
		return code == 503 && !r.Ready && len(r.Reasons) == 2 && strings.Contains(r.Reasons[0], "connection refused")
	})
	if code, _ := get(admin, "/healthz"); code != 200 {
		t.Fatal("/healthz should answer while Consul is unreachable")
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestSidecarAddressInUse: a busy admin address fails at once, naming it.
func TestSidecarAddressInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg, err := ParseArgs([]string{"-admin", l.Addr().String(), "-consul", freeAddr(t)}, DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	err = s.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), l.Addr().String()) || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Run = %v, want an error naming %s as in use", err, l.Addr())
	}
}
