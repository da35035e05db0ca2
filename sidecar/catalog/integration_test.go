package catalog

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"attache/internal/testcluster"

	"github.com/hashicorp/consul/api"
)

// integrationConfig is a watcher config for the real cluster: quick retries
// so that recoveries show within the test's time.
func integrationConfig(addrs ...string) Config {
	c := DefaultConfig()
	c.Addresses = addrs
	c.Mode = ModeAll
	c.Wait = 30 * time.Second
	c.MinInterval = 5 * time.Millisecond
	c.RetryBase = 50 * time.Millisecond
	c.RetryMax = 500 * time.Millisecond
	c.RequestTimeout = 3 * time.Second
	c.CoordInterval = time.Second
	return c
}

// consulPassing lists the IDs of the passing instances of service, asking
// the leader.
func consulPassing(t *testing.T, c *api.Client, service string) []string {
	t.Helper()
	entries, _, err := c.Health().Service(service, "", true, &api.QueryOptions{RequireConsistent: true})
	if err != nil {
		return nil
	}
	out := []string{}
	for _, e := range entries {
		out = append(out, e.Service.ID)
	}
	sort.Strings(out)
	return out
}

// TestIntegration runs the watcher against a real three-server Consul
// cluster with one client agent, one scenario after the other on the same
// cluster.
func TestIntegration(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Consul cluster")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	client := c.Clients[0]
	capi := client.API(t)
	agent := capi.Agent()

	t.Run("snapshot follows register, checks, maintenance, deregister", func(t *testing.T) {
		cfg := integrationConfig(client.HTTPAddr)
		cfg.Node = client.Name
		w := runWatcher(t, cfg)
		var servers []string
		for _, s := range c.Servers {
			servers = append(servers, s.HTTPAddr)
		}
		scfg := integrationConfig(servers...)
		scfg.Stale = true
		scfg.MaxStale = 10 * time.Second
		ws := runWatcher(t, scfg) // stale mode, straight to the servers
		both := func(what string, cond func(*Snapshot) bool) {
			t.Helper()
			waitFor(t, w, 15*time.Second, what, cond)
			waitFor(t, ws, 15*time.Second, what+" (stale, servers)", cond)
		}
		reg := &api.AgentServiceRegistration{ID: "web1", Name: "web", Port: 8080, Tags: []string{"v1"},
			Meta:  map[string]string{"team": "a"},
			Check: &api.AgentServiceCheck{CheckID: "web1-ttl", TTL: "10m", Status: api.HealthPassing}}
		if err := agent.ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
		both("web1 registered", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
		s := w.Load()
		svc, _ := s.Service("web")
		in := svc.Instances[0]
		if in.Node != client.Name || in.Address != client.IP || in.Port != 8080 || !in.HasTag("V1") || in.Meta["team"] != "a" || in.Datacenter != "dc1" || in.Weight != 1 {
			t.Fatalf("instance %+v", in)
		}
		if _, ok := s.Node(client.Name); !ok {
			t.Fatalf("node %s missing", client.Name)
		}
		if err := agent.UpdateTTL("web1-ttl", "", api.HealthCritical); err != nil {
			t.Fatal(err)
		}
		both("web1 failing", func(s *Snapshot) bool { return same(ids(s, "web")) && s.Known["web"] })
		if err := agent.UpdateTTL("web1-ttl", "", api.HealthPassing); err != nil {
			t.Fatal(err)
		}
		both("web1 passing again", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
		if err := agent.EnableServiceMaintenance("web1", "test"); err != nil {
			t.Fatal(err)
		}
		both("web1 in maintenance", func(s *Snapshot) bool { return same(ids(s, "web")) })
		if err := agent.DisableServiceMaintenance("web1"); err != nil {
			t.Fatal(err)
		}
		both("web1 out of maintenance", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
		if err := agent.EnableNodeMaintenance("test"); err != nil {
			t.Fatal(err)
		}
		both("node in maintenance", func(s *Snapshot) bool { return same(ids(s, "web")) })
		if err := agent.DisableNodeMaintenance(); err != nil {
			t.Fatal(err)
		}
		both("node out of maintenance", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
		if err := agent.ServiceDeregister("web1"); err != nil {
			t.Fatal(err)
		}
		both("web deregistered", func(s *Snapshot) bool { _, ok := s.Service("web"); return !ok && !s.Known["web"] })
		// Agents send their coordinates every 15s or so: some are in by now.
		waitFor(t, w, 30*time.Second, "coordinates", func(s *Snapshot) bool {
			for n := range s.Coords {
				if _, ok := s.RTT(n, n); ok {
					return true
				}
			}
			return false
		})
	})

	t.Run("1000 flaps end in Consul's state", func(t *testing.T) {
		w := runWatcher(t, integrationConfig(client.HTTPAddr))
		if err := agent.ServiceRegister(&api.AgentServiceRegistration{ID: "flap1", Name: "flap", Port: 1,
			Check: &api.AgentServiceCheck{CheckID: "flap1-ttl", TTL: "10m", Status: api.HealthPassing}}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, w, 15*time.Second, "flap1", func(s *Snapshot) bool { return same(ids(s, "flap"), "flap1") })
		final := api.HealthCritical
		for i := 0; i < 1000; i++ {
			st := api.HealthPassing
			if i%2 == 0 {
				st = api.HealthCritical
			}
			if i == 999 && rand.IntN(2) == 0 {
				st = api.HealthCritical
			}
			final = st
			if err := agent.UpdateTTL("flap1-ttl", "", st); err != nil {
				t.Fatal(err)
			}
		}
		want := []string{}
		if final == api.HealthPassing {
			want = []string{"flap1"}
		}
		waitFor(t, w, 20*time.Second, "final state "+final, func(s *Snapshot) bool {
			return same(ids(s, "flap"), want...) && same(consulPassing(t, capi, "flap"), want...)
		})
		// And it stays there (no late, stale update overwrites it).
		time.Sleep(500 * time.Millisecond)
		if got := ids(w.Load(), "flap"); !same(got, want...) {
			t.Fatalf("after settling: %v, want %v", got, want)
		}
		_ = agent.ServiceDeregister("flap1")
	})

	t.Run("many services", func(t *testing.T) {
		scaleSubtests(t, c.Servers[0].Client(), client.HTTPAddr)
	})

	t.Run("leader killed while data changes loses nothing", func(t *testing.T) {
		w := runWatcher(t, integrationConfig(client.HTTPAddr))
		cat := capi.Catalog()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		var mu sync.Mutex
		writes := 0
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(g), 1))
				deadline := time.Now().Add(4 * time.Second)
				for time.Now().Before(deadline) && ctx.Err() == nil {
					svc := fmt.Sprintf("churn%d", r.IntN(5))
					id := fmt.Sprintf("%s-%d-%d", svc, g, r.IntN(4))
					var err error
					if r.IntN(3) == 0 {
						_, err = cat.Deregister(&api.CatalogDeregistration{Node: "ext-node", ServiceID: id}, nil)
					} else {
						_, err = cat.Register(&api.CatalogRegistration{Node: "ext-node", Address: "10.9.9.9",
							Service: &api.AgentService{ID: id, Service: svc, Port: 1 + r.IntN(1000)}}, nil)
					}
					if err == nil {
						mu.Lock()
						writes++
						mu.Unlock()
					} else {
						time.Sleep(20 * time.Millisecond) // no leader yet; try again
					}
				}
			}(g)
		}
		time.Sleep(time.Second)
		leader := c.Leader(t)
		leader.Kill()
		wg.Wait()
		leader.Start(t)
		c.WaitLeader(t)
		t.Logf("%d successful writes, leader %s killed", writes, leader.Name)
		for i := 0; i < 5; i++ {
			svc := fmt.Sprintf("churn%d", i)
			waitFor(t, w, 20*time.Second, svc+" equal to the catalog", func(s *Snapshot) bool {
				want := consulPassing(t, capi, svc)
				if len(want) == 0 {
					_, ok := s.Service(svc)
					return want != nil && !ok
				}
				return same(ids(s, svc), want...)
			})
		}
		_, _ = cat.Deregister(&api.CatalogDeregistration{Node: "ext-node"}, nil)
	})

	t.Run("servers down: keeps serving, restarts from disk, catches up", func(t *testing.T) {
		dir := t.TempDir()
		cfg := integrationConfig(client.HTTPAddr)
		cfg.DataDir = dir
		cfg.SaveInterval = 50 * time.Millisecond
		if err := agent.ServiceRegister(&api.AgentServiceRegistration{ID: "db1", Name: "db", Port: 5432}); err != nil {
			t.Fatal(err)
		}
		w1, err := NewWatcher(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx1, cancel1 := context.WithCancel(context.Background())
		done1 := make(chan error, 1)
		go func() { done1 <- w1.Run(ctx1) }()
		waitFor(t, w1, 15*time.Second, "db1", func(s *Snapshot) bool { return same(ids(s, "db"), "db1") })
		time.Sleep(200 * time.Millisecond) // a save

		for _, s := range c.Servers {
			s.Stop()
		}
		time.Sleep(time.Second)
		if got := ids(w1.Load(), "db"); !same(got, "db1") {
			t.Fatalf("view lost while the servers are down: %v", got)
		}
		if st := w1.Status(); st.Connected {
			t.Logf("status still connected right after the servers stopped: %+v", st)
		}
		cancel1()
		<-done1

		// Restarted while the servers are down: serves from disk.
		w2 := runWatcher(t, cfg)
		if s := w2.Load(); !s.Stale || !same(ids(s, "db"), "db1") {
			t.Fatalf("not served from disk: %+v", s)
		}
		// Changed meanwhile: the agent keeps the registration and syncs it
		// when the servers are back.
		if err := agent.ServiceRegister(&api.AgentServiceRegistration{ID: "db2", Name: "db", Port: 5433}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		if st := w2.Status(); st.Connected || !st.Stale || st.DataAge <= 0 {
			t.Fatalf("status while down: %+v", st)
		}
		for _, s := range c.Servers {
			s.Start(t)
		}
		c.WaitLeader(t)
		waitFor(t, w2, 60*time.Second, "caught up", func(s *Snapshot) bool { return !s.Stale && same(ids(s, "db"), "db1", "db2") })
		if st := w2.Status(); !st.Connected || st.DataAge != 0 {
			t.Fatalf("status after catching up: %+v", st)
		}
	})
}
