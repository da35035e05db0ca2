package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
)

// prefixRouter routes by path prefix: "/a/" to service a (the prefix
// stripped when strip), "/deny/" to a 429, anything else to 404.
type prefixRouter struct {
	routes map[string]string // prefix -> service
	strip  bool
	calls  atomic.Int64
	pol    *Policy
}

func (r *prefixRouter) Route(h *Head) Decision {
	r.calls.Add(1)
	if strings.HasPrefix(h.Path, "/deny/") {
		return Decision{Answer: &Answer{Status: 429, Header: [][2]string{{"Retry-After", "1"}}, Body: []byte("slow down\n")}}
	}
	if h.Header("X-Route-To") != "" {
		return Decision{Service: h.Header("X-Route-To")}
	}
	for p, svc := range r.routes {
		if strings.HasPrefix(h.Path, p) {
			d := Decision{Service: svc, Policy: r.pol}
			if r.strip {
				d.Path = "/" + strings.TrimPrefix(h.Path, p)
			}
			return d
		}
	}
	return Decision{}
}

// headerEcho answers with the path and forwarding headers it got.
type headerEcho struct{ id string }

func (e headerEcho) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") == "websocket" {
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(conn, rw)
		return
	}
	body, _ := io.ReadAll(r.Body)
	json.NewEncoder(w).Encode(map[string]string{"id": e.id, "path": r.URL.RequestURI(), "real_ip": r.Header.Get("X-Real-IP"),
		"xfp": r.Header.Get("X-Forwarded-Proto"), "xff": r.Header.Get("X-Forwarded-For"), "body": string(body)})
}

// TestGatewayListener: a gateway listener asks its Router about every
// request, whichever engine serves it (event loop or goroutine fast path,
// fasthttp for a chunked body, net/http for h2c and TLS), and forwards with
// the decision: the service, the rewritten path, X-Real-IP and
// X-Forwarded-Proto set, the router's own answers written as they are.
// The same with goroutines only, and with fasthttp alone (NoFastPath:
// HTTP/1.1 over TLS answered 502 there, its URI parsed as https).
func TestGatewayListener(t *testing.T) {
	for _, tc := range []struct {
		name string
		eng  Engines
	}{{"default", Engines{}}, {"goroutines", Engines{NoEventLoops: true}}, {"fasthttp", Engines{NoFastPath: true}}} {
		t.Run(tc.name, func(t *testing.T) { testGatewayListener(t, tc.eng) })
	}
}

func testGatewayListener(t *testing.T, eng Engines) {
	var cfg Config
	a := newBackend(t, "a", "a1", headerEcho{"a1"})
	b := newBackend(t, "b", "b1", headerEcho{"b1"})
	rt := &prefixRouter{routes: map[string]string{"/a/": "a", "/b/": "b"}, strip: true}
	cert := selfSigned(t)
	cfg.Gateways = []GatewayListener{
		{Addr: "127.0.0.1:0", Router: rt},
		{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{cert}}},
	}
	tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"a": {a}, "b": {b}}, eng)
	plain := "http://" + tp.p.GatewayAddr(0).String()
	secure := "https://" + tp.p.GatewayAddr(1).String()
	c := newClient()
	echoOf := func(code int, body []byte) map[string]string {
		var m map[string]string
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatalf("%d %s", code, body)
		}
		return m
	}

	req, _ := http.NewRequest("GET", plain+"/a/x/y?q=1", nil)
	req.Header.Set("X-Real-IP", "6.6.6.6")
	req.Header.Set("X-Forwarded-Proto", "https")
	for i := 0; i < 3; i++ { // keep-alive: several requests on one connection
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		m := echoOf(resp.StatusCode, body)
		if resp.StatusCode != 200 || m["id"] != "a1" || m["path"] != "/x/y?q=1" || m["real_ip"] != "127.0.0.1" || m["xfp"] != "http" || m["xff"] != "127.0.0.1" {
			t.Fatalf("plain: %d %v", resp.StatusCode, m)
		}
	}
	// A header the router reads; an unknown route; the router's own answer.
	req, _ = http.NewRequest("GET", plain+"/zzz", nil)
	req.Header.Set("X-Route-To", "b")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := echoOf(resp.StatusCode, body); m["id"] != "b1" || m["path"] != "/zzz" {
		t.Errorf("routed by header: %v", m)
	}
	if code, _, body := get(t, c, plain+"/nowhere"); code != 404 || !strings.Contains(string(body), "no route") {
		t.Errorf("no route: %d %s", code, body)
	}
	if code, h, body := get(t, c, plain+"/deny/1"); code != 429 || h.Get("Retry-After") != "1" || string(body) != "slow down\n" {
		t.Errorf("router's answer: %d %v %s", code, h, body)
	}
	// A chunked body goes to fasthttp, routed the same way.
	resp, err = c.Post(plain+"/b/post", "text/plain", io.MultiReader(strings.NewReader("chunked "), strings.NewReader("body")))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := echoOf(resp.StatusCode, body); m["id"] != "b1" || m["path"] != "/post" || m["body"] != "chunked body" || m["real_ip"] != "127.0.0.1" {
		t.Errorf("chunked (fasthttp): %v", m)
	}
	// h2c on the plain listener.
	tr := &http.Transport{}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetUnencryptedHTTP2(true)
	resp, err = (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get(plain + "/a/h2c")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := echoOf(resp.StatusCode, body); resp.ProtoMajor != 2 || m["path"] != "/h2c" || m["xfp"] != "http" {
		t.Errorf("h2c: %s %v", resp.Proto, m)
	}
	// TLS: HTTP/2 by ALPN, X-Forwarded-Proto https.
	tc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}}
	resp, err = tc.Get(secure + "/a/tls?z=2")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := echoOf(resp.StatusCode, body); resp.ProtoMajor != 2 || m["path"] != "/tls?z=2" || m["xfp"] != "https" || m["real_ip"] != "127.0.0.1" {
		t.Errorf("tls: %s %v", resp.Proto, m)
	}
	if code, _, _ := get(t, tc, secure+"/nowhere"); code != 404 {
		t.Errorf("tls, no route: %d", code)
	}
	// HTTP/1.1 over TLS: the goroutine fast path, keep-alive; a chunked
	// body goes on to fasthttp.
	t1 := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	for i := 0; i < 3; i++ {
		resp, err = t1.Get(secure + "/b/one")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if m := echoOf(resp.StatusCode, body); resp.ProtoMajor != 1 || m["id"] != "b1" || m["path"] != "/one" || m["xfp"] != "https" || m["real_ip"] != "127.0.0.1" {
			t.Errorf("tls http/1.1: %s %v", resp.Proto, m)
		}
	}
	resp, err = t1.Post(secure+"/b/post", "text/plain", io.MultiReader(strings.NewReader("over "), strings.NewReader("tls")))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := echoOf(resp.StatusCode, body); m["body"] != "over tls" || m["xfp"] != "https" {
		t.Errorf("tls http/1.1 chunked: %v", m)
	}
	// WebSocket through both listeners (TLS: HTTP/1.1 by ALPN), the path rewritten.
	for i, dial := range []func() (net.Conn, error){
		func() (net.Conn, error) { return net.Dial("tcp", tp.p.GatewayAddr(0).String()) },
		func() (net.Conn, error) {
			return tls.Dial("tcp", tp.p.GatewayAddr(1).String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		},
	} {
		conn, err := dial()
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(conn, "GET /a/chat HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
		br := bufio.NewReader(conn)
		if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 101 {
			t.Fatalf("listener %d: upgrade: %v %v", i, resp, err)
		}
		fmt.Fprint(conn, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(br, buf); err != nil || !bytes.Equal(buf, []byte("ping")) {
			t.Fatalf("listener %d: echo: %q %v", i, buf, err)
		}
	}
}

// TestGatewayPolicy: a route's policy replaces the proxy's retries and try
// timeout for its requests only.
func TestGatewayPolicy(t *testing.T) {
	var slowHits atomic.Int64
	slow := func(id string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			slowHits.Add(1)
			time.Sleep(300 * time.Millisecond)
			w.Write([]byte(id))
		})
	}
	s1, s2 := newBackend(t, "slow", "s1", slow("s1")), newBackend(t, "slow", "s2", slow("s2"))
	rt := &prefixRouter{routes: map[string]string{"/": "slow"}, pol: &Policy{TryTimeout: 100 * time.Millisecond, NoRetries: true}}
	tp := startProxy(t, Config{Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt}}}, breaker.Config{},
		map[string][]*backend{"slow": {s1, s2}})
	code, _, body := get(t, newClient(), "http://"+tp.p.GatewayAddr(0).String()+"/x")
	if code != 504 || slowHits.Load() != 1 {
		t.Errorf("route policy (100 ms try, no retry): %d %s, %d tries", code, body, slowHits.Load())
	}
	// The proxy's own settings (5 s tries) elsewhere: the same instances answer.
	rt.pol = nil
	if code, _, body := get(t, newClient(), "http://"+tp.p.GatewayAddr(0).String()+"/x"); code != 200 {
		t.Errorf("without the route policy: %d %s", code, body)
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gw"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// FuzzGatewayListener sends raw bytes over a real TCP connection to a
// gateway listener whose router rewrites paths and reads headers: it must
// answer with well-formed HTTP or close, and keep serving.
func FuzzGatewayListener(f *testing.F) {
	for _, s := range []string{
		"GET /a/items/1 HTTP/1.1\r\nHost: gw\r\n\r\nGET /a/items/2?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n",
		"GET /zzz HTTP/1.1\r\nHost: gw\r\nX-Route-To: a\r\nX-Real-IP: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n\r\n",
		"POST /a/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello",
		"POST /a/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"GET /deny/1 HTTP/1.1\r\nHost: gw\r\n\r\n",
		"GET http://gw/a?x HTTP/1.1\r\nHost: gw\r\n\r\n",
		"GET /nowhere HTTP/1.1\r\nHost: gw\r\nX-Route-To: nosuch\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	b := newBackend(f, "a", "a1", headerEcho{"a1"})
	src := &viewSource{v: catalog.NewView()}
	publish(src, map[string][]*backend{"a": {b}})
	br, _ := breaker.New(breaker.Config{}, nil, nil)
	rt := &prefixRouter{routes: map[string]string{"/a": "a"}, strip: true}
	p, err := New(Config{Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt}}, TryTimeout: time.Second, RequestTimeout: 2 * time.Second,
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
	addr := p.GatewayAddr(0).String()
	f.Fuzz(func(t *testing.T, in []byte) {
		fuzzListener(t, addr, in, "GET /a/items/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
	})
}

// slotRouter sends everything to service a, handing back one TargetSlot.
type slotRouter struct{ slot TargetSlot }

func (r *slotRouter) Route(*Head) Decision { return Decision{Service: "a", Target: &r.slot} }

// TestTargetSlot: a decision's TargetSlot is filled with the proxy's
// state for its service and used for the next requests; a proxy never uses
// the state another proxy left in a slot (two proxies sharing one router
// each reach their own instance).
func TestTargetSlot(t *testing.T) {
	rt := &slotRouter{}
	a1 := newBackend(t, "a", "a1", headerEcho{"a1"})
	a2 := newBackend(t, "a", "a2", headerEcho{"a2"})
	tp1 := startProxy(t, Config{Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt}}}, breaker.Config{}, map[string][]*backend{"a": {a1}})
	tp2 := startProxy(t, Config{Gateways: []GatewayListener{{Addr: "127.0.0.1:0", Router: rt}}}, breaker.Config{}, map[string][]*backend{"a": {a2}})
	c := newClient()
	for i := 0; i < 3; i++ {
		for _, tc := range []struct {
			tp *testProxy
			id string
		}{{tp1, "a1"}, {tp2, "a2"}} {
			code, _, body := get(t, c, "http://"+tc.tp.p.GatewayAddr(0).String()+"/x")
			var m map[string]string
			if err := json.Unmarshal(body, &m); err != nil || code != 200 || m["id"] != tc.id {
				t.Fatalf("round %d: want %s: %d %s", i, tc.id, code, body)
			}
			tc.tp.p.mu.Lock()
			want := tc.tp.p.targets["a"]
			tc.tp.p.mu.Unlock()
			if got := rt.slot.t.Load(); got != want {
				t.Fatalf("round %d: the slot holds %p, the proxy's target is %p", i, got, want)
			}
		}
	}
}
