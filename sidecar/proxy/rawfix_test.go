package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
)

// Regression tests for the hand-written HTTP/1.1 path: each one sends the
// exact bytes of a case that once went wrong, through a real proxy, to a
// real loopback backend.

// rawBackend is an instance that reads request heads and answers each with
// whatever answer returns (exact bytes), on raw TCP.
func rawBackend(t *testing.T, service, id string, answer func(n int, req *http.Request, c net.Conn)) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	var count atomic.Int64
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					answer(int(count.Add(1)), req, c)
				}
			}()
		}
	}()
	a := ln.Addr().(*net.TCPAddr)
	return &backend{id: id, inst: catalog.Instance{ID: id, Service: service, Node: "node-" + id,
		Address: "127.0.0.1", Port: a.Port, Weight: 1, Status: "passing"}}
}

// rawClient is one client connection to the proxy.
type rawClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr net.Addr) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawClient{c: c, br: bufio.NewReader(c)}
}

// do sends req and reads one answer with its body; err when there is none.
func (rc *rawClient) do(req string) (*http.Response, []byte, error) {
	if _, err := rc.c.Write([]byte(req)); err != nil {
		return nil, nil, err
	}
	method := req[:strings.IndexByte(req, ' ')]
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: method})
	if err != nil {
		return nil, nil, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, body, err
}

// Bug: the retries running out of instances after 5xx answers returned an
// answer already discarded, and the fast path crashed writing it.
func TestRetriesRunOutKeepLastAnswer(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "down")
	})
	for _, tc := range []struct {
		name      string
		instances int
		slow      bool
	}{
		{"fast path, one instance", 1, false},
		{"fast path, two instances", 2, false},
		{"fasthttp path, one instance", 1, true},
		{"fasthttp path, two instances", 2, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var bs []*backend
			for i := 0; i < tc.instances; i++ {
				bs = append(bs, newBackend(t, "down", string(rune('a'+i)), h))
			}
			tp := startProxy(t, Config{Upstreams: []Upstream{upstream("down")}, DisableHTTP2: true},
				breaker.Config{Disabled: true, NoEjection: true}, map[string][]*backend{"down": bs}, Engines{NoFastPath: tc.slow})
			c := dialRaw(t, tp.p.Addr("down"))
			for i := 0; i < 3; i++ {
				resp, body, err := c.do("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != 503 || string(body) != "down" {
					t.Fatalf("%d %q, want the instance's 503", resp.StatusCode, body)
				}
			}
		})
	}
}

// Bug: a request naming Content-Length in Connection lost its framing
// header while its body was still sent: a second, smuggled request.
func TestConnectionNamingContentLength(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	b := newBackend(t, "svc", "s1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, r.Method+" "+r.URL.Path+" "+string(body))
		mu.Unlock()
		io.WriteString(w, "ok")
	}))
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	smuggled := "GET /admin HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
	for _, conn := range []string{"Content-Length, close", "Content-Length", "Host, Transfer-Encoding"} {
		mu.Lock()
		seen = nil
		mu.Unlock()
		c := dialRaw(t, tp.p.Addr("svc"))
		req := "POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: " + strconv.Itoa(len(smuggled)) +
			"\r\nConnection: " + conn + "\r\n\r\n" + smuggled
		resp, body, err := c.do(req)
		if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("Connection: %s: %v %v %q", conn, resp, err, body)
		}
		time.Sleep(50 * time.Millisecond) // a smuggled request would have arrived by now
		mu.Lock()
		got := append([]string(nil), seen...)
		mu.Unlock()
		if len(got) != 1 || got[0] != "POST /x "+smuggled {
			t.Fatalf("Connection: %s: the instance saw %q, want one POST with the body", conn, got)
		}
	}
}

// Bug: an answer naming its own framing header in Connection was passed on
// without it, unframed, on a connection kept open.
func TestAnswerConnectionNamingFraming(t *testing.T) {
	answers := map[string]string{
		"/cl": "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\nhello",
		"/te": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
	}
	b := rawBackend(t, "svc", "s1", func(_ int, r *http.Request, c net.Conn) {
		io.WriteString(c, answers[r.URL.Path])
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	for _, path := range []string{"/cl", "/te", "/cl", "/te"} { // one client connection for all
		resp, body, err := c.do("GET " + path + " HTTP/1.1\r\nHost: svc\r\n\r\n")
		if err != nil || resp.StatusCode != 200 || string(body) != "hello" || resp.Close {
			t.Fatalf("%s: %v %q %v", path, err, body, resp)
		}
	}
}

// Bug: a client that never read its answer held the instance's connection
// for ever; with one connection per instance, every other client got 502.
func TestClientNotReadingFreesInstance(t *testing.T) {
	big := bytes.Repeat([]byte("x"), 1<<20)
	b := newBackend(t, "big", "b1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/small" {
			io.WriteString(w, "small")
			return
		}
		w.Header().Set("Content-Length", "67108864")
		for i := 0; i < 64; i++ {
			if _, err := w.Write(big); err != nil {
				return
			}
		}
	}))
	for _, slow := range []bool{false, true} {
		name := "fast path"
		if slow {
			name = "fasthttp path"
		}
		t.Run(name, func(t *testing.T) {
			tp := startProxy(t, Config{Upstreams: []Upstream{upstream("big")}, MaxConnsPerHost: 1,
				TryTimeout: 300 * time.Millisecond, RequestTimeout: 500 * time.Millisecond, DisableHTTP2: true},
				breaker.Config{Disabled: true, NoEjection: true}, map[string][]*backend{"big": {b}}, Engines{NoFastPath: slow})
			stuck := dialRaw(t, tp.p.Addr("big"))
			if _, err := stuck.c.Write([]byte("GET /big HTTP/1.1\r\nHost: big\r\n\r\n")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(1500 * time.Millisecond) // never reads
			c := dialRaw(t, tp.p.Addr("big"))
			resp, body, err := c.do("GET /small HTTP/1.1\r\nHost: big\r\n\r\n")
			if err != nil || resp.StatusCode != 200 || string(body) != "small" {
				t.Fatalf("second client: %v %v %q", err, resp, body)
			}
		})
	}
}

// Bug: "GET http://svc?q=1" went to the instance as "GET ?q=1".
func TestAbsoluteFormQueryOnly(t *testing.T) {
	var got atomic.Value
	b := newBackend(t, "inventory", "i1", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got.Store(r.RequestURI)
		io.WriteString(w, "ok")
	}))
	tp := startProxy(t, Config{HTTPProxyAddr: "127.0.0.1:0"}, breaker.Config{}, map[string][]*backend{"inventory": {b}})
	for _, tc := range []struct{ target, want string }{
		{"http://inventory?q=1", "/?q=1"},
		{"http://inventory.service.consul:80?a=b&c", "/?a=b&c"},
		{"http://inventory", "/"},
		{"http://inventory/p?q", "/p?q"},
	} {
		c := dialRaw(t, tp.p.Addr(""))
		resp, body, err := c.do("GET " + tc.target + " HTTP/1.1\r\nHost: inventory\r\n\r\n")
		if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("%s: %v %v %q", tc.target, err, resp, body)
		}
		if uri, _ := got.Load().(string); uri != tc.want {
			t.Errorf("%s: the instance got %q, want %q", tc.target, uri, tc.want)
		}
	}
}

// Bug: a bare LF starting the trailer section let the instance end the
// body early and slip a forged answer to the client's next request.
func TestChunkedBareLFTrailerSplit(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		if r.URL.Path == "/split" {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n\nHTTP/1.1 299 Forged\r\nContent-Length: 0\r\nX: y\r\n\r\n")
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	if resp, body, err := c.do("GET /split HTTP/1.1\r\nHost: svc\r\n\r\n"); err == nil {
		t.Logf("first answer: %d %q", resp.StatusCode, body)
	}
	resp, body, err := c.do("GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	if err == nil && (resp.StatusCode != 200 || string(body) != "ok") {
		t.Fatalf("the next request got %d %q", resp.StatusCode, body)
	}
	// A new client is served by the instance, not by the forged bytes.
	c2 := dialRaw(t, tp.p.Addr("svc"))
	resp, body, err = c2.do("GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
	if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("another client: %v %v %q", err, resp, body)
	}
}

// Bug: a pooled connection went back to the pool while the instance was
// still sending; the next request on it got those bytes as its answer.
func TestPooledConnWithLateBytes(t *testing.T) {
	late := make(chan struct{}, 1)
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		if r.Method == "HEAD" {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
			time.Sleep(50 * time.Millisecond)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
			late <- struct{}{}
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}, MaxConnsPerHost: 1}, breaker.Config{},
		map[string][]*backend{"svc": {b}})
	for i := 0; i < 3; i++ {
		c := dialRaw(t, tp.p.Addr("svc"))
		resp, _, err := c.do("HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("HEAD: %v %v", err, resp)
		}
		<-late // the late bytes are on their way to the proxy's idle connection
		time.Sleep(20 * time.Millisecond)
		c2 := dialRaw(t, tp.p.Addr("svc"))
		resp, body, err := c2.do("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		if err != nil || resp.StatusCode != 200 || string(body) != "real" {
			t.Fatalf("GET after HEAD: %v %v %q", err, resp, body)
		}
	}
}

// The look at an idle connection costs no allocation.
func TestIdleDirtyNoAllocs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := newBconn(c)
	if b.idleDirty() {
		t.Fatal("a quiet connection is dirty")
	}
	if n := testing.AllocsPerRun(100, func() { b.idleDirty() }); n != 0 {
		t.Errorf("%v allocations per look", n)
	}
	s.Write([]byte("x"))
	time.Sleep(20 * time.Millisecond)
	if !b.idleDirty() {
		t.Error("a connection with bytes to read is clean")
	}
	if !b.idleDirty() {
		t.Error("the look consumed the byte")
	}
}

// Bug: an answer with both Content-Length and Transfer-Encoding was passed
// on chunked with the Content-Length too.
func TestAnswerWithLengthAndChunked(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(_ int, r *http.Request, c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	for i := 0; i < 2; i++ {
		if _, err := c.c.Write([]byte("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		tr := textproto.NewReader(c.br)
		status, err := tr.ReadLine()
		if err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
			t.Fatalf("%q %v", status, err)
		}
		h, err := tr.ReadMIMEHeader()
		if err != nil {
			t.Fatal(err)
		}
		if h.Get("Content-Length") != "" || h.Get("Transfer-Encoding") != "chunked" {
			t.Fatalf("head %v: want chunked without Content-Length", h)
		}
		body, err := io.ReadAll(io.LimitReader(c.br, int64(len("5\r\nhello\r\n0\r\n\r\n"))))
		if err != nil || string(body) != "5\r\nhello\r\n0\r\n\r\n" {
			t.Fatalf("body %q %v", body, err)
		}
	}
}

// A chunked body of a request that may be retried is buffered up to the
// replay limit, so the retry carries it whole; a longer one streams through.
func TestChunkedBodyRetried(t *testing.T) {
	var downSaw atomic.Int64
	down := newBackend(t, "svc", "down", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downSaw.Add(1)
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	up := newBackend(t, "svc", "up", echo)
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}, MaxReplayBody: 64, RetryBackoff: time.Millisecond},
		breaker.Config{}, map[string][]*backend{"svc": {down, up}})
	const chunked = "PUT /x HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
	for i := 0; i < 12; i++ {
		c := dialRaw(t, tp.p.Addr("svc"))
		resp, body, err := c.do(chunked)
		if err != nil || resp.StatusCode != 200 || string(body) != "hello world" {
			t.Fatalf("request %d: %v %v %q", i, err, resp, body)
		}
	}
	if downSaw.Load() == 0 {
		t.Fatal("no request went to the failing instance first: nothing was retried")
	}

	only := newBackend(t, "big", "b1", echo)
	tp2 := startProxy(t, Config{Upstreams: []Upstream{upstream("big")}, MaxReplayBody: 8},
		breaker.Config{}, map[string][]*backend{"big": {only}})
	c := dialRaw(t, tp2.p.Addr("big"))
	resp, body, err := c.do(strings.Replace(chunked, "Host: svc", "Host: big", 1))
	if err != nil || resp.StatusCode != 200 || string(body) != "hello world" {
		t.Fatalf("over the limit: %v %v %q", err, resp, body)
	}
}
