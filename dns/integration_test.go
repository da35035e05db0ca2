package dns

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	miekg "github.com/miekg/dns"

	"attache/internal/testcluster"
	"attache/sidecar/catalog"
)

// TestCompareWithConsul asks attache's DNS, fed by the real catalog watcher,
// and Consul's own DNS on the same client agent the same questions, over UDP
// and TCP, and compares rcodes and record sets (not order, TTLs or the SOA
// serial). Questions where attache differs on purpose are in README.md and
// in TestAnswer, not here.
func TestCompareWithConsul(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Consul cluster")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	agent := c.Clients[0]
	cl := agent.API(t)

	// On the client agent's node: two instances of web, one without an
	// address (SRV target <node>.node.dc1.consul), one with its own
	// (<hex>.addr.dc1.consul), and a service whose only check is critical.
	regs := []*api.AgentServiceRegistration{
		{ID: "web-1", Name: "web", Port: 8080, Tags: []string{"v1", "Blue"}},
		{ID: "web-2", Name: "web", Port: 8081, Address: "127.0.0.77", Tags: []string{"v2"}, Meta: map[string]string{"version": "2"}},
		{ID: "down-1", Name: "down", Port: 9000, Check: &api.AgentServiceCheck{TTL: "1h", Status: api.HealthCritical}},
	}
	for _, r := range regs {
		if err := cl.Agent().ServiceRegister(r); err != nil {
			t.Fatal(err)
		}
	}
	// A second node, registered in the catalog, with meta and a third web.
	if _, err := cl.Catalog().Register(&api.CatalogRegistration{
		Node: "ext-node", Address: "127.0.0.88", NodeMeta: map[string]string{"rack": "r1"},
		Service: &api.AgentService{ID: "web-3", Service: "web", Port: 8082, Tags: []string{"v1"}},
	}, nil); err != nil {
		t.Fatal(err)
	}

	wcfg := catalog.DefaultConfig()
	wcfg.Addresses = []string{agent.HTTPAddr}
	wcfg.Node = agent.Name
	w, err := catalog.NewWatcher(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	wdone := make(chan error, 1)
	go func() { wdone <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-wdone
	})

	cfg := DefaultConfig()
	cfg.Addr = "127.0.0.1:0"
	cfg.ResolvConf = ""
	s, err := New(cfg, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := runServer(t, s)

	questions := []struct {
		name  string
		qtype uint16
	}{
		{"web.service.consul.", miekg.TypeA},
		{"WEB.service.consul.", miekg.TypeA},
		{"web.service.dc1.consul.", miekg.TypeA},
		{"web.service.consul.", miekg.TypeSRV},
		{"v1.web.service.consul.", miekg.TypeA},
		{"v1.web.service.consul.", miekg.TypeSRV},
		{"blue.web.service.consul.", miekg.TypeA},
		{"_web._v2.service.consul.", miekg.TypeSRV},
		{"_web._tcp.service.consul.", miekg.TypeSRV},
		{"web.service.consul.", miekg.TypeAAAA},
		{"web.service.consul.", miekg.TypeANY},
		{"nope.web.service.consul.", miekg.TypeA},
		{"nosuch.service.consul.", miekg.TypeA},
		{"down.service.consul.", miekg.TypeA},
		{"down.service.consul.", miekg.TypeSRV},
		{"consul.service.consul.", miekg.TypeA},
		{agent.Name + ".node.consul.", miekg.TypeA},
		{"ext-node.node.consul.", miekg.TypeA},
		{"ext-node.node.dc1.consul.", miekg.TypeTXT},
		{"ext-node.node.consul.", miekg.TypeANY},
		{"nosuch.node.consul.", miekg.TypeA},
		{"7f00004d.addr.dc1.consul.", miekg.TypeA},
		{"foo.consul.", miekg.TypeA},
		{"consul.", miekg.TypeNS},
		{"consul.", miekg.TypeSOA},
	}

	type result struct {
		rcode                int
		answer, authority, x []string
	}
	exchange := func(server, proto string, name string, qtype uint16) (result, error) {
		m := new(miekg.Msg)
		m.SetQuestion(name, qtype)
		r, _, err := (&miekg.Client{Net: proto, Timeout: 3 * time.Second}).Exchange(m, server)
		if err != nil {
			return result{}, err
		}
		// Consul repeats a node's meta TXT records once per instance on
		// the node; an RRset holds each record once (RFC 2181 5): compare
		// the sets.
		return result{r.Rcode, rrs(r.Answer), rrs(r.Ns), slices.Compact(rrs(r.Extra))}, nil
	}
	equal := func(a, b result) bool {
		return a.rcode == b.rcode && slices.Equal(a.answer, b.answer) && slices.Equal(a.authority, b.authority) && slices.Equal(a.x, b.x)
	}
	for _, q := range questions {
		for _, proto := range []string{"udp", "tcp"} {
			t.Run(proto+" "+miekg.TypeToString[q.qtype]+" "+q.name, func(t *testing.T) {
				// Both views are eventually consistent: give them a moment
				// to agree after the registrations.
				var ours, theirs result
				deadline := time.Now().Add(10 * time.Second)
				for {
					var err error
					if ours, err = exchange(addr, proto, q.name, q.qtype); err != nil {
						t.Fatalf("attache: %v", err)
					}
					if theirs, err = exchange(agent.DNSAddr, proto, q.name, q.qtype); err != nil {
						t.Fatalf("consul: %v", err)
					}
					if equal(ours, theirs) || time.Now().After(deadline) {
						break
					}
					time.Sleep(200 * time.Millisecond)
				}
				if !equal(ours, theirs) {
					t.Errorf("attache and Consul differ\nattache: %s %q\n         ns %q\n         extra %q\nconsul:  %s %q\n         ns %q\n         extra %q",
						miekg.RcodeToString[ours.rcode], ours.answer, ours.authority, ours.x,
						miekg.RcodeToString[theirs.rcode], theirs.answer, theirs.authority, theirs.x)
				}
			})
		}
	}

	// Consul's answers change when the catalog does; so do ours, from the
	// watcher, without a query per question.
	if err := cl.Agent().ServiceDeregister("web-2"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := exchange(addr, "udp", "web.service.consul.", miekg.TypeA)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(r.answer, []string{"web.service.consul. A 127.0.0.88", "web.service.consul. A " + agent.IP}) ||
			slices.Equal(r.answer, []string{"web.service.consul. A " + agent.IP, "web.service.consul. A 127.0.0.88"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("deregistered instance still answered: %q", r.answer)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
