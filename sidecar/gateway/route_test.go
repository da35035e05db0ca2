package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"attache/control/routes"
	"attache/sidecar/catalog"
	"attache/sidecar/proxy"
)

// staticCatalog is a catalog view that never changes: the route decision
// reads the snapshot only (a fake, as the decision alone is measured).
type staticCatalog struct{ snap *catalog.Snapshot }

func (c staticCatalog) Load() *catalog.Snapshot                        { return c.snap }
func (c staticCatalog) Want(context.Context, string) *catalog.Snapshot { return c.snap }
func (c staticCatalog) View() *catalog.View                            { return nil }

// decisionGateway is a gateway with the bench's routes installed, no Consul.
func decisionGateway(tb testing.TB) *Gateway {
	tb.Helper()
	snap := &catalog.Snapshot{Services: map[string]*catalog.Service{
		"users":     {Name: "users", Instances: []catalog.Instance{{ID: "u1", Address: "127.0.0.1", Port: 1}}},
		"inventory": {Name: "inventory", Instances: []catalog.Instance{{ID: "i1", Address: "127.0.0.1", Port: 2}}},
	}}
	g, err := New(Config{Addr: "127.0.0.1:0", Node: "bench"}, nil, staticCatalog{snap})
	if err != nil {
		tb.Fatal(err)
	}
	doc, err := routes.Parse("bench.hcl", []byte(`
route "users" {
  prefix  = "/users/"
  service = "users"
}
route "inventory" {
  prefix  = "/inventory/"
  service = "inventory"
}
route "limited" {
  prefix  = "/limited/"
  service = "users"
  rate_limit {
    rps = 1000000000
  }
}
`))
	if err != nil {
		tb.Fatal(err)
	}
	if err := g.install(&applied{Version: 1, doc: doc}, false); err != nil {
		tb.Fatal(err)
	}
	return g
}

// TestRouteAllocs: the decision of a plain route and of a rate-limited one
// (a client already known) allocates nothing.
func TestRouteAllocs(t *testing.T) {
	g := decisionGateway(t)
	for _, path := range []string{"/users/1", "/inventory/x?q=1", "/limited/1"} {
		h := &proxy.Head{Method: "GET", Host: "api.bench:8080", Path: path, RemoteIP: "127.0.0.1"}
		if d := g.Route(h); d.Service == "" {
			t.Fatalf("%s: %+v", path, d)
		}
		if n := testing.AllocsPerRun(1000, func() { g.Route(h) }); n != 0 {
			t.Errorf("%s: %v allocations per decision", path, n)
		}
	}
}

func BenchmarkRoute(b *testing.B) {
	g := decisionGateway(b)
	for _, path := range []string{"/users/1", "/limited/1"} {
		b.Run(strings.Split(path, "/")[1], func(b *testing.B) {
			h := &proxy.Head{Method: "GET", Host: "api.bench:8080", Path: path, RemoteIP: "127.0.0.1", Now: time.Now()} // as an event loop sets it
			b.ReportAllocs()
			for b.Loop() {
				g.Route(h)
			}
		})
	}
}
