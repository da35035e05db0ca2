package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"attache/control/routes"
	"attache/internal/testcluster"
)

// One real three-server Consul cluster for the package; each test works
// under its own KV prefix.
var consulAddr string

func TestMain(m *testing.M) {
	c, err := testcluster.New(testcluster.Options{})
	if err != nil {
		if c != nil {
			c.Close()
		}
		fmt.Fprintln(os.Stderr, "control tests: starting Consul:", err)
		os.Exit(1)
	}
	consulAddr = c.Servers[0].HTTPAddr
	code := m.Run()
	c.Close()
	os.Exit(code)
}

func consul(t *testing.T) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: consulAddr})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func prefix(t *testing.T) string { return "test/" + strings.ReplaceAll(t.Name(), "/", "_") + "/" }

func doc(t *testing.T, routesHCL ...string) *routes.Document {
	t.Helper()
	var b strings.Builder
	for i, r := range routesHCL {
		fmt.Fprintf(&b, "route %q {\n  prefix = %q\n  service = %q\n}\n", fmt.Sprintf("r%d", i), r, strings.Trim(r, "/"))
	}
	d, err := routes.Parse("t.hcl", []byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestApplyGetHistory(t *testing.T) {
	ctx := context.Background()
	s := newStore(consul(t), prefix(t), 50)
	if _, _, err := s.Get(ctx, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get before any apply: %v", err)
	}
	a := doc(t, "/users/", "/inventory/")
	res, err := s.Apply(ctx, a, "apply", nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 1 || !res.Changed || res.Previous != 0 || !strings.Contains(res.Diff, `+ route "r0" (added)`) {
		t.Fatalf("first apply = %+v", res)
	}
	v, got, err := s.Get(ctx, 0)
	if err != nil || v.Number != 1 || v.Source != "apply" || !routes.Equal(got, a) || v.Document != string(routes.Encode(a)) {
		t.Fatalf("get = %+v, %v", v, err)
	}
	// The same document again: nothing written.
	res, err = s.Apply(ctx, doc(t, "/users/", "/inventory/"), "apply", nil)
	if err != nil || res.Changed || res.Version != 1 || !strings.Contains(res.Message, "unchanged") {
		t.Fatalf("same again = %+v, %v", res, err)
	}
	res, err = s.Apply(ctx, doc(t, "/users/", "/orders/"), "apply", nil)
	if err != nil || res.Version != 2 || res.Previous != 1 || !strings.Contains(res.Diff, `~ route "r1"`) {
		t.Fatalf("second apply = %+v, %v", res, err)
	}
	cur, hist, err := s.History(ctx)
	if err != nil || cur != 2 || len(hist) != 2 || hist[0].Version != 2 || !hist[0].Current || hist[1].Version != 1 || hist[1].Current || hist[1].Routes != 2 {
		t.Fatalf("history = %d %+v %v", cur, hist, err)
	}
	if v, _, err := s.Get(ctx, 1); err != nil || v.Number != 1 {
		t.Fatalf("get 1 = %+v %v", v, err)
	}
	if _, _, err := s.Get(ctx, 9); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get 9: %v", err)
	}
	// expect: a change based on an old version is refused.
	one := uint64(1)
	if _, err := s.Apply(ctx, doc(t, "/x/"), "apply", &one); !errors.Is(err, ErrConflict) {
		t.Fatalf("apply expecting 1 while 2 is current: %v", err)
	}
}

func TestRollback(t *testing.T) {
	ctx := context.Background()
	s := newStore(consul(t), prefix(t), 50)
	a, b := doc(t, "/a/"), doc(t, "/b/")
	for _, d := range []*routes.Document{a, b} {
		if _, err := s.Apply(ctx, d, "apply", nil); err != nil {
			t.Fatal(err)
		}
	}
	res, err := s.Rollback(ctx, 1, nil)
	if err != nil || res.Version != 3 || res.Previous != 2 || !res.Changed {
		t.Fatalf("rollback = %+v %v", res, err)
	}
	v, got, err := s.Get(ctx, 0)
	if err != nil || v.Source != "rollback to 1" || !routes.Equal(got, a) {
		t.Fatalf("after rollback: %+v %v", v, err)
	}
	// Rolling back to what is current changes nothing.
	if res, err := s.Rollback(ctx, 1, nil); err != nil || res.Changed || res.Version != 3 {
		t.Fatalf("rollback to the current document = %+v %v", res, err)
	}
	if _, err := s.Rollback(ctx, 42, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rollback to a missing version: %v", err)
	}
}

// TestConcurrentApplies: two applies that both read the same current
// version before either writes: exactly one wins, the other is told to
// retry, and nothing is half-written.
func TestConcurrentApplies(t *testing.T) {
	ctx := context.Background()
	c := consul(t)
	p := prefix(t)
	if _, err := newStore(c, p, 50).Apply(ctx, doc(t, "/base/"), "apply", nil); err != nil {
		t.Fatal(err)
	}
	var barrier sync.WaitGroup
	barrier.Add(2)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		s := newStore(c, p, 50) // two control services
		s.beforeTxn = func() { barrier.Done(); barrier.Wait() }
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = s.Apply(ctx, doc(t, fmt.Sprintf("/from-%d/", i)), "apply", nil)
		}()
	}
	wg.Wait()
	wins, conflicts := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			wins++
		case errors.Is(err, ErrConflict) && strings.Contains(err.Error(), "retry"):
			conflicts++
		default:
			t.Fatalf("unexpected error: %v", err)
		}
	}
	if wins != 1 || conflicts != 1 {
		t.Fatalf("wins %d conflicts %d, errors %v", wins, conflicts, errs)
	}
	s := newStore(c, p, 50)
	cur, hist, err := s.History(ctx)
	if err != nil || cur != 2 || len(hist) != 2 {
		t.Fatalf("after the race: current %d history %+v %v", cur, hist, err)
	}
}

// TestConcurrentAppliesNoLostUpdate: several writers applying in a loop,
// retrying on conflict: every success has its own version, in order, and
// the history holds them all.
func TestConcurrentAppliesNoLostUpdate(t *testing.T) {
	ctx := context.Background()
	c := consul(t)
	p := prefix(t)
	const writers, each = 4, 5
	var mu sync.Mutex
	seen := map[uint64]string{}
	var conflicts atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := newStore(c, p, 100)
			for i := 0; i < each; i++ {
				path := fmt.Sprintf("/w%d-%d/", w, i)
				for try := 0; ; try++ {
					res, err := s.Apply(ctx, doc(t, path), "apply", nil)
					if errors.Is(err, ErrConflict) && try < 50 {
						conflicts.Add(1)
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					if other, dup := seen[res.Version]; dup {
						t.Errorf("version %d given to %s and %s", res.Version, other, path)
					}
					seen[res.Version] = path
					mu.Unlock()
					break
				}
			}
		}()
	}
	wg.Wait()
	cur, hist, err := newStore(c, p, 100).History(ctx)
	if err != nil || cur != writers*each || len(hist) != writers*each || len(seen) != writers*each {
		t.Fatalf("current %d, %d versions, %d successes, %v", cur, len(hist), len(seen), err)
	}
	t.Logf("%d applies, %d conflicts retried", writers*each, conflicts.Load())
}

func TestPruneKeepsN(t *testing.T) {
	ctx := context.Background()
	s := newStore(consul(t), prefix(t), 3)
	for i := range 6 {
		res, err := s.Apply(ctx, doc(t, fmt.Sprintf("/v%d/", i)), "apply", nil)
		if err != nil {
			t.Fatal(err)
		}
		if i == 5 && (len(res.Pruned) != 1 || res.Pruned[0] != 3) {
			t.Errorf("last apply pruned %v, want [3]", res.Pruned)
		}
	}
	cur, hist, err := s.History(ctx)
	if err != nil || cur != 6 || len(hist) != 3 || hist[2].Version != 4 {
		t.Fatalf("history = %d %+v %v", cur, hist, err)
	}
	if _, err := s.Rollback(ctx, 2, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rollback to a pruned version: %v", err)
	}
}

// TestStatus reads the records gateways write under routes/applied/.
func TestStatus(t *testing.T) {
	ctx := context.Background()
	c := consul(t)
	s := newStore(c, prefix(t), 50)
	for _, d := range []*routes.Document{doc(t, "/a/"), doc(t, "/a/", "/b/")} {
		if _, err := s.Apply(ctx, d, "apply", nil); err != nil {
			t.Fatal(err)
		}
	}
	tab, err := routes.Compile(doc(t, "/a/", "/b/"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	for _, a := range []routes.Applied{
		{Node: "gw1", Version: 2, Time: now, Routes: routes.AppliedRoutes(tab)},
		{Node: "gw2", Version: 1, Time: now, Refused: 2, Error: "routes: version 2:3: nope"},
	} {
		val, _ := json.Marshal(a)
		if _, err := c.KV().Put(&api.KVPair{Key: s.KV().Applied(a.Node), Value: val}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.KV().Put(&api.KVPair{Key: s.KV().Applied("gw3"), Value: []byte("garbage")}, nil); err != nil {
		t.Fatal(err)
	}
	cur, gws, err := s.Status(ctx)
	if err != nil || cur != 2 || len(gws) != 3 {
		t.Fatalf("status = %d %+v %v", cur, gws, err)
	}
	if g := gws[0]; g.Node != "gw1" || !g.Current || len(g.Routes) != 2 || g.Routes[0].Origin != "document" || !g.Time.Equal(now) {
		t.Errorf("gw1 = %+v", g)
	}
	if g := gws[1]; g.Node != "gw2" || g.Current || g.Refused != 2 {
		t.Errorf("gw2 = %+v", g)
	}
	if g := gws[2]; g.Node != "gw3" || g.Current || g.Invalid == "" {
		t.Errorf("gw3 = %+v", g)
	}
}

// serve starts a control service on a random loopback port.
func serve(t *testing.T, cfg Config) (string, context.CancelFunc) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Addr = ln.Addr().String()
	cfg.Consul = consulAddr
	srv, err := New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	stop := func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}
	t.Cleanup(func() {
		if ctx.Err() == nil {
			stop()
		}
	})
	return "http://" + cfg.Addr, stop
}

// TestAPI drives the HTTP API through the client: refusals with file:line,
// the current version unchanged after one, a restart that loses nothing.
func TestAPI(t *testing.T) {
	ctx := context.Background()
	cfg := DefaultConfig()
	cfg.KVPrefix = prefix(t)
	url, stop := serve(t, cfg)
	c := NewClient(url, "")
	src := []byte("route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n}\n")
	if v, err := c.Validate(ctx, "r.hcl", src); err != nil || !v.Valid || v.Routes != 1 || len(v.Warnings) != 1 || !strings.Contains(v.Warnings[0], "users has no healthy instance") {
		t.Fatalf("validate = %+v %v", v, err)
	}
	if d, err := c.Diff(ctx, "r.hcl", src); err != nil || !d.Changed || d.Current != 0 {
		t.Fatalf("diff = %+v %v", d, err)
	}
	res, err := c.Apply(ctx, "r.hcl", src, nil)
	if err != nil || res.Version != 1 || !res.Changed {
		t.Fatalf("apply = %+v %v", res, err)
	}
	broken := []byte("route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n  try_timeout = \"soon\"\n}\n")
	_, err = c.Apply(ctx, "broken.hcl", broken, nil)
	var ref *RefusedError
	if !errors.As(err, &ref) || ref.Status != http.StatusUnprocessableEntity || len(ref.Problems) != 1 ||
		ref.Problems[0].File != "broken.hcl" || ref.Problems[0].Line != 4 || !strings.Contains(err.Error(), `broken.hcl:4,3: try_timeout: "soon" is not a duration`) {
		t.Fatalf("broken apply: %#v", err)
	}
	if v, err := c.Get(ctx, 0); err != nil || v.Number != 1 {
		t.Fatalf("current after a refused apply: %+v %v", v, err)
	}
	if d, err := c.Diff(ctx, "r.hcl", src); err != nil || d.Changed || d.Current != 1 {
		t.Fatalf("diff of the current document = %+v %v", d, err)
	}
	if _, err := c.Rollback(ctx, 7, nil); !errors.As(err, &ref) || ref.Status != http.StatusNotFound {
		t.Fatalf("rollback to a missing version: %v", err)
	}
	if _, err := c.Get(ctx, 7); !errors.As(err, &ref) || ref.Status != http.StatusNotFound {
		t.Fatalf("get a missing version: %v", err)
	}
	two := []byte("route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users-v2\"\n}\n")
	zero := uint64(0)
	if _, err := c.Apply(ctx, "two.hcl", two, &zero); !errors.As(err, &ref) || ref.Status != http.StatusConflict {
		t.Fatalf("apply expecting nothing applied: %v", err)
	}
	if res, err := c.Apply(ctx, "two.hcl", two, nil); err != nil || res.Version != 2 {
		t.Fatalf("apply two = %+v %v", res, err)
	}
	// Oversized body.
	big := make([]byte, cfg.MaxBody+1)
	if _, err := c.Validate(ctx, "big.hcl", big); !errors.As(err, &ref) || ref.Status != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized body: %v", err)
	}
	// A restart (a new service, the same KV) loses nothing.
	stop()
	url2, _ := serve(t, cfg)
	c2 := NewClient(url2, "")
	h, err := c2.History(ctx)
	if err != nil || h.Current != 2 || len(h.Versions) != 2 {
		t.Fatalf("history after restart = %+v %v", h, err)
	}
	if v, err := c2.Get(ctx, 1); err != nil || !strings.Contains(v.Document, `service = "users"`) {
		t.Fatalf("version 1 after restart = %+v %v", v, err)
	}
	if res, err := c2.Rollback(ctx, 1, nil); err != nil || res.Version != 3 {
		t.Fatalf("rollback after restart = %+v %v", res, err)
	}
	if st, err := c2.Status(ctx); err != nil || st.Current != 3 || len(st.Gateways) != 0 {
		t.Fatalf("status = %+v %v", st, err)
	}
}

func TestAuth(t *testing.T) {
	ctx := context.Background()
	cfg := DefaultConfig()
	cfg.KVPrefix = prefix(t)
	cfg.APIToken = "s3cret"
	url, _ := serve(t, cfg)
	var ref *RefusedError
	for _, tok := range []string{"", "wrong"} {
		if _, err := NewClient(url, tok).History(ctx); !errors.As(err, &ref) || ref.Status != http.StatusUnauthorized {
			t.Errorf("token %q: %v", tok, err)
		}
	}
	if _, err := NewClient(url, "s3cret").History(ctx); err != nil {
		t.Errorf("with the token: %v", err)
	}
	if resp, err := http.Get(url + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("healthz without token: %v %v", resp, err)
	}
	for addr, ok := range map[string]bool{"127.0.0.1:0": true, "[::1]:0": true, "localhost:0": true, "0.0.0.0:9500": false, ":9500": false, "10.1.2.3:9500": false} {
		c := DefaultConfig()
		c.Addr = addr
		_, err := New(c, hclog.NewNullLogger())
		if (err == nil) != ok {
			t.Errorf("New(%s) without token: %v", addr, err)
		}
		c.APIToken = "x"
		if _, err := New(c, hclog.NewNullLogger()); err != nil {
			t.Errorf("New(%s) with token: %v", addr, err)
		}
	}
}

// TestLargeDocument: a document near the size limit (1,000 routes) is
// stored in one transaction and read back.
func TestLargeDocument(t *testing.T) {
	ctx := context.Background()
	var b strings.Builder
	for i := range routes.MaxRoutes {
		fmt.Fprintf(&b, "route \"route-%04d\" {\n  prefix = \"/%s/%04d/\"\n  service = \"svc-%d\"\n  request_timeout = \"3s\"\n}\n", i, strings.Repeat("p", 120), i, i%50)
	}
	d, err := routes.Parse("large.hcl", []byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("canonical document: %d bytes", len(routes.Encode(d)))
	s := newStore(consul(t), prefix(t), 50)
	if _, err := s.Apply(ctx, d, "apply", nil); err != nil {
		t.Fatal(err)
	}
	if _, got, err := s.Get(ctx, 0); err != nil || !routes.Equal(got, d) {
		t.Fatalf("read back: %v", err)
	}
}

// TestRepairCorrupt: a pointer or version written by hand that does not
// decode is reported on reads, and the next apply replaces it.
func TestRepairCorrupt(t *testing.T) {
	ctx := context.Background()
	c := consul(t)
	s := newStore(c, prefix(t), 50)
	put := func(k, v string) {
		if _, err := c.KV().Put(&api.KVPair{Key: k, Value: []byte(v)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct{ name, key, value string }{
		{"pointer not a number", s.KV().Current(), "seven"},
		{"pointer to a missing version", s.KV().Current(), "7"},
		{"version not JSON", s.KV().Version(8), "{"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			put(tt.key, tt.value)
			if tt.key != s.KV().Current() {
				put(s.KV().Current(), "8")
			}
			if _, _, err := s.Get(ctx, 0); err == nil {
				t.Fatal("a corrupt current version reads fine")
			}
			res, err := s.Apply(ctx, doc(t, "/"+strings.ReplaceAll(tt.name, " ", "-")+"/"), "apply", nil)
			if err != nil || !res.Changed {
				t.Fatalf("apply over it = %+v, %v", res, err)
			}
			if v, _, err := s.Get(ctx, 0); err != nil || v.Number != res.Version {
				t.Fatalf("after the repair: %+v %v", v, err)
			}
		})
	}
}

// TestWarnings: a route to a service (or tag) without a healthy instance is
// a warning; one with a passing instance is not.
func TestWarnings(t *testing.T) {
	ctx := context.Background()
	c := consul(t)
	reg := &api.AgentServiceRegistration{Name: "warn-users", ID: "warn-users-1", Port: 1, Tags: []string{"v1"},
		Check: &api.AgentServiceCheck{TTL: "1m", Status: api.HealthPassing}}
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	defer c.Agent().ServiceDeregister("warn-users-1")
	d, err := routes.Parse("w.hcl", []byte(`
route "ok" {
  prefix  = "/ok/"
  service = "warn-users"
}
route "split" {
  prefix = "/split/"
  split {
    service = "warn-users"
    tag     = "v1"
    weight  = 50
  }
  split {
    service = "warn-users"
    tag     = "v2"
    weight  = 50
  }
}
route "gone" {
  prefix  = "/gone/"
  service = "warn-nobody"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	s := newStore(c, prefix(t), 50)
	var ws []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		ws = s.Warnings(ctx, d)
		if len(ws) == 2 || time.Now().After(deadline) {
			break
		}
	}
	want := []string{`route "split": service warn-users (tag v2) has no healthy instance now`, `route "gone": service warn-nobody has no healthy instance now`}
	if strings.Join(ws, "\n") != strings.Join(want, "\n") {
		t.Fatalf("warnings:\n%s\nwant\n%s", strings.Join(ws, "\n"), strings.Join(want, "\n"))
	}
}
