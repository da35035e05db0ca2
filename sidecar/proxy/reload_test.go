package proxy

import (
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/demo"
	"attache/sidecar/breaker"
)

// TestUpdateUnderLoad: while keep-alive clients call users without a
// pause, a reload adds an upstream and the HTTP proxy listener and
// shortens the timeouts, another removes the upstream again, and a bad one
// (an upstream's balancer changing) is refused: no call to users fails,
// the new listeners serve, the new timeout applies, the removed one
// refuses connections.
func TestUpdateUnderLoad(t *testing.T) {
	users := []*backend{newBackend(t, "users", "u1", nil), newBackend(t, "users", "u2", nil)}
	inv := newBackend(t, "inventory", "i1", nil)
	slow := newBackend(t, "slow", "s1", nil)
	slow.demo.SetFault(demo.ModeSlow, 5*time.Second)
	cfg := Config{Upstreams: []Upstream{upstream("users"), upstream("slow")}}
	tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"users": users, "inventory": {inv}, "slow": {slow}})

	const workers, maxCalls = 4, 200000
	var calls, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	usersURL := tp.url("users", "/u")
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newClient()
			for calls.Add(1) < maxCalls {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get(usersURL)
				if err != nil {
					t.Logf("users: %v", err)
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Logf("users: %s", resp.Status)
					failed.Add(1)
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	waitCalls := func(n int64) {
		t.Helper()
		for end, from := time.Now().Add(10*time.Second), calls.Load(); calls.Load() < from+n; {
			if time.Now().After(end) {
				t.Fatal("the load does not go on")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitCalls(200)

	// 1: an upstream and the HTTP proxy added, the timeouts shortened.
	cfg.Upstreams = append(cfg.Upstreams, upstream("inventory"))
	cfg.HTTPProxyAddr = "127.0.0.1:0"
	cfg.TryTimeout, cfg.RequestTimeout, cfg.MaxRetries = 1500*time.Millisecond, 2*time.Second, -1
	if err := tp.p.Update(cfg); err != nil {
		t.Fatal(err)
	}
	c := newClient()
	if code, _, body := get(t, c, tp.url("inventory", "/i")); code != 200 || !strings.Contains(string(body), "inventory") {
		t.Fatalf("new upstream: %d %s", code, body)
	}
	req, _ := http.NewRequest("GET", "http://"+tp.p.Addr("").String()+"/x", nil)
	req.Host = "inventory.service.consul"
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("new HTTP proxy listener: %d", resp.StatusCode)
	}
	// The slow instance answers after 5 s: the try timeout of 1.5 s ends
	// the call (before the reload it was 5 s: the call would have waited).
	start := time.Now()
	code, _, _ := get(t, c, tp.url("slow", "/s"))
	if took := time.Since(start); code != http.StatusGatewayTimeout || took > 4*time.Second {
		t.Fatalf("slow upstream after the reload: %d after %v, want 504 from the 1.5s try timeout", code, took)
	}
	waitCalls(200)

	// 2: the upstream removed again.
	invAddr := tp.p.Addr("inventory").String()
	cfg.Upstreams = cfg.Upstreams[:2]
	if err := tp.p.Update(cfg); err != nil {
		t.Fatal(err)
	}
	if tp.p.Addr("inventory") != nil {
		t.Error("removed upstream still has an address")
	}
	if conn, err := net.DialTimeout("tcp", invAddr, time.Second); err == nil {
		conn.Close()
		t.Errorf("removed upstream %s still accepts connections", invAddr)
	}
	waitCalls(200)

	// 3: refused, nothing changes.
	bad := cfg
	bad.Upstreams = []Upstream{{Name: "users", Addr: "127.0.0.1:0", Protocol: ProtoHTTP, Balancer: RoundRobin}, upstream("slow")}
	if err := tp.p.Update(bad); err == nil || !strings.Contains(err.Error(), "cannot change without a restart") {
		t.Fatalf("balancer change: %v", err)
	}
	if tp.p.Addr("users").String() != strings.TrimPrefix(usersURL[:strings.LastIndex(usersURL, "/")], "http://") {
		t.Errorf("users moved after a refused update: %v", tp.p.Addr("users"))
	}
	waitCalls(200)
	close(stop)
	wg.Wait()
	stop = make(chan struct{})
	t.Logf("%d calls to users during the reloads, %d failed", calls.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d calls to users failed", failed.Load())
	}
}
