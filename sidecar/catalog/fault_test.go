package catalog

import (
	"flag"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/internal/testcluster"
)

var agentDown = flag.Duration("agent-down", 20*time.Second, "TestAgentRestart: how long the node's agent stays down")

// TestAgentRestart kills the node's own Consul agent for -agent-down (20 s),
// changes the catalog through a server meanwhile, and starts the agent
// again. Two watchers of that agent, with the default retry settings, one
// with the probe (the default) and one without: both serve their last view
// throughout; the probing one shows the change within a few seconds of the
// agent answering again, while the other waits out a backoff that grew to
// 8-16 s. Both times are logged (scripts/faults prints them).
func TestAgentRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("keeps an agent down for 20 s")
	}
	c := testcluster.Start(t, testcluster.Options{Servers: 1, Clients: 1})
	agent := c.Clients[0]
	server := c.Servers[0].Client()
	register := func(id string) {
		t.Helper()
		_, err := server.Catalog().Register(&api.CatalogRegistration{Node: "ext-" + id, Address: "127.0.0.1",
			Service: &api.AgentService{ID: id, Service: "web", Port: 1}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	register("web1")
	cfg := DefaultConfig()
	cfg.Addresses = []string{agent.HTTPAddr}
	cfg.Mode = ModeAll
	probing := runWatcher(t, cfg)
	cfg.ProbeInterval = -1
	plain := runWatcher(t, cfg)
	for _, w := range []*Watcher{probing, plain} {
		waitFor(t, w, 15*time.Second, "web1", func(s *Snapshot) bool { return same(ids(s, "web"), "web1") })
	}

	agent.Kill()
	down := time.Now()
	changed := false
	for time.Since(down) < *agentDown {
		if !changed && time.Since(down) > *agentDown/2 {
			register("web2") // through the server: the agent is down
			changed = true
		}
		for name, w := range map[string]*Watcher{"probing": probing, "plain": plain} {
			if !same(ids(w.Load(), "web"), "web1") {
				t.Fatalf("%s watcher: the view changed while its agent was down: %v", name, ids(w.Load(), "web"))
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	agent.Start(t)
	// The agent answers once it has rejoined the server.
	for {
		if _, _, err := agent.Client().Catalog().Services(nil); err == nil {
			break
		}
		if time.Since(down) > *agentDown+30*time.Second {
			t.Fatal("the agent did not answer within 30 s of its start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	answering := time.Now()
	both := func(s *Snapshot) bool { return same(ids(s, "web"), "web1", "web2") }
	waitFor(t, probing, 10*time.Second, "web2 in the probing watcher's view", both)
	took := time.Since(answering)
	t.Logf("agent down %v: the probing watcher showed the change %v after the agent answered again", *agentDown, took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("the probing watcher took %v after the agent answered (want about ProbeInterval, %v)", took, DefaultConfig().ProbeInterval)
	}
	ch, cancel := plain.View().Subscribe()
	defer cancel()
	for !both(plain.Load()) && time.Since(answering) < 20*time.Second {
		select {
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		}
	}
	if both(plain.Load()) {
		t.Logf("without the probe: %v", time.Since(answering).Round(time.Millisecond))
	} else {
		t.Logf("without the probe: not within 20 s")
	}
}
