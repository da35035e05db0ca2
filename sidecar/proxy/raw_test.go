package proxy

import (
	"bytes"
	"context"
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/valyala/fasthttp"
)

func TestParseRawReq(t *testing.T) {
	tests := []struct {
		name, in string
		err      error
		check    func(t *testing.T, b []byte, r *Request)
	}{
		{"simple", "GET /a HTTP/1.1\r\nHost: x\r\n\r\n", nil, func(t *testing.T, b []byte, r *Request) {
			if string(b[r.Host.Start:r.Host.End]) != "x" || r.ContentLength != -1 || r.Hop {
				t.Errorf("%+v", r)
			}
		}},
		{"incomplete", "GET /a HTTP/1.1\r\nHost: x\r\n", errHeadIncomplete, nil},
		{"http/1.0", "GET /a HTTP/1.0\r\nHost: x\r\n\r\n", errSlow, nil},
		{"no host", "GET /a HTTP/1.1\r\n\r\n", errSlow, nil},
		{"chunked", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", errSlow, nil},
		{"expect", "POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", errSlow, nil},
		{"upgrade", "GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", errSlow, nil},
		{"connect", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", errSlow, nil},
		{"bare lf", "GET /a HTTP/1.1\nHost: x\n\n", errSlow, nil},
		{"folding", "GET /a HTTP/1.1\r\nHost: x\r\n y\r\n\r\n", errSlow, nil},
		{"two lengths", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", errSlow, nil},
		{"bad length", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", errSlow, nil},
		{"hop headers", "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close, X-P\r\nX-P: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nIdempotency-Key: k\r\n\r\n", nil,
			func(t *testing.T, b []byte, r *Request) {
				if !r.ConnClose || !r.Hop || !r.IdemKey || r.NumXFF != 1 {
					t.Errorf("%+v", r)
				}
				for k := 0; k < r.NumHeaders; k++ {
					name := string(b[r.Names[k].Start:r.Names[k].End])
					if want := name != "Host" && name != "Idempotency-Key"; r.Drop[k] != want {
						t.Errorf("%s: drop %v", name, r.Drop[k])
					}
				}
			}},
		{"absolute form", "GET http://inventory.service.consul:80?q HTTP/1.1\r\nHost: inventory\r\n\r\n", nil, func(t *testing.T, b []byte, r *Request) {
			h, p := r.authority(b)
			if path := appendPath(nil, b, p); string(b[h.Start:h.End]) != "inventory.service.consul:80" || string(path) != "/?q" {
				t.Errorf("authority %q path %q", b[h.Start:h.End], path)
			}
		}},
		{"connection names framing", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: Content-Length, host, X-P\r\nX-P: 1\r\n\r\nA", nil,
			func(t *testing.T, b []byte, r *Request) {
				if r.ContentLength != 1 {
					t.Errorf("clen %d", r.ContentLength)
				}
				for k := 0; k < r.NumHeaders; k++ {
					name := string(b[r.Names[k].Start:r.Names[k].End])
					if want := name == "Connection" || name == "X-P"; r.Drop[k] != want {
						t.Errorf("%s: drop %v", name, r.Drop[k])
					}
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r Request
			b := []byte(tc.in)
			if err := parseRawReq(b, &r); err != tc.err {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			if tc.check != nil {
				tc.check(t, b, &r)
			}
		})
	}
}

func TestChunkScan(t *testing.T) {
	body := "4;ext=1\r\nabcd\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n"
	for split := 1; split <= len(body); split++ { // every way of cutting it in two reads
		var cs chunkScan
		n1, done, err := cs.scan([]byte(body[:split]))
		if err != nil || n1 != split || done != (split == len(body)) {
			t.Fatalf("split %d: %d %v %v", split, n1, done, err)
		}
		if done {
			continue
		}
		n2, done, err := cs.scan([]byte(body[split:] + "EXTRA"))
		if err != nil || !done || split+n2 != len(body) {
			t.Fatalf("split %d: second part %d %v %v", split, n2, done, err)
		}
	}
	for _, bad := range []string{"x\r\n", "\r\n", "4\r\nabcdXY", "4\nabcd", "1234567890abc\r\n",
		"0\r\n\nHTTP/1.1 299 Forged\r\n\r\n", "0\r\nX: y\n\r\n"} {
		var cs chunkScan
		if _, _, err := cs.scan([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// FuzzRawParsers checks that the fast path's parsers never panic and keep
// their spans inside the input.
func FuzzRawParsers(f *testing.F) {
	for _, s := range []string{
		"GET /a HTTP/1.1\r\nHost: x\r\nConnection: a, b, close\r\na: 1\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X\r\nX: y\r\n\r\nok",
		"HTTP/1.0 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n",
		"5\r\nhello\r\n0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var rq Request
		if parseRawReq(b, &rq) == nil {
			if rq.HeadEnd > len(b) {
				t.Fatal("head past the input")
			}
			for k := 0; k < rq.NumHeaders; k++ {
				if rq.Names[k].End > rq.Vals[k].End || rq.Vals[k].End > rq.HeadEnd {
					t.Fatal("span out of range")
				}
			}
			h, p := rq.authority(b)
			_, _ = b[h.Start:h.End], b[p.Start:p.End]
		}
		var rs rawResp
		if parseRawResp(b, &rs) == nil {
			if rs.HeadEnd > len(b) || rs.Reason.End > rs.HeadEnd || rs.Status < 100 || rs.Status > 999 {
				t.Fatal("bad response parse")
			}
		}
		var cs chunkScan
		if n, _, _ := cs.scan(b); n > len(b) {
			t.Fatal("scanned past the input")
		}
	})
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
		s.wg.Add(1)
		serveFuzzConn(t, c, rc.run)
	})
}
