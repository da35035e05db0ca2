package testcluster

import (
	"github.com/hashicorp/consul/api"
	"net"
	"strings"
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

// TestSecure starts a cluster with ACLs in default-deny mode and HTTPS with
// verify_incoming, and checks that it holds: no certificate, no connection;
// no token, nothing; a token gets exactly its policy; every agent's own
// token works (its node is in the catalog, synced by anti-entropy).
func TestSecure(t *testing.T) {
	c := Start(t, Options{Servers: 1, Clients: 1, ACL: true, TLS: true})
	cl := c.Clients[0]

	// HTTPS only, and only with a certificate the cluster's CA signed.
	if conn, err := net.DialTimeout("tcp", cl.IP+":8500", time.Second); err == nil {
		conn.Close()
		t.Fatal("plain HTTP answers on :8500 with TLS on")
	}
	noCert := api.DefaultNonPooledConfig()
	noCert.Address, noCert.Scheme, noCert.Token = cl.HTTPAddr, "https", c.ManagementToken
	noCert.TLSConfig = api.TLSConfig{CAFile: c.TLS.CAFile}
	anon, _ := api.NewClient(noCert)
	if _, err := anon.Status().Leader(); err == nil {
		t.Fatal("HTTPS answered a client without a certificate (verify_incoming)")
	}

	// Default deny: a token without rules reads nothing and writes nothing.
	kv := cl.Client().KV()
	if _, err := kv.Put(kvPair("app/x", "1"), nil); err != nil {
		t.Fatalf("management token: %v", err)
	}
	empty := withToken(t, c, cl, c.Token(t, "nothing", `node_prefix "nobody" { policy = "read" }`))
	if _, _, err := empty.KV().Get("app/x", nil); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("a token without key rules read app/x: %v", err)
	}
	svcs, meta, err := empty.Catalog().Services(nil)
	if err != nil || len(svcs) != 0 || !meta.ResultsFilteredByACLs {
		t.Fatalf("a token without service rules listed %v (filtered %v, err %v)", svcs, meta != nil && meta.ResultsFilteredByACLs, err)
	}

	// A token gets exactly what its policy says.
	app := withToken(t, c, cl, c.Token(t, "app", `key_prefix "app/" { policy = "write" }`))
	if _, err := app.KV().Put(kvPair("app/y", "2"), nil); err != nil {
		t.Fatalf("key write on app/: %v", err)
	}
	_, err = app.KV().Put(kvPair("other/y", "2"), nil)
	if err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("key write outside app/: %v", err)
	}
	t.Logf("Consul's refusal: %v", err)

	// The agents' own tokens: each node is in the catalog with its address.
	deadline := time.Now().Add(30 * time.Second)
	for {
		nodes, _, err := cl.Client().Catalog().Nodes(nil)
		if err == nil && len(nodes) == len(c.Servers)+len(c.Clients) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes in the catalog: %d, want %d (%v)", len(nodes), len(c.Servers)+len(c.Clients), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func withToken(t *testing.T, c *Cluster, a *Agent, token string) *api.Client {
	t.Helper()
	cfg := api.DefaultNonPooledConfig()
	cfg.Address, cfg.Scheme, cfg.Token = a.HTTPAddr, a.Scheme, token
	cfg.TLSConfig = c.TLS.Config()
	cl, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}
