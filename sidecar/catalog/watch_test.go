package catalog

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"attache/internal/testrun"
)

// runWatcher builds and runs a watcher; it is stopped (and checked to have
// stopped) when the test ends.
func runWatcher(t *testing.T, cfg Config) *Watcher {
	t.Helper()
	w, err := NewWatcher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	testrun.Start(t, w)
	return w
}

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
		err  bool
	}{
		{"", ModeOnDemand, false},
		{"all", ModeAll, false},
		{" LIST ", ModeList, false},
		{"on-demand", ModeOnDemand, false},
		{"some", "", true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseMode(tc.in)
			if (err != nil) != tc.err || got != tc.want {
				t.Fatalf("ParseMode(%q) = %q, %v", tc.in, got, err)
			}
		})
	}
}

func TestApplyEnv(t *testing.T) {
	env := map[string]string{
		"CONSUL_HTTP_ADDR":       "https://10.1.1.1:8501",
		"CONSUL_HTTP_TOKEN":      "secret",
		"CONSUL_CACERT":          "/ca.pem",
		"CONSUL_CLIENT_CERT":     "/c.pem",
		"CONSUL_CLIENT_KEY":      "/k.pem",
		"CONSUL_HTTP_SSL":        "true",
		"CONSUL_HTTP_SSL_VERIFY": "false",
	}
	tests := []struct {
		name  string
		start Config
		check func(t *testing.T, c Config)
	}{
		{"defaults take the environment", DefaultConfig(), func(t *testing.T, c Config) {
			if !reflect.DeepEqual(c.Addresses, []string{"https://10.1.1.1:8501"}) || c.Token != "secret" ||
				c.TLS.CAFile != "/ca.pem" || c.TLS.CertFile != "/c.pem" || c.TLS.KeyFile != "/k.pem" ||
				!c.SSL || !c.TLS.InsecureSkipVerify {
				t.Fatalf("got %+v", c)
			}
		}},
		{"explicit settings win", func() Config {
			c := DefaultConfig()
			c.Addresses = []string{"a:1", "b:2"}
			c.Token = "mine"
			c.TLS.CAFile = "/my.pem"
			return c
		}(), func(t *testing.T, c Config) {
			if !reflect.DeepEqual(c.Addresses, []string{"a:1", "b:2"}) || c.Token != "mine" || c.TLS.CAFile != "/my.pem" {
				t.Fatalf("got %+v", c)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.start
			c.ApplyEnv(func(k string) string { return env[k] })
			tc.check(t, c)
		})
	}
	if c := ConfigFromEnv(func(string) string { return "" }); !reflect.DeepEqual(c.Addresses, DefaultConfig().Addresses) {
		t.Fatalf("empty environment changed the addresses: %v", c.Addresses)
	}
}

func TestBuildService(t *testing.T) {
	entry := func(id, status string, mod func(e *api.ServiceEntry)) *api.ServiceEntry {
		e := &api.ServiceEntry{
			Node:    &api.Node{Node: "n-" + id, Address: "10.0.0.9", Datacenter: "dc1"},
			Service: &api.AgentService{ID: id, Service: "Web", Port: 80, Weights: api.AgentWeights{Passing: 3, Warning: 1}},
			Checks:  api.HealthChecks{{CheckID: "serfHealth", Status: api.HealthPassing}, {CheckID: "c-" + id, Status: status}},
		}
		if mod != nil {
			mod(e)
		}
		return e
	}
	maint := func(e *api.ServiceEntry) {
		e.Checks = append(e.Checks, &api.HealthCheck{CheckID: api.ServiceMaintPrefix + e.Service.ID, Status: api.HealthCritical})
	}
	tests := []struct {
		name    string
		entries []*api.ServiceEntry
		warning bool
		want    []Instance
	}{
		{"empty", nil, false, []Instance{}},
		{"passing kept, address falls back to the node's", []*api.ServiceEntry{entry("a", api.HealthPassing, nil)}, false,
			[]Instance{{ID: "a", Service: "Web", Node: "n-a", NodeAddress: "10.0.0.9", Address: "10.0.0.9", Port: 80, Weight: 3, Datacenter: "dc1", Status: "passing"}}},
		{"service address, tags and meta kept", []*api.ServiceEntry{entry("a", api.HealthPassing, func(e *api.ServiceEntry) {
			e.Service.Address = "10.0.0.5"
			e.Service.Tags = []string{"v1"}
			e.Service.Meta = map[string]string{"k": "v"}
		})}, false,
			[]Instance{{ID: "a", Service: "Web", Node: "n-a", NodeAddress: "10.0.0.9", Address: "10.0.0.5", Port: 80, Tags: []string{"v1"}, Meta: map[string]string{"k": "v"}, Weight: 3, Datacenter: "dc1", Status: "passing"}}},
		{"warning dropped by default", []*api.ServiceEntry{entry("a", api.HealthWarning, nil)}, false, []Instance{}},
		{"warning kept when asked, with its weight", []*api.ServiceEntry{entry("a", api.HealthWarning, nil)}, true,
			[]Instance{{ID: "a", Service: "Web", Node: "n-a", NodeAddress: "10.0.0.9", Address: "10.0.0.9", Port: 80, Weight: 1, Datacenter: "dc1", Status: "warning"}}},
		{"critical dropped", []*api.ServiceEntry{entry("a", api.HealthCritical, nil)}, true, []Instance{}},
		{"maintenance dropped", []*api.ServiceEntry{entry("a", api.HealthPassing, maint)}, true, []Instance{}},
		{"no weights means 1", []*api.ServiceEntry{entry("a", api.HealthPassing, func(e *api.ServiceEntry) { e.Service.Weights = api.AgentWeights{} })}, false,
			[]Instance{{ID: "a", Service: "Web", Node: "n-a", NodeAddress: "10.0.0.9", Address: "10.0.0.9", Port: 80, Weight: 1, Datacenter: "dc1", Status: "passing"}}},
		{"nil parts skipped", []*api.ServiceEntry{nil, {Node: &api.Node{}}}, false, []Instance{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, _ := buildService("web", 7, toHealth(t, tc.entries), tc.warning)
			if got.Index != 7 || !reflect.DeepEqual(got.Instances, tc.want) {
				t.Fatalf("got %+v\nwant %+v", got.Instances, tc.want)
			}
		})
	}
	t.Run("sorted by ID then node", func(t *testing.T) {
		a := entry("b", api.HealthPassing, nil)
		b := entry("a", api.HealthPassing, nil)
		c := entry("a", api.HealthPassing, nil)
		c.Node.Node = "m-a"
		got, nodes := buildService("web", 1, toHealth(t, []*api.ServiceEntry{a, b, c}), false)
		if strings.Join(nodes, ",") != "n-b,n-a,m-a" {
			t.Fatalf("nodes %v", nodes)
		}
		var order []string
		for _, i := range got.Instances {
			order = append(order, i.ID+"@"+i.Node)
		}
		if strings.Join(order, ",") != "a@m-a,a@n-a,b@n-b" {
			t.Fatalf("order %v", order)
		}
	})
}

func TestWatcherFollowsChanges(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "10.0.0.2", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	w := runWatcher(t, cfg)

	waitFor(t, w, 5*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	f.register("web", "web2", "node1", "10.0.0.3", 80, api.HealthPassing)
	waitFor(t, w, 5*time.Second, "web2 added", func(s *Snapshot) bool { return same(ids(s, "web"), "web1", "web2") })
	f.register("web", "web1", "node1", "10.0.0.2", 80, api.HealthCritical)
	waitFor(t, w, 5*time.Second, "web1 failing", func(s *Snapshot) bool { return same(ids(s, "web"), "web2") })
	f.register("db", "db1", "node1", "10.0.0.4", 5432, api.HealthPassing)
	s := waitFor(t, w, 5*time.Second, "db watched", func(s *Snapshot) bool { return same(ids(s, "db"), "db1") })
	if !s.Known["db"] || !s.Known["web"] || s.Stale || s.Datacenter != "dc1" || s.Nodes["node1"] == nil {
		t.Fatalf("snapshot %+v", s)
	}
	f.deregister("db", "db1")
	waitFor(t, w, 5*time.Second, "db gone", func(s *Snapshot) bool { _, ok := s.Service("db"); return !ok && !s.Known["db"] })

	st := w.Status()
	if !st.Connected || !st.Synced || st.DataAge != 0 || !w.Ready() {
		t.Fatalf("status %+v", st)
	}
	if n := counterValue(w.met.updates); n < 5 {
		t.Fatalf("updates metric %v", n)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

func TestSnapshotVersionsAndImmutability(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	w := runWatcher(t, cfg)
	s1 := waitFor(t, w, 5*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	f.register("web", "web2", "node1", "", 80, api.HealthPassing)
	s2 := waitFor(t, w, 5*time.Second, "web2", func(s *Snapshot) bool { return same(ids(s, "web"), "web1", "web2") })
	if s2.Version <= s1.Version || s2.Index <= s1.Index-1 {
		t.Fatalf("versions %d -> %d, index %d -> %d", s1.Version, s2.Version, s1.Index, s2.Index)
	}
	if !same(ids(s1, "web"), "web1") {
		t.Fatalf("an old snapshot changed: %v", ids(s1, "web"))
	}
}

func TestWantOnDemand(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	f.register("db", "db1", "node1", "", 5432, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeOnDemand
	cfg.IdleTimeout = time.Second
	w := runWatcher(t, cfg)
	waitFor(t, w, 5*time.Second, "service list", func(s *Snapshot) bool { return s.Known["web"] })
	if _, ok := w.Load().Service("web"); ok {
		t.Fatal("web watched before anyone asked")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s := w.Want(ctx, "WEB")
	if !same(ids(s, "web"), "web1") {
		t.Fatalf("Want returned before the first answer: %v", ids(s, "web"))
	}
	if s := w.Want(ctx, "nosuch"); len(s.Services) != 1 || w.Status().Watched != 1 {
		t.Fatalf("an unknown name was watched: %v", s.ServiceNames())
	}
	// Kept alive by use, then stopped when idle.
	for i := 0; i < 6; i++ {
		time.Sleep(100 * time.Millisecond)
		w.Want(ctx, "web")
	}
	if _, ok := w.Load().Service("web"); !ok {
		t.Fatal("a used watch stopped")
	}
	waitFor(t, w, 5*time.Second, "idle watch stopped", func(s *Snapshot) bool { _, ok := s.Service("web"); return !ok })
	if w.Status().Watched != 0 {
		t.Fatalf("watched %d", w.Status().Watched)
	}
}

func TestWantConcurrent(t *testing.T) {
	f := newFake(t)
	for i := 0; i < 20; i++ {
		f.register(fmt.Sprintf("svc%d", i), "i1", "node1", "", 80, api.HealthPassing)
	}
	w := runWatcher(t, testConfig(f.addr()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				name := fmt.Sprintf("svc%d", i)
				if s := w.Want(ctx, name); !same(ids(s, name), "i1") {
					t.Errorf("%s: %v", name, ids(s, name))
				}
			}
		}()
	}
	wg.Wait()
}

func TestListMode(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	f.register("db", "db1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeList
	cfg.Services = []string{"web", "missing"}
	w := runWatcher(t, cfg)
	s := waitFor(t, w, 5*time.Second, "web", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") && w.Status().Synced })
	if m, ok := s.Service("missing"); !ok || len(m.Instances) != 0 {
		t.Fatalf("a listed service without instances should be present and empty: %+v", m)
	}
	if s := w.Want(context.Background(), "db"); s.Services["db"] != nil {
		t.Fatal("list mode watched a service off the list")
	}
}

func TestIndexGoingBackwardsResets(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	cfg.CoordInterval = -1
	w := runWatcher(t, cfg)
	waitFor(t, w, 5*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	time.Sleep(50 * time.Millisecond) // let the loops block
	f.setIndex(3)                     // a new leader with a shorter log, say
	f.register("web", "web2", "node1", "", 80, api.HealthPassing)
	waitFor(t, w, 5*time.Second, "web2 after the reset", func(s *Snapshot) bool { return same(ids(s, "web"), "web1", "web2") })
	// The watcher must have asked again with index 0 after seeing index 3
	// (the first query of the loop was the other one). The loops answer on
	// their own: web2 may come through another (a service's health query)
	// before the critical-state loop has seen index 3, so that one's
	// reset is waited for.
	zeros := func() int {
		n := 0
		for _, r := range f.seenRequests() {
			if strings.HasPrefix(r, "/v1/health/state/critical 0 ") {
				n++
			}
		}
		return n
	}
	for end := time.Now().Add(5 * time.Second); zeros() < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no reset to index 0 after the index went backwards: %v", f.seenRequests())
		}
	}
}

func TestHungConnectionFailsOver(t *testing.T) {
	// The first address accepts connections and never answers.
	hung, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := hung.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		hung.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(hung.Addr().String(), f.addr())
	cfg.Mode = ModeAll
	cfg.RequestTimeout = 200 * time.Millisecond
	w := runWatcher(t, cfg)
	waitFor(t, w, 10*time.Second, "web1 via the second address", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	if st := w.Status(); st.Address != f.addr() || st.LastError == "" {
		t.Fatalf("status %+v", st)
	}
}

func TestGarbageJSONKeepsTheLastView(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	w := runWatcher(t, cfg)
	waitFor(t, w, 5*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	f.setFault(func(rw http.ResponseWriter, r *http.Request) bool {
		rw.Header().Set("X-Consul-Index", "999")
		rw.Header().Set("X-Consul-LastContact", "0")
		_, _ = rw.Write([]byte(`[{"Node": {"Node": garbage`))
		return true
	})
	f.register("web", "web2", "node1", "", 80, api.HealthPassing) // wakes the loops into the garbage
	deadline := time.Now().Add(5 * time.Second)
	for counterValue(w.met.errors.WithLabelValues("health")) < 3 {
		if time.Now().After(deadline) {
			t.Fatal("garbage JSON was not counted as errors")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !same(ids(w.Load(), "web"), "web1") {
		t.Fatalf("the view changed on garbage: %v", ids(w.Load(), "web"))
	}
	if st := w.Status(); st.Connected || st.LastError == "" {
		t.Fatalf("status after garbage %+v", st)
	}
	f.setFault(nil)
	waitFor(t, w, 5*time.Second, "recovery", func(s *Snapshot) bool { return same(ids(s, "web"), "web1", "web2") })
}

func TestZeroIndexIsAnError(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	f.setFault(func(rw http.ResponseWriter, r *http.Request) bool {
		rw.Header().Set("X-Consul-Index", "0")
		rw.Header().Set("X-Consul-LastContact", "0")
		_, _ = rw.Write([]byte(`{}`))
		return true
	})
	cfg := testConfig(f.addr())
	w := runWatcher(t, cfg)
	time.Sleep(300 * time.Millisecond)
	// Backoff keeps the loops from spinning: a few requests, not thousands.
	if n := f.requests.Load(); n > 100 {
		t.Fatalf("%d requests in 300ms against index 0", n)
	}
	if w.Status().Connected {
		t.Fatal("connected on index 0")
	}
}

func TestStaleRetriesTheLeaderWhenTooStale(t *testing.T) {
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	f.contact = 10 * time.Second
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	cfg.Stale = true
	cfg.MaxStale = time.Second
	w := runWatcher(t, cfg)
	waitFor(t, w, 5*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	var stale, leader bool
	for _, r := range f.seenRequests() {
		if strings.HasPrefix(r, "/v1/health/service/web ") {
			stale = stale || strings.HasSuffix(r, " true")
			leader = leader || strings.HasSuffix(r, " false")
		}
	}
	if !stale || !leader {
		t.Fatalf("want a stale query then a leader query: %v", f.seenRequests())
	}
}

func TestRunStopsEverything(t *testing.T) {
	f := newFake(t)
	for i := 0; i < 50; i++ {
		f.register(fmt.Sprintf("svc%d", i), "i", "node1", "", 80, api.HealthPassing)
	}
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	w, err := NewWatcher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	waitFor(t, w, 5*time.Second, "50 services and consul", func(s *Snapshot) bool { return len(s.Services) == 51 })
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
	if err := w.Run(context.Background()); err == nil {
		t.Fatal("a second Run should fail")
	}
}

func TestNewWatcherRejectsBadConfig(t *testing.T) {
	cfg := testConfig("127.0.0.1:1")
	cfg.Mode = "sometimes"
	if _, err := NewWatcher(cfg); err == nil {
		t.Fatal("bad mode accepted")
	}
	cfg = testConfig("ftp://x")
	if _, err := NewWatcher(cfg); err == nil {
		t.Fatal("bad scheme accepted")
	}
}

func counterValue(c prometheus.Counter) float64 {
	m := &dto.Metric{}
	if err := c.Write(m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

// toHealth turns consul/api entries into what the watcher decodes, through
// their JSON, as it would come from Consul.
func toHealth(t *testing.T, in []*api.ServiceEntry) []healthEntry {
	t.Helper()
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out []healthEntry
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestProbesUsedFirst: after a change of registrations, the services used
// last are probed first.
func TestProbesUsedFirst(t *testing.T) {
	f := newFake(t)
	for i := 0; i < 30; i++ {
		f.register(fmt.Sprintf("svc%d", i), "i1", "node1", "", 80, api.HealthPassing)
	}
	cfg := testConfig(f.addr())
	cfg.Mode = ModeAll
	cfg.CoordInterval = -1
	cfg.MaxConns = minConns // one fetcher: the queue's order is the order of the requests
	w := runWatcher(t, cfg)
	waitFor(t, w, 5*time.Second, "synced", func(s *Snapshot) bool { return w.Status().Synced && len(s.Services) == 31 })
	quiet := func() { // until the fake has seen no request for 200ms
		for n := -1; n != len(f.seenRequests()); {
			n = len(f.seenRequests())
			time.Sleep(200 * time.Millisecond)
		}
	}
	quiet()
	w.Want(context.Background(), "svc17")
	n := len(f.seenRequests())
	f.register("other", "o1", "node1", "", 80, api.HealthPassing) // a registration: every watched service is probed
	waitFor(t, w, 5*time.Second, "other", func(s *Snapshot) bool { return same(ids(s, "other"), "o1") })
	quiet()
	var probes []string
	for _, r := range f.seenRequests()[n:] {
		if strings.HasPrefix(r, "/v1/health/service/svc") {
			probes = append(probes, strings.Fields(strings.TrimPrefix(r, "/v1/health/service/"))[0])
		}
	}
	if len(probes) == 0 || probes[0] != "svc17" {
		t.Fatalf("svc17, used last, not among the first probes: %v", probes)
	}
}
