package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"attache/sidecar/breaker"
)

// The cases the event loops keep or hand over mid-request; they hold for
// the goroutine fast path too (go test -args -noloop).

// Several requests in one write are answered in order.
func TestPipelinedRequests(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(r.URL.Path), r.URL.Path)
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	var reqs strings.Builder
	for i := 0; i < 20; i++ {
		fmt.Fprintf(&reqs, "GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n", i)
	}
	if _, err := io.WriteString(c.c, reqs.String()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		resp, err := http.ReadResponse(c.br, nil)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if want := fmt.Sprintf("/%d", i); resp.StatusCode != 200 || string(body) != want {
			t.Fatalf("answer %d: %d %q, want %q", i, resp.StatusCode, body, want)
		}
	}
}

// An instance that closes its idle keepalive connections costs no request
// a failure, not even a POST (which may not be sent twice): the proxy sees
// the close while the connection is idle.
func TestInstanceClosesIdleConnections(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		go func() {
			time.Sleep(20 * time.Millisecond)
			c.Close()
		}()
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	for i := 0; i < 5; i++ {
		resp, body, err := c.do("POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
		if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("POST %d: %v %v %q", i, err, resp, body)
		}
		time.Sleep(60 * time.Millisecond)
	}
}

// With one connection allowed per instance, many clients on several loops
// all get answers: a loop out of connections has the others give back
// their idle ones and a goroutine waits for the free slot.
func TestOneConnectionPerInstanceManyClients(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}, MaxConnsPerHost: 1, ConnectTimeout: 3 * time.Second},
		breaker.Config{}, map[string][]*backend{"svc": {b}})
	var wg sync.WaitGroup
	errs := make(chan error, 8*10)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialRaw(t, tp.p.Addr("svc"))
			for j := 0; j < 10; j++ {
				resp, body, err := c.do("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
				if err != nil || resp.StatusCode != 200 || string(body) != "ok" {
					errs <- fmt.Errorf("client %d request %d: %v %v %q", i, j, err, resp, body)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A request under way when the proxy stops is answered; the connection is
// then closed.
func TestShutdownFinishesRequestUnderWay(t *testing.T) {
	started := make(chan struct{})
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		close(started)
		time.Sleep(200 * time.Millisecond)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}}, breaker.Config{}, map[string][]*backend{"svc": {b}})
	c := dialRaw(t, tp.p.Addr("svc"))
	type answer struct {
		resp *http.Response
		body []byte
		err  error
	}
	got := make(chan answer, 1)
	go func() {
		resp, body, err := c.do("GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
		got <- answer{resp, body, err}
	}()
	<-started
	tp.cancel()
	a := <-got
	if a.err != nil || a.resp.StatusCode != 200 || string(a.body) != "late" || !a.resp.Close {
		t.Fatalf("got %v %v %q; want 200 \"late\" with Connection: close", a.err, a.resp, a.body)
	}
	if _, err := bufio.NewReader(c.c).ReadByte(); err == nil {
		t.Fatal("the connection stayed open after the answer")
	}
}

// Bug (found by FuzzListener): a client that sent its request and its
// close together waited for the idle timeout; the close is said once.
func TestClientClosesAfterRequest(t *testing.T) {
	b := rawBackend(t, "svc", "s1", func(n int, r *http.Request, c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	tp := startProxy(t, Config{Upstreams: []Upstream{upstream("svc")}, IdleTimeout: time.Minute}, breaker.Config{},
		map[string][]*backend{"svc": {b}})
	for _, req := range []string{
		"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
		"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n",
		"GET /x HTTP/1.1\r\nHost: svc\r\n", // incomplete: closed at once
	} {
		c := dialRaw(t, tp.p.Addr("svc"))
		c.c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c.c, req)
		c.c.(*net.TCPConn).CloseWrite()
		if _, err := io.ReadAll(c.c); err != nil {
			t.Fatalf("%q: %v (neither answered nor closed)", req, err)
		}
	}
}
