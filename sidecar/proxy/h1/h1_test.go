package h1

import (
	"testing"
)

func TestParseRequest(t *testing.T) {
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
		{"incomplete", "GET /a HTTP/1.1\r\nHost: x\r\n", ErrIncomplete, nil},
		{"http/1.0", "GET /a HTTP/1.0\r\nHost: x\r\n\r\n", ErrSlow, nil},
		{"no host", "GET /a HTTP/1.1\r\n\r\n", ErrSlow, nil},
		{"chunked", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", ErrSlow, nil},
		{"expect", "POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", ErrSlow, nil},
		{"upgrade", "GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", ErrSlow, nil},
		{"connect", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", ErrSlow, nil},
		{"bare lf", "GET /a HTTP/1.1\nHost: x\n\n", ErrSlow, nil},
		{"folding", "GET /a HTTP/1.1\r\nHost: x\r\n y\r\n\r\n", ErrSlow, nil},
		{"two lengths", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", ErrSlow, nil},
		{"bad length", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", ErrSlow, nil},
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
			h, p := r.Authority(b)
			if path := AppendPath(nil, b, p); string(b[h.Start:h.End]) != "inventory.service.consul:80" || string(path) != "/?q" {
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
			if err := ParseRequest(b, &r); err != tc.err {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			if tc.check != nil {
				tc.check(t, b, &r)
			}
		})
	}
}

func TestChunkScan(t *testing.T) {
	body := "4;ext=1\r\nabcd\r\n10 \t\r\n0123456789abcdef\r\n0 \r\nTrailer: x\r\n\r\n"
	for split := 1; split <= len(body); split++ { // every way of cutting it in two reads
		var cs ChunkScan
		n1, done, err := cs.Scan([]byte(body[:split]))
		if err != nil || n1 != split || done != (split == len(body)) {
			t.Fatalf("split %d: %d %v %v", split, n1, done, err)
		}
		if done {
			continue
		}
		n2, done, err := cs.Scan([]byte(body[split:] + "EXTRA"))
		if err != nil || !done || split+n2 != len(body) {
			t.Fatalf("split %d: second part %d %v %v", split, n2, done, err)
		}
	}
	for _, bad := range []string{"x\r\n", "\r\n", "4\r\nabcdXY", "4\nabcd", "1234567890abc\r\n",
		"0\r\n\nHTTP/1.1 299 Forged\r\n\r\n", "0\r\nX: y\n\r\n", "0 0\r\n\r\n", "0 ;x\r\n\r\n"} {
		var cs ChunkScan
		if _, _, err := cs.Scan([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// FuzzParsers checks that the parsers never panic and keep
// their spans inside the input.
func FuzzParsers(f *testing.F) {
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
		if ParseRequest(b, &rq) == nil {
			if rq.HeadEnd > len(b) {
				t.Fatal("head past the input")
			}
			for k := 0; k < rq.NumHeaders; k++ {
				if rq.Names[k].End > rq.Vals[k].End || rq.Vals[k].End > rq.HeadEnd {
					t.Fatal("span out of range")
				}
			}
			h, p := rq.Authority(b)
			_, _ = b[h.Start:h.End], b[p.Start:p.End]
		}
		var rs Response
		if ParseResponse(b, &rs) == nil {
			if rs.HeadEnd > len(b) || rs.Reason.End > rs.HeadEnd || rs.Status < 100 || rs.Status > 999 {
				t.Fatal("bad response parse")
			}
		}
		var cs ChunkScan
		if n, _, _ := cs.Scan(b); n > len(b) {
			t.Fatal("scanned past the input")
		}
	})
}

func TestParseResponseRejects(t *testing.T) {
	tests := []struct {
		name, in string
		err      error
	}{
		{"plus length", "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", ErrBadResponse},
		{"space in length", "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n", ErrBadResponse},
		{"empty length", "HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", ErrBadResponse},
		{"bare CR in value", "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", ErrBadResponse},
		{"NUL in value", "HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", ErrBadResponse},
		{"bare CR in reason", "HTTP/1.1 200 O\rK\r\n\r\n", ErrBadResponse},
		{"chunked HTTP/1.0", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", ErrBadResponse},
		{"good", "HTTP/1.1 200 OK\r\nContent-Length: 05\r\nX: a b\r\n\r\n", nil},
	}
	for _, tc := range tests {
		var r Response
		if err := ParseResponse([]byte(tc.in), &r); err != tc.err {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.err)
		}
	}
	var r Response
	in := []byte("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: Content-Length, Transfer-Encoding\r\n\r\n")
	if err := ParseResponse(in, &r); err != nil {
		t.Fatal(err)
	}
	for k := 0; k < r.NumHeaders; k++ {
		name := string(in[r.Names[k].Start:r.Names[k].End])
		if want := name != "Transfer-Encoding"; r.Drop[k] != want {
			t.Errorf("%s: drop %v, want %v", name, r.Drop[k], want)
		}
	}
}

// TestTargetForm: the targets a proxy passes on, and absolute-form
// authorities a strict URI parser refuses (a fuzzer found "invento`y").
func TestTargetForm(t *testing.T) {
	for _, tt := range []struct {
		uri     string
		options bool
		want    bool
	}{
		{"/a?b=1", false, true},
		{"/a%2Fb", false, true},
		{"/a%2", false, false},
		{"*", true, true},
		{"*", false, false},
		{"a/b", false, false},
		{"http://inventory/items/1", false, true},
		{"HTTP://inventory.service.consul:8080/x?y#z", false, true},
		{"http://127.0.0.1:9191", false, true},
		{"http://[::1]:9191/x", false, true},
		{"http://[fe80::1%25eth0]/x", false, false}, // zone: stricter than net/url
		{"http://user:pw@inventory/x", false, true},
		{"http://inventory:/x", false, true},
		{"http://invento`y/q?x=1", false, false},
		{"http://inv{ento}ry/", false, false},
		{"http://inventory:80a/", false, false},
		{"http://in%41ventory/", false, false},
		{"http://[::1/x", false, false},
		{"http://[::1]x/", false, false},
		{"http://us`er@inventory/", false, false},
	} {
		if got := TargetForm([]byte(tt.uri), tt.options); got != tt.want {
			t.Errorf("TargetForm(%q, %v) = %v, want %v", tt.uri, tt.options, got, tt.want)
		}
	}
}
