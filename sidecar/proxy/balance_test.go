package proxy

import (
	"testing"
	"time"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/hashicorp/serf/coordinate"
)

func newPickTarget(t *testing.T, bal Balancer, node string, snap *catalog.Snapshot, bcfg breaker.Config) *target {
	t.Helper()
	br, err := breaker.New(bcfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	src := &viewSource{v: catalog.NewView()}
	src.v.Publish(snap)
	p, err := New(Config{Balancer: bal, Node: node}, src, br)
	if err != nil {
		t.Fatal(err)
	}
	return p.target("svc", "", ProtoHTTP)
}

func snapWith(insts ...catalog.Instance) *catalog.Snapshot {
	return &catalog.Snapshot{
		Services: map[string]*catalog.Service{"svc": {Name: "svc", Instances: insts}},
		Known:    map[string]bool{"svc": true},
		Coords:   map[string]*coordinate.Coordinate{},
	}
}

func inst(id, node string, port, weight int) catalog.Instance {
	return catalog.Instance{ID: id, Service: "svc", Node: node, Address: "127.0.0.1", Port: port, Weight: weight}
}

func counts(t *target, n int) map[string]int {
	out := map[string]int{}
	for i := 0; i < n; i++ {
		ep := t.pick(t.endpoints(), nil, nil)
		if ep == nil {
			out["<nil>"]++
			continue
		}
		out[ep.id]++
	}
	return out
}

func TestBalancers(t *testing.T) {
	three := snapWith(inst("a", "n1", 1, 1), inst("b", "n2", 2, 1), inst("c", "n3", 3, 1))
	t.Run("round robin is even", func(t *testing.T) {
		c := counts(newPickTarget(t, RoundRobin, "", three, breaker.Config{}), 300)
		if c["a"] != 100 || c["b"] != 100 || c["c"] != 100 {
			t.Fatalf("%v", c)
		}
	})
	t.Run("weighted follows weights", func(t *testing.T) {
		s := snapWith(inst("a", "n1", 1, 1), inst("b", "n2", 2, 9))
		c := counts(newPickTarget(t, Weighted, "", s, breaker.Config{}), 5000)
		if c["b"] < 4250 || c["b"] > 4750 {
			t.Fatalf("%v, want b near 90%%", c)
		}
	})
	t.Run("least request avoids the busy instance", func(t *testing.T) {
		tg := newPickTarget(t, LeastRequest, "", snapWith(inst("a", "n1", 1, 1), inst("b", "n2", 2, 1)), breaker.Config{})
		for _, ep := range tg.endpoints().list {
			if ep.id == "a" {
				ep.inflight.Store(10)
			}
		}
		if c := counts(tg, 100); c["b"] != 100 {
			t.Fatalf("%v", c)
		}
	})
	t.Run("nearest by coordinates", func(t *testing.T) {
		s := snapWith(inst("far", "n-far", 1, 1), inst("near", "n-near", 2, 1), inst("nocoord", "n-x", 3, 1))
		cfg := coordinate.DefaultConfig()
		here, near, far := coordinate.NewCoordinate(cfg), coordinate.NewCoordinate(cfg), coordinate.NewCoordinate(cfg)
		near.Vec[0] = 0.001 // 1ms
		far.Vec[0] = 0.050  // 50ms
		s.Coords = map[string]*coordinate.Coordinate{"me": here, "n-near": near, "n-far": far}
		tg := newPickTarget(t, Nearest, "me", s, breaker.Config{})
		if c := counts(tg, 50); c["near"] != 50 {
			t.Fatalf("%v", c)
		}
	})
	t.Run("nearest without coordinates spreads", func(t *testing.T) {
		tg := newPickTarget(t, Nearest, "me", three, breaker.Config{})
		if c := counts(tg, 300); len(c) != 3 {
			t.Fatalf("%v", c)
		}
	})
	t.Run("ejected skipped, probe first, tried excluded", func(t *testing.T) {
		tg := newPickTarget(t, RoundRobin, "", three, breaker.Config{BaseEjectionTime: 50 * time.Millisecond, MaxEjectionPercent: 100})
		tg.endpoints() // the breaker knows the three instances
		a := tg.svc.Instance("a")
		for i := 0; i < 5; i++ {
			a.Report(true)
		}
		if c := counts(tg, 100); c["a"] != 0 {
			t.Fatalf("ejected instance picked: %v", c)
		}
		time.Sleep(60 * time.Millisecond)
		if ep := tg.pick(tg.endpoints(), nil, nil); ep == nil || ep.id != "a" {
			t.Fatalf("probe-ready instance not picked first: %v", ep)
		}
		if c := counts(tg, 100); c["a"] != 0 {
			t.Fatalf("instance with a probe in flight picked: %v", c)
		}
		set := tg.endpoints()
		var tried []*endpoint
		for _, ep := range set.list {
			if ep.id != "c" {
				tried = append(tried, ep)
			}
		}
		if ep := tg.pick(set, tried, nil); ep == nil || ep.id != "c" {
			t.Fatalf("pick with a, b tried = %v", ep)
		}
		if ep := tg.pick(set, set.list, nil); ep != nil {
			t.Fatalf("all tried but got %s", ep.id)
		}
	})
	t.Run("instances leaving the catalog leave the pool", func(t *testing.T) {
		tg := newPickTarget(t, RoundRobin, "", three, breaker.Config{})
		tg.p.src.(*viewSource).v.Publish(snapWith(inst("c", "n3", 3, 1)))
		if c := counts(tg, 10); c["c"] != 10 {
			t.Fatalf("%v", c)
		}
		if len(tg.eps) != 1 {
			t.Fatalf("%d endpoints kept", len(tg.eps))
		}
	})
}

// TestPickPolicy: a route's policy narrows the instances to its tag
// (without case) and balances with its own balancer.
func TestPickPolicy(t *testing.T) {
	tagged := func(id string, port int, tags ...string) catalog.Instance {
		in := inst(id, "n", port, 1)
		in.Tags = tags
		return in
	}
	s := snapWith(tagged("a", 1, "v1"), tagged("b", 2, "V1", "stable"), tagged("c", 3, "v2"), tagged("d", 4))
	for _, tc := range []struct {
		name string
		pol  *Policy
		want map[string]int // of 400 picks; nil: only the keys matter
	}{
		{"no policy: every instance", nil, map[string]int{"a": 100, "b": 100, "c": 100, "d": 100}},
		{"tag v1, either case", &Policy{Tag: "v1"}, map[string]int{"a": 200, "b": 200}},
		{"tag given upper case", &Policy{Tag: "STABLE"}, map[string]int{"b": 400}},
		{"tag nobody carries", &Policy{Tag: "v3"}, map[string]int{"<nil>": 400}},
		{"tag and balancer", &Policy{Tag: "v1", Balancer: LeastRequest}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg := newPickTarget(t, RoundRobin, "", s, breaker.Config{})
			got := map[string]int{}
			for i := 0; i < 400; i++ {
				if ep := tg.pick(tg.endpoints(), nil, tc.pol); ep == nil {
					got["<nil>"]++
				} else {
					got[ep.id]++
				}
			}
			if tc.want == nil {
				if len(got) != 2 || got["a"] == 0 || got["b"] == 0 {
					t.Fatalf("%v, want a and b only", got)
				}
				return
			}
			if len(got) != len(tc.want) {
				t.Fatalf("%v, want %v", got, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Fatalf("%v, want %v", got, tc.want)
				}
			}
		})
	}
	t.Run("the policy's balancer over the service's", func(t *testing.T) {
		tg := newPickTarget(t, LeastRequest, "", s, breaker.Config{})
		set := tg.endpoints()
		last := ""
		for i := 0; i < 40; i++ {
			ep := tg.pick(set, nil, &Policy{Balancer: RoundRobin})
			if ep.id == last {
				t.Fatalf("round-robin picked %s twice in a row", ep.id)
			}
			last = ep.id
		}
	})
}
