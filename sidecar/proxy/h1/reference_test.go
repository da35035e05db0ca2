package h1

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strings"
	"testing"
)

// FuzzAgainstNetHTTP judges the parsers by net/http's, the strict
// reference: a request head ParseRequest takes whole is one net/http's
// server reads the same (method, target, length, close, every header),
// an answer head ParseResponse takes is one net/http's client reads the
// same (status, framing, close), and a chunked body ChunkScan sees end is
// one net/http reads to its end at the same byte. The other way round
// there is no claim: what the fast path refuses goes to the general path
// (requests) or is answered 502 (answers).
func FuzzAgainstNetHTTP(f *testing.F) {
	for _, s := range []string{
		"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: a, close\r\na: 1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
		"POST http://svc:80/p HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nIdempotency-Key: k\r\n\r\nabc",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X\r\nX: y\r\n\r\nok",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
		"HTTP/1.1 204 No Content\r\n\r\n",
		"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
		"4;ext=1\r\nabcd\r\n0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var rq Request
		if ParseRequest(b, &rq) == nil {
			checkRequest(t, b, &rq)
		}
		var rs Response
		if ParseResponse(b, &rs) == nil {
			checkResponse(t, b, &rs)
		}
		var cs ChunkScan
		if n, done, err := cs.Scan(b); err == nil && done {
			checkChunked(t, b[:n])
		}
	})
}

func checkRequest(t *testing.T, b []byte, r *Request) {
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b[:r.HeadEnd])))
	if err != nil {
		var uerr *url.Error
		if strings.Contains(err.Error(), "malformed Host header") || errors.As(err, &uerr) {
			// The proxy routes by the host's name (a host no service
			// has finds none) and passes the target on as it is:
			// net/http's URL and Host checks are not the framing's.
			return
		}
		t.Fatalf("taken, but net/http refuses it: %v\n%q", err, b[:r.HeadEnd])
	}
	span := func(s Span) string { return string(b[s.Start:s.End]) }
	if req.Method != span(r.Method) || req.RequestURI != span(r.Target) {
		t.Fatalf("request line %q %q, net/http %q %q", span(r.Method), span(r.Target), req.Method, req.RequestURI)
	}
	if want := max(r.ContentLength, 0); req.ContentLength != want {
		t.Fatalf("length %d, net/http %d", r.ContentLength, req.ContentLength)
	}
	if req.Close != r.ConnClose {
		t.Fatalf("close %v, net/http %v", r.ConnClose, req.Close)
	}
	for k := 0; k < r.NumHeaders; k++ {
		name := textproto.CanonicalMIMEHeaderKey(span(r.Names[k]))
		if name == "Host" {
			continue
		}
		found := false
		for _, v := range req.Header.Values(name) {
			found = found || v == span(r.Vals[k])
		}
		if !found {
			t.Fatalf("header %s: %q, net/http %q", name, span(r.Vals[k]), req.Header.Values(name))
		}
	}
}

func checkResponse(t *testing.T, b []byte, r *Response) {
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b[:r.HeadEnd])), &http.Request{Method: "GET"})
	if err != nil {
		t.Fatalf("taken, but net/http refuses it: %v\n%q", err, b[:r.HeadEnd])
	}
	if resp.StatusCode != r.Status {
		t.Fatalf("status %d, net/http %d", r.Status, resp.StatusCode)
	}
	chunked := len(resp.TransferEncoding) == 1 && resp.TransferEncoding[0] == "chunked"
	if !r.HasBody(false) {
		return // net/http frames no body there whatever the head says
	}
	if chunked != r.Chunked {
		t.Fatalf("chunked %v, net/http %v", r.Chunked, resp.TransferEncoding)
	}
	if !r.Chunked && resp.ContentLength != r.ContentLength {
		t.Fatalf("length %d, net/http %d", r.ContentLength, resp.ContentLength)
	}
	if resp.Close != r.Close && r.ContentLength >= 0 {
		t.Fatalf("close %v, net/http %v", r.Close, resp.Close)
	}
}

func checkChunked(t *testing.T, body []byte) {
	// net/http's chunked reader judges the chunks and stops after the
	// last one; the trailer section after it is passed on as it is, and
	// only where it ends matters: at the first empty line.
	rd := bytes.NewReader(body)
	br := bufio.NewReader(rd)
	if _, err := io.Copy(io.Discard, httputil.NewChunkedReader(br)); err != nil {
		t.Fatalf("the body ends here, but net/http: %v\n%q", err, body)
	}
	rest := string(body[len(body)-br.Buffered()-rd.Len():])
	lines := strings.Split(rest, "\r\n")
	if len(lines) < 2 || lines[len(lines)-1] != "" || lines[len(lines)-2] != "" {
		t.Fatalf("the body ends here, but the trailers %q do not\n%q", rest, body)
	}
	for _, l := range lines[:len(lines)-2] {
		if l == "" || strings.ContainsAny(l, "\r\n") {
			t.Fatalf("the body ends here, but the trailers %q do not\n%q", rest, body)
		}
	}
}
