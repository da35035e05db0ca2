package proxy

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/proxy/h1"
)

// Differential fuzzers: byte streams through a running proxy (the event
// loops, or with -noloop the goroutine path), judged by net/http's
// parsers as the strict reference.

// received is one request as an instance read it.
type received struct {
	method, uri, host string
	header            http.Header
	body              []byte
}

// recorder is an instance that records every request it reads (with
// net/http's parser) and answers each with "ok"; bytes it cannot parse as
// a request are recorded too, as a request with method "!".
type recorder struct {
	ln     net.Listener
	mu     sync.Mutex
	got    []received
	wg     sync.WaitGroup
	active atomic.Int64 // requests read and not yet answered
}

func newRecorder(tb testing.TB) *recorder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	r := &recorder{ln: ln}
	var conns sync.Map
	tb.Cleanup(func() {
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		r.wg.Wait()
	})
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						if _, perr := br.Peek(1); perr == nil || err != io.EOF && !isReset(err) && !strings.Contains(err.Error(), "closed") {
							r.add(received{method: "!", uri: err.Error()})
						}
						return
					}
					r.active.Add(1)
					body, err := io.ReadAll(req.Body)
					if err != nil { // cut short: the client's was too, or it is a bug
						r.add(received{method: "cut", uri: req.URL.RequestURI() + " " + err.Error()})
						r.active.Add(-1)
						return
					}
					r.add(received{method: req.Method, uri: req.URL.RequestURI(), host: req.Host, header: req.Header, body: body})
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
					r.active.Add(-1)
				}
			}()
		}
	}()
	return r
}

func (r *recorder) add(x received) {
	r.mu.Lock()
	r.got = append(r.got, x)
	r.mu.Unlock()
}

// take returns what was recorded since the last take, once no request is
// under way at the instance (for at most 3 s).
func (r *recorder) take() []received {
	for deadline, quiet := time.Now().Add(3*time.Second), 0; quiet < 3 && time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if r.active.Load() == 0 {
			quiet++
		} else {
			quiet = 0
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	got := r.got
	r.got = nil
	return got
}

func (r *recorder) inst(service string) catalog.Instance {
	a := r.ln.Addr().(*net.TCPAddr)
	return catalog.Instance{ID: service + "-rec", Service: service, Node: "n", Address: "127.0.0.1", Port: a.Port, Weight: 1, Status: "passing"}
}

// runFuzzProxy runs a proxy with an upstream listener for service in front
// of inst, until the fuzz test ends.
func runFuzzProxy(f *testing.F, service string, inst catalog.Instance, cfg Config) *Proxy {
	src := &viewSource{v: catalog.NewView()}
	src.v.Publish(&catalog.Snapshot{Services: map[string]*catalog.Service{service: {Name: service, Instances: []catalog.Instance{inst}}},
		Known: map[string]bool{service: true}})
	br, _ := breaker.New(breaker.Config{NoEjection: true, NoFailureRate: true}, nil, nil)
	cfg.Upstreams = []Upstream{{Name: service, Addr: "127.0.0.1:0", Protocol: ProtoHTTP}}
	cfg.WantTimeout = time.Millisecond
	p, err := New(cfg, src, br, WithEngines(testEngines()))
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
	return p
}

// referenceRequests parses in as a server using net/http would: the
// requests up to the first it refuses, or the first after which the
// connection ends.
func referenceRequests(in []byte) (reqs []received, bodyCut bool) {
	br := bufio.NewReader(bytes.NewReader(in))
	for {
		// Empty lines before a request line may be ignored (RFC 9112
		// §2.2); net/http does not, fasthttp does: both are right.
		for {
			b, err := br.Peek(1)
			if err != nil {
				return reqs, false
			}
			if b[0] == '\n' {
				br.ReadByte()
			} else if b2, _ := br.Peek(2); string(b2) == "\r\n" {
				br.Discard(2)
			} else {
				break
			}
		}
		req, err := http.ReadRequest(br)
		if err != nil {
			return reqs, false
		}
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return reqs, true
		}
		reqs = append(reqs, received{method: req.Method, uri: req.URL.RequestURI(), host: req.Host, header: req.Header, body: body})
		if req.Close {
			return reqs, false
		}
	}
}

// endToEnd is what a proxy may change in a request's headers: the
// hop-by-hop ones (and those its Connection names, but the framing ones),
// Expect (answered by the proxy), the framing, X-Forwarded-*.
func endToEnd(h http.Header) http.Header {
	out := h.Clone()
	for _, v := range h.Values("Connection") {
		for _, tok := range strings.Split(v, ",") {
			if tok = strings.TrimSpace(tok); tok != "" && !h1.FramingHeader([]byte(tok)) {
				out.Del(tok)
			}
		}
	}
	for _, k := range append(hopHeaders, "Expect", "Content-Length", "X-Forwarded-For", "X-Forwarded-Proto") {
		out.Del(k)
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// FuzzRequestStream: a client sends random bytes through the proxy to a
// recording instance. Every request the instance reads must be one the
// client sent, at the same place in the stream, with the same method,
// target, Host, end-to-end headers and body (net/http's server parser is
// the reference); when the proxy passes on fewer requests than the
// reference reads, its last answer to the client is an error (4xx/5xx).
func FuzzRequestStream(f *testing.F) {
	for _, s := range []string{
		"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: y\r\nX-A: 1\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /z HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET http://inventory/q?x=1 HTTP/1.1\r\nHost: other\r\nConnection: close, X-B\r\nX-B: 2\r\n\r\n",
		"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
		"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	rec := newRecorder(f)
	p := runFuzzProxy(f, "inventory", rec.inst("inventory"), Config{TryTimeout: time.Second, RequestTimeout: 2 * time.Second,
		HeaderTimeout: 2 * time.Second, BodyTimeout: 2 * time.Second})
	addr := p.Addr("inventory").String()
	f.Fuzz(func(t *testing.T, in []byte) {
		if bytes.Contains(bytes.ToLower(in), []byte("upgrade")) || bytes.HasPrefix(in, []byte("PRI ")) {
			return // tunnels and h2c carry other protocols
		}
		rec.take()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		_ = c.SetDeadline(start.Add(5 * time.Second)) // past HeaderTimeout, BodyTimeout and TryTimeout
		if _, err := c.Write(in); err == nil {
			_ = c.(*net.TCPConn).CloseWrite()
		}
		out, err := io.ReadAll(c)
		if err != nil && !isReset(err) {
			t.Fatalf("reading the answers: %v after %v (%q so far)", err, time.Since(start), out)
		}
		got := rec.take()
		refs, bodyCut := referenceRequests(in)
		for i, g := range got {
			if g.method == "cut" && i == len(refs) && i == len(got)-1 && bodyCut {
				break // a body the client cut short, streamed on as far as it came
			}
			if g.method == "!" {
				t.Fatalf("the instance read bytes that are no request (%s) after %d requests", g.uri, i)
			}
			if i >= len(refs) {
				t.Fatalf("the instance read request %d (%s %s) where the reference reads %d", i, g.method, g.uri, len(refs))
			}
			r := refs[i]
			if g.method != r.method || g.uri != r.uri || g.host != r.host || !bytes.Equal(g.body, r.body) ||
				!reflect.DeepEqual(endToEnd(g.header), endToEnd(r.header)) {
				t.Fatalf("request %d differs:\n instance: %s %s host %q %v body %q\nreference: %s %s host %q %v body %q",
					i, g.method, g.uri, g.host, endToEnd(g.header), g.body, r.method, r.uri, r.host, endToEnd(r.header), r.body)
			}
		}
		if len(got) < len(refs) {
			// fewer passed on: the client was told why (or its request
			// under way went to a tunnel or ended with the connection)
			last, answers := 0, 0
			br := bufio.NewReader(bytes.NewReader(out))
			for {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					break
				}
				io.Copy(io.Discard, resp.Body)
				last = resp.StatusCode
				answers++
			}
			if last != 0 && last < 400 && answers != len(got) {
				t.Fatalf("the instance read %d of %d requests, the client got %d answers, the last a %d", len(got), len(refs), answers, last)
			}
		}
	})
}

// answerStatus is the proxy's own error answer: 502 or 504 with a JSON body.
func proxyError(resp *http.Response, body []byte) bool {
	return (resp.StatusCode == 502 || resp.StatusCode == 504) && bytes.Contains(body, []byte(`"error"`))
}

// referenceAnswer reads the final answer from in as net/http's client does
// (interim 1xx answers skipped); err when it refuses it.
func referenceAnswer(in []byte) (*http.Response, []byte, error) {
	br := bufio.NewReader(bytes.NewReader(in))
	for {
		resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			return nil, nil, err
		}
		if resp.StatusCode == 101 {
			return nil, nil, h1.ErrBadResponse
		}
		if resp.StatusCode >= 200 {
			body, err := io.ReadAll(resp.Body)
			return resp, body, err
		}
	}
}

// endToEndAnswer drops what a proxy may change in an answer's headers.
func endToEndAnswer(h http.Header) http.Header {
	out := endToEnd(h)
	if out != nil {
		out.Del("Date")
	}
	return out
}

// FuzzAnswerStream: a scripted instance answers a client's request with
// random bytes. What the client reads (net/http's client parser, the
// strict reference) is the instance's answer as the reference reads it,
// or the proxy's own 502/504 — or, when the reference refuses the answer,
// a 502/504 or an answer cut off with the connection; never something
// else. And the client connection stays in step: its next request gets
// its own answer.
func FuzzAnswerStream(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length : 99\r\nContent-Length: 5\r\n\r\nhello",
		"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.0 200 OK\r\n\r\nuntil close",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
		"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	var mu sync.Mutex
	var script []byte
	inst := rawBackendTB(f, "inventory", "scripted", func(req *http.Request, c net.Conn) bool {
		if req.URL.Path != "/fuzz" {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
			return true
		}
		mu.Lock()
		out := script
		mu.Unlock()
		c.Write(out)
		return false // then waits a moment for a next request, and closes
	})
	p := runFuzzProxy(f, "inventory", inst, Config{TryTimeout: time.Second, RequestTimeout: 2 * time.Second})
	addr := p.Addr("inventory").String()
	f.Fuzz(func(t *testing.T, in []byte) {
		mu.Lock()
		script = in
		mu.Unlock()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		io.WriteString(c, "GET /fuzz HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			t.Fatalf("the client could not read an answer: %v", err)
		}
		body, berr := io.ReadAll(resp.Body)
		ref, refBody, refErr := referenceAnswer(in)
		switch {
		case berr != nil: // cut off: only an answer the reference refuses
			if refErr == nil {
				t.Fatalf("an answer the reference reads whole (%d %q) was cut off: %v", ref.StatusCode, refBody, berr)
			}
			return
		case proxyError(resp, body):
		case refErr != nil:
			t.Fatalf("an answer the reference refuses (%v) reached the client as %d %q", refErr, resp.StatusCode, body)
		case resp.StatusCode != ref.StatusCode || !bytes.Equal(body, refBody) ||
			!reflect.DeepEqual(endToEndAnswer(resp.Header), endToEndAnswer(ref.Header)):
			t.Fatalf("the client read %d %v %q, the reference %d %v %q", resp.StatusCode, endToEndAnswer(resp.Header), body,
				ref.StatusCode, endToEndAnswer(ref.Header), refBody)
		}
		if resp.Close {
			return
		}
		io.WriteString(c, "GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err = http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			t.Fatalf("the next request on the connection: %v", err)
		}
		body, err = io.ReadAll(resp.Body)
		if err != nil || !(resp.StatusCode == 200 && string(body) == "good" || proxyError(resp, body)) {
			t.Fatalf("the next request on the connection got %d %q (%v): out of step", resp.StatusCode, body, err)
		}
	})
}

// rawBackendTB is an instance on raw TCP answering each request with
// answer; when answer returns false, the connection is closed once no
// next request comes within 300 ms.
func rawBackendTB(tb testing.TB, service, id string, answer func(req *http.Request, c net.Conn) bool) catalog.Instance {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	var conns sync.Map
	tb.Cleanup(func() {
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
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
			conns.Store(c, true)
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
					if !answer(req, c) {
						_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
					} else {
						_ = c.SetReadDeadline(time.Time{})
					}
				}
			}()
		}
	}()
	a := ln.Addr().(*net.TCPAddr)
	return catalog.Instance{ID: id, Service: service, Node: "n", Address: "127.0.0.1", Port: a.Port, Weight: 1, Status: "passing"}
}
