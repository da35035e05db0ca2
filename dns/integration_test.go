package dns

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
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
	c := testcluster.Start(t, testcluster.Options{Servers: 1, Clients: 1})
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
	wcfg.IncludeWarning = true // as Consul's DNS without only_passing
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
		// Reverse lookups: a node, a service address, any type.
		{"88.0.0.127.in-addr.arpa.", miekg.TypePTR},
		{"88.0.0.127.in-addr.arpa.", miekg.TypeA},
		{"88.0.0.127.in-addr.arpa.", miekg.TypeSOA},
		{"77.0.0.127.in-addr.arpa.", miekg.TypePTR},
		{reverse(t, agent.IP), miekg.TypePTR},
	}

	type result struct {
		rcode                int
		answer, authority, x []string
	}
	exchange := func(server, proto string, name string, qtype uint16) (result, error) {
		m := new(miekg.Msg)
		m.SetQuestion(name, qtype)
		m.RecursionDesired = false
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

	t.Run("randomized", func(t *testing.T) { compareRandomized(t, cl, agent.DNSAddr, addr) })

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

func reverse(t *testing.T, ip string) string {
	t.Helper()
	r, err := miekg.ReverseAddr(ip)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// compareRandomized registers a seeded random catalog (11 services of 1 to
// 60 instances, tags, node meta, service addresses of their own, IPv6,
// warning and critical checks) and asks attache and Consul the same 600
// seeded random questions (service, tag, RFC 2782, node, addr and reverse
// names; A, AAAA, ANY, SRV; no EDNS0 or buffers of 400 to 4096 bytes; UDP
// and TCP). Answers are shuffled, and cut to fit, differently on each side,
// so it compares what does not depend on the shuffle: the rcode, the number
// of records in each section by type, the authority records, every record
// being one of the full answer's (asked over TCP), the records themselves
// when nothing was cut, and each SRV target's address being there. The
// catalog's shapes make sizes independent of the shuffle: within a service
// every instance is on its own node, node names have one length, every
// node has one meta key, and instances use the same kind of address.
// ATTACHE_DNS_SEED picks another seed.
func compareRandomized(t *testing.T, cl *api.Client, consulDNS, attacheDNS string) {
	seed := uint64(13)
	if v := os.Getenv("ATTACHE_DNS_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("ATTACHE_DNS_SEED: %v", err)
		}
	}
	t.Logf("seed %d (ATTACHE_DNS_SEED)", seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	const nodes = 60
	for i := range nodes {
		if _, err := cl.Catalog().Register(&api.CatalogRegistration{
			Node: fmt.Sprintf("rnode-%02d", i), Address: fmt.Sprintf("127.0.5.%d", i+1),
			NodeMeta: map[string]string{"rack": fmt.Sprintf("r%02d", i%7)},
		}, nil); err != nil {
			t.Fatal(err)
		}
	}
	type svc struct {
		name    string
		healthy int
		tags    map[string]int // tag: healthy instances with it
	}
	var services []*svc
	var names []string // question names: reverse names, nodes, addrs
	shapes := []string{"node", "v4", "v6"}
	for si := range 11 {
		n := 1 + rng.IntN(60)
		if si == 0 {
			n = 60
		}
		sv := &svc{name: fmt.Sprintf("rsvc%02d", si), tags: map[string]int{}}
		shape := shapes[si%3]
		first := rng.IntN(nodes)
		for i := range n {
			node := (first + i) % nodes
			reg := &api.CatalogRegistration{
				Node: fmt.Sprintf("rnode-%02d", node), SkipNodeUpdate: true,
				Service: &api.AgentService{ID: fmt.Sprintf("%s-%d", sv.name, i), Service: sv.name, Port: 20000 + i,
					Meta: map[string]string{"v": strconv.Itoa(i % 3)}},
			}
			switch shape {
			case "v4":
				reg.Service.Address = fmt.Sprintf("127.0.%d.%d", 100+si, i+1)
			case "v6":
				reg.Service.Address = fmt.Sprintf("fd00::%x:%x", si+1, i+1)
			}
			var tags []string
			for _, tag := range []string{"v1", "v2", "canary"} {
				if rng.IntN(3) == 0 {
					tags = append(tags, tag)
				}
			}
			reg.Service.Tags = tags
			status := api.HealthPassing
			switch r := rng.IntN(10); {
			case r == 0 && i > 0:
				status = api.HealthCritical
			case r == 1:
				status = api.HealthWarning
			}
			reg.Check = &api.AgentCheck{Node: reg.Node, CheckID: "c-" + reg.Service.ID, Name: "c", Status: status, ServiceID: reg.Service.ID}
			if _, err := cl.Catalog().Register(reg, nil); err != nil {
				t.Fatal(err)
			}
			if status == api.HealthCritical {
				continue
			}
			sv.healthy++
			for _, tag := range tags {
				sv.tags[tag]++
			}
			if reg.Service.Address != "" && rng.IntN(4) == 0 {
				names = append(names, reverse(t, reg.Service.Address))
			}
		}
		services = append(services, sv)
	}
	for i := range nodes {
		if rng.IntN(3) == 0 {
			names = append(names, fmt.Sprintf("rnode-%02d.node.consul.", i), reverse(t, fmt.Sprintf("127.0.5.%d", i+1)))
		}
	}
	names = append(names, "7f000501.addr.consul.", "fd000000000000000000000000010001.addr.dc1.consul.")

	type ask struct {
		name  string
		qtype uint16
		edns  uint16
		proto string
	}
	do := func(server string, q ask) (*miekg.Msg, error) {
		m := new(miekg.Msg)
		m.SetQuestion(q.name, q.qtype)
		m.RecursionDesired = false
		if q.edns > 0 {
			m.SetEdns0(q.edns, false)
		}
		r, _, err := (&miekg.Client{Net: q.proto, Timeout: 3 * time.Second, UDPSize: 65535}).Exchange(m, server)
		return r, err
	}
	// Both views must have every service whole before comparing.
	for _, sv := range services {
		deadline := time.Now().Add(20 * time.Second)
		for _, server := range []string{consulDNS, attacheDNS} {
			for {
				r, err := do(server, ask{sv.name + ".service.consul.", miekg.TypeSRV, 0, "tcp"})
				if err == nil && len(r.Answer) == sv.healthy {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: %s never had %d instances (%v %v)", server, sv.name, sv.healthy, err, r)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}

	types := []uint16{miekg.TypeA, miekg.TypeA, miekg.TypeSRV, miekg.TypeSRV, miekg.TypeAAAA, miekg.TypeANY}
	sizes := []uint16{0, 0, 0, 400, 512, 1232, 1232, 4096}
	var asks []ask
	for range 600 {
		q := ask{qtype: types[rng.IntN(len(types))], edns: sizes[rng.IntN(len(sizes))], proto: "udp"}
		if rng.IntN(5) == 0 {
			q.proto = "tcp"
		}
		sv := services[rng.IntN(len(services))]
		tags := []string{"v1", "v2", "canary"}
		switch r := rng.IntN(10); {
		case r < 4:
			q.name = sv.name + ".service.consul."
		case r < 6:
			q.name = tags[rng.IntN(3)] + "." + sv.name + ".service.dc1.consul."
		case r == 6:
			q.name, q.qtype = "_"+sv.name+"._"+tags[rng.IntN(3)]+".service.consul.", miekg.TypeSRV
		case r == 7:
			q.name, q.qtype = "_"+sv.name+"._tcp.service.consul.", miekg.TypeSRV
		default:
			q.name = names[rng.IntN(len(names))]
			if strings.HasSuffix(q.name, ".arpa.") {
				q.qtype = miekg.TypePTR
			}
		}
		asks = append(asks, q)
	}

	render := func(rrs []miekg.RR) []string {
		out := []string{}
		for _, rr := range rrs {
			if rr.Header().Rrtype == miekg.TypeOPT {
				continue
			}
			h := *rr.Header()
			h.Name = strings.ToLower(h.Name)
			c := miekg.Copy(rr)
			*c.Header() = h
			c.Header().Ttl = 0
			if soa, ok := c.(*miekg.SOA); ok {
				soa.Serial = 0
			}
			out = append(out, c.String())
		}
		sort.Strings(out)
		return slices.Compact(out)
	}
	countTypes := func(rrs []miekg.RR) map[uint16]int {
		out := map[uint16]int{}
		seen := map[string]bool{}
		for _, rr := range rrs {
			if rr.Header().Rrtype == miekg.TypeOPT {
				continue // Consul drops it from trimmed answers (README: differences)
			}
			if seen[rr.String()] { // Consul repeats node meta TXT records
				continue
			}
			seen[rr.String()] = true
			out[rr.Header().Rrtype]++
		}
		return out
	}
	differences := 0
	for i, q := range asks {
		ours, err := do(attacheDNS, q)
		if err != nil {
			t.Fatalf("attache: %v %v", q, err)
		}
		theirs, err := do(consulDNS, q)
		if err != nil {
			t.Fatalf("consul: %v %v", q, err)
		}
		full, err := do(consulDNS, ask{q.name, q.qtype, 0, "tcp"})
		if err != nil {
			t.Fatal(err)
		}
		var why []string
		if ours.Rcode != theirs.Rcode {
			why = append(why, "rcode")
		}
		if !maps.Equal(countTypes(ours.Answer), countTypes(theirs.Answer)) {
			why = append(why, "answer counts")
		}
		if !maps.Equal(countTypes(ours.Extra), countTypes(theirs.Extra)) {
			why = append(why, "additional counts")
		}
		if !slices.Equal(render(ours.Ns), render(theirs.Ns)) {
			why = append(why, "authority")
		}
		fullSet := render(full.Answer)
		for _, rr := range render(ours.Answer) {
			if _, ok := slices.BinarySearch(fullSet, rr); !ok {
				why = append(why, "answer "+rr+" not in Consul's full answer")
			}
		}
		if len(ours.Answer) == len(full.Answer) && !slices.Equal(render(ours.Answer), render(theirs.Answer)) {
			why = append(why, "answer records")
		}
		extra := render(ours.Extra)
		for _, rr := range ours.Answer {
			if srv, ok := rr.(*miekg.SRV); ok && !slices.ContainsFunc(extra, func(x string) bool { return strings.HasPrefix(x, strings.ToLower(srv.Target)+"\t") }) {
				why = append(why, "no address for "+srv.Target)
			}
		}
		if len(why) > 0 {
			differences++
			if differences <= 15 {
				t.Errorf("question %d: %s %s EDNS %d over %s: %s\nattache: %s %q\n         ns %q\n         extra %q\nconsul:  %s %q\n         ns %q\n         extra %q",
					i, q.name, miekg.TypeToString[q.qtype], q.edns, q.proto, strings.Join(why, ", "),
					miekg.RcodeToString[ours.Rcode], render(ours.Answer), render(ours.Ns), render(ours.Extra),
					miekg.RcodeToString[theirs.Rcode], render(theirs.Answer), render(theirs.Ns), render(theirs.Extra))
			}
		}
	}
	if differences > 0 {
		t.Errorf("%d of %d questions answered differently (seed %d)", differences, len(asks), seed)
	}
}
