package gateway

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"attache/control/routes"
	"attache/internal/testcluster"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/proxy"
)

// One cluster (three servers, two client agents) for the package's tests.
var cluster *testcluster.Cluster

func TestMain(m *testing.M) {
	if os.Getenv("ATTACHE_SKIP_CLUSTER") == "" {
		if _, err := testcluster.Binary(); err == nil {
			c, err := testcluster.New(testcluster.Options{Clients: 2})
			if err != nil {
				fmt.Fprintln(os.Stderr, "gateway tests: cannot start a Consul cluster:", err)
				os.Exit(1)
			}
			cluster = c
		}
	}
	code := m.Run()
	if cluster != nil {
		cluster.Close()
	}
	os.Exit(code)
}

func needCluster(t *testing.T) *testcluster.Cluster {
	t.Helper()
	if cluster == nil {
		t.Fatal("testcluster: no Consul binary: run scripts/build (it builds the pinned Consul into .bin/consul) or set ATTACHE_CONSUL")
	}
	return cluster
}

// echo is a backend that tells who it is and what it got.
type echo struct {
	service, id string
	hits        atomic.Int64
}

type echoed struct {
	Service string `json:"service"`
	ID      string `json:"id"`
	Path    string `json:"path"`
	RealIP  string `json:"real_ip"`
	XFF     string `json:"xff"`
	XFP     string `json:"xfp"`
}

func (e *echo) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.hits.Add(1)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(echoed{Service: e.service, ID: e.id, Path: r.URL.RequestURI(),
		RealIP: r.Header.Get("X-Real-IP"), XFF: r.Header.Get("X-Forwarded-For"), XFP: r.Header.Get("X-Forwarded-Proto")})
}

// backend starts an echo server and registers it with agent as an
// instance of service (no check: passing), with tags.
func backend(t *testing.T, agent *testcluster.Agent, service, id string, tags ...string) *echo {
	t.Helper()
	e := &echo{service: service, id: id}
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	if err := agent.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: service, Address: host, Port: p, Tags: tags}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.Client().Agent().ServiceDeregister(id) })
	return e
}

// node is one gateway node under test: catalog watcher, breakers, proxy
// with the gateway's listeners, the gateway and its registration.
type node struct {
	gw     *Gateway
	br     *breaker.Registry
	px     *proxy.Proxy
	w      *catalog.Watcher
	cancel context.CancelFunc
	done   chan error
	name   string
}

type nodeOpts struct {
	noLoop  bool
	tls     bool
	dataDir string
	prefix  string
	consul  string // default: the agent's
	all     bool   // watch every service (service routes)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func startNode(t *testing.T, agent *testcluster.Agent, name string, o nodeOpts) *node {
	t.Helper()
	log := hclog.New(&hclog.LoggerOptions{Name: name, Output: testWriter{t}, Level: hclog.Info})
	reg := prometheus.NewRegistry()
	wc := catalog.DefaultConfig()
	wc.Addresses = []string{agent.HTTPAddr}
	if o.consul != "" {
		wc.Addresses = []string{o.consul}
	}
	wc.DataDir, wc.Node, wc.Logger, wc.Registerer = o.dataDir, name, log, reg
	if o.all {
		wc.Mode = catalog.ModeAll
	}
	w, err := catalog.NewWatcher(wc)
	if err != nil {
		t.Fatal(err)
	}
	client, _ := w.Client(0)
	gc := DefaultConfig()
	gc.Addr, gc.Node, gc.DataDir, gc.Logger, gc.Registerer = freeAddr(t), name, o.dataDir, log, reg
	gc.Prefix = o.prefix
	gc.CertCheck = 100 * time.Millisecond
	if o.tls {
		gc.TLSAddr = freeAddr(t)
	}
	br, err := breaker.New(breaker.DefaultConfig(), log, reg)
	if err != nil {
		t.Fatal(err)
	}
	gc.Breakers = br
	gw, err := New(gc, client, w)
	if err != nil {
		t.Fatal(err)
	}
	px, err := proxy.New(proxy.Config{Gateways: gw.Listeners(), Node: name, Logger: log, Registerer: reg,
		EventLoops: 1}, w, br, proxy.WithEngines(proxy.Engines{NoEventLoops: o.noLoop}))
	if err != nil {
		t.Fatal(err)
	}
	r, err := gw.Registration()
	if err != nil {
		t.Fatal(err)
	}
	rg := catalog.NewRegistrar(client, []*api.AgentServiceRegistration{r}, 0, log)
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{gw: gw, br: br, px: px, w: w, cancel: cancel, done: make(chan error, 1), name: name}
	go func() {
		eg, ctx := errgroup.WithContext(ctx)
		eg.Go(func() error { return w.Run(ctx) })
		eg.Go(func() error { return px.Run(ctx) })
		eg.Go(func() error { return gw.Run(ctx) })
		eg.Go(func() error { return rg.Run(ctx) })
		n.done <- eg.Wait()
	}()
	t.Cleanup(n.stop)
	select {
	case <-px.Ready():
	case err := <-n.done:
		t.Fatalf("node %s: %v", name, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("node %s not ready", name)
	}
	return n
}

func (n *node) stop() {
	if n.cancel == nil {
		return
	}
	n.cancel()
	n.cancel = nil
	select {
	case <-n.done:
	case <-time.After(15 * time.Second):
		panic("gateway node did not stop within 15s")
	}
}

func (n *node) addr() string    { return n.px.GatewayAddr(0).String() }
func (n *node) tlsAddr() string { return n.px.GatewayAddr(1).String() }

// apply writes version v of a document and points routes/current at it,
// as the control service does (one transaction).
func apply(t *testing.T, c *api.Client, prefix string, v int, doc string) {
	t.Helper()
	val, _ := json.Marshal(routes.Version{Number: uint64(v), Created: time.Now(), Source: "apply", Document: doc})
	ops := api.TxnOps{
		&api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: fmt.Sprintf("%sroutes/versions/%d", prefix, v), Value: val}},
		&api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: prefix + "routes/current", Value: []byte(strconv.Itoa(v))}},
	}
	ok, resp, _, err := c.Txn().Txn(ops, nil)
	if err != nil || !ok {
		t.Fatalf("apply version %d: %v %+v", v, err, resp)
	}
}

func point(t *testing.T, c *api.Client, prefix string, v int) {
	t.Helper()
	if _, err := c.KV().Put(&api.KVPair{Key: prefix + "routes/current", Value: []byte(strconv.Itoa(v))}, nil); err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, what string, timeout time.Duration, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var plain = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}

func getJSON(c *http.Client, url string, hdr ...string) (int, echoed, http.Header) {
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, echoed{Path: err.Error()}, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e echoed
	if json.Unmarshal(b, &e) != nil || e.Service == "" {
		e.Path = string(b)
	}
	return resp.StatusCode, e, resp.Header
}

func uniquePrefix(t *testing.T) string {
	return "test-" + strings.ToLower(strings.NewReplacer("/", "-", " ", "-").Replace(t.Name())) + "/"
}

// TestRoutesApplied: a document applied in KV routes requests to the right
// services (event loops and goroutines alike); a broken version is refused
// and the table keeps serving; a rollback (the pointer moving back) is
// applied; the applied version is written to routes/applied/<node>.
func TestRoutesApplied(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	backend(t, agent, "users", "users-a")
	backend(t, agent, "inventory", "inventory-a")
	for _, noLoop := range []bool{false, true} {
		t.Run(map[bool]string{false: "loop", true: "noloop"}[noLoop], func(t *testing.T) {
			prefix := uniquePrefix(t)
			n := startNode(t, agent, "gw-"+strconv.FormatBool(noLoop), nodeOpts{noLoop: noLoop, prefix: prefix})
			base := "http://" + n.addr()
			if code, e, _ := getJSON(plain, base+"/users/1"); code != 404 || !strings.Contains(e.Path, "no route") {
				t.Fatalf("before any routes: %d %s", code, e.Path)
			}
			apply(t, kv, prefix, 1, `
route "users" {
  prefix = "/users/"
  service = "users"
}
route "inventory" {
  prefix = "/inventory/"
  service = "inventory"
  strip_prefix = true
}
`)
			eventually(t, "version 1 served", 10*time.Second, func() bool {
				code, e, _ := getJSON(plain, base+"/users/1?x=1")
				return code == 200 && e.Service == "users"
			})
			code, e, _ := getJSON(plain, base+"/users/1?x=1", "X-Real-IP", "6.6.6.6", "X-Forwarded-Proto", "https")
			if code != 200 || e.Path != "/users/1?x=1" || e.RealIP != "127.0.0.1" || e.XFF != "127.0.0.1" || e.XFP != "http" {
				t.Errorf("users: %d %+v", code, e)
			}
			code, e, _ = getJSON(plain, base+"/inventory/items/7?q=2")
			if code != 200 || e.Service != "inventory" || e.Path != "/items/7?q=2" {
				t.Errorf("inventory (strip_prefix): %d %+v", code, e)
			}
			code, e, _ = getJSON(plain, base+"/nothing/here")
			if code != 404 || !strings.Contains(e.Path, `"error"`) {
				t.Errorf("no route: %d %s", code, e.Path)
			}
			applied := func(v int) bool {
				p, _, err := kv.KV().Get(prefix+"routes/applied/"+n.name, nil)
				var a routes.Applied
				return err == nil && p != nil && json.Unmarshal(p.Value, &a) == nil && a.Version == uint64(v) && a.Node == n.name && len(a.Routes) > 0
			}
			eventually(t, "applied/<node> = 1", 5*time.Second, func() bool { return applied(1) })

			// A broken version: refused, version 1 keeps serving.
			apply(t, kv, prefix, 2, `route "users" {
  prefix = "/users/"
  service = "users"
  bogus = 1
}`)
			eventually(t, "version 2 refused", 10*time.Second, func() bool { return n.gw.Status().Refused == 2 })
			if st := n.gw.Status(); st.Version != 1 || !strings.Contains(st.RefusedWhy, "version 2") || !strings.Contains(st.RefusedWhy, "bogus") {
				t.Errorf("after a broken version: %+v", st)
			}
			eventually(t, "the refusal in applied/<node>", 5*time.Second, func() bool {
				p, _, err := kv.KV().Get(prefix+"routes/applied/"+n.name, nil)
				var a routes.Applied
				return err == nil && p != nil && json.Unmarshal(p.Value, &a) == nil && a.Version == 1 && a.Refused == 2 && a.Error != ""
			})
			if code, e, _ := getJSON(plain, base+"/users/2"); code != 200 || e.Service != "users" {
				t.Errorf("after a broken version: %d %+v", code, e)
			}

			// Version 3 sends /users/ to inventory; rolling back to 1 undoes it.
			apply(t, kv, prefix, 3, `route "users" {
  prefix = "/users/"
  service = "inventory"
}`)
			eventually(t, "version 3 served", 10*time.Second, func() bool {
				code, e, _ := getJSON(plain, base+"/users/3")
				return code == 200 && e.Service == "inventory"
			})
			point(t, kv, prefix, 1)
			eventually(t, "rollback to 1 served", 10*time.Second, func() bool {
				code, e, _ := getJSON(plain, base+"/users/3")
				return code == 200 && e.Service == "users"
			})
			eventually(t, "applied/<node> = 1 again", 5*time.Second, func() bool { return applied(1) })

			// /v1/routes shows the table, its version and origins.
			rec := httptest.NewRecorder()
			n.gw.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/v1/routes", nil))
			var view struct {
				Version uint64
				Routes  []RouteView
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &view); err != nil || view.Version != 1 || len(view.Routes) != 2 ||
				view.Routes[0].Origin != "document" {
				t.Errorf("/v1/routes: %v %s", err, rec.Body.String())
			}
		})
	}
}

// TestWeightedSplit: a 90/10 split lands within a few percent of its
// weights over 2,000 requests.
func TestWeightedSplit(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	stable := backend(t, agent, "split-v1", "split-v1-a")
	canary := backend(t, agent, "split-v2", "split-v2-a")
	prefix := uniquePrefix(t)
	n := startNode(t, agent, "gw-split", nodeOpts{prefix: prefix})
	apply(t, kv, prefix, 1, `route "api" {
  prefix = "/api/"
  split {
    service = "split-v1"
    weight = 90
  }
  split {
    service = "split-v2"
    weight = 10
  }
}`)
	base := "http://" + n.addr()
	eventually(t, "both services answer", 10*time.Second, func() bool {
		_, a, _ := getJSON(plain, base+"/api/x")
		_, b, _ := getJSON(plain, base+"/api/x")
		return a.Service != "" && b.Service != ""
	})
	stable.hits.Store(0)
	canary.hits.Store(0)
	const total = 2000
	for i := 0; i < total; i++ {
		if code, e, _ := getJSON(plain, base+"/api/x"); code != 200 {
			t.Fatalf("request %d: %d %+v", i, code, e)
		}
	}
	share := float64(canary.hits.Load()) / total
	t.Logf("split-v2 took %.1f%% of %d requests (weight 10%%)", 100*share, total)
	if stable.hits.Load()+canary.hits.Load() != total || share < 0.07 || share > 0.13 {
		t.Errorf("split: v1 %d, v2 %d of %d: want v2 within 3 points of 10%%", stable.hits.Load(), canary.hits.Load(), total)
	}
}

// TestTagsAndBalancer: a split over tags sends each share to the
// instances carrying its tag only (canary: tag v1 90, tag v2 10); a
// destination's tag that no instance carries is no healthy instance; a
// route's lb is the one its requests are balanced with (round-robin
// alternates strictly where the default least-request draws at random).
// On the event loops and without them.
func TestTagsAndBalancer(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	v1a := backend(t, agent, "tagged", "tagged-v1-a", "v1")
	v1b := backend(t, agent, "tagged", "tagged-v1-b", "V1", "stable") // tags compare without case
	v2 := backend(t, agent, "tagged", "tagged-v2", "v2")
	backend(t, agent, "balanced", "balanced-a")
	backend(t, agent, "balanced", "balanced-b")
	doc := `route "canary" {
  prefix = "/canary/"
  split {
    service = "tagged"
    tag = "v1"
    weight = 90
  }
  split {
    service = "tagged"
    tag = "v2"
    weight = 10
  }
}
route "stable" {
  prefix = "/stable/"
  split {
    service = "tagged"
    tag = "stable"
    weight = 100
  }
}
route "missing" {
  prefix = "/missing/"
  split {
    service = "tagged"
    tag = "v3"
    weight = 100
  }
}
route "rr" {
  prefix = "/rr/"
  service = "balanced"
  lb = "round-robin"
}
route "lr" {
  prefix = "/lr/"
  service = "balanced"
}`
	for _, noLoop := range []bool{false, true} {
		t.Run(map[bool]string{false: "loop", true: "noloop"}[noLoop], func(t *testing.T) {
			prefix := uniquePrefix(t)
			n := startNode(t, agent, "gw-tags-"+strconv.FormatBool(noLoop), nodeOpts{noLoop: noLoop, prefix: prefix})
			apply(t, kv, prefix, 1, doc)
			base := "http://" + n.addr()
			eventually(t, "the routes answer", 10*time.Second, func() bool {
				a, _, _ := getJSON(plain, base+"/canary/x")
				b, _, _ := getJSON(plain, base+"/rr/x")
				return a == 200 && b == 200
			})
			for _, e := range []*echo{v1a, v1b, v2} {
				e.hits.Store(0)
			}
			const total = 1000
			for i := 0; i < total; i++ {
				if code, e, _ := getJSON(plain, base+"/canary/x"); code != 200 {
					t.Fatalf("request %d: %d %+v", i, code, e)
				}
			}
			share := float64(v2.hits.Load()) / total
			t.Logf("canary: v1 %d+%d, v2 %d of %d", v1a.hits.Load(), v1b.hits.Load(), v2.hits.Load(), total)
			if v1a.hits.Load()+v1b.hits.Load()+v2.hits.Load() != total || share < 0.06 || share > 0.14 || v1a.hits.Load() == 0 || v1b.hits.Load() == 0 {
				t.Errorf("canary split: v1 %d+%d, v2 %d of %d: want v2 within 4 points of 10%%, both v1 instances used",
					v1a.hits.Load(), v1b.hits.Load(), v2.hits.Load(), total)
			}
			for i := 0; i < 20; i++ {
				if code, e, _ := getJSON(plain, base+"/stable/x"); code != 200 || e.ID != "tagged-v1-b" {
					t.Fatalf("tag stable: %d %+v, want tagged-v1-b only", code, e)
				}
			}
			if code, e, _ := getJSON(plain, base+"/missing/x"); code != 503 {
				t.Errorf("a tag no instance carries: %d %+v, want 503", code, e)
			}
			// round-robin alternates; least-request (the default) does not
			// over 20 sequential requests but with odds of 2 in 2^20.
			alternates := func(path string) bool {
				last := ""
				for i := 0; i < 20; i++ {
					code, e, _ := getJSON(plain, base+path)
					if code != 200 {
						t.Fatalf("%s: %d %+v", path, code, e)
					}
					if e.ID == last {
						return false
					}
					last = e.ID
				}
				return true
			}
			if !alternates("/rr/x") {
				t.Errorf("lb = round-robin: two requests in a row went to one instance")
			}
			if alternates("/lr/x") {
				t.Errorf("the default balancer alternated strictly over 20 requests: is round-robin the route's own?")
			}
		})
	}
}

// TestRouteBreaker: a route's breaker block gives it a breaker of its own
// for its service (SERVICE@ROUTE in /v1/breakers), with the route's
// thresholds: it opens on the route's failures while the service's own
// breaker (another route's calls) stays closed. On the event loops and
// without them.
func TestRouteBreaker(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, "backend failed\n")
	}))
	defer srv.Close()
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	if err := agent.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "failing-a", Name: "failing", Address: host, Port: p}); err != nil {
		t.Fatal(err)
	}
	defer agent.Client().Agent().ServiceDeregister("failing-a")
	doc := `route "strict" {
  prefix = "/strict/"
  service = "failing"
  retries = 0
  breaker {
    minimum_calls = 4
    failure_rate = 50
    open_time = "1m"
  }
}
route "plain" {
  prefix = "/plain/"
  service = "failing"
  retries = 0
}`
	for _, noLoop := range []bool{false, true} {
		t.Run(map[bool]string{false: "loop", true: "noloop"}[noLoop], func(t *testing.T) {
			prefix := uniquePrefix(t)
			n := startNode(t, agent, "gw-brk-"+strconv.FormatBool(noLoop), nodeOpts{noLoop: noLoop, prefix: prefix})
			apply(t, kv, prefix, 1, doc)
			base := "http://" + n.addr()
			eventually(t, "the routes reach the backend", 10*time.Second, func() bool {
				code, e, _ := getJSON(plain, base+"/plain/x")
				return code == 500 && strings.Contains(e.Path, "backend failed")
			})
			opened := 0
			for i := 0; i < 10 && opened == 0; i++ {
				code, e, h := getJSON(plain, base+"/strict/x")
				switch {
				case code == 503 && h.Get("X-Attache-Breaker") == "open":
					opened = i
				case code != 500:
					t.Fatalf("strict request %d: %d %+v", i, code, e)
				}
			}
			if opened < 4 {
				t.Fatalf("the route's breaker opened after %d calls, want it open after its 4 (minimum_calls)", opened)
			}
			// The other route's calls go on: the service's breaker (20 calls
			// at least) is not the route's.
			for i := 0; i < 5; i++ {
				if code, e, _ := getJSON(plain, base+"/plain/x"); code != 500 || !strings.Contains(e.Path, "backend failed") {
					t.Fatalf("plain request %d: %d %+v, want the backend's 500", i, code, e)
				}
			}
			states := map[string]string{}
			for _, st := range n.br.State() {
				states[st.Service] = st.State
			}
			if states["failing@strict"] != breaker.Open || states["failing"] != breaker.Closed {
				t.Errorf("breakers: %v, want failing@strict open, failing closed", states)
			}
			// A version without the block drops the route's breaker.
			apply(t, kv, prefix, 2, strings.Replace(doc, "breaker {\n    minimum_calls = 4\n    failure_rate = 50\n    open_time = \"1m\"\n  }", "", 1))
			eventually(t, "the route's breaker dropped", 10*time.Second, func() bool {
				for _, st := range n.br.State() {
					if st.Service == "failing@strict" {
						return false
					}
				}
				return true
			})
			if code, e, _ := getJSON(plain, base+"/strict/x"); code != 500 || !strings.Contains(e.Path, "backend failed") {
				t.Errorf("strict after its breaker block went: %d %+v, want the backend's 500", code, e)
			}
		})
	}
}

// TestRouteBreakerHearsInstancesBack: a route's own breaker, opened by its
// service's failures, closes as the service's breaker does when the
// service's instances, gone from the Consul view, come back healthy — not
// only through trial calls after its open time (here 1m, longer than the
// test waits).
func TestRouteBreakerHearsInstancesBack(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	var failing atomic.Bool
	failing.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
		}
		io.WriteString(w, "flaky\n")
	}))
	defer srv.Close()
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	if err := kv.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "flaky-a", Name: "flaky", Address: host, Port: p,
		Check: &api.AgentServiceCheck{CheckID: "flaky-a-ttl", TTL: "10m", Status: api.HealthPassing}}); err != nil {
		t.Fatal(err)
	}
	defer kv.Agent().ServiceDeregister("flaky-a")
	doc := `route "strict" {
  prefix = "/strict/"
  service = "flaky"
  retries = 0
  breaker {
    minimum_calls = 4
    failure_rate = 50
    open_time = "1m"
  }
}`
	for _, noLoop := range []bool{false, true} {
		t.Run(map[bool]string{false: "loop", true: "noloop"}[noLoop], func(t *testing.T) {
			failing.Store(true)
			if err := kv.Agent().UpdateTTL("flaky-a-ttl", "", api.HealthPassing); err != nil {
				t.Fatal(err)
			}
			prefix := uniquePrefix(t)
			n := startNode(t, agent, "gw-back-"+strconv.FormatBool(noLoop), nodeOpts{noLoop: noLoop, prefix: prefix})
			apply(t, kv, prefix, 1, doc)
			base := "http://" + n.addr() + "/strict/x"
			eventually(t, "the route's breaker open", 10*time.Second, func() bool {
				code, _, h := getJSON(plain, base)
				return code == 503 && h.Get("X-Attache-Breaker") == "open"
			})
			state := func(name string) string {
				for _, st := range n.br.State() {
					if st.Service == name {
						return st.State
					}
				}
				return ""
			}
			instances := func() int {
				if svc, ok := n.w.Load().Service("flaky"); ok {
					return len(svc.Instances)
				}
				return 0
			}
			// Consul finds the instance failing: it leaves the view; the
			// route's breaker stays open meanwhile.
			if err := kv.Agent().UpdateTTL("flaky-a-ttl", "down", api.HealthCritical); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the instance out of the gateway's view", 10*time.Second, func() bool { return instances() == 0 })
			if st := state("flaky@strict"); st != breaker.Open {
				t.Fatalf("route breaker %q with no instance, want open", st)
			}
			// Mended, and healthy in Consul again: the breaker closes at once.
			failing.Store(false)
			if err := kv.Agent().UpdateTTL("flaky-a-ttl", "", api.HealthPassing); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the instance back in the gateway's view", 10*time.Second, func() bool { return instances() == 1 })
			eventually(t, "the route's breaker closed", 5*time.Second, func() bool { return state("flaky@strict") == breaker.Closed })
			if code, e, h := getJSON(plain, base); code != 200 {
				t.Fatalf("after the instance came back: %d %+v %v, want the backend's 200", code, e, h)
			}
		})
	}
}

// load sends requests from workers until d has passed and counts the
// answers by status. Each worker pauses pause between requests.
func load(url string, workers int, d, pause time.Duration, hdr func(w int) []string) map[int]int {
	var mu sync.Mutex
	counts := map[int]int{}
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := &http.Client{Timeout: 5 * time.Second}
			for time.Now().Before(end) {
				var h []string
				if hdr != nil {
					h = hdr(w)
				}
				code, _, _ := getJSON(cl, url, h...)
				mu.Lock()
				counts[code]++
				mu.Unlock()
				if pause > 0 {
					time.Sleep(pause)
				}
			}
		}()
	}
	wg.Wait()
	return counts
}

// TestRateLimit: a route limited to 100 requests/s (burst 5) passes 100/s
// within 10 % over 5 s of more load than that; the 429s carry Retry-After
// and RateLimit-* headers; keys by header get buckets of their own.
func TestRateLimit(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	backend(t, agent, "limited", "limited-a")
	prefix := uniquePrefix(t)
	n := startNode(t, agent, "gw-limit", nodeOpts{prefix: prefix})
	apply(t, kv, prefix, 1, `route "limited" {
  prefix = "/l/"
  service = "limited"
  rate_limit {
    rps = 100
    burst = 5
  }
}
route "keyed" {
  prefix = "/k/"
  service = "limited"
  rate_limit {
    rps = 1
    burst = 1
    key = "header:X-Api-Key"
  }
}`)
	base := "http://" + n.addr()
	eventually(t, "routes served", 10*time.Second, func() bool { code, _, _ := getJSON(plain, base+"/l/x"); return code == 200 })
	time.Sleep(100 * time.Millisecond) // the bucket fills again
	counts := load(base+"/l/x", 4, 5*time.Second, time.Millisecond, nil)
	ok := counts[200]
	t.Logf("5 s at 100/s (burst 5): %v", counts)
	if ok < 450 || ok > 550 || counts[429] == 0 {
		t.Errorf("%d requests passed in 5 s, want 500 ± 10 %%: %v", ok, counts)
	}
	code, e, h := getJSON(plain, base+"/l/x")
	for code != 429 {
		code, e, h = getJSON(plain, base+"/l/x")
	}
	if h.Get("Retry-After") == "" || h.Get("RateLimit-Limit") != "100" || h.Get("RateLimit-Remaining") != "0" || h.Get("RateLimit-Reset") == "" ||
		!strings.Contains(e.Path, "rate limit") {
		t.Errorf("429: headers %v body %s", h, e.Path)
	}
	// Per API key: each key has its own bucket of 1.
	for _, k := range []string{"a", "b"} {
		if code, _, _ := getJSON(plain, base+"/k/x", "X-Api-Key", k); code != 200 {
			t.Errorf("key %s first request: %d", k, code)
		}
		if code, _, _ := getJSON(plain, base+"/k/x", "X-Api-Key", k); code != 429 {
			t.Errorf("key %s second request: %d, want 429", k, code)
		}
	}
}

// TestClusterScope: two gateways on two agents both register (each under
// its own ID); a cluster-scope limit gives each half of it; when one stops (and deregisters), the other takes it whole.
func TestClusterScope(t *testing.T) {
	c := needCluster(t)
	kv := c.Clients[0].Client()
	backend(t, c.Clients[0], "shared", "shared-a")
	prefix := uniquePrefix(t)
	apply(t, kv, prefix, 1, `route "shared" {
  prefix = "/s/"
  service = "shared"
  rate_limit {
    rps = 100
    burst = 10
    scope = "cluster"
  }
}`)
	a := startNode(t, c.Clients[0], "gw-a", nodeOpts{prefix: prefix})
	b := startNode(t, c.Clients[1], "gw-b", nodeOpts{prefix: prefix})
	share := func(n *node) float64 {
		for _, rs := range n.gw.cur.Load().per {
			if rs.lim != nil {
				r, _ := rs.lim.rate()
				return r
			}
		}
		return 0
	}
	// Each gateway keeps its own registration, attache-gateway-<node>.
	eventually(t, "both gateways registered and passing", 20*time.Second, func() bool {
		entries, _, err := kv.Health().Service(ServiceName, "", true, nil)
		ids := map[string]bool{}
		for _, e := range entries {
			ids[e.Service.ID] = true
		}
		return err == nil && ids["attache-gateway-gw-a"] && ids["attache-gateway-gw-b"]
	})
	eventually(t, "each gateway takes 50/s", 20*time.Second, func() bool { return share(a) == 50 && share(b) == 50 })
	time.Sleep(200 * time.Millisecond)
	counts := load("http://"+a.addr()+"/s/x", 2, 2*time.Second, time.Millisecond, nil)
	t.Logf("gateway a, 2 s at its share of 50/s (burst 5): %v", counts)
	if ok := counts[200]; ok < 90 || ok > 115 {
		t.Errorf("gateway a passed %d in 2 s, want about 100 (50/s + burst 5)", ok)
	}
	b.stop()
	eventually(t, "gateway a takes 100/s again", 20*time.Second, func() bool { return share(a) == 100 })
}

// TestTLS: the TLS listener serves HTTP/2 by ALPN (and HTTP/1.1) with the
// certificate the route document names, picks it by SNI, and serves a new
// certificate once its files change.
func TestTLS(t *testing.T) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	backend(t, agent, "secure", "secure-a")
	dir := t.TempDir()
	ca := newCA(t)
	certFile, keyFile := dir+"/gw.crt", dir+"/gw.key"
	ca.issue(t, certFile, keyFile, 1, "gw.test", "127.0.0.1")
	prefix := uniquePrefix(t)
	n := startNode(t, agent, "gw-tls", nodeOpts{prefix: prefix, tls: true})
	apply(t, kv, prefix, 1, fmt.Sprintf(`gateway {
  tls {
    cert = %q
    key = %q
  }
}
route "secure" {
  prefix = "/"
  service = "secure"
}`, certFile, keyFile))
	h2 := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: ca.pool, ServerName: "gw.test"}, ForceAttemptHTTP2: true}}
	url := "https://" + n.tlsAddr() + "/hello"
	var serial string
	eventually(t, "HTTP/2 over TLS", 10*time.Second, func() bool {
		resp, err := h2.Get(url)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var e echoed
		json.NewDecoder(resp.Body).Decode(&e)
		serial = resp.TLS.PeerCertificates[0].SerialNumber.String()
		if resp.ProtoMajor != 2 || e.Service != "secure" || e.XFP != "https" || e.RealIP != "127.0.0.1" {
			t.Logf("proto %s, %+v", resp.Proto, e)
			return false
		}
		return true
	})
	if serial != "1" {
		t.Fatalf("serial %s, want 1", serial)
	}
	// TLS 1.1 is refused.
	if _, err := tls.Dial("tcp", n.tlsAddr(), &tls.Config{RootCAs: ca.pool, ServerName: "gw.test", MaxVersion: tls.VersionTLS11}); err == nil {
		t.Error("a TLS 1.1 handshake succeeded")
	}
	// A new certificate in the same files is served while the gateway runs.
	ca.issue(t, certFile, keyFile, 2, "gw.test", "127.0.0.1")
	eventually(t, "the new certificate", 10*time.Second, func() bool {
		conn, err := tls.Dial("tcp", n.tlsAddr(), &tls.Config{RootCAs: ca.pool, ServerName: "gw.test"})
		if err != nil {
			return false
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String() == "2"
	})
	h1 := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool, ServerName: "gw.test"}}}
	resp, err := h1.Get(url)
	if err != nil || resp.ProtoMajor != 1 || resp.StatusCode != 200 {
		t.Fatalf("HTTP/1.1 over TLS: %v %v", resp, err)
	}
	resp.Body.Close()
}

// TestServesFromDiskWithConsulDown: a gateway restarted while every Consul
// server is down serves the routes it applied last, from its data dir.
func TestServesFromDiskWithConsulDown(t *testing.T) {
	needCluster(t)
	c := testcluster.Start(t, testcluster.Options{Clients: 1}) // its own: every server goes down
	agent := c.Clients[0]
	kv := agent.Client()
	backend(t, agent, "durable", "durable-a")
	prefix := uniquePrefix(t)
	dir := t.TempDir()
	n := startNode(t, agent, "gw-disk", nodeOpts{prefix: prefix, dataDir: dir})
	apply(t, kv, prefix, 1, `route "durable" {
  prefix = "/d/"
  service = "durable"
}`)
	eventually(t, "routes served", 10*time.Second, func() bool { code, _, _ := getJSON(plain, "http://"+n.addr()+"/d/1"); return code == 200 })
	eventually(t, "snapshot and routes on disk", 10*time.Second, func() bool {
		_, e1 := os.Stat(dir + "/" + diskFile)
		_, e2 := os.Stat(dir + "/" + catalog.SnapshotFile)
		return e1 == nil && e2 == nil
	})
	time.Sleep(3500 * time.Millisecond) // the catalog snapshot is saved at most every 3 s: let it hold the instance
	n.stop()
	for _, s := range c.Servers {
		s.Stop()
	}
	m := startNode(t, agent, "gw-disk", nodeOpts{prefix: prefix, dataDir: dir})
	if st := m.gw.Status(); st.Version != 1 || !st.FromDisk {
		t.Errorf("restarted gateway: %+v", st)
	}
	eventually(t, "routes served from disk", 10*time.Second, func() bool {
		code, e, _ := getJSON(plain, "http://"+m.addr()+"/d/2")
		return code == 200 && e.Service == "durable"
	})
}

// TestServiceRoutes: a service publishing `attache-route` in its meta joins
// the table below the document's routes (the document wins a clash), and
// leaves it when it goes; in the catalog's default on-demand mode (the
// gateway learns such services from a filtered catalog query) as with
// -watch all.
func TestServiceRoutes(t *testing.T) {
	for _, all := range []bool{false, true} {
		t.Run(map[bool]string{false: "on-demand", true: "all"}[all], func(t *testing.T) { testServiceRoutes(t, all) })
	}
}

func testServiceRoutes(t *testing.T, all bool) {
	c := needCluster(t)
	agent := c.Clients[0]
	kv := agent.Client()
	backend(t, agent, "docsvc", "docsvc-a")
	e := &echo{service: "metasvc", id: "metasvc-a"}
	srv := httptest.NewServer(e)
	defer srv.Close()
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	reg := func(route string) {
		if err := agent.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "metasvc-a", Name: "metasvc", Address: host, Port: p,
			Meta: map[string]string{routes.MetaKey: route}}); err != nil {
			t.Fatal(err)
		}
	}
	prefix := uniquePrefix(t)
	n := startNode(t, agent, "gw-meta-"+strconv.FormatBool(all), nodeOpts{prefix: prefix, all: all})
	apply(t, kv, prefix, 1, `route "doc" {
  prefix = "/doc/"
  service = "docsvc"
}`)
	base := "http://" + n.addr()
	eventually(t, "version 1 applied", 10*time.Second, func() bool { return n.gw.Status().Version == 1 })
	// Registered after the gateway started: it learns of it from Consul.
	reg("/meta/,/doc/")
	defer agent.Client().Agent().ServiceDeregister("metasvc-a")
	eventually(t, "the service's route", 10*time.Second, func() bool {
		code, e, _ := getJSON(plain, base+"/meta/1")
		return code == 200 && e.Service == "metasvc"
	})
	if code, e, _ := getJSON(plain, base+"/doc/1"); code != 200 || e.Service != "docsvc" {
		t.Errorf("the document's route should win /doc/: %d %+v", code, e)
	}
	rec := httptest.NewRecorder()
	n.gw.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/v1/routes", nil))
	if b := rec.Body.String(); !strings.Contains(b, `"origin": "service metasvc"`) || !strings.Contains(b, "service_route_errors") {
		t.Errorf("/v1/routes: %s", b)
	}
	agent.Client().Agent().ServiceDeregister("metasvc-a")
	eventually(t, "the service's route gone", 10*time.Second, func() bool {
		code, _, _ := getJSON(plain, base+"/meta/1")
		return code == 404
	})
}
