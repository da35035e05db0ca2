package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"attache/internal/evloop"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Regression tests for the hardening of the HTTP/1.1 path (issue 12), on
// the event loops or, with -noloop, on the goroutine path.

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// scripted is an instance on raw TCP: each request is answered with the
// bytes answer returns for it; after an answer marked bad it records
// whether the proxy closed that connection.
type scripted struct {
	inst   catalog.Instance
	mu     sync.Mutex
	hosts  []string
	closed chan bool // after a bad answer: did the proxy close the connection?
}

func newScripted(t *testing.T, service, id string, answer func(req *http.Request) (out string, bad bool)) *scripted {
	t.Helper()
	s := &scripted{closed: make(chan bool, 16)}
	b := rawBackend(t, service, id, func(n int, req *http.Request, c net.Conn) {
		s.mu.Lock()
		s.hosts = append(s.hosts, req.Host)
		s.mu.Unlock()
		out, bad := answer(req)
		io.WriteString(c, out)
		if bad {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			var one [1]byte
			_, err := c.Read(one[:])
			s.closed <- err == io.EOF || isReset(err)
			c.Close()
		}
	})
	s.inst = b.inst
	return s
}

func (s *scripted) lastHost() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.hosts) == 0 {
		return ""
	}
	return s.hosts[len(s.hosts)-1]
}

func (s *scripted) backend() *backend { return &backend{id: s.inst.ID, inst: s.inst} }

// Issue 12, 1: through the HTTP proxy, an absolute-form target's
// authority replaces the Host the client sent (RFC 9112 §3.2.2), on the
// fast path and on the general one (a chunked body), and on an upstream
// listener too.
func TestAbsoluteFormReplacesHost(t *testing.T) {
	ok := func(*http.Request) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false }
	inv, pay := newScripted(t, "inventory", "inv1", ok), newScripted(t, "payments", "pay1", ok)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, HTTPProxyAddr: "127.0.0.1:0"}, breaker.Config{},
		map[string][]*backend{"inventory": {inv.backend()}, "payments": {pay.backend()}})
	for _, tc := range []struct{ name, listener, req, wantHost string }{
		{"fast path", "", "GET http://inventory.service.consul/x HTTP/1.1\r\nHost: payments.service.consul\r\n\r\n", "inventory.service.consul"},
		{"userinfo", "", "GET http://u:p@inventory.service.consul/x HTTP/1.1\r\nHost: payments.service.consul\r\n\r\n", "inventory.service.consul"},
		{"general path", "", "POST http://inventory.service.consul/x HTTP/1.1\r\nHost: payments.service.consul\r\nIdempotency-Key: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n", "inventory.service.consul"},
		{"upstream listener", "inventory", "GET http://inventory:8080/x HTTP/1.1\r\nHost: payments.service.consul\r\n\r\n", "inventory:8080"},
		{"origin-form keeps Host", "inventory", "GET /x HTTP/1.1\r\nHost: payments.service.consul\r\n\r\n", "payments.service.consul"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, tp.p.Addr(tc.listener))
			resp, body, err := c.do(tc.req)
			if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
				t.Fatalf("%v %v %q", err, resp, body)
			}
			if got := inv.lastHost(); got != tc.wantHost {
				t.Errorf("inventory saw Host %q, want %q", got, tc.wantHost)
			}
		})
	}
	if n := len(pay.hosts); n != 0 {
		t.Errorf("payments got %d requests", n)
	}
}

// Issue 12, 2: a head dribbled a byte at a time is cut at HeaderTimeout,
// however often bytes come; a body that stops for BodyTimeout is cut; a
// body that keeps coming is served.
func TestSlowClientsTimeOut(t *testing.T) {
	ok := func(*http.Request) (string, bool) { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false }
	inv := newScripted(t, "inventory", "inv1", ok)
	const head, body = 400 * time.Millisecond, 400 * time.Millisecond
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, HeaderTimeout: head, BodyTimeout: body, IdleTimeout: 20 * time.Second},
		breaker.Config{}, map[string][]*backend{"inventory": {inv.backend()}})
	addr := tp.p.Addr("inventory")
	// dribble sends the pieces every gap and reports when the proxy
	// closed the connection (zero: it never did, within 6 s).
	dribble := func(pieces []string, gap time.Duration, thenWait bool) (time.Duration, string) {
		c := dialRaw(t, addr)
		start := time.Now()
		readDone := make(chan []byte, 1)
		go func() {
			b, _ := io.ReadAll(c.c)
			readDone <- b
		}()
		for _, p := range pieces {
			if _, err := io.WriteString(c.c, p); err != nil {
				break
			}
			select {
			case b := <-readDone:
				return time.Since(start), string(b)
			case <-time.After(gap):
			}
		}
		if !thenWait {
			c.c.(*net.TCPConn).CloseWrite()
		}
		select {
		case b := <-readDone:
			return time.Since(start), string(b)
		case <-time.After(6 * time.Second):
			return 0, ""
		}
	}
	longHead := []string{"GET / HTTP/1.1\r\n"}
	for i := 0; i < 40; i++ {
		longHead = append(longHead, fmt.Sprintf("X-%d: 1\r\n", i))
	}
	longHead10 := append([]string{"GET / HTTP/1.0\r\n"}, longHead[1:]...) // the general path
	for _, tc := range []struct {
		name   string
		pieces []string
		gap    time.Duration
		cut    bool
	}{
		{"head dribbled", longHead, 100 * time.Millisecond, true},
		{"two bytes, then nothing", []string{"GE"}, 0, true},
		{"head dribbled, general path", longHead10, 100 * time.Millisecond, true},
		{"body stops", []string{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"}, 0, true},
		{"large body stops", []string{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\nabc"}, 0, true},
		{"body keeps coming", []string{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", "a", "b", "c"}, 150 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			took, got := dribble(tc.pieces, tc.gap, tc.cut)
			if !tc.cut {
				if !strings.HasPrefix(got, "HTTP/1.1 200") {
					t.Fatalf("answer %q", got)
				}
				return
			}
			if took == 0 {
				t.Fatal("the connection was never closed")
			}
			if strings.Contains(got, " 200 ") {
				t.Fatalf("served: %q", got)
			}
			// the sweep looks once a second while nothing is under way
			if took < head-50*time.Millisecond || took > head+2500*time.Millisecond {
				t.Errorf("closed after %v, want about %v", took, head)
			}
		})
	}
}

// Issue 12, 3: answers the strict parser refuses get a 502, the instance
// connection is closed, and the client connection stays in step (its
// next request is answered by its own answer).
func TestStrictAnswerParser(t *testing.T) {
	bad := map[string]string{
		"/bare-lf":          "HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
		"/bare-lf-header":   "HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok",
		"/space-colon":      "HTTP/1.1 200 OK\r\nContent-Length : 99\r\nContent-Length: 5\r\n\r\nhello",
		"/not-token":        "HTTP/1.1 200 OK\r\nX(y): 1\r\nContent-Length: 2\r\n\r\nok",
		"/gzip-chunked":     "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"/two-te":           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"/control-byte":     "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
		"/control-reason":   "HTTP/1.1 200 O\x02K\r\nContent-Length: 2\r\n\r\nok",
		"/folded":           "HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\nok",
		"/two-lengths":      "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
		"/bare-lf-in-chunk": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
	}
	inv := newScripted(t, "inventory", "inv1", func(req *http.Request) (string, bool) {
		if a, ok := bad[req.URL.Path]; ok {
			return a, true
		}
		return "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood", false
	})
	never := breaker.Config{NoEjection: true, NoFailureRate: true} // many 502s in a row, on purpose
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, TryTimeout: 2 * time.Second}, never,
		map[string][]*backend{"inventory": {inv.backend()}})
	for path := range bad {
		t.Run(path, func(t *testing.T) {
			c := dialRaw(t, tp.p.Addr("inventory"))
			resp, body, err := c.do("GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n")
			if path == "/bare-lf-in-chunk" {
				// the head went out before the body turned bad: the
				// client connection is closed instead, the answer cut
				if err == nil && resp.StatusCode != 502 {
					t.Fatalf("a whole answer reached the client: %v %q", resp, body)
				}
			} else if err != nil || resp.StatusCode != 502 {
				t.Fatalf("want a 502: %v %v %q", err, resp, body)
			}
			select {
			case closed := <-inv.closed:
				if !closed {
					t.Error("the instance connection was not closed")
				}
			case <-time.After(5 * time.Second):
				t.Error("no word from the instance")
			}
			if err != nil || resp.StatusCode != 502 {
				return
			}
			resp, body, err = c.do("GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode != 200 || string(body) != "good" {
				t.Fatalf("the next request on the connection: %v %v %q", err, resp, body)
			}
		})
	}
}

// Issue 12, 4: an answer that ends (or stalls) after its head, before its
// Content-Length body is whole, sent the client nothing yet: a 502 (504)
// and a failed try, on the loops as on the goroutine path.
func TestAnswerCutAfterHeadIsFailedTry(t *testing.T) {
	inv := rawBackend(t, "inventory", "inv1", func(n int, req *http.Request, c net.Conn) {
		switch req.URL.Path {
		case "/cut":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
			c.(*net.TCPConn).CloseWrite()
			time.Sleep(100 * time.Millisecond)
			c.Close()
		case "/stall":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
			time.Sleep(2 * time.Second)
			c.Close()
		default:
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, TryTimeout: 500 * time.Millisecond}, breaker.Config{},
		map[string][]*backend{"inventory": {inv}})
	tm := tp.p.targets["inventory"]
	failures := tp.p.met.tryFailures.WithLabelValues("inventory", "inv1")
	// A cut answer is an error (502); a stalled one timed out and was
	// answered 504, counted with the 5xx answers (issue 20).
	for _, tc := range []struct {
		path   string
		status int
		class  int
	}{{"/cut", 502, classError}, {"/stall", 504, class5xx}} {
		errs := tm.met.classes[tc.class]
		f0, e0 := counterValue(t, failures), counterValue(t, errs)
		c := dialRaw(t, tp.p.Addr("inventory"))
		resp, body, err := c.do("GET " + tc.path + " HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode != tc.status {
			t.Fatalf("%s: want %d: %v %v %q", tc.path, tc.status, err, resp, body)
		}
		if d := counterValue(t, failures) - f0; d != 1 {
			t.Errorf("%s: %v failed tries counted, want 1", tc.path, d)
		}
		if d := counterValue(t, errs) - e0; d != 1 {
			t.Errorf("%s: %v requests counted as %s, want 1", tc.path, d, classNames[tc.class])
		}
		resp, body, err = c.do("GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("%s: the next request: %v %v %q", tc.path, err, resp, body)
		}
	}
}

// The cap on client connections: one more than MaxClientConns gets a 503
// and is closed, counted; a place freed is taken again.
func TestClientConnectionCap(t *testing.T) {
	b := newBackend(t, "inventory", "i1", nil)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, MaxClientConns: 3}, breaker.Config{},
		map[string][]*backend{"inventory": {b}})
	addr := tp.p.Addr("inventory")
	var held []*rawClient
	for i := 0; i < 3; i++ {
		c := dialRaw(t, addr)
		if resp, _, err := c.do("GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode != 200 {
			t.Fatalf("connection %d: %v %v", i, err, resp)
		}
		held = append(held, c)
	}
	refused := tp.p.met.clientsRefused.WithLabelValues("inventory")
	c := dialRaw(t, addr)
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil || resp.StatusCode != 503 || !resp.Close {
		t.Fatalf("over the cap: want a 503 and close: %v %v", err, resp)
	}
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatal(err)
	}
	if _, err := c.br.ReadByte(); err == nil {
		t.Fatal("the refused connection stayed open")
	}
	if v := counterValue(t, refused); v != 1 {
		t.Errorf("refused %v, want 1", v)
	}
	held[0].c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := dialRaw(t, addr)
		resp, _, err := c.do("GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
		if err == nil && resp.StatusCode == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the freed place was not taken again: %v %v", err, resp)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The TLS gateway listener's cap: one more than MaxClientConns is closed
// at once (no handshake; a TLS client cannot read a plain-text 503),
// counted; a place freed is taken again.
func TestTLSClientConnectionCap(t *testing.T) {
	b := newBackend(t, "a", "a1", headerEcho{"a1"})
	rt := &prefixRouter{routes: map[string]string{"/a/": "a"}}
	cfg := Config{MaxClientConns: 2, Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}}}
	tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"a": {b}})
	addr := tp.p.GatewayAddr(0).String()
	get := func() (*tls.Conn, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /a/x HTTP/1.1\r\nHost: gw\r\n\r\n"); err != nil {
			c.Close()
			return nil, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			c.Close()
			return nil, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			c.Close()
			return nil, fmt.Errorf("status %d", resp.StatusCode)
		}
		return c, nil
	}
	var held []*tls.Conn
	for i := range 2 {
		c, err := get()
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		held = append(held, c)
	}
	refused := tp.p.met.clientsRefused.WithLabelValues("gateway-https")
	if c, err := get(); err == nil {
		c.Close()
		t.Fatal("a third connection was served over a cap of 2")
	}
	if v := counterValue(t, refused); v != 1 {
		t.Errorf("refused %v, want 1", v)
	}
	held[0].Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := get()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the freed place was not taken again: %v", err)
		}
	}
}

// A client that does not read (small socket buffers, pipelined requests
// whose answers fill them) and then reads slowly gets every answer whole
// and in order: the loop's partial write goes on from a goroutine.
func TestSlowReaderPartialWrites(t *testing.T) {
	const size = 14 << 10 // fits the loop's instance buffer: answered from the loop
	inv := rawBackend(t, "inventory", "inv1", func(n int, req *http.Request, c net.Conn) {
		body := bytes.Repeat([]byte(req.URL.Path[1:2]), size)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", size, body)
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}}, breaker.Config{},
		map[string][]*backend{"inventory": {inv}})
	d := net.Dialer{Control: func(network, address string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 2048)
		})
	}}
	c, err := d.Dial("tcp", tp.p.Addr("inventory").String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	letters := "abcdefghijkl"
	var reqs strings.Builder
	for _, l := range letters {
		fmt.Fprintf(&reqs, "GET /%c HTTP/1.1\r\nHost: x\r\n\r\n", l)
	}
	if _, err := io.WriteString(c, reqs.String()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the proxy's writes fill the buffers
	br := bufio.NewReader(slowReader{c})
	for _, l := range letters {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %c: %v", l, err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || !bytes.Equal(body, bytes.Repeat([]byte{byte(l)}, size)) {
			t.Fatalf("answer %c: %v %d, %d bytes", l, err, resp.StatusCode, len(body))
		}
	}
}

// slowReader reads at most 512 bytes at a time, pausing between reads.
type slowReader struct{ r io.Reader }

func (s slowReader) Read(p []byte) (int, error) {
	time.Sleep(time.Millisecond)
	if len(p) > 512 {
		p = p[:512]
	}
	return s.r.Read(p)
}

// Under GODEBUG=asyncpreemptoff=1 the loops wait the plain way and leave
// GOMAXPROCS alone (the loops read GODEBUG when they start).
func TestAsyncPreemptOffPlainWait(t *testing.T) {
	if runtime.GOOS != "linux" || *noLoop {
		t.Skip("event loops only")
	}
	t.Setenv("GODEBUG", os.Getenv("GODEBUG")+",asyncpreemptoff=1")
	before := runtime.GOMAXPROCS(0)
	b := newBackend(t, "inventory", "i1", nil)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, EventLoops: 1}, breaker.Config{},
		map[string][]*backend{"inventory": {b}})
	if got := runtime.GOMAXPROCS(0); got != before {
		t.Errorf("GOMAXPROCS %d while serving, want %d", got, before)
	}
	c := dialRaw(t, tp.p.Addr("inventory"))
	for i := 0; i < 20; i++ {
		if resp, _, err := c.do("GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%v %v", err, resp)
		}
	}
}

// cpuCgroup makes a cgroup limited to cpus processors (v2 cpu.max, or the
// v1 cpu controller) and returns its directory; the test is skipped where
// it cannot (not root, no writable cgroup file system).
func cpuCgroup(t *testing.T, cpus int) (dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("making a cgroup needs root")
	}
	var setLimit func(cpus int) error
	name := fmt.Sprintf("attache-test-%d", os.Getpid())
	if ctl, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && strings.Contains(string(ctl), "cpu") {
		dir = "/sys/fs/cgroup/" + name
		setLimit = func(n int) error {
			return os.WriteFile(dir+"/cpu.max", []byte(fmt.Sprintf("%d 100000", n*100000)), 0o644)
		}
	} else if _, err := os.Stat("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"); err == nil {
		dir = "/sys/fs/cgroup/cpu/" + name
		setLimit = func(n int) error {
			if err := os.WriteFile(dir+"/cpu.cfs_period_us", []byte("100000"), 0o644); err != nil {
				return err
			}
			return os.WriteFile(dir+"/cpu.cfs_quota_us", []byte(fmt.Sprint(n*100000)), 0o644)
		}
	} else {
		t.Skip("no cgroup file system with the cpu controller")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("cannot make a cgroup: %v", err)
	}
	t.Cleanup(func() {
		for i := 0; i < 50 && os.Remove(dir) != nil; i++ {
			time.Sleep(20 * time.Millisecond) // the child's exit is seen a little later
		}
	})
	if err := setLimit(cpus); err != nil {
		t.Skipf("cannot limit the cgroup's CPU: %v", err)
	}
	return dir
}

// Issue 12, 5: in a container limited to N processors, GOMAXPROCS never
// passes N because of the loops, and has the runtime's default back once
// they stop. The test runs itself again inside a cgroup it makes.
func TestGOMAXPROCSWithinCPULimit(t *testing.T) {
	if runtime.GOOS != "linux" || *noLoop {
		t.Skip("event loops only")
	}
	if os.Getenv("ATTACHE_CPU_CHILD") != "" {
		t.Skip("in the child")
	}
	if runtime.NumCPU() < 2 {
		t.Skip("needs 2 processors")
	}
	for _, cpus := range []int{1, runtime.NumCPU() + 1} {
		t.Run(fmt.Sprintf("%d cpus", cpus), func(t *testing.T) {
			dir := cpuCgroup(t, cpus)
			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			cmd := execInCgroup(dir, exe, "-test.run=^TestGOMAXPROCSChild$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), fmt.Sprintf("ATTACHE_CPU_CHILD=%d", cpus))
			out, err := cmd.CombinedOutput()
			t.Logf("child:\n%s", out)
			if cmd.ProcessState != nil && cmd.ProcessState.ExitCode() == 97 {
				t.Skip("cannot move a process into the cgroup")
			}
			if err != nil {
				t.Fatalf("child: %v", err)
			}
			if !bytes.Contains(out, []byte("--- PASS: TestGOMAXPROCSChild")) {
				t.Fatal("the child did not run")
			}
		})
	}
}

// TestGOMAXPROCSChild is TestGOMAXPROCSWithinCPULimit's child, in the
// cgroup limited to ATTACHE_CPU_CHILD processors.
func TestGOMAXPROCSChild(t *testing.T) {
	var cpus int
	if _, err := fmt.Sscan(os.Getenv("ATTACHE_CPU_CHILD"), &cpus); err != nil {
		t.Skip("run by TestGOMAXPROCSWithinCPULimit")
	}
	limit := evloop.CPULimit()
	if limit != cpus {
		t.Fatalf("cgroup CPU limit read as %d, want %d", limit, cpus)
	}
	def := runtime.GOMAXPROCS(0) // the runtime's default in this cgroup
	t.Logf("limit %d, NumCPU %d, default GOMAXPROCS %d", limit, runtime.NumCPU(), def)
	b := newBackend(t, "inventory", "i1", nil)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}, EventLoops: 1}, breaker.Config{},
		map[string][]*backend{"inventory": {b}})
	during := runtime.GOMAXPROCS(0)
	t.Logf("GOMAXPROCS while serving: %d", during)
	if during > max(limit, def) {
		t.Errorf("GOMAXPROCS %d above the limit %d (the runtime's own default: %d)", during, limit, def)
	}
	if want := def + 1; def+1 <= limit && during != want {
		t.Errorf("GOMAXPROCS %d while serving, want %d (room under the limit for the loop)", during, want)
	}
	throttledLoops := throttledDuring(t, tp)
	tp.cancel()
	<-tp.stopped
	if got := runtime.GOMAXPROCS(0); got != def {
		t.Errorf("GOMAXPROCS %d after the loops stopped, want the default %d", got, def)
	}
	if during != def && !evloop.DefaultWasRuntimes() {
		t.Error("the default was not seen as the runtime's")
	}
	// The same load with a goroutine per connection, for the log: how
	// long the cgroup was throttled (a measurement, not a verdict).
	tp = startProxy(t, Config{Upstreams: []Upstream{upstream("inventory")}}, breaker.Config{},
		map[string][]*backend{"inventory": {b}}, Engines{NoEventLoops: true})
	throttledGoroutines := throttledDuring(t, tp)
	t.Logf("throttled during 2000 requests: %v with the loops, %v with goroutines", throttledLoops, throttledGoroutines)
}

// throttledDuring sends 2000 requests through tp on 8 connections and
// returns how long the process's cgroup was throttled meanwhile (-1 where
// the cgroup does not say).
func throttledDuring(t *testing.T, tp *testProxy) time.Duration {
	before := cgroupThrottled()
	var wg sync.WaitGroup
	for k := 0; k < 8; k++ {
		c := dialRaw(t, tp.p.Addr("inventory"))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 250; i++ {
				if resp, _, err := c.do("GET /items/1 HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode != 200 {
					t.Errorf("%v %v", err, resp)
					return
				}
			}
		}()
	}
	wg.Wait()
	after := cgroupThrottled()
	if before < 0 || after < 0 {
		return -1
	}
	return after - before
}

// cgroupThrottled is the time the process's cgroup has been throttled
// (cpu.stat: v2 throttled_usec, v1 throttled_time in ns); -1 if unknown.
func cgroupThrottled() time.Duration {
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(cg), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		var file string
		switch {
		case parts[0] == "0" && parts[1] == "":
			file = "/sys/fs/cgroup" + parts[2] + "/cpu.stat"
		case slices.Contains(strings.Split(parts[1], ","), "cpu"):
			file = "/sys/fs/cgroup/" + parts[1] + parts[2] + "/cpu.stat"
		default:
			continue
		}
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			var v int64
			if _, err := fmt.Sscanf(l, "throttled_usec %d", &v); err == nil {
				return time.Duration(v) * time.Microsecond
			}
			if _, err := fmt.Sscanf(l, "throttled_time %d", &v); err == nil {
				return time.Duration(v)
			}
		}
	}
	return -1
}

// execInCgroup runs exe in the cgroup dir from its first instruction (the
// runtime reads its cgroup when it starts).
func execInCgroup(dir, exe string, args ...string) *exec.Cmd {
	return exec.Command("/bin/sh", append([]string{"-c", `echo $$ > "$0/cgroup.procs" || exit 97; exec "$@"`, dir, exe}, args...)...)
}
