//go:build linux

package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"attache/sidecar/breaker"
)

// Idle keep-alive connections of the goroutine path (Engines.NoEventLoops, the
// TLS gateway listener) are parked: no goroutine holds them; a request on
// one is answered as before; the idle timeout and the drain close them.
func TestIdleConnectionsPark(t *testing.T) {
	b := newBackend(t, "a", "a1", headerEcho{"a1"})
	rt := &prefixRouter{routes: map[string]string{"/a/": "a"}}
	for _, tc := range []struct {
		name string
		tls  bool
	}{{"goroutine path", false}, {"tls gateway", true}} {
		t.Run(tc.name, func(t *testing.T) {
			const n, idle = 30, 2 * time.Second
			cfg := Config{IdleTimeout: idle, ShutdownGraceTime: 20 * time.Second}
			if tc.tls {
				cfg.Gateways = []GatewayListener{{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}}
			} else {
				cfg.Upstreams = []Upstream{upstream("a")}
			}
			tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"a": {b}}, Engines{NoEventLoops: !tc.tls})
			addr := func() string {
				if tc.tls {
					return tp.p.GatewayAddr(0).String()
				}
				return tp.p.Addr("a").String()
			}()
			if tp.p.parker == nil {
				t.Fatal("no parker on Linux")
			}
			type client struct {
				c  net.Conn
				br *bufio.Reader
			}
			dial := func() client {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				if tc.tls {
					c = tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
				}
				c.SetDeadline(time.Now().Add(20 * time.Second))
				return client{c, bufio.NewReader(c)}
			}
			get := func(cl client) {
				t.Helper()
				if _, err := io.WriteString(cl.c, "GET /a/x HTTP/1.1\r\nHost: gw\r\n\r\n"); err != nil {
					t.Fatal(err)
				}
				resp, err := http.ReadResponse(cl.br, nil)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || resp.Close {
					t.Fatalf("status %d, close %v", resp.StatusCode, resp.Close)
				}
			}
			waitParked := func(want int) {
				t.Helper()
				for end := time.Now().Add(5 * time.Second); tp.p.parker.parked() != want; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(end) {
						t.Fatalf("%d connections parked, want %d", tp.p.parker.parked(), want)
					}
				}
			}
			closedBy := func(cl client, by time.Time) {
				t.Helper()
				cl.c.SetReadDeadline(by)
				if _, err := cl.br.ReadByte(); err != io.EOF {
					t.Fatalf("read %v, want the proxy's close (EOF) by %v", err, by.Format("15:04:05.000"))
				}
			}

			before := runtime.NumGoroutine()
			var cls []client
			for range n {
				cl := dial()
				get(cl)
				cls = append(cls, cl)
			}
			waitParked(n)
			if g := runtime.NumGoroutine(); g > before+n/3 {
				t.Errorf("%d goroutines with %d parked connections, %d before them", g, n, before)
			}
			for _, cl := range cls { // taken up again, each answered
				get(cl)
			}
			waitParked(n)
			start := time.Now()
			for _, cl := range cls { // the idle timeout counts across parkings
				closedBy(cl, start.Add(idle+2*time.Second))
			}
			if d := time.Since(start); d < idle/2 {
				t.Errorf("closed after %v idle, want about %v", d, idle)
			}

			// Drain: the idle ones are closed at once, not after the grace time.
			var rest []client
			for range n {
				cl := dial()
				get(cl)
				rest = append(rest, cl)
			}
			waitParked(len(rest))
			tp.cancel()
			for _, cl := range rest {
				closedBy(cl, time.Now().Add(idle))
			}
			select {
			case <-tp.stopped:
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not return within 5 s of its end with only idle connections")
			}
		})
	}
}

// Bytes of a TLS record that never ends wake a parked connection but bring
// no request: they do not put its idle timeout off.
func TestParkedTLSDribbleTimesOut(t *testing.T) {
	b := newBackend(t, "a", "a1", headerEcho{"a1"})
	rt := &prefixRouter{routes: map[string]string{"/a/": "a"}}
	const idle = 1500 * time.Millisecond
	tp := startProxy(t, Config{IdleTimeout: idle, Gateways: []GatewayListener{
		{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}}},
		breaker.Config{}, map[string][]*backend{"a": {b}})
	raw, err := net.Dial("tcp", tp.p.GatewayAddr(0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: gw\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	start := time.Now()
	closed := make(chan time.Duration, 1)
	go func() {
		var one [1]byte
		raw.SetReadDeadline(time.Now().Add(4 * idle))
		raw.Read(one[:]) // the alert or EOF of the proxy's close
		closed <- time.Since(start)
	}()
	// An application-data record of 16 KiB, a byte every 100 ms.
	rec := append([]byte{0x17, 0x03, 0x03, 0x40, 0x00}, make([]byte, 100)...)
	for i := 0; i < len(rec); i++ {
		select {
		case d := <-closed:
			if d > idle+time.Second {
				t.Fatalf("closed after %v, want about %v", d, idle)
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
		if _, err := raw.Write(rec[i : i+1]); err != nil {
			return // closed
		}
	}
	t.Fatal("a dribbling TLS client was never closed")
}

// TestParkedAnsweredWhenHandingOver: a stop that hands over (Proxy.HandOver)
// answers a parked connection's next request, with Connection: close, as
// it does a connection whose goroutine waits; without it the request would
// find the connection closed.
func TestParkedAnsweredWhenHandingOver(t *testing.T) {
	b := newBackend(t, "a", "a1", headerEcho{"a1"})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("a")}, ShutdownGraceTime: 10 * time.Second},
		breaker.Config{}, map[string][]*backend{"a": {b}}, Engines{NoEventLoops: true})
	if tp.p.parker == nil {
		t.Fatal("no parker on Linux")
	}
	c, err := net.Dial("tcp", tp.p.Addr("a").String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	get := func() *http.Response {
		t.Helper()
		if _, err := io.WriteString(c, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	get()
	for end := time.Now().Add(5 * time.Second); tp.p.parker.parked() != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the connection was not parked")
		}
	}
	tp.p.HandOver()
	tp.cancel()
	time.Sleep(200 * time.Millisecond) // the stop is under way
	if resp := get(); resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("parked connection's request while handing over: %d, close %v; want 200 and Connection: close", resp.StatusCode, resp.Close)
	}
	select {
	case <-tp.stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return once the parked connection was answered")
	}
}

// A burst of parked connections, then none: the parker settles the heap
// once (a collection that gives the freed pages back), and counts a new
// burst from there.
func TestParkerSettlesAfterABurst(t *testing.T) {
	for _, proto := range []string{"http/1.1", "h2"} {
		t.Run(proto, func(t *testing.T) { testParkerSettles(t, proto) })
	}
}

// testParkerSettles: a burst of connections over the TLS gateway listener,
// each one request then idle, ends in one settling, with every connection
// parked, HTTP/1.1 and HTTP/2 alike.
func testParkerSettles(t *testing.T, proto string) {
	b := newBackend(t, "a", "a1", headerEcho{"a1"})
	rt := &prefixRouter{routes: map[string]string{"/a/": "a"}}
	cfg := Config{IdleTimeout: time.Minute, Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}}}
	tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"a": {b}})
	k := tp.p.parker
	if k == nil {
		t.Fatal("no parker on Linux")
	}
	const burst = 8
	k.mu.Lock()
	k.settleAfter, k.settleQuiet, k.settleEvery = burst, 20*time.Millisecond, 0
	k.mu.Unlock()
	addr := tp.p.GatewayAddr(0).String()
	for range burst {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{proto}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if got := c.ConnectionState().NegotiatedProtocol; got != proto {
			t.Fatalf("ALPN %q, want %q", got, proto)
		}
		if proto == "h2" {
			tr := &http.Transport{Protocols: new(http.Protocols), DialTLSContext: func(context.Context, string, string) (net.Conn, error) { return c, nil }}
			tr.Protocols.SetHTTP2(true)
			t.Cleanup(tr.CloseIdleConnections)
			resp, err := (&http.Client{Transport: tr}).Get("https://gw/a/x")
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			continue
		}
		if _, err := io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: gw\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for end := time.Now().Add(10 * time.Second); k.settles.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no settling after a burst of %d %s connections (%d parked)", burst, proto, k.parked())
		}
	}
	k.mu.Lock()
	since := k.sinceSettle
	k.mu.Unlock()
	if since != 0 {
		t.Errorf("%d idle connections counted after the settling, want 0", since)
	}
	if got := k.parked(); got != burst { // HTTP/2 ones too: our h2 server parks them
		t.Errorf("%d parked after the settling, want %d", got, burst)
	}
}

// Settling leaves a collector the operator turned off (GOGC=off) alone.
func TestGCOn(t *testing.T) {
	old := debug.SetGCPercent(-1)
	off := gcOn()
	debug.SetGCPercent(old)
	if off {
		t.Error("gcOn with GOGC=off")
	}
	if !gcOn() {
		t.Errorf("not gcOn with GOGC=%d", old)
	}
}

// An idle h2c connection (an upstream listener, on the event loops and on
// the goroutine path) is parked as an HTTP/1.1 one is, and answers its
// next request when taken up again (the same connection: one parked).
func TestH2CParks(t *testing.T) {
	for _, noLoops := range []bool{false, true} {
		t.Run(map[bool]string{false: "event loops", true: "goroutine path"}[noLoops], func(t *testing.T) {
			b := newBackend(t, "grpcish", "g1", nil)
			tp := startProxy(t, Config{Upstreams: []Upstream{upstream("grpcish")}}, breaker.Config{}, map[string][]*backend{"grpcish": {b}}, Engines{NoEventLoops: noLoops})
			k := tp.p.parker
			if k == nil {
				t.Fatal("no parker on Linux")
			}
			tr := &http.Transport{}
			tr.Protocols = new(http.Protocols)
			tr.Protocols.SetUnencryptedHTTP2(true)
			t.Cleanup(tr.CloseIdleConnections)
			c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
			get := func() {
				t.Helper()
				resp, err := c.Get(tp.url("grpcish", "/h2"))
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.ProtoMajor != 2 || resp.StatusCode != 200 {
					t.Fatalf("proto %s, status %d", resp.Proto, resp.StatusCode)
				}
			}
			for i := 0; i < 2; i++ { // the second request on the parked connection
				get()
				for end := time.Now().Add(5 * time.Second); k.parked() != 1; time.Sleep(5 * time.Millisecond) {
					if time.Now().After(end) {
						t.Fatalf("request %d: %d connections parked, want 1", i+1, k.parked())
					}
				}
			}
		})
	}
}
