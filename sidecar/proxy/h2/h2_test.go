package h2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// seen is what a handler saw of its request.
type seen struct {
	proto   string
	host    string
	remote  string
	tls     bool
	alpn    string
	length  int64
	body    string
	trailer http.Header
}

func TestRequestFields(t *testing.T) {
	got := make(chan seen, 1)
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("reading the body: %v", err)
		}
		s := seen{proto: r.Proto, host: r.Host, remote: r.RemoteAddr, tls: r.TLS != nil,
			length: r.ContentLength, body: string(b), trailer: r.Trailer}
		if r.TLS != nil {
			s.alpn = r.TLS.NegotiatedProtocol
		}
		got <- s
		_, _ = io.WriteString(w, "ok")
	})}
	ts := startServer(t, srv, true)
	c := ts.client(t)
	for _, tc := range []struct {
		name    string
		method  string
		body    io.Reader // nil: none
		length  int64     // the request's ContentLength
		trailer http.Header
		want    seen
	}{
		{name: "GET", method: "GET", want: seen{length: 0}},
		{name: "POST with a length", method: "POST", body: strings.NewReader("hello"), length: 5,
			want: seen{length: 5, body: "hello"}},
		{name: "POST without a length", method: "POST", body: io.MultiReader(strings.NewReader("hel"), strings.NewReader("lo")), length: -1,
			want: seen{length: -1, body: "hello"}},
		{name: "POST with trailers", method: "POST", body: io.MultiReader(strings.NewReader("hello")), length: -1,
			trailer: http.Header{"X-Sum": {"5"}},
			want:    seen{length: -1, body: "hello", trailer: http.Header{"X-Sum": {"5"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, c.base+"/path?q=1", tc.body)
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = tc.length
			req.Trailer = tc.trailer
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(b) != "ok" || resp.ProtoMajor != 2 {
				t.Fatalf("answer %s %d %q, want HTTP/2.0 200 \"ok\"", resp.Proto, resp.StatusCode, b)
			}
			s := <-got
			_, local := c.dialed()
			want := tc.want
			want.proto, want.host, want.remote, want.tls, want.alpn = "HTTP/2.0", ts.addr, local, true, "h2"
			if fmt.Sprint(s) != fmt.Sprint(want) {
				t.Errorf("the handler saw\n %+v\nwant\n %+v", s, want)
			}
		})
	}
	if n, _ := c.dialed(); n != 1 {
		t.Errorf("the client dialed %d connections, want 1 (the requests share one)", n)
	}
}

// pattern is n bytes that are not all alike, so that a reordering or a
// lost frame shows.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// TestFlowControl: a response and an upload many times the initial
// windows arrive whole, both ways.
func TestFlowControl(t *testing.T) {
	big := pattern(1 << 20)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/download":
			_, _ = w.Write(big)
		case "/partial": // reads a little and answers: the rest is discarded
			_, _ = io.ReadFull(r.Body, make([]byte, 10))
			_, _ = io.WriteString(w, "partial")
		case "/upload":
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
		}
	})
	for _, useTLS := range []bool{false, true} {
		t.Run(fmt.Sprint("tls=", useTLS), func(t *testing.T) {
			// A Server per run: the run's end shuts it down for good.
			c := startServer(t, &Server{Handler: handler}, useTLS).client(t)
			resp, err := c.Get(c.base + "/download")
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(b, big) {
				t.Errorf("download: %d bytes (%v), equal %v; want the %d sent", len(b), err, bytes.Equal(b, big), len(big))
			}
			up := pattern(2 << 20)
			resp, err = c.Post(c.base+"/upload", "application/octet-stream", bytes.NewReader(up))
			if err != nil {
				t.Fatal(err)
			}
			b, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := fmt.Sprintf("%d %x", len(up), sha256.Sum256(up)); string(b) != want {
				t.Errorf("upload: the handler read %q, want %q", b, want)
			}
			// Bodies a handler left unread give their window back to the
			// connection: five of 2 MiB (ten times the connection's window),
			// then a whole upload again.
			for i := range 5 {
				resp, err := c.Post(c.base+"/partial", "application/octet-stream", bytes.NewReader(up))
				if err != nil {
					t.Fatalf("partial upload %d: %v", i, err)
				}
				b, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(b) != "partial" {
					t.Fatalf("partial upload %d: %q", i, b)
				}
			}
			resp, err = c.Post(c.base+"/upload", "application/octet-stream", bytes.NewReader(up))
			if err != nil {
				t.Fatalf("upload after partial ones: %v", err)
			}
			b, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := fmt.Sprintf("%d %x", len(up), sha256.Sum256(up)); string(b) != want {
				t.Errorf("upload after partial ones: the handler read %q, want %q", b, want)
			}
			// Streams at once share the connection's window: all arrive.
			var wg sync.WaitGroup
			for i := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, err := c.Get(c.base + "/download")
					if err != nil {
						t.Errorf("download %d: %v", i, err)
						return
					}
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					if err != nil || !bytes.Equal(b, big) {
						t.Errorf("download %d: %d bytes (%v), want the %d sent", i, len(b), err, len(big))
					}
				}()
			}
			wg.Wait()
			if n, _ := c.dialed(); n != 1 {
				t.Errorf("the client dialed %d connections, want 1", n)
			}
		})
	}
}

func TestResponseTrailers(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter)
		body    string
		want    http.Header
	}{
		{"declared", func(w http.ResponseWriter) {
			w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
			w.Header().Set("Content-Type", "application/grpc")
			_, _ = io.WriteString(w, "\x00\x00\x00\x00\x02hi")
			w.Header().Set("Grpc-Status", "0")
			w.Header().Set("Grpc-Message", "fine")
		}, "\x00\x00\x00\x00\x02hi", http.Header{"Grpc-Status": {"0"}, "Grpc-Message": {"fine"}}},
		{"TrailerPrefix", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/grpc")
			_, _ = io.WriteString(w, "\x00\x00\x00\x00\x02hi")
			w.Header().Set(http.TrailerPrefix+"Grpc-Status", "0")
		}, "\x00\x00\x00\x00\x02hi", http.Header{"Grpc-Status": {"0"}}},
		{"no body (trailers-only)", func(w http.ResponseWriter) {
			w.Header().Set("Trailer", "Grpc-Status")
			w.Header().Set("Content-Type", "application/grpc")
			w.WriteHeader(200)
			w.Header().Set("Grpc-Status", "5")
		}, "", http.Header{"Grpc-Status": {"5"}}},
		{"flushed body, both kinds", func(w http.ResponseWriter) {
			w.Header().Set("Trailer", "Grpc-Status")
			w.Header().Set("Content-Type", "application/grpc")
			_, _ = io.WriteString(w, "one")
			w.(http.Flusher).Flush()
			_, _ = io.WriteString(w, "two")
			w.Header().Set("Grpc-Status", "0")
			w.Header().Set(http.TrailerPrefix+"X-Extra", "x")
		}, "onetwo", http.Header{"Grpc-Status": {"0"}, "X-Extra": {"x"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tc.handler(w) })}
			c := startServer(t, srv, true).client(t)
			req, _ := http.NewRequest("POST", c.base+"/svc/Method", strings.NewReader("\x00\x00\x00\x00\x00"))
			req.Header.Set("Content-Type", "application/grpc")
			req.Header.Set("Te", "trailers")
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || string(b) != tc.body {
				t.Errorf("body %q (%v), want %q", b, err, tc.body)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/grpc" {
				t.Errorf("content-type %q", ct)
			}
			if fmt.Sprint(resp.Trailer) != fmt.Sprint(tc.want) {
				t.Errorf("trailers %v, want %v", resp.Trailer, tc.want)
			}
			for k := range resp.Header {
				if strings.HasPrefix(k, http.TrailerPrefix) || k == "Grpc-Status" {
					t.Errorf("%s came in the header", k)
				}
			}
		})
	}
}

// TestNoBody checks frame by frame: HEAD, 204 and 304 answers end with
// their HEADERS (no DATA, nothing after, a flushed HEAD answer too), and a
// small answer (or a HEAD answer's counted body) has a content-length.
func TestNoBody(t *testing.T) {
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.Header().Set("Etag", `"x"`)
			w.WriteHeader(304)
		}
		_, _ = io.WriteString(w, "hello") // refused for 204, 304; counted, not sent, for HEAD
		if r.URL.Path == "/flushed" {
			w.(http.Flusher).Flush() // a HEAD answer ends here: nothing after it
			_, _ = io.WriteString(w, " again")
		}
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	var id uint32 = 1
	for _, tc := range []struct {
		method, path string
		status       string
		body         string
		length       string // the content-length header, "": none, "-": either
	}{
		{"HEAD", "/", "200", "", "5"},
		{"HEAD", "/flushed", "200", "", ""},
		{"GET", "/204", "204", "", ""}, // RFC 9110 8.6: MUST NOT
		{"GET", "/304", "304", "", "-"},
		{"GET", "/", "200", "hello", "5"},
	} {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			rc.headers(id, tc.method, tc.path, true)
			r, err := rc.readResponse(id, 5*time.Second)
			id += 2
			if err != nil {
				t.Fatalf("%v (so far %+v)", err, r)
			}
			if r.status != tc.status || string(r.body) != tc.body || !r.end {
				t.Errorf("got %s %q end %v, want %s %q", r.status, r.body, r.end, tc.status, tc.body)
			}
			if tc.body == "" && fmt.Sprint(r.frames) != "[HEADERS]" {
				t.Errorf("frames %v, want [HEADERS] with END_STREAM", r.frames)
			}
			if got := r.header["content-length"]; tc.length != "-" && got != tc.length {
				t.Errorf("content-length %q, want %q", got, tc.length)
			}
		})
	}
	for sid, r := range rc.streams { // frames that came after a stream's end
		t.Errorf("stream %d: %v after its END_STREAM", sid, r.frames)
	}
}

func TestExpectContinue(t *testing.T) {
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/refuse" {
			http.Error(w, "no", http.StatusExpectationFailed)
			return
		}
		if r.Header.Get("Expect") != "" {
			t.Errorf("the handler saw Expect: %q", r.Header.Get("Expect"))
		}
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	for _, tc := range []struct {
		name    string
		id      uint32
		path    string
		want100 bool
		status  string
		body    string
	}{
		{"read", 1, "/echo", true, "200", "payload"},
		{"refused unread", 3, "/refuse", false, "417", "no\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc.headers(tc.id, "POST", tc.path, false, "expect", "100-continue", "content-length", "7")
			f, err := rc.next(5 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			h, ok := f.(*http2.MetaHeadersFrame)
			if !ok || h.StreamID != tc.id {
				t.Fatalf("first frame %v, want HEADERS on stream %d", f, tc.id)
			}
			got100 := h.PseudoValue("status") == "100"
			if got100 != tc.want100 {
				t.Fatalf("first answer :status %s, want 100: %v", h.PseudoValue("status"), tc.want100)
			}
			if got100 && h.StreamEnded() {
				t.Fatal("100 Continue with END_STREAM")
			}
			if got100 {
				rc.write(func() error { return rc.fr.WriteData(tc.id, true, []byte("payload")) })
			}
			r, err := rc.readResponse(tc.id, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if !got100 { // the final answer was that first HEADERS
				r.status = h.PseudoValue("status")
			}
			if r.status != tc.status || string(r.body) != tc.body {
				t.Errorf("got %s %q, want %s %q", r.status, r.body, tc.status, tc.body)
			}
		})
	}
}

// TestExpectContinueClient: net/http's client (HTTP/2 over TLS) waits for
// the 100 Continue before it sends the body.
func TestExpectContinueClient(t *testing.T) {
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	})}
	ts := startServer(t, srv, true)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ts.roots}, ForceAttemptHTTP2: true,
		ExpectContinueTimeout: 10 * time.Second}
	defer tr.CloseIdleConnections()
	var got100 atomic.Bool
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{Got100Continue: func() { got100.Store(true) }})
	req, _ := http.NewRequestWithContext(ctx, "PUT", "https://"+ts.addr+"/", strings.NewReader("payload"))
	req.Header.Set("Expect", "100-continue")
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || string(b) != "payload" || !got100.Load() {
		t.Errorf("%s %q, 100 Continue seen %v; want HTTP/2.0 \"payload\" after a 100", resp.Proto, b, got100.Load())
	}
}

// TestClientReset: a request the client cancels ends its handler's
// context.
func TestClientReset(t *testing.T) {
	started := make(chan struct{})
	ended := make(chan error, 1)
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		close(started)
		select {
		case <-r.Context().Done():
			ended <- nil
		case <-time.After(5 * time.Second):
			ended <- errors.New("the handler's context is not done 5 s after the client reset its stream")
		}
	})}
	c := startServer(t, srv, true).client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", c.base+"/slow", nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	<-started
	cancel()
	resp.Body.Close()
	if err := <-ended; err != nil {
		t.Error(err)
	}
}

// TestMaxConcurrentStreams: over the limit a stream is refused, the ones
// within it are answered.
func TestMaxConcurrentStreams(t *testing.T) {
	release := make(chan struct{})
	var running atomic.Int32
	started := make(chan struct{}, 3)
	srv := &Server{MaxConcurrentStreams: 2, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		started <- struct{}{}
		<-release
		_, _ = io.WriteString(w, "ok")
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	rc.headers(1, "GET", "/", true)
	rc.headers(3, "GET", "/", true)
	<-started
	<-started
	rc.headers(5, "GET", "/", true)
	r, err := rc.readResponse(5, 5*time.Second)
	if err != nil || !r.wasRST || r.reset != http2.ErrCodeRefusedStream {
		t.Errorf("stream 5: %+v %v, want RST_STREAM REFUSED_STREAM", r, err)
	}
	if n := running.Load(); n != 2 {
		t.Errorf("%d handlers run, want 2", n)
	}
	close(release)
	for _, id := range []uint32{1, 3} {
		r, err := rc.readResponse(id, 5*time.Second)
		if err != nil || r.status != "200" || string(r.body) != "ok" {
			t.Errorf("stream %d: %+v %v, want 200 ok", id, r, err)
		}
	}
}

// TestPark: an idle connection is offered to Park, its goroutine ends,
// and once resumed it serves the same client connection again; with the
// parker resuming when the socket is readable (as the proxy's epoll
// parker does), or when the test says so before the client writes.
func TestPark(t *testing.T) {
	for _, tc := range []struct {
		name     string
		useTLS   bool
		readable bool // resume when the socket is readable; else on the test's signal
	}{
		{"h2c, resumed on signal", false, false},
		{"tls, resumed on signal", true, false},
		{"h2c, resumed when readable", false, true},
		{"tls, resumed when readable", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parked := make(chan *Conn, 16)
			resume := make(chan struct{}, 1) // one token: the first parking's
			stop := make(chan struct{})      // the test's end
			t.Cleanup(func() { close(stop) })
			srv := &Server{
				ParkAfter: 10 * time.Millisecond,
				Park: func(c *Conn) bool {
					go func() {
						if tc.readable {
							if !waitReadable(c.NetConn()) {
								return // closed: the test's end
							}
						} else {
							select {
							case <-resume:
							case <-stop:
								return
							}
						}
						c.Resume()
					}()
					parked <- c
					return true
				},
				Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					_, _ = io.WriteString(w, r.URL.Path)
				}),
			}
			ts := startServer(t, srv, tc.useTLS)
			c := ts.client(t)
			get := func(path string) {
				t.Helper()
				resp, err := c.Get(c.base + path)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(b) != path {
					t.Fatalf("GET %s: %q", path, b)
				}
			}
			await := func() *Conn {
				t.Helper()
				select {
				case pc := <-parked:
					return pc
				case <-time.After(time.Second):
					t.Fatal("the idle connection was not parked within 1 s")
					return nil
				}
			}
			get("/one")
			pc := await()
			select {
			case <-ts.served:
			case <-time.After(time.Second):
				t.Fatal("ServeConn did not return when its connection was parked")
			}
			if d := pc.IdleDeadline(); d.IsZero() || !d.After(time.Now()) {
				t.Errorf("a parked connection's IdleDeadline %v is not in the future", d)
			}
			if !tc.readable {
				resume <- struct{}{}
			}
			get("/two")
			if n, _ := c.dialed(); n != 1 {
				t.Errorf("the client dialed %d connections, want 1 (the parked one resumed)", n)
			}
			// Parked again: the test's end closes it (Park's job, not
			// Shutdown's).
			pc = await()
			t.Cleanup(pc.Close)
		})
	}
}

// waitReadable waits until nc's socket has bytes (or is closed): what the
// proxy's epoll parker does, through Go's netpoller. False: closed.
func waitReadable(nc net.Conn) bool {
	type netConner interface{ NetConn() net.Conn }
	if tc, ok := nc.(netConner); ok {
		nc = tc.NetConn()
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	_ = nc.SetReadDeadline(time.Time{}) // the serving goroutine left one in the past
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var buf [1]byte
	open := true
	// Peek first: bytes that came before this call made no new edge for
	// the netpoller to wait for.
	err = rc.Read(func(fd uintptr) bool {
		n, _, errno := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if errno == syscall.EAGAIN {
			return false
		}
		open = n > 0
		return true
	})
	return err == nil && open
}

func TestIdleTimeout(t *testing.T) {
	for _, tc := range []struct {
		name    string
		request bool
		decline bool // a Park that declines every offer (the goroutine stays)
	}{
		{"no request", false, false},
		{"after a request", true, false},
		{"Park declines", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{IdleTimeout: 200 * time.Millisecond, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
			var offers atomic.Int32
			if tc.decline {
				srv.ParkAfter = 10 * time.Millisecond
				srv.Park = func(*Conn) bool { offers.Add(1); return false }
			}
			ts := startServer(t, srv, false)
			rc := dialRaw(t, ts.addr, true)
			start := time.Now()
			if tc.request {
				rc.headers(1, "GET", "/", true)
				if r, err := rc.readResponse(1, 5*time.Second); err != nil || r.status != "200" {
					t.Fatalf("%+v %v", r, err)
				}
			}
			goAways, closed := rc.closed(5 * time.Second)
			if !closed {
				t.Fatal("the idle connection was not closed within 5 s")
			}
			if fmt.Sprint(goAways) != "[NO_ERROR]" {
				t.Errorf("GOAWAYs %v before the close, want [NO_ERROR]", goAways)
			}
			if d := time.Since(start); d < 200*time.Millisecond {
				t.Errorf("closed after %v, before IdleTimeout", d)
			}
			if tc.decline && offers.Load() == 0 {
				t.Error("Park was never offered the idle connection")
			}
		})
	}
}

// TestShutdown: an in-flight request completes after GOAWAY; a stream
// opened after it is not served; Shutdown returns once the connection is
// done.
func TestShutdown(t *testing.T) {
	started := make(chan string, 2)
	release := make(chan struct{})
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- r.URL.Path
		<-release
		_, _ = io.WriteString(w, "done")
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	rc.headers(1, "GET", "/slow", true)
	if p := <-started; p != "/slow" {
		t.Fatal(p)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	// Two steps (RFC 9113 6.8): GOAWAY naming the highest id possible and
	// a PING; once the PING is answered (readResponse does), GOAWAY
	// naming stream 1.
	_, err := rc.readResponse(1, 5*time.Second)
	var ga goAwayError
	if !errors.As(err, &ga) || ga.code != http2.ErrCodeNo || ga.last != 1<<31-1 {
		t.Fatalf("got %v, want GOAWAY NO_ERROR last stream 2147483647", err)
	}
	_, err = rc.readResponse(1, 5*time.Second)
	if !errors.As(err, &ga) || ga.code != http2.ErrCodeNo || ga.last != 1 {
		t.Fatalf("got %v, want GOAWAY NO_ERROR last stream 1", err)
	}
	rc.headers(3, "GET", "/late", true)
	close(release)
	r, err := rc.readResponse(1, 5*time.Second)
	if err != nil || r.status != "200" || string(r.body) != "done" {
		t.Errorf("the in-flight request: %+v %v, want 200 done", r, err)
	}
	if _, closed := rc.closed(5 * time.Second); !closed {
		t.Error("the connection was not closed after its last stream")
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("Shutdown did not return")
	}
	select {
	case p := <-started:
		t.Errorf("%s was served after GOAWAY", p)
	default:
	}
}

// TestShutdownForced: a stream still running when Shutdown's context ends
// is cut: the connection is closed, the handler's context done, and
// Shutdown says why it returned.
func TestShutdownForced(t *testing.T) {
	started := make(chan struct{})
	ended := make(chan struct{})
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-r.Context().Done():
			close(ended)
		case <-time.After(10 * time.Second):
		}
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	rc.headers(1, "GET", "/", true)
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want %v", err, context.DeadlineExceeded)
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Error("the handler's context was not done after the forced close")
	}
	goAways, closed := rc.closed(5 * time.Second)
	if !closed || fmt.Sprint(goAways) != "[NO_ERROR]" {
		t.Errorf("closed %v, GOAWAYs %v; want closed after [NO_ERROR]", closed, goAways)
	}
}

// TestShutdownIdle: Shutdown sends an idle connection drain's GOAWAYs and
// closes it; a parked one is Park's: Shutdown does not wait for it, and
// resumed after it, it is sent GOAWAY and closed.
func TestShutdownIdle(t *testing.T) {
	for _, tc := range []struct {
		name   string
		parked bool
	}{
		{"idle", false},
		{"parked, then resumed", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parked := make(chan *Conn, 4)
			srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
			if tc.parked {
				srv.ParkAfter = 10 * time.Millisecond
				srv.Park = func(c *Conn) bool { parked <- c; return true }
			}
			ts := startServer(t, srv, false)
			rc := dialRaw(t, ts.addr, true)
			rc.headers(1, "GET", "/", true)
			if r, err := rc.readResponse(1, 5*time.Second); err != nil || r.status != "200" {
				t.Fatalf("%+v %v", r, err)
			}
			var pc *Conn
			if tc.parked {
				select {
				case pc = <-parked:
				case <-time.After(5 * time.Second):
					t.Fatal("not parked")
				}
				// ServeConn returned: the Server has let go of it (see
				// TestParkResumeAtOnce for the moment between).
				<-ts.served
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			if tc.parked {
				pc.Resume()
			}
			// An idle connection with its goroutine gets drain's two
			// GOAWAYs; a parked one, resumed after Shutdown, one.
			want := "[NO_ERROR NO_ERROR]"
			if tc.parked {
				want = "[NO_ERROR]"
			}
			goAways, closed := rc.closed(5 * time.Second)
			if !closed || fmt.Sprint(goAways) != want {
				t.Errorf("closed %v, GOAWAYs %v; want closed after %s", closed, goAways, want)
			}
		})
	}
}

// TestParkResumeAtOnce: a parker may resume a connection before Park
// has returned (its socket was readable already: the epoll parker resumes
// on its own goroutine); the resumed connection, serving again, is still
// the Server's: Shutdown sends it GOAWAY and waits for its stream.
func TestParkResumeAtOnce(t *testing.T) {
	var parks atomic.Int32
	firstPark := make(chan struct{})
	started := make(chan struct{})
	release := make(chan struct{})
	srv := &Server{
		ParkAfter: 10 * time.Millisecond,
		Park: func(c *Conn) bool {
			if parks.Add(1) == 1 {
				close(firstPark)
			}
			c.Resume() // at once, before Park returns
			return true
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				close(started)
				<-release
			}
			_, _ = io.WriteString(w, "done")
		}),
	}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	rc.headers(1, "GET", "/", true)
	if r, err := rc.readResponse(1, 5*time.Second); err != nil || r.status != "200" {
		t.Fatalf("%+v %v", r, err)
	}
	select {
	case <-firstPark:
	case <-time.After(5 * time.Second):
		t.Fatal("not parked")
	}
	rc.headers(3, "GET", "/slow", true)
	<-started
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	_, err := rc.readResponse(3, 2*time.Second)
	var ga goAwayError
	if !errors.As(err, &ga) {
		t.Errorf("during Shutdown, with stream 3 in flight, the client got %v, want GOAWAY", err)
	}
	select {
	case err := <-shut:
		t.Errorf("Shutdown returned (%v) with stream 3 in flight: the Server lost track of the resumed connection", err)
		shut <- err
	default:
	}
	close(release)
	if r, err := rc.readResponse(3, 5*time.Second); err != nil || string(r.body) != "done" {
		t.Errorf("stream 3: %+v %v, want done", r, err)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func TestHeaderTooLarge(t *testing.T) {
	srv := &Server{MaxHeaderBytes: 1024, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "served")
	})}
	ts := startServer(t, srv, false)
	many := make([]string, 0, 80)
	for i := range 40 { // 40 fields of ~80 bytes: 3 KiB as HTTP/2 counts it
		many = append(many, fmt.Sprintf("x-field-%02d", i), strings.Repeat("v", 40))
	}
	for _, tc := range []struct {
		name   string
		fields []string
		want   string // the :status, or "closed": GOAWAY or the connection's end
	}{
		{"within", []string{"x-a", strings.Repeat("v", 500)}, "200"},
		{"many fields over", many, "431"},
		{"one field far over", []string{"x-big", strings.Repeat("v", 64<<10)}, "closed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, ts.addr, true)
			rc.lenient = tc.want == "closed" // it may close mid-block
			rc.headers(1, "GET", "/", true, tc.fields...)
			r, err := rc.readResponse(1, 5*time.Second)
			if tc.want == "closed" {
				var ga goAwayError
				if err == nil || !errors.As(err, &ga) && !isClosed(err) {
					t.Errorf("got %+v %v, want GOAWAY or the connection closed", r, err)
				}
				return
			}
			if err != nil || r.status != tc.want {
				t.Errorf("got %+v %v, want :status %s", r, err, tc.want)
			}
		})
	}
}

// isClosed: err is the connection's end (not a timeout).
func isClosed(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return err != nil
}

// TestBadClient: a client that breaks the protocol, or stalls in it, is
// closed in bounded time.
func TestBadClient(t *testing.T) {
	srv := &Server{FrameTimeout: 300 * time.Millisecond, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
	ts := startServer(t, srv, false)
	for _, tc := range []struct {
		name   string
		send   func(rc *rawClient) error
		goAway string // the GOAWAY code expected before the close, "": any or none
	}{
		{"garbage preface", func(rc *rawClient) error {
			_, err := io.WriteString(rc.nc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			return err
		}, ""},
		{"no preface", func(rc *rawClient) error { return nil }, ""},
		{"preface cut short", func(rc *rawClient) error {
			_, err := io.WriteString(rc.nc, http2.ClientPreface[:10])
			return err
		}, ""},
		{"PING before SETTINGS", func(rc *rawClient) error {
			if _, err := io.WriteString(rc.nc, http2.ClientPreface); err != nil {
				return err
			}
			return rc.fr.WritePing(false, [8]byte{})
		}, "PROTOCOL_ERROR"},
		{"frame too large", func(rc *rawClient) error {
			if err := preface(rc); err != nil {
				return err
			}
			// A DATA frame header announcing 1 MiB (over 16 KiB).
			_, err := rc.nc.Write([]byte{0x10, 0x00, 0x00, 0x0, 0x0, 0, 0, 0, 1})
			return err
		}, "FRAME_SIZE_ERROR"},
		{"frame begun, never finished", func(rc *rawClient) error {
			if err := preface(rc); err != nil {
				return err
			}
			_, err := rc.nc.Write([]byte{0, 0, 100, 0x6, 0, 0, 0, 0, 0, 1, 2, 3})
			return err
		}, ""},
		{"PUSH_PROMISE", func(rc *rawClient) error {
			if err := preface(rc); err != nil {
				return err
			}
			return rc.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, EndHeaders: true})
		}, "PROTOCOL_ERROR"},
		// The GOAWAY reaches the client though more of its frames are
		// unread when the server closes (a close with unread input sends
		// TCP RST instead of FIN).
		{"PUSH_PROMISE, then more frames", func(rc *rawClient) error {
			if err := preface(rc); err != nil {
				return err
			}
			rc.lenient = true
			var b bytes.Buffer
			fr := http2.NewFramer(&b, nil)
			_ = fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, EndHeaders: true})
			for range 8 << 10 {
				_ = fr.WritePing(false, [8]byte{})
			}
			_ = rc.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
			_, _ = rc.nc.Write(b.Bytes()) // may fail: the server closes
			return nil
		}, "PROTOCOL_ERROR"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, ts.addr, false)
			if err := tc.send(rc); err != nil {
				t.Fatal(err)
			}
			goAways, closed := rc.closed(5 * time.Second)
			if !closed {
				t.Fatalf("not closed within 5 s (GOAWAYs %v)", goAways)
			}
			if tc.goAway != "" && fmt.Sprint(goAways) != "["+tc.goAway+"]" {
				t.Errorf("GOAWAYs %v, want [%s]", goAways, tc.goAway)
			}
		})
	}
}

func preface(rc *rawClient) error {
	if _, err := io.WriteString(rc.nc, http2.ClientPreface); err != nil {
		return err
	}
	return rc.fr.WriteSettings()
}

// TestRapidReset: a client that opens streams and resets them at once
// (CVE-2023-44487) never has more than MaxConcurrentStreams handlers
// running, and its connection is answered or sent away, not hung; with
// handlers that ignore the reset (they keep counting), the client whose
// streams keep being refused is sent away.
func TestRapidReset(t *testing.T) {
	const limit = 8
	for _, tc := range []struct {
		name     string
		ignore   bool // handlers block until the test's end, reset or not
		pairs    int  // HEADERS+RST_STREAM pairs
		sentAway bool // the client must be sent away (else: any outcome but a hang)
	}{
		{"handlers end on reset", false, 1000, false},
		{"handlers ignore the reset", true, 1200, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var running, peak atomic.Int32
			release := make(chan struct{})
			srv := &Server{MaxConcurrentStreams: limit, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := running.Add(1)
				defer running.Add(-1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				if r.URL.Path == "/fast" {
					_, _ = io.WriteString(w, "fast")
					return
				}
				if tc.ignore {
					<-release
					return
				}
				select {
				case <-r.Context().Done():
				case <-time.After(10 * time.Second):
					t.Error("a handler's context was not done 10 s after its stream was reset")
				}
			})}
			ts := startServer(t, srv, false)
			t.Cleanup(func() { close(release) }) // before the server's Shutdown
			rc := dialRaw(t, ts.addr, true)
			rc.lenient = true // it may be sent away mid-write

			// Read what the server sends while the client writes, so that
			// its writes (RST_STREAMs for refused streams) never stall it.
			type outcome struct {
				what string
				err  error
			}
			last := uint32(2*tc.pairs + 1)
			done := make(chan outcome, 1)
			go func() {
				for {
					f, err := rc.next(20 * time.Second)
					if err != nil {
						done <- outcome{"closed", err}
						return
					}
					switch f := f.(type) {
					case *http2.GoAwayFrame:
						done <- outcome{"GOAWAY " + f.ErrCode.String(), nil}
						return
					case *http2.MetaHeadersFrame:
						if f.StreamID == last {
							done <- outcome{"answered " + f.PseudoValue("status"), nil}
							return
						}
					case *http2.RSTStreamFrame:
						if f.StreamID == last {
							done <- outcome{"reset " + f.ErrCode.String(), nil}
							return
						}
					}
				}
			}()
			for id := uint32(1); id < last; id += 2 {
				rc.headers(id, "GET", "/block", true)
				rc.write(func() error { return rc.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
			}
			rc.headers(last, "GET", "/fast", true)
			select {
			case o := <-done:
				t.Logf("after %d HEADERS+RST_STREAM pairs the last stream: %s (%v)", tc.pairs, o.what, o.err)
				if o.what == "closed" && !isClosed(o.err) {
					t.Errorf("the connection hung: %v", o.err)
				}
				// Sent away: GOAWAY, or (what the client may see instead)
				// a reset connection: the server closes at once after
				// its GOAWAY, and a close with unsent output or unread
				// input sends TCP RST, which may drop that GOAWAY.
				if tc.sentAway && o.what != "GOAWAY ENHANCE_YOUR_CALM" && o.what != "closed" {
					t.Errorf("got %s, want GOAWAY ENHANCE_YOUR_CALM (or the connection reset)", o.what)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("no answer, GOAWAY or close within 30 s")
			}
			if p := peak.Load(); p > limit {
				t.Errorf("%d handlers ran at once, over MaxConcurrentStreams %d", p, limit)
			}
		})
	}
}

// TestHeadersOnClosedStream: HEADERS again on a stream whose answer has
// ended (END_STREAM both ways) is a connection error (RFC 9113 5.1,
// "closed"; h2spec http2/5.1/12). The server must see the stream closed
// as soon as its END_STREAM is written: the client may send the moment it
// reads it. Timing-dependent, so tried on many connections.
func TestHeadersOnClosedStream(t *testing.T) {
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })}
	ts := startServer(t, srv, false)
	const tries = 1000
	wrong := 0
	for i := range tries {
		rc := dialRaw(t, ts.addr, true)
		rc.headers(1, "GET", "/", true)
		if r, err := rc.readResponse(1, 5*time.Second); err != nil || !r.end {
			t.Fatalf("try %d, the first request: %+v %v", i, r, err)
		}
		rc.headers(1, "GET", "/", true)
		r, err := rc.readResponse(1, 5*time.Second)
		var ga goAwayError
		if errors.As(err, &ga) || isClosed(err) {
			rc.nc.Close()
			continue
		}
		if wrong++; wrong == 1 {
			t.Errorf("try %d: HEADERS on the closed stream 1 got %v %v, want GOAWAY or the connection closed", i, r.frames, err)
			if r.wasRST {
				t.Errorf("(RST_STREAM %v: the server still held the stream as half-closed (remote) after sending its END_STREAM)", r.reset)
			}
		}
		rc.nc.Close()
	}
	if wrong > 0 {
		t.Errorf("%d of %d tries wrong", wrong, tries)
	}
}

// TestAnswers: answers beyond a plain body, frame by frame.
func TestAnswers(t *testing.T) {
	big := strings.Repeat("b", 40<<10) // over the 16 KiB frame: CONTINUATION
	srv := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/panic":
			_, _ = io.WriteString(w, "partial")
			panic("handler bug")
		case "/abort":
			panic(http.ErrAbortHandler)
		case "/early-hints":
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			_, _ = io.WriteString(w, "final")
		case "/big-header":
			w.Header().Set("X-Big", big)
			_, _ = io.WriteString(w, "ok")
		case "/cookies":
			_, _ = io.WriteString(w, r.Header.Get("Cookie")+"|"+fmt.Sprint(len(r.Header["Cookie"])))
		}
	})}
	ts := startServer(t, srv, false)
	rc := dialRaw(t, ts.addr, true)
	for i, tc := range []struct {
		path   string
		fields []string
		frames string // the frames that came, in order
		status string
		body   string
		header func(h map[string]string) bool
	}{
		{path: "/panic", frames: "[RST_STREAM]"},
		{path: "/abort", frames: "[RST_STREAM]"},
		{path: "/early-hints", frames: "[HEADERS HEADERS DATA]", status: "200", body: "final"},
		{path: "/big-header", frames: "[HEADERS DATA]", status: "200", body: "ok",
			header: func(h map[string]string) bool { return h["x-big"] == big }},
		{path: "/cookies", fields: []string{"cookie", "a=1", "cookie", "b=2"}, frames: "[HEADERS DATA]", status: "200", body: "a=1; b=2|1"},
	} {
		t.Run(strings.TrimPrefix(tc.path, "/"), func(t *testing.T) {
			id := uint32(2*i + 1)
			rc.headers(id, "GET", tc.path, true, tc.fields...)
			r, err := rc.readResponse(id, 5*time.Second)
			if err != nil {
				t.Fatalf("%+v %v", r, err)
			}
			if fmt.Sprint(r.frames) != tc.frames || r.status != tc.status || string(r.body) != tc.body {
				t.Errorf("got %v %s %q, want %s %s %q", r.frames, r.status, r.body, tc.frames, tc.status, tc.body)
			}
			if tc.status == "" && (!r.wasRST || r.reset != http2.ErrCodeInternal) {
				t.Errorf("reset %v (%v), want RST_STREAM INTERNAL_ERROR", r.reset, r.wasRST)
			}
			if tc.header != nil && !tc.header(r.header) {
				t.Errorf("header not as sent (x-big %d bytes)", len(r.header["x-big"]))
			}
		})
	}
}

// TestWriteTimeout: a client that gives no window, or does not read,
// stalls only until WriteTimeout: the handler's write fails, and the
// stream is reset or the connection closed.
func TestWriteTimeout(t *testing.T) {
	for _, tc := range []struct {
		name     string
		settings []http2.Setting
		connWin  uint32 // a WINDOW_UPDATE for the connection, 0: none
		size     int    // what the handler writes
	}{
		{"no window", []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 0}}, 0, 1 << 10},
		{"not reading", []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1}}, 1<<31 - 1 - 65535, 64 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wrote := make(chan error, 1)
			chunk := pattern(1 << 20)
			srv := &Server{WriteTimeout: 300 * time.Millisecond, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(200)
				w.(http.Flusher).Flush()
				var err error
				for n := 0; n < tc.size && err == nil; n += len(chunk) {
					_, err = w.Write(chunk[:min(len(chunk), tc.size-n)])
					if err == nil {
						err = w.(interface{ FlushError() error }).FlushError()
					}
				}
				wrote <- err
			})}
			ts := startServer(t, srv, false)
			rc := dialRaw(t, ts.addr, false)
			rc.write(func() error {
				if _, err := io.WriteString(rc.nc, http2.ClientPreface); err != nil {
					return err
				}
				if err := rc.fr.WriteSettings(tc.settings...); err != nil {
					return err
				}
				if tc.connWin > 0 {
					return rc.fr.WriteWindowUpdate(0, tc.connWin)
				}
				return nil
			})
			rc.headers(1, "GET", "/", true)
			select {
			case err := <-wrote:
				if err == nil {
					t.Fatal("the handler's writes all succeeded, want an error after WriteTimeout")
				}
				t.Logf("the handler's write: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("the handler's write did not fail within 10 s (WriteTimeout 300 ms)")
			}
			if tc.name == "not reading" {
				if _, closed := rc.closed(10 * time.Second); !closed {
					t.Error("the connection was not closed after the write timed out")
				}
			}
			if tc.name == "no window" {
				r, err := rc.readResponse(1, 5*time.Second)
				if err != nil || !r.wasRST || r.reset != http2.ErrCodeCancel {
					t.Errorf("got %+v %v, want RST_STREAM CANCEL", r, err)
				}
			}
		})
	}
}
