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
// pause, a reload adds upstreams (HTTP and TCP) and the HTTP proxy
// listener and shortens the timeouts, another removes them again and moves
// one to another address, and a bad one
// (an upstream's balancer changing) is refused: no call to users fails,
// the new listeners serve, the new timeout applies, the removed one
// refuses connections.
func TestUpdateUnderLoad(t *testing.T) {
	users := []*backend{newBackend(t, "users", "u1", nil), newBackend(t, "users", "u2", nil)}
	inv := newBackend(t, "inventory", "i1", nil)
	slow := newBackend(t, "slow", "s1", nil)
	slow.demo.SetFault(demo.ModeSlow, 5*time.Second)
	cfg := Config{Upstreams: []Upstream{upstream("users"), upstream("slow")}}
	tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"users": users, "inventory": {inv}, "slow": {slow}, "raw": {inv}})

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

	// 1: an upstream (HTTP and TCP) and the HTTP proxy added, the timeouts shortened.
	cfg.Upstreams = append(cfg.Upstreams, upstream("inventory"), Upstream{Name: "raw", Addr: "127.0.0.1:0", Protocol: ProtoTCP})
	cfg.HTTPProxyAddr = "127.0.0.1:0"
	cfg.TryTimeout, cfg.RequestTimeout, cfg.NoRetries = 1500*time.Millisecond, 2*time.Second, true
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

	if code, _, body := get(t, c, tp.url("raw", "/r")); code != 200 || !strings.Contains(string(body), "inventory") {
		t.Fatalf("new TCP upstream: %d %s", code, body)
	}

	// 2: the upstreams removed again, slow moved to another address.
	invAddr, rawAddr, slowAddr := tp.p.Addr("inventory").String(), tp.p.Addr("raw").String(), tp.p.Addr("slow").String()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	moved := l.Addr().String()
	l.Close()
	cfg.Upstreams = []Upstream{cfg.Upstreams[0], {Name: "slow", Addr: moved, Protocol: ProtoHTTP}}
	if err := tp.p.Update(cfg); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"inventory", "raw"} {
		if tp.p.Addr(name) != nil {
			t.Errorf("removed upstream %s still has an address", name)
		}
	}
	for _, a := range []string{invAddr, rawAddr, slowAddr} {
		if conn, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			conn.Close()
			t.Errorf("removed listener %s still accepts connections", a)
		}
	}
	if got := tp.p.Addr("slow").String(); got != moved {
		t.Errorf("slow listens on %s, want %s", got, moved)
	}
	slow.demo.SetFault(demo.ModeOK, 0)
	if code, _, _ := get(t, c, tp.url("slow", "/s")); code != 200 {
		t.Errorf("moved upstream: %d", code)
	}
	waitCalls(200)

	// 3: refused, nothing changes.
	bad := cfg
	bad.Upstreams = []Upstream{{Name: "users", Addr: "127.0.0.1:0", Protocol: ProtoHTTP, Balancer: RoundRobin}, cfg.Upstreams[1]}
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
