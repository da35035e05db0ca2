package catalog

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestSplitAddress(t *testing.T) {
	for _, tc := range []struct {
		in           string
		ssl          bool
		scheme, rest string
		err          bool
	}{
		{in: "127.0.0.1:8500", scheme: "http", rest: "127.0.0.1:8500"},
		{in: "http://127.0.0.1:8500", scheme: "http", rest: "127.0.0.1:8500"},
		{in: "https://consul.local:8501/", scheme: "https", rest: "consul.local:8501"},
		{in: "127.0.0.1:8501", ssl: true, scheme: "https", rest: "127.0.0.1:8501"},
		{in: "unix:///run/consul.sock", scheme: "unix", rest: "/run/consul.sock"},
		{in: "ftp://x:1", err: true},
		{in: "http://x:1/prefix", err: true},
		{in: "http://", err: true},
		{in: "unix://", err: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			scheme, rest, err := splitAddress(tc.in, tc.ssl)
			if (err != nil) != tc.err || scheme != tc.scheme || rest != tc.rest {
				t.Fatalf("got %q %q %v", scheme, rest, err)
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

func TestChangedChecks(t *testing.T) {
	web := checkState{status: "critical", service: "web", node: "n1"}
	node := checkState{status: "critical", node: "n2"}
	tests := []struct {
		name     string
		old, cur map[checkKey]checkState
		want     []checkState
	}{
		{"same", map[checkKey]checkState{{"n1", "c"}: web}, map[checkKey]checkState{{"n1", "c"}: web}, nil},
		{"appeared", nil, map[checkKey]checkState{{"n1", "c"}: web}, []checkState{web}},
		{"left", map[checkKey]checkState{{"n2", "serfHealth"}: node}, nil, []checkState{node}},
		{"status changed", map[checkKey]checkState{{"n1", "c"}: web}, map[checkKey]checkState{{"n1", "c"}: {status: "warning", service: "web", node: "n1"}},
			[]checkState{web, {status: "warning", service: "web", node: "n1"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := changedChecks(tc.old, tc.cur)
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
	m := checkMap([]checkEntry{{Node: "N1", CheckID: "c", Status: "critical", ServiceID: "web1", ServiceName: "Web"}, {Node: "N2", CheckID: "serfHealth", Status: "critical"}})
	if m[checkKey{"n1", "c"}] != web || m[checkKey{"n2", "serfHealth"}] != node {
		t.Fatalf("checkMap %v", m)
	}
}

func TestQueue(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q := newQueue()
	q.add("a", false, false)
	q.add("b", false, false)
	q.add("a", true, false) // a probe becomes a fetch, in its place
	q.add("b", false, true) // b moves ahead
	q.add("c", true, true)
	type got struct {
		name          string
		fetch, urgent bool
	}
	next := func() got {
		n, f, u, ok := q.next(ctx)
		if !ok {
			t.Fatal("no job")
		}
		return got{n, f, u}
	}
	for _, want := range []got{{"b", false, true}, {"c", true, true}, {"a", true, false}} {
		if g := next(); g != want {
			t.Fatalf("got %+v, want %+v", g, want)
		}
	}
	// Asked again while running: once more afterwards, as a fetch.
	q.add("a", false, false)
	q.add("a", true, false)
	q.done("a")
	q.done("b")
	q.done("c")
	if g := next(); g != (got{"a", true, false}) {
		t.Fatalf("again: %+v", g)
	}
	q.done("a")
	if len(q.jobs) != 0 {
		t.Fatalf("jobs left: %v", q.jobs)
	}
	short, cancel2 := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel2()
	if _, _, _, ok := q.next(short); ok {
		t.Fatal("a job from an empty queue")
	}
}

// TestFetchRequest checks what a fetch and a probe ask of Consul.
func TestFetchRequest(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []*http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r)
		mu.Unlock()
		w.Header().Set("X-Consul-Index", "7")
		w.Header().Set("X-Consul-LastContact", "12")
		_, _ = w.Write([]byte(`[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a","Service":"web","Port":80},"Checks":[]}]`))
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
	var out []healthEntry
	index, _, err := w.query(context.Background(), "service", "my web", &out, 5, true, "")
	if err != nil || index != 7 || len(out) != 1 || out[0].Service.ID != "a" {
		t.Fatalf("fetch: %v %d %+v", err, index, out)
	}
	if _, _, err := w.query(context.Background(), "probe", "web", &out, 5, false, never); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	v := got[0].URL.Query()
	if got[0].URL.Path != "/v1/health/service/my web" || v.Get("index") != "5" || v.Get("wait") != "1000ms" || v.Has("passing") ||
		v.Get("dc") != "dc9" || !v.Has("stale") || v.Get("near") != "_agent" || got[0].Header.Get("X-Consul-Token") != "s3cret" {
		t.Fatalf("fetch request %s %v", got[0].URL, got[0].Header)
	}
	v = got[1].URL.Query()
	if v.Get("filter") != never || v.Has("index") {
		t.Fatalf("probe request %s", got[1].URL)
	}
}

// TestNoUnsolicitedResponseLog: an agent over its per-client connection
// limit answers 429 on a new connection as soon as it accepts it, request
// or not. When the transport dialed that connection for a request that
// then went out on a connection freed meanwhile, the connection waits in
// the idle pool with an answer nobody asked for, and net/http prints
// "Unsolicited response received on idle HTTP channel" on the standard
// logger. The watcher's connections hold their reads back until they have
// written: the 429 becomes an ordinary error of the next request sent on
// that connection.
func TestNoUnsolicitedResponseLog(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		first := true
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if first { // the one connection within the limit: answers quickly, kept alive
				first = false
				go func() {
					defer c.Close()
					br := bufio.NewReader(c)
					for {
						if _, err := http.ReadRequest(br); err != nil {
							return
						}
						time.Sleep(2 * time.Millisecond)
						if _, err := c.Write([]byte("HTTP/1.1 200 OK\r\nX-Consul-Index: 3\r\nContent-Length: 2\r\n\r\n[]")); err != nil {
							return
						}
					}
				}()
				continue
			}
			go func() { // over the limit: 429 a moment after accepting
				time.Sleep(10 * time.Millisecond)
				_, _ = c.Write([]byte("HTTP/1.1 429 Too Many Requests\r\nContent-Length: 33\r\nConnection: close\r\n\r\nYour IP is issuing too many conns"))
				time.Sleep(200 * time.Millisecond)
				c.Close()
			}()
		}
	}()
	var buf bytes.Buffer
	var bmu sync.Mutex
	log.SetOutput(writerFunc(func(p []byte) (int, error) { bmu.Lock(); defer bmu.Unlock(); return buf.Write(p) }))
	defer log.SetOutput(os.Stderr)
	w, err := NewWatcher(testConfig(l.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	oks, fails := 0, 0
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				var out []healthEntry
				_, _, err := w.query(context.Background(), "service", "web", &out, 0, false, "")
				mu.Lock()
				if err == nil {
					oks++
				} else {
					fails++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	time.Sleep(50 * time.Millisecond) // the late 429s arrive
	bmu.Lock()
	defer bmu.Unlock()
	if strings.Contains(buf.String(), "Unsolicited") {
		t.Fatalf("net/http logged: %s", buf.String())
	}
	if oks == 0 {
		t.Fatal("no query went through")
	}
	t.Logf("%d answered, %d refused", oks, fails)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// FuzzHealthAnswers feeds arbitrary bytes as Consul's JSON answers to a
// health query and to the health-state query: decoding must give an error
// or values the watcher can use, never a panic, and a Service built from
// them keeps only passing or warning instances.
func FuzzHealthAnswers(f *testing.F) {
	f.Add([]byte(`[]`))
	f.Add([]byte(`[{"Node":{"Node":"n","Address":"a"},"Service":{"ID":"x","Service":"web","Port":1,"Tags":["t"],"Meta":{"k":"v"},"Weights":{"Passing":2}},"Checks":[{"CheckID":"c","Status":"warning"}]}]`))
	f.Add([]byte(`[{"Node":"n","CheckID":"serfHealth","Status":"critical","ServiceID":"","ServiceName":""}]`))
	f.Add([]byte(`[{"Node":null,"Service":{}},{}]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var entries []healthEntry
		if json.Unmarshal(b, &entries) == nil {
			for _, warn := range []bool{false, true} {
				svc, _ := buildService("web", 1, entries, warn)
				for _, in := range svc.Instances {
					if in.Status != api.HealthPassing && in.Status != api.HealthWarning {
						t.Fatalf("instance with status %q kept", in.Status)
					}
				}
			}
		}
		var checks []checkEntry
		if json.Unmarshal(b, &checks) == nil {
			m := checkMap(checks)
			if len(changedChecks(m, m)) != 0 {
				t.Fatal("a set of checks differs from itself")
			}
			_ = changedChecks(nil, m)
		}
	})
}
