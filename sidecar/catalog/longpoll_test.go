package catalog

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestParseEndpoint(t *testing.T) {
	for _, tc := range []struct {
		in       string
		ssl      bool
		network  string
		addr     string
		tls, err bool
	}{
		{in: "127.0.0.1:8500", network: "tcp", addr: "127.0.0.1:8500"},
		{in: "http://127.0.0.1:8500", network: "tcp", addr: "127.0.0.1:8500"},
		{in: "https://consul.local:8501/", network: "tcp", addr: "consul.local:8501", tls: true},
		{in: "127.0.0.1:8501", ssl: true, network: "tcp", addr: "127.0.0.1:8501", tls: true},
		{in: "consul.local", network: "tcp", addr: "consul.local:8500"},
		{in: "https://[::1]", network: "tcp", addr: "[::1]:8501", tls: true},
		{in: "unix:///run/consul.sock", network: "unix", addr: "/run/consul.sock"},
		{in: "ftp://x:1", err: true},
		{in: "http://x:1/prefix", err: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			ep, err := parseEndpoint(tc.in, tc.ssl, &tls.Config{})
			if (err != nil) != tc.err {
				t.Fatalf("err %v", err)
			}
			if err != nil {
				return
			}
			if ep.network != tc.network || ep.addr != tc.addr || (ep.tls != nil) != tc.tls {
				t.Fatalf("got %+v", ep)
			}
			if ep.tls != nil && ep.tls.ServerName == "" {
				t.Fatal("no TLS server name")
			}
		})
	}
}

// TestStatusMatchesConsulAPI: the watcher's aggregation of check states is
// consul/api's.
func TestStatusMatchesConsulAPI(t *testing.T) {
	statuses := []string{api.HealthPassing, api.HealthWarning, api.HealthCritical, "bogus"}
	ids := []string{"c1", api.NodeMaint, api.ServiceMaintPrefix + "web1"}
	for _, s1 := range statuses {
		for _, s2 := range statuses {
			for _, id := range ids {
				checks := api.HealthChecks{{CheckID: "c0", Status: s1}, {CheckID: id, Status: s2}}
				var e healthEntry
				for _, c := range checks {
					e.Checks = append(e.Checks, struct{ CheckID, Status string }{c.CheckID, c.Status})
				}
				if got, want := e.status(), checks.AggregatedStatus(); got != want {
					t.Errorf("%s/%s/%s: got %q, want %q", s1, s2, id, got, want)
				}
			}
		}
	}
	var none healthEntry
	if none.status() != api.HealthPassing {
		t.Fatal("no checks should be passing")
	}
}

// TestLongPollRequest checks the request the watcher sends and that it
// copes with Consul's ways of answering: chunked bodies, Connection: close,
// errors with a status and a message.
func TestLongPollRequest(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var got *http.Request
	mode := "chunked"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r
		w.Header().Set("X-Consul-Index", "7")
		w.Header().Set("X-Consul-LastContact", "12")
		w.Header().Set("X-Consul-KnownLeader", "true")
		switch mode {
		case "chunked":
			w.(http.Flusher).Flush() // forces chunked encoding
			_, _ = w.Write([]byte(`[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a","Service":"web","Port":80},"Checks":[]}]`))
		case "close":
			w.Header().Set("Connection", "close")
			_, _ = w.Write([]byte(`[]`))
		case "error":
			http.Error(w, "ACL not found", http.StatusForbidden)
		case "noindex":
			w.Header().Del("X-Consul-Index")
			_, _ = w.Write([]byte(`[]`))
		}
	}))
	defer srv.Close()
	cfg := testConfig(srv.Listener.Addr().String())
	cfg.TokenFile = tokenFile
	cfg.Datacenter = "dc9"
	cfg.Stale = true
	w, err := NewWatcher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &poller{w: w, ep: -1}
	defer p.close()
	ctx := context.Background()
	q := &api.QueryOptions{WaitIndex: 5, WaitTime: 2 * time.Second, AllowStale: true}
	out, meta, err := p.health(ctx, 0, "my web", q, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || out[0].Service.ID != "a" || meta.LastIndex != 7 || meta.LastContact != 12*time.Millisecond || !meta.KnownLeader {
		t.Fatalf("answer %+v %+v", out, meta)
	}
	v := got.URL.Query()
	if got.URL.Path != "/v1/health/service/my web" || v.Get("index") != "5" || v.Get("wait") != "2000ms" || v.Get("passing") != "true" ||
		v.Get("dc") != "dc9" || !v.Has("stale") || v.Get("near") != "_agent" || got.Header.Get("X-Consul-Token") != "s3cret" {
		t.Fatalf("request %s %v", got.URL, got.Header)
	}
	// The connection is kept alive for the next query.
	first := p.conn
	if _, _, err := p.health(ctx, 0, "web", q, time.Now().Add(5*time.Second)); err != nil || p.conn != first {
		t.Fatalf("connection not reused: %v", err)
	}
	mode = "close"
	if _, _, err := p.health(ctx, 0, "web", q, time.Now().Add(5*time.Second)); err != nil || p.conn != nil {
		t.Fatalf("Connection: close not honoured: %v", err)
	}
	mode = "error"
	if _, _, err := p.health(ctx, 0, "web", q, time.Now().Add(5*time.Second)); err == nil || !strings.Contains(err.Error(), "ACL not found") {
		t.Fatalf("error answer: %v", err)
	}
	mode = "noindex"
	if _, _, err := p.health(ctx, 0, "web", q, time.Now().Add(5*time.Second)); err == nil {
		t.Fatal("an answer without X-Consul-Index accepted")
	}
}

// TestLongPollServerClosedIdleConnection: a kept-alive connection the server
// has closed meanwhile is replaced at once, not reported as an error.
func TestLongPollServerClosedIdleConnection(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "3")
		_, _ = w.Write([]byte(`[]`))
	}))
	srv.Start()
	defer srv.Close()
	w, err := NewWatcher(testConfig(srv.Listener.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	p := &poller{w: w, ep: -1}
	defer p.close()
	q := &api.QueryOptions{}
	if _, _, err := p.health(context.Background(), 0, "web", q, time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	srv.CloseClientConnections()
	time.Sleep(20 * time.Millisecond)
	if _, _, err := p.health(context.Background(), 0, "web", q, time.Now().Add(5*time.Second)); err != nil {
		t.Fatalf("closed keep-alive connection surfaced as %v", err)
	}
}

// TestLongPollCancel: ending the watch's context unblocks a waiting query at
// once.
func TestLongPollCancel(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // never answers
		}
	}()
	w, err := NewWatcher(testConfig(l.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	p := &poller{w: w, ep: -1}
	defer p.close()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	if _, _, err := p.health(ctx, 0, "web", &api.QueryOptions{}, time.Now().Add(time.Minute)); err == nil {
		t.Fatal("no error")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cancel took %v", d)
	}
}

// FuzzHealthAnswer feeds arbitrary bytes as Consul's raw HTTP answer to a
// health query: the watcher must return an answer or an error, never panic
// or hang, and build a valid Service from whatever it accepted.
func FuzzHealthAnswer(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 2\r\n\r\n[]"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[{}]\r\n0\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\n\r\n" +
		`[{"Node":{"Node":"n","Address":"a"},"Service":{"ID":"x","Service":"web","Port":1,"Tags":["t"],"Meta":{"k":"v"},"Weights":{"Passing":2}},"Checks":[{"CheckID":"c","Status":"warning"}]}]`))
	f.Add([]byte("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 16\r\n\r\nNo cluster leader"))
	f.Add([]byte("garbage"))
	w, err := NewWatcher(testConfig("127.0.0.1:1"))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, answer []byte) {
		client, server := net.Pipe()
		defer server.Close()
		go func() {
			br := bufio.NewReader(server)
			for {
				line, err := br.ReadString('\n')
				if err != nil || line == "\r\n" {
					break
				}
			}
			_, _ = server.Write(answer)
			server.Close()
		}()
		p := &poller{w: w, ep: 0, conn: client, stop: func() bool { return true }}
		defer p.close()
		out, meta, _, err := p.roundTrip(context.Background(), 0, "web", &api.QueryOptions{}, time.Now().Add(2*time.Second))
		if err != nil {
			return
		}
		if meta == nil {
			t.Fatal("no metadata with an answer")
		}
		for _, warn := range []bool{false, true} {
			svc := buildService("web", meta.LastIndex, out, warn)
			for _, in := range svc.Instances {
				if in.Status != api.HealthPassing && in.Status != api.HealthWarning {
					t.Fatalf("instance with status %q kept", in.Status)
				}
			}
		}
	})
}
