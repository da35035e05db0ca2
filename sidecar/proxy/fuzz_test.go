package proxy

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/valyala/fasthttp"
)

// FuzzHandleRequest feeds raw bytes, as a client would send them, to the
// HTTP proxy listener's handler (service from the host) in front of a real
// backend. Whatever comes in, the proxy must not panic and must answer with
// a well-formed response or close the connection.
func FuzzHandleRequest(f *testing.F) {
	for _, s := range []string{
		"GET http://inventory.service.consul/items/1 HTTP/1.1\r\nHost: inventory.service.consul\r\n\r\n",
		"GET /items/1 HTTP/1.1\r\nHost: inventory\r\nConnection: keep-alive, X-Foo\r\nX-Foo: 1\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nContent-Length: 5\r\nIdempotency-Key: k\r\n\r\nhello",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"GET /ws HTTP/1.1\r\nHost: inventory\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
		"CONNECT inventory:443 HTTP/1.1\r\nHost: inventory:443\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: nosuch.service.consul\r\n\r\n",
		"GET / HTTP/1.0\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	b := newBackend(f, "inventory", "i1", nil)
	src := &viewSource{v: catalog.NewView()}
	snap := &catalog.Snapshot{Services: map[string]*catalog.Service{
		"inventory": {Name: "inventory", Instances: []catalog.Instance{b.inst}},
	}, Known: map[string]bool{"inventory": true}}
	src.v.Publish(snap)
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	p, err := New(Config{TryTimeout: time.Second, WantTimeout: time.Millisecond}, src, br)
	if err != nil {
		f.Fatal(err)
	}
	srv := &fasthttp.Server{
		Handler:            func(c *fasthttp.RequestCtx) { p.handleFast(c, nil) },
		StreamRequestBody:  true,
		MaxRequestBodySize: p.cfg.MaxReplayBody,
		ReadTimeout:        2 * time.Second,
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c := &fuzzConn{in: bytes.NewReader(in)}
		serveFuzzConn(t, c, func() { _ = srv.ServeConn(c) })
	})
}

// serveFuzzConn runs serve (which handles c until its input ends) and
// checks that it returns and that whatever HTTP answer it wrote is sane.
func serveFuzzConn(t *testing.T, c *fuzzConn, serve func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		serve()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection handler did not return after the input ended")
	}
	c.mu.Lock()
	out := append([]byte(nil), c.out.Bytes()...)
	c.mu.Unlock()
	if len(out) == 0 {
		return
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(out)), nil)
	if err != nil {
		return // a tunnelled answer, or an error fasthttp wrote itself
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode < 100 || resp.StatusCode > 599 {
		t.Fatalf("status %d", resp.StatusCode)
	}
}

// fuzzConn is a connection whose client sends in and then closes its side;
// what the server writes is kept in out.
type fuzzConn struct {
	in  *bytes.Reader
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *fuzzConn) Read(p []byte) (int, error) { return c.in.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *fuzzConn) Close() error        { return nil }
func (c *fuzzConn) LocalAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 15001} }
func (c *fuzzConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (c *fuzzConn) SetDeadline(t time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(t time.Time) error { return nil }

// FuzzListener sends raw bytes over a real TCP connection to a running HTTP
// proxy listener (the event loops, or with -noloop the goroutine path),
// then closes its side. The proxy must answer with well-formed HTTP or
// close the connection, within the request timeout, and keep serving.
func FuzzListener(f *testing.F) {
	for _, s := range []string{
		"GET /items/1 HTTP/1.1\r\nHost: inventory\r\n\r\nGET /items/2 HTTP/1.1\r\nHost: inventory\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nContent-Length: 5\r\n\r\nhello",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: nosuch.service.consul\r\n\r\n",
		"GET / HTTP/1.0\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"HEAD /items/1 HTTP/1.1\r\nHost: inventory.service.consul\r\nConnection: close\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	b := newBackend(f, "inventory", "i1", nil)
	src := &viewSource{v: catalog.NewView()}
	publish(src, map[string][]*backend{"inventory": {b}})
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	p, err := New(Config{HTTPProxyAddr: "127.0.0.1:0", TryTimeout: time.Second, RequestTimeout: 2 * time.Second,
		WantTimeout: time.Millisecond, IdleTimeout: 3 * time.Second}, src, br, WithEngines(testEngines()))
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	f.Cleanup(func() {
		cancel()
		<-done
	})
	<-p.Ready()
	addr := p.Addr("").String()
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzListener(t, addr, in, "GET /items/1 HTTP/1.1\r\nHost: inventory\r\n\r\n")
	})
}

// fuzzListener sends in on one connection to a listener at addr (half-closing
// after it), checks that whatever came back parses as answers with a
// valid status, then that a plain request next on a new connection still
// gets a 200.
func fuzzListener(t *testing.T, addr string, in []byte, next string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(in); err != nil {
		return // the listener closed on what it read so far
	}
	_ = c.(*net.TCPConn).CloseWrite()
	out, err := io.ReadAll(c)
	if err != nil && !isReset(err) {
		t.Fatalf("reading the answers: %v (the listener neither answered nor closed)", err)
	}
	if len(out) > 0 {
		if resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(out)), nil); err == nil {
			io.Copy(io.Discard, resp.Body)
			if resp.StatusCode < 100 || resp.StatusCode > 599 {
				t.Fatalf("status %d", resp.StatusCode)
			}
		}
	}
	c2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_ = c2.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c2, next)
	resp, err := http.ReadResponse(bufio.NewReader(c2), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a plain request after the input: %v %v", err, resp)
	}
}

// FuzzRawConn feeds raw bytes, as a client would send them, to the fast
// path's connection handler in front of a real backend: no panic, and the
// output is empty or starts with a well-formed response.
func FuzzRawConn(f *testing.F) {
	for _, s := range []string{
		"GET /items/1 HTTP/1.1\r\nHost: inventory\r\n\r\nGET /items/2 HTTP/1.1\r\nHost: inventory.service.consul\r\nConnection: close\r\n\r\n",
		"GET http://inventory.service.consul/items/1 HTTP/1.1\r\nHost: inventory.service.consul\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nContent-Length: 5\r\n\r\nhello",
		"POST /x HTTP/1.1\r\nHost: inventory\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"HEAD / HTTP/1.1\r\nHost: nosuch\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	b := newBackend(f, "inventory", "i1", nil)
	src := &viewSource{v: catalog.NewView()}
	src.v.Publish(&catalog.Snapshot{Services: map[string]*catalog.Service{
		"inventory": {Name: "inventory", Instances: []catalog.Instance{b.inst}},
	}, Known: map[string]bool{"inventory": true}})
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	p, err := New(Config{TryTimeout: time.Second, WantTimeout: time.Millisecond}, src, br)
	if err != nil {
		f.Fatal(err)
	}
	fs := &fasthttp.Server{
		Handler:            func(c *fasthttp.RequestCtx) { p.handleFast(c, nil) },
		StreamRequestBody:  true,
		MaxRequestBodySize: p.cfg.MaxReplayBody,
		ReadTimeout:        2 * time.Second,
	}
	s := newRawServer(context.Background(), p, nil, fs)
	f.Fuzz(func(t *testing.T, in []byte) {
		c := &fuzzConn{in: bytes.NewReader(in)}
		rc := &rawConn{s: s, c: c}
		s.mu.Lock()
		s.conns[rc] = struct{}{} // as start does
		s.mu.Unlock()
		serveFuzzConn(t, c, rc.run)
	})
}
