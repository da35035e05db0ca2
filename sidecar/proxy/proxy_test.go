package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/demo"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
)

// viewSource is a catalog source over a View that tests publish hand-built
// snapshots into; the instances point at real local backends.
type viewSource struct {
	v     *catalog.View
	wants atomic.Int64
}

func (s *viewSource) Load() *catalog.Snapshot { return s.v.Load() }
func (s *viewSource) Want(ctx context.Context, service string) *catalog.Snapshot {
	s.wants.Add(1)
	return s.v.Load()
}

type backend struct {
	id   string
	demo *demo.Server
	srv  *httptest.Server
	inst catalog.Instance
}

func newBackend(t testing.TB, service, id string, h http.Handler) *backend {
	t.Helper()
	b := &backend{id: id}
	if h == nil {
		b.demo = demo.New(service, id)
		h = b.demo
	}
	b.srv = httptest.NewServer(h)
	t.Cleanup(b.srv.Close)
	u, _ := url.Parse(b.srv.URL)
	port, _ := strconv.Atoi(u.Port())
	b.inst = catalog.Instance{ID: id, Service: service, Node: "node-" + id, Address: u.Hostname(), Port: port, Weight: 1, Status: "passing"}
	return b
}

func publish(src *viewSource, services map[string][]*backend) {
	snap := &catalog.Snapshot{Services: map[string]*catalog.Service{}, Nodes: map[string]*catalog.Node{}, Known: map[string]bool{}}
	for name, bs := range services {
		svc := &catalog.Service{Name: name}
		for _, b := range bs {
			svc.Instances = append(svc.Instances, b.inst)
		}
		snap.Services[name] = svc
		snap.Known[name] = true
	}
	src.v.Publish(snap)
}

type testProxy struct {
	cancel  context.CancelFunc // stops the proxy (as its cleanup does)
	stopped chan struct{}      // closed when Run has returned
	p       *Proxy
	br      *breaker.Registry
	src     *viewSource
}

func (tp *testProxy) url(service, path string) string {
	return "http://" + tp.p.Addr(service).String() + path
}

// -noloop runs every test with the goroutine fast path instead of the event
// loops (scripts/test runs the package both ways).
var noLoop = flag.Bool("noloop", false, "serve with a goroutine per connection, not event loops")

// testEngines is the engine choice a test asks for (none: the default),
// with -noloop's on top.
func testEngines(eng ...Engines) Engines {
	var e Engines
	if len(eng) > 0 {
		e = eng[0]
	}
	e.NoEventLoops = e.NoEventLoops || *noLoop
	return e
}

func startProxy(t *testing.T, cfg Config, bcfg breaker.Config, services map[string][]*backend, eng ...Engines) *testProxy {
	t.Helper()
	e := testEngines(eng...)
	if cfg.EventLoops == 0 {
		cfg.EventLoops = 2 // what passes between loops is tested on any machine
	}
	src := &viewSource{v: catalog.NewView()}
	publish(src, services)
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{t}})
	br, err := breaker.New(bcfg, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	cfg.Logger = log
	cfg.Registerer = prometheus.NewRegistry()
	p, err := New(cfg, src, br, WithEngines(e))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stopped := make(chan struct{})
	go func() {
		err := p.Run(ctx)
		close(stopped)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	select {
	case <-p.Ready():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	}
	return &testProxy{p: p, br: br, src: src, cancel: cancel, stopped: stopped}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func get(t *testing.T, c *http.Client, u string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

func upstream(name string) Upstream {
	return Upstream{Name: name, Addr: "127.0.0.1:0", Protocol: ProtoHTTP}
}

func newClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
}

func TestForwardHeaders(t *testing.T) {
	var got http.Header
	var mu sync.Mutex
	b := newBackend(t, "echo", "e1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = r.Header.Clone()
		mu.Unlock()
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "must go")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Kept", "yes")
		fmt.Fprintf(w, "%s %s", r.Method, r.URL.RequestURI())
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("echo")}}, breaker.Config{}, map[string][]*backend{"echo": {b}})
	req, _ := http.NewRequest("GET", tp.url("echo", "/a/b?c=d%20e"), nil)
	req.Header.Set("Connection", "X-Private")
	req.Header.Set("X-Private", "secret")
	req.Header.Set("Proxy-Authorization", "Basic x")
	req.Header.Set("X-Forwarded-For", "10.0.0.1")
	req.Header.Set("X-App", "kept")
	resp, err := newClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "GET /a/b?c=d%20e" {
		t.Fatalf("body %q", body)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, k := range []string{"X-Private", "Proxy-Authorization"} {
		if got.Get(k) != "" {
			t.Errorf("hop-by-hop header %s forwarded", k)
		}
	}
	if got.Get("X-App") != "kept" {
		t.Error("end-to-end header dropped")
	}
	if xff := got.Get("X-Forwarded-For"); xff != "10.0.0.1, 127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q", xff)
	}
	if got.Get("X-Forwarded-Proto") != "http" {
		t.Errorf("X-Forwarded-Proto = %q", got.Get("X-Forwarded-Proto"))
	}
	if resp.Header.Get("X-Hop") != "" || resp.Header.Get("Keep-Alive") != "" || resp.Header.Get("X-Kept") != "yes" {
		t.Errorf("response headers %v", resp.Header)
	}
}

func TestHTTPProxyHostForms(t *testing.T) {
	b := newBackend(t, "inventory", "i1", nil)
	tp := startProxy(t, Config{HTTPProxyAddr: "127.0.0.1:0"}, breaker.Config{},
		map[string][]*backend{"inventory": {b}, "empty": {}})
	proxyURL, _ := url.Parse("http://" + tp.p.Addr("").String())
	viaProxy := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}}

	// absolute-form, as apps with HTTP_PROXY send it
	for _, u := range []string{"http://inventory.service.consul/items/1", "http://inventory/items/1", "http://INVENTORY.service.dc1.consul:8080/items/1"} {
		code, _, body := get(t, viaProxy, u)
		var r demo.Response
		if err := json.Unmarshal(body, &r); err != nil || code != 200 || r.Instance != "i1" || r.Path != "/items/1" {
			t.Fatalf("%s: %d %s", u, code, body)
		}
	}
	// origin-form with a Host header
	req, _ := http.NewRequest("GET", "http://"+tp.p.Addr("").String()+"/items/2", nil)
	req.Host = "inventory.service.consul"
	resp, err := newClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("origin-form: %d", resp.StatusCode)
	}
	tests := []struct {
		url, want string
		code      int
	}{
		{"http://example.org/", "not a Consul service", 404},
		{"http://nosuch.service.consul/", "not in the catalog", 503},
		{"http://empty.service.consul/", "no healthy instance", 503},
	}
	for _, tc := range tests {
		code, _, body := get(t, viaProxy, tc.url)
		if code != tc.code || !bytes.Contains(body, []byte(tc.want)) {
			t.Errorf("%s: %d %s", tc.url, code, body)
		}
	}
	if tp.src.wants.Load() == 0 {
		t.Error("unknown service was never asked for with Want")
	}
}

func TestOutlierEjectionAndProbe(t *testing.T) {
	good := newBackend(t, "inventory", "good", nil)
	bad := newBackend(t, "inventory", "bad", nil)
	bad.demo.SetFault(demo.ModeFail, 0)
	tp := startProxy(t, Config{Upstreams: []Upstream{{Name: "inventory", Addr: "127.0.0.1:0", Balancer: RoundRobin}}, NoRetries: true},
		breaker.Config{BaseEjectionTime: 400 * time.Millisecond, Disabled: true},
		map[string][]*backend{"inventory": {good, bad}})
	c := newClient()
	for i := 0; i < 40; i++ {
		get(t, c, tp.url("inventory", "/x"))
	}
	if n := bad.demo.Count(); n > 5 {
		t.Fatalf("failing instance got %d requests, want at most 5 before ejection", n)
	}
	if !tp.br.Ejected("inventory", "bad") {
		t.Fatal("failing instance not ejected")
	}
	before := bad.demo.Count()
	time.Sleep(500 * time.Millisecond) // ejection time over: the next request is the probe
	for i := 0; i < 20; i++ {
		get(t, c, tp.url("inventory", "/x"))
	}
	if n := bad.demo.Count() - before; n != 1 {
		t.Fatalf("failing instance got %d requests after its ejection time, want exactly 1 probe", n)
	}
	st := tp.br.State()
	if len(st) != 1 || len(st[0].Instances) != 2 || st[0].Instances[0].ID != "bad" || st[0].Instances[0].TimesEjected != 2 {
		t.Fatalf("state %+v", st)
	}
	// It recovers: after its (longer) ejection, the probe succeeds.
	bad.demo.SetFault(demo.ModeOK, 0)
	time.Sleep(900 * time.Millisecond)
	for i := 0; i < 10; i++ {
		get(t, c, tp.url("inventory", "/x"))
	}
	if tp.br.Ejected("inventory", "bad") || bad.demo.Count()-before < 3 {
		t.Fatalf("instance did not come back after a good probe (%d requests)", bad.demo.Count()-before)
	}
}

func TestKillOneUnderLoad(t *testing.T) {
	a := newBackend(t, "users", "a", nil)
	b := newBackend(t, "users", "b", nil)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("users")}}, breaker.Config{},
		map[string][]*backend{"users": {a, b}})
	c := newClient()
	const total, workers = 3000, 4
	var ok, failed atomic.Int64
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > total {
					return
				}
				if i == total/3 {
					b.srv.CloseClientConnections()
					b.srv.Listener.Close()
					b.srv.CloseClientConnections()
				}
				resp, err := c.Get(tp.url("users", "/u"))
				if err != nil {
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				} else {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	rate := float64(ok.Load()) / total
	t.Logf("ok %d failed %d (%.3f%%)", ok.Load(), failed.Load(), 100*rate)
	if rate < 0.999 {
		t.Fatalf("success rate %.4f < 0.999", rate)
	}
	if !tp.br.Ejected("users", "b") {
		t.Error("killed instance not ejected")
	}
}

func TestHungInstance(t *testing.T) {
	good := newBackend(t, "slowpoke", "good", nil)
	hung := newBackend(t, "slowpoke", "hung", nil)
	hung.demo.SetFault(demo.ModeHang, 0)
	tp := startProxy(t, Config{Upstreams: []Upstream{{Name: "slowpoke", Addr: "127.0.0.1:0", Balancer: RoundRobin}},
		TryTimeout: 200 * time.Millisecond, RequestTimeout: 3 * time.Second}, breaker.Config{},
		map[string][]*backend{"slowpoke": {good, hung}})
	c := newClient()
	for i := 0; i < 6; i++ {
		start := time.Now()
		code, _, body := get(t, c, tp.url("slowpoke", "/x"))
		var r demo.Response
		json.Unmarshal(body, &r)
		if code != 200 || r.Instance != "good" {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
		// bounded by one per-try timeout plus backoff, far below the request timeout
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("request %d took %s", i, d)
		}
	}
	if hung.demo.Count() == 0 {
		t.Fatal("hung instance never tried: test proves nothing")
	}
}

func TestBreakerOpensAndRecovers(t *testing.T) {
	a := newBackend(t, "orders", "a", nil)
	b := newBackend(t, "orders", "b", nil)
	a.demo.SetFault(demo.ModeFail, 0)
	b.demo.SetFault(demo.ModeFail, 0)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("orders")}},
		breaker.Config{NoEjection: true, MinimumCalls: 10, OpenDuration: 600 * time.Millisecond, HalfOpenCalls: 2},
		map[string][]*backend{"orders": {a, b}})
	c := newClient()
	for i := 0; i < 10; i++ {
		get(t, c, tp.url("orders", "/o"))
	}
	code, h, body := get(t, c, tp.url("orders", "/o"))
	var m map[string]any
	json.Unmarshal(body, &m)
	if code != 503 || h.Get("Retry-After") == "" || h.Get("X-Attache-Breaker") != "open" ||
		m["service"] != "orders" || m["state"] != "open" {
		t.Fatalf("open breaker answer: %d %v %s", code, h, body)
	}
	seen := a.demo.Count() + b.demo.Count()
	for i := 0; i < 20; i++ {
		get(t, c, tp.url("orders", "/o"))
	}
	if n := a.demo.Count() + b.demo.Count(); n != seen {
		t.Fatalf("%d requests reached the service while its breaker was open", n-seen)
	}
	a.demo.SetFault(demo.ModeOK, 0)
	b.demo.SetFault(demo.ModeOK, 0)
	time.Sleep(700 * time.Millisecond)
	for i := 0; i < 5; i++ {
		if code, _, body := get(t, c, tp.url("orders", "/o")); code != 200 {
			t.Fatalf("after recovery: %d %s", code, body)
		}
	}
	if st := tp.br.Service("orders").State(); st != breaker.Closed {
		t.Fatalf("breaker %s after recovery", st)
	}
}

func TestFallbacks(t *testing.T) {
	spare := newBackend(t, "spare", "s1", nil)
	tp := startProxy(t, Config{
		Upstreams: []Upstream{upstream("static"), upstream("other"), upstream("none")},
		Fallbacks: map[string]Fallback{
			"static": {Status: 200, Body: `{"items":[]}`},
			"other":  {Service: "spare"},
		}}, breaker.Config{},
		map[string][]*backend{"static": {}, "other": {}, "none": {}, "spare": {spare}})
	c := newClient()
	code, h, body := get(t, c, tp.url("static", "/"))
	if code != 200 || string(body) != `{"items":[]}` || h.Get("X-Attache-Fallback") != "no-healthy" {
		t.Fatalf("static fallback: %d %v %s", code, h, body)
	}
	code, h, body = get(t, c, tp.url("other", "/p"))
	var r demo.Response
	json.Unmarshal(body, &r)
	if code != 200 || r.Service != "spare" || h.Get("X-Attache-Fallback") != "no-healthy" || h.Get("X-Attache-Fallback-Service") != "spare" {
		t.Fatalf("service fallback: %d %v %s", code, h, body)
	}
	code, _, body = get(t, c, tp.url("none", "/"))
	if code != 503 || !bytes.Contains(body, []byte(`"no healthy instance"`)) || !bytes.Contains(body, []byte(`"none"`)) {
		t.Fatalf("no instance: %d %s", code, body)
	}
}

func TestRetryRules(t *testing.T) {
	var aN, bN atomic.Int64
	h := func(n *atomic.Int64, status int) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n.Add(1)
			io.Copy(io.Discard, r.Body)
			w.WriteHeader(status)
		})
	}
	a := newBackend(t, "pay", "a", h(&aN, 503))
	b := newBackend(t, "pay", "b", h(&bN, 503))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("pay")}, MaxRetries: 1, MinRetries: 5},
		breaker.Config{Disabled: true, NoEjection: true},
		map[string][]*backend{"pay": {a, b}})
	c := newClient()
	post := func(key string) {
		req, _ := http.NewRequest("POST", tp.url("pay", "/charge"), strings.NewReader(`{"amount":1}`))
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for i := 0; i < 20; i++ {
		post("")
	}
	if n := aN.Load() + bN.Load(); n != 20 {
		t.Fatalf("20 POSTs without Idempotency-Key reached instances %d times: retried", n)
	}
	aN.Store(0)
	bN.Store(0)
	post("k1")
	if aN.Load() != 1 || bN.Load() != 1 {
		t.Fatalf("POST with Idempotency-Key: a=%d b=%d, want one try on each instance", aN.Load(), bN.Load())
	}
	// Full outage: the budget holds retries to 20% of requests (+ floor of
	// 5); the 21 POSTs above count as requests in the same window.
	aN.Store(0)
	bN.Store(0)
	const n = 200
	for i := 0; i < n; i++ {
		get(t, c, tp.url("pay", "/x"))
	}
	tries := aN.Load() + bN.Load()
	t.Logf("%d requests, %d tries", n, tries)
	if tries > n+(n+21)/5+5 {
		t.Fatalf("%d tries for %d requests: retry budget exceeded", tries, n)
	}
	if tries <= n {
		t.Fatal("no retries at all")
	}
}

func TestStreamingAndLargeBodies(t *testing.T) {
	release := make(chan struct{})
	var gotLen atomic.Int64
	b := newBackend(t, "stream", "s1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			n, _ := io.Copy(io.Discard, r.Body)
			gotLen.Store(n)
			fmt.Fprint(w, n)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "first\n")
		w.(http.Flusher).Flush()
		<-release
		fmt.Fprint(w, "second\n")
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("stream")}, MaxReplayBody: 1024}, breaker.Config{},
		map[string][]*backend{"stream": {b}})
	resp, err := newClient().Get(tp.url("stream", "/events"))
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	line, err := br.ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first chunk %q %v", line, err)
	}
	close(release) // only now does the backend finish: the first chunk was streamed
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	if string(rest) != "second\n" {
		t.Fatalf("rest %q", rest)
	}
	for _, chunked := range []bool{false, true} {
		body := bytes.Repeat([]byte("x"), 1<<20)
		var r io.Reader = bytes.NewReader(body)
		if chunked {
			r = io.MultiReader(r) // hides the length: sent chunked
		}
		resp, err := newClient().Post(tp.url("stream", "/upload"), "application/octet-stream", r)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(out) != strconv.Itoa(1<<20) || gotLen.Load() != 1<<20 {
			t.Fatalf("chunked=%v: large body: %d %s", chunked, resp.StatusCode, out)
		}
	}
}

func TestWebSocketUpgrade(t *testing.T) {
	b := newBackend(t, "ws", "w1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want upgrade", 400)
			return
		}
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(conn, rw) // echo
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("ws")}}, breaker.Config{}, map[string][]*backend{"ws": {b}})
	conn, err := net.Dial("tcp", tp.p.Addr("ws").String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprint(conn, "GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	for _, msg := range []string{"hello", "world"} {
		fmt.Fprint(conn, msg)
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo %q: %q %v", msg, buf, err)
		}
	}
}

func TestH2C(t *testing.T) {
	b := newBackend(t, "grpcish", "g1", nil)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("grpcish")}}, breaker.Config{}, map[string][]*backend{"grpcish": {b}})
	tr := &http.Transport{TLSClientConfig: &tls.Config{}}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get(tp.url("grpcish", "/h2"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var r demo.Response
	json.Unmarshal(body, &r)
	if resp.ProtoMajor != 2 || resp.StatusCode != 200 || r.Path != "/h2" {
		t.Fatalf("h2c: proto %s code %d body %s", resp.Proto, resp.StatusCode, body)
	}
}

func TestTCPUpstream(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	// A dead instance first: connects fail over to the live one.
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	live := &backend{inst: catalog.Instance{ID: "live", Address: "127.0.0.1", Port: port, Weight: 1}}
	gone := &backend{inst: catalog.Instance{ID: "gone", Address: "127.0.0.1", Port: deadPort, Weight: 1}}
	tp := startProxy(t, Config{Upstreams: []Upstream{{Name: "echo", Addr: "127.0.0.1:0", Protocol: ProtoTCP}}}, breaker.Config{},
		map[string][]*backend{"echo": {gone, live}})
	for i := 0; i < 4; i++ {
		c, err := net.Dial("tcp", tp.p.Addr("echo").String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(c, "ping")
		c.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(c)
		c.Close()
		if string(got) != "ping" {
			t.Fatalf("tcp echo %q", got)
		}
	}
	// Every instance down: the client's connection is closed, not held.
	ln.Close()
	c, err := net.Dial("tcp", tp.p.Addr("echo").String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || os.IsTimeout(err) {
		t.Fatalf("with no instance up: read %d, %v; want the connection closed", n, err)
	}
}

func TestRunAddressInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	p, err := New(Config{Upstreams: []Upstream{{Name: "x", Addr: ln.Addr().String()}}}, &viewSource{v: catalog.NewView()}, br)
	if err != nil {
		t.Fatal(err)
	}
	err = p.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Fatalf("Run = %v, want an error naming %s", err, ln.Addr())
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	src := &viewSource{v: catalog.NewView()}
	tests := []struct {
		name string
		cfg  Config
	}{
		{"bad name", Config{Upstreams: []Upstream{{Name: "a b", Addr: "127.0.0.1:1"}}}},
		{"bad addr", Config{Upstreams: []Upstream{{Name: "a", Addr: "nowhere"}}}},
		{"bad proto", Config{Upstreams: []Upstream{{Name: "a", Addr: "127.0.0.1:1", Protocol: "udp"}}}},
		{"same addr", Config{Upstreams: []Upstream{{Name: "a", Addr: "127.0.0.1:1"}, {Name: "b", Addr: "127.0.0.1:1"}}}},
		{"bad proxy addr", Config{HTTPProxyAddr: "15001"}},
		{"bad balancer", Config{Balancer: "fastest"}},
		{"bad fallback", Config{Fallbacks: map[string]Fallback{"a": {Status: 42}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg, src, br); err == nil || !strings.HasPrefix(err.Error(), "proxy: ") {
				t.Fatalf("New = %v", err)
			}
		})
	}
}

func TestResponseFraming(t *testing.T) {
	b := newBackend(t, "frames", "f1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/until-close": // no Content-Length, no chunking: the body ends with the connection
			conn, rw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			rw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
			rw.Flush()
			conn.Close()
		case "/nocontent":
			w.WriteHeader(204)
		case "/head":
			w.Header().Set("Content-Length", "42")
		default:
			fmt.Fprint(w, "plain")
		}
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("frames")}}, breaker.Config{}, map[string][]*backend{"frames": {b}})
	c := newClient()
	for i := 0; i < 2; i++ { // twice: the pooled connection must not be reused after a close-delimited body
		code, _, body := get(t, c, tp.url("frames", "/until-close"))
		if code != 200 || string(body) != "until close" {
			t.Fatalf("until-close: %d %q", code, body)
		}
	}
	if code, _, body := get(t, c, tp.url("frames", "/nocontent")); code != 204 || len(body) != 0 {
		t.Fatalf("204: %d %q", code, body)
	}
	resp, err := c.Head(tp.url("frames", "/head"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ContentLength != 42 {
		t.Fatalf("HEAD: %d length %d", resp.StatusCode, resp.ContentLength)
	}
	if code, _, body := get(t, c, tp.url("frames", "/plain")); code != 200 || string(body) != "plain" {
		t.Fatalf("after HEAD: %d %q", code, body)
	}
}

func TestH2CRetriesAndBreaker(t *testing.T) {
	var bad, good atomic.Int64
	badB := newBackend(t, "h2svc", "bad", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bad.Add(1)
		w.WriteHeader(503)
	}))
	goodB := newBackend(t, "h2svc", "good", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		good.Add(1)
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Sum")
		fmt.Fprintf(w, "%s %d", r.Method, len(b))
		w.Header().Set("X-Sum", "42")
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{{Name: "h2svc", Addr: "127.0.0.1:0", Balancer: RoundRobin}}}, breaker.Config{},
		map[string][]*backend{"h2svc": {badB, goodB}})
	tr := &http.Transport{}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for i := 0; i < 4; i++ {
		req, _ := http.NewRequest("PUT", tp.url("h2svc", "/x"), strings.NewReader("hello"))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != 200 || string(body) != "PUT 5" || resp.Trailer.Get("X-Sum") != "42" {
			t.Fatalf("h2c PUT: %s %d %q trailer %v", resp.Proto, resp.StatusCode, body, resp.Trailer)
		}
	}
	if bad.Load() == 0 {
		t.Fatal("the failing instance was never tried: retry not exercised")
	}
	// A POST without Idempotency-Key over h2c is not retried either.
	bad.Store(0)
	good.Store(0)
	for i := 0; i < 6; i++ {
		resp, err := c.Post(tp.url("h2svc", "/x"), "text/plain", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if n := bad.Load() + good.Load(); n != 6 {
		t.Fatalf("6 POSTs made %d tries", n)
	}
}

func TestShutdownClosesTunnels(t *testing.T) {
	b := newBackend(t, "ws", "w1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(io.Discard, rw)
	}))
	src := &viewSource{v: catalog.NewView()}
	publish(src, map[string][]*backend{"ws": {b}})
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	p, err := New(Config{Upstreams: []Upstream{upstream("ws")}}, src, br)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	<-p.Ready()
	conn, err := net.Dial("tcp", p.Addr("ws").String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET / HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v", err)
	}
	idle, _ := net.Dial("tcp", p.Addr("ws").String()) // a client that never speaks
	defer idle.Close()
	time.Sleep(50 * time.Millisecond)
	stopAt := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("Run did not return with a tunnel and a silent client open")
	}
	t.Logf("Run returned %s after cancel", time.Since(stopAt))
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("tunnel still open after Run returned: %v", err)
	}
}

// An http2 upstream sends h2c requests to its instances over h2c: an
// instance that speaks only h2c (as a gRPC server) answers them.
func TestH2CToH2COnlyInstance(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path)
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetUnencryptedHTTP2(true) // and not HTTP/1
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	inst := &backend{id: "g1", inst: catalog.Instance{ID: "g1", Service: "grpc", Node: "n1", Address: "127.0.0.1",
		Port: ln.Addr().(*net.TCPAddr).Port, Weight: 1, Status: "passing"}}
	tp := startProxy(t, Config{Upstreams: []Upstream{{Name: "grpc", Addr: "127.0.0.1:0", Protocol: ProtoHTTP2}}},
		breaker.Config{}, map[string][]*backend{"grpc": {inst}})
	tr := &http.Transport{}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for i := 0; i < 3; i++ {
		resp, err := c.Get(tp.url("grpc", "/svc.Method"))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 || string(body) != "HTTP/2.0 /svc.Method" {
			t.Fatalf("got %s %d %q; want the instance reached over h2c", resp.Proto, resp.StatusCode, body)
		}
	}
}

// A fallback answers for failed calls too, naming the cause; On limits it
// to the causes given; a service fallback replaces a failed answer.
func TestFallbackCauses(t *testing.T) {
	failing := func(service, id string) *backend {
		b := newBackend(t, service, id, nil)
		b.demo.SetFault(demo.ModeFail, 0)
		return b
	}
	spare := newBackend(t, "spare", "s1", nil)
	tp := startProxy(t, Config{
		Upstreams: []Upstream{upstream("all"), upstream("refused"), upstream("other")},
		Fallbacks: map[string]Fallback{
			"all":     {Body: "Stock status unavailable", ContentType: "text/plain"},
			"refused": {Body: "refused", On: []string{CauseBreakerOpen, CauseMaxRequests}},
			"other":   {Service: "spare"},
		}}, breaker.Config{Disabled: true, NoEjection: true},
		map[string][]*backend{"all": {failing("all", "a1")}, "refused": {failing("refused", "r1")},
			"other": {failing("other", "o1")}, "spare": {spare}})
	c := newClient()
	for _, tc := range []struct {
		service, path string
		code          int
		cause, body   string
	}{
		{"all", "/x", 200, Cause5xx, "Stock status unavailable"},
		{"refused", "/x", 500, "", "fault injected"},
		{"other", "/x", 200, Cause5xx, `"service":"spare"`},
	} {
		for _, method := range []string{"GET", "POST"} { // retried, and not
			req, _ := http.NewRequest(method, tp.url(tc.service, tc.path), nil)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.code || resp.Header.Get("X-Attache-Fallback") != tc.cause || !strings.Contains(string(body), tc.body) {
				t.Errorf("%s %s: %d %q %s", method, tc.service, resp.StatusCode, resp.Header.Get("X-Attache-Fallback"), body)
			}
		}
	}
}

func TestFallbackUnknownCause(t *testing.T) {
	_, err := New(Config{Fallbacks: map[string]Fallback{"a": {On: []string{"sometimes"}}}}, &viewSource{v: catalog.NewView()}, mustBreaker(t))
	if err == nil || !strings.Contains(err.Error(), `unknown cause "sometimes"`) {
		t.Fatalf("err = %v", err)
	}
}

func mustBreaker(t *testing.T) *breaker.Registry {
	br, err := breaker.New(breaker.Config{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return br
}

// TestServicePolicies gives one service settings of its own
// (Config.Policies): "once" is tried once and answers within its own try
// timeout, while "twice" keeps the proxy's retries, through its upstream
// listener and through the HTTP proxy listener alike.
func TestServicePolicies(t *testing.T) {
	var onceN, twiceN atomic.Int64
	h := func(n *atomic.Int64) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n.Add(1)
			if r.URL.Path == "/slow" {
				time.Sleep(2 * time.Second)
			}
			w.WriteHeader(503)
		})
	}
	o1, o2 := newBackend(t, "once", "o1", h(&onceN)), newBackend(t, "once", "o2", h(&onceN))
	t1, t2 := newBackend(t, "twice", "t1", h(&twiceN)), newBackend(t, "twice", "t2", h(&twiceN))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("once"), upstream("twice")}, HTTPProxyAddr: "127.0.0.1:0",
		MaxRetries: 1, MinRetries: 100,
		Policies: map[string]*Policy{"Once": {NoRetries: true, TryTimeout: 300 * time.Millisecond}}},
		breaker.Config{Disabled: true, NoEjection: true},
		map[string][]*backend{"once": {o1, o2}, "twice": {t1, t2}})
	c := newClient()
	viaProxy := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: tp.p.Addr("").String()})}}
	for _, cl := range []struct {
		name string
		get  func(service, path string) int
	}{
		{"upstream listener", func(service, path string) int { code, _, _ := get(t, c, tp.url(service, path)); return code }},
		{"http proxy", func(service, path string) int {
			resp, err := viaProxy.Get("http://" + service + ".service.consul" + path)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}},
	} {
		onceN.Store(0)
		twiceN.Store(0)
		for i := 0; i < 10; i++ {
			cl.get("once", "/x")
			cl.get("twice", "/x")
		}
		if onceN.Load() != 10 || twiceN.Load() != 20 {
			t.Errorf("%s: 10 requests each: once tried %d times (want 10), twice %d (want 20)", cl.name, onceN.Load(), twiceN.Load())
		}
		start := time.Now()
		if code := cl.get("once", "/slow"); code != http.StatusGatewayTimeout {
			t.Errorf("%s: a try slower than the service's try timeout: %d, want 504", cl.name, code)
		}
		if d := time.Since(start); d > 1500*time.Millisecond {
			t.Errorf("%s: the service's 300ms try timeout answered after %v", cl.name, d)
		}
	}
}
