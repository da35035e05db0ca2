package testcluster

import (
	"github.com/hashicorp/consul/api"
	"testing"
	"time"
)

// TestLeaderSurvivesServerLoss kills the leader of a real three-server
// cluster and checks that the other two elect a new one and still serve.
func TestLeaderSurvivesServerLoss(t *testing.T) {
	c := Start(t, Options{Clients: 1})
	old := c.Leader(t)
	kv := c.Clients[0].API(t).KV()
	if _, err := kv.Put(kvPair("before", "1"), nil); err != nil {
		t.Fatalf("write before failover: %v", err)
	}
	old.Kill()
	start := time.Now()
	nl := c.Leader(t)
	if nl == old {
		t.Fatalf("leader is still the killed server %s", old.Name)
	}
	t.Logf("new leader %s after %v", nl.Name, time.Since(start))
	// The client agent may still route an RPC or two to the dead server
	// until gossip marks it failed: writes succeed again within seconds.
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := kv.Put(kvPair("after", "2"), nil)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("write after failover: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	p, _, err := kv.Get("before", nil)
	if err != nil || p == nil || string(p.Value) != "1" {
		t.Fatalf("value written before failover: %v %v", p, err)
	}
	old.Start(t)
	c.WaitLeader(t)
}

func kvPair(k, v string) *api.KVPair { return &api.KVPair{Key: k, Value: []byte(v)} }
