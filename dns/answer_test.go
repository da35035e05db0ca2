package dns

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/serf/coordinate"
	miekg "github.com/miekg/dns"

	"attache/sidecar/catalog"
)

// fakeSource is a Source over a catalog.View; Want publishes the snapshot
// lazy holds for the service, as the watcher does after its first answer.
type fakeSource struct {
	view    *catalog.View
	mu      sync.Mutex
	wants   []string
	touches []string
	lazy    map[string]*catalog.Service
}

func (f *fakeSource) Load() *catalog.Snapshot { return f.view.Load() }

func (f *fakeSource) Want(ctx context.Context, service string) *catalog.Snapshot {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ctx.Err() != nil { // a touch: the service is in use
		f.touches = append(f.touches, service)
		return f.view.Load()
	}
	f.wants = append(f.wants, service)
	if svc, ok := f.lazy[service]; ok {
		cur := f.view.Load()
		next := *cur
		next.Services = map[string]*catalog.Service{}
		for k, v := range cur.Services {
			next.Services[k] = v
		}
		next.Services[service] = svc
		f.view.Publish(&next)
	}
	return f.view.Load()
}

type fakeEjections map[string]bool

func (f fakeEjections) Ejected(service, id string) bool { return f[service+"/"+id] }

func inst(svc, id, node, nodeAddr, addr string, port int, tags ...string) catalog.Instance {
	if addr == "" {
		addr = nodeAddr
	}
	return catalog.Instance{ID: id, Service: svc, Node: node, NodeAddress: nodeAddr, Address: addr,
		Port: port, Tags: tags, Weight: 1, Datacenter: "dc1", Status: "passing"}
}

func testSnapshot() *catalog.Snapshot {
	nodes := map[string]*catalog.Node{
		"node1": {Name: "node1", Address: "127.0.0.21", Datacenter: "dc1", Meta: map[string]string{"consul-network-segment": ""}},
		"node2": {Name: "Node2", Address: "127.0.0.22", Datacenter: "dc1", Meta: map[string]string{"rack": "r2"}},
		"node6": {Name: "node6", Address: "fd00::6", Datacenter: "dc1"},
		"ext":   {Name: "ext", Address: "ext.example.com", Datacenter: "dc1"},
		"s1":    {Name: "s1", Address: "127.0.0.11", Datacenter: "dc1"},
		"s2":    {Name: "s2", Address: "127.0.0.12", Datacenter: "dc1"},
		"s3":    {Name: "s3", Address: "127.0.0.13", Datacenter: "dc1"},
	}
	users := []catalog.Instance{
		inst("users", "u1", "node1", "127.0.0.21", "", 9001, "v1", "Primary"),
		inst("users", "u2", "Node2", "127.0.0.22", "127.0.0.99", 9002, "v2"),
	}
	users[0].Meta = map[string]string{"version": "1"}
	users[1].Meta = map[string]string{"version": "2"}
	users[1].Weight = 5
	var many []catalog.Instance
	for i := range 40 {
		many = append(many, inst("many", fmt.Sprintf("m%02d", i), "node1", "127.0.0.21", fmt.Sprintf("10.0.0.%d", i+1), 8000+i))
	}
	services := map[string]*catalog.Service{
		"users": {Name: "users", Instances: users},
		"many":  {Name: "many", Instances: many},
		"v6":    {Name: "v6", Instances: []catalog.Instance{inst("v6", "a", "node6", "fd00::6", "", 80)}},
		"dup": {Name: "dup", Instances: []catalog.Instance{
			inst("dup", "a", "node1", "127.0.0.21", "", 80), inst("dup", "b", "node1", "127.0.0.21", "", 80)}},
		"ext":   {Name: "ext", Instances: []catalog.Instance{inst("ext", "e", "ext", "ext.example.com", "db.example.com", 5432)}},
		"empty": {Name: "empty"},
		"consul": {Name: "consul", Instances: []catalog.Instance{
			inst("consul", "consul", "s1", "127.0.0.11", "", 8300),
			inst("consul", "consul", "s2", "127.0.0.12", "", 8300),
			inst("consul", "consul", "s3", "127.0.0.13", "", 8300)}},
	}
	known := map[string]bool{"lazy": true, "gone": true}
	for k := range services {
		known[k] = true
	}
	return &catalog.Snapshot{Datacenter: "dc1", Services: services, Nodes: nodes, Known: known, Coords: map[string]*coordinate.Coordinate{}}
}

func newTestServer(t testing.TB, mod func(*Config), ej Ejections) (*Server, *fakeSource) {
	t.Helper()
	v := catalog.NewView()
	v.Publish(testSnapshot())
	src := &fakeSource{view: v, lazy: map[string]*catalog.Service{
		"lazy": {Name: "lazy", Instances: []catalog.Instance{inst("lazy", "l1", "node1", "127.0.0.21", "", 7000)}},
	}}
	cfg := DefaultConfig()
	cfg.ResolvConf = ""
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg, src, ej)
	if err != nil {
		t.Fatal(err)
	}
	return s, src
}

// rrs renders records as "name type rdata", lower-cased names, TTL and class
// left out, sorted: answers compare as sets, not in order. SOA rdata is left
// out (its serial is the time).
func rrs(list []miekg.RR) []string {
	out := []string{}
	for _, rr := range list {
		if rr.Header().Rrtype == miekg.TypeOPT {
			continue
		}
		f := strings.Fields(rr.String())
		s := strings.ToLower(f[0]) + " " + f[3]
		if rr.Header().Rrtype != miekg.TypeSOA && len(f) > 4 {
			s += " " + strings.Join(f[4:], " ")
		}
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

func ask(s *Server, name string, qtype uint16, proto string, edns uint16, from string) *miekg.Msg {
	req := new(miekg.Msg)
	req.SetQuestion(name, qtype)
	if edns > 0 {
		req.SetEdns0(edns, false)
	}
	if from == "" {
		from = "127.0.0.1"
	}
	if proto == "" {
		proto = "udp"
	}
	return s.Answer(req, netip.MustParseAddr(from), proto)
}

func TestAnswer(t *testing.T) {
	soa := []string{"consul. SOA"}
	users := []string{"users.service.consul. A 127.0.0.21", "users.service.consul. A 127.0.0.99"}
	cases := []struct {
		name   string
		qname  string
		qtype  uint16
		rcode  int
		answer []string
		ns     []string
		extra  []string
	}{
		{"service A", "users.service.consul.", miekg.TypeA, 0, users, nil, nil},
		{"case-insensitive", "USERS.Service.CONSUL.", miekg.TypeA, 0,
			[]string{"users.service.consul. A 127.0.0.21", "users.service.consul. A 127.0.0.99"}, nil, nil},
		{"with datacenter", "users.service.dc1.consul.", miekg.TypeA, 0,
			[]string{"users.service.dc1.consul. A 127.0.0.21", "users.service.dc1.consul. A 127.0.0.99"}, nil, nil},
		{"with dc label pair", "users.service.dc1.dc.consul.", miekg.TypeA, 0,
			[]string{"users.service.dc1.dc.consul. A 127.0.0.21", "users.service.dc1.dc.consul. A 127.0.0.99"}, nil, nil},
		{"other datacenter", "users.service.dc2.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"peer", "users.service.p.peer.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"tag", "v1.users.service.consul.", miekg.TypeA, 0, []string{"v1.users.service.consul. A 127.0.0.21"}, nil, nil},
		{"tag case-insensitive", "primary.users.service.consul.", miekg.TypeA, 0, []string{"primary.users.service.consul. A 127.0.0.21"}, nil, nil},
		{"unknown tag", "v9.users.service.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"AAAA of v4 service: no data", "users.service.consul.", miekg.TypeAAAA, 0, nil, soa, nil},
		{"AAAA", "v6.service.consul.", miekg.TypeAAAA, 0, []string{"v6.service.consul. AAAA fd00::6"}, nil, nil},
		{"ANY: addresses only", "users.service.consul.", miekg.TypeANY, 0, users, nil, nil},
		{"MX: no data", "users.service.consul.", miekg.TypeMX, 0, nil, soa, nil},
		{"duplicates collapse", "dup.service.consul.", miekg.TypeA, 0, []string{"dup.service.consul. A 127.0.0.21"}, nil, nil},
		{"host name address: CNAME", "ext.service.consul.", miekg.TypeA, 0, []string{"ext.service.consul. CNAME db.example.com."}, nil, nil},
		{"SRV", "users.service.consul.", miekg.TypeSRV, 0,
			[]string{"users.service.consul. SRV 1 1 9001 node1.node.dc1.consul.", "users.service.consul. SRV 1 5 9002 7f000063.addr.dc1.consul."}, nil,
			[]string{"7f000063.addr.dc1.consul. A 127.0.0.99", "node1.node.dc1.consul. A 127.0.0.21",
				"node1.node.dc1.consul. TXT \"consul-network-segment=\"", "node2.node.dc1.consul. TXT \"rack=r2\""}},
		{"SRV RFC 2782 tag", "_users._v2.service.consul.", miekg.TypeSRV, 0,
			[]string{"_users._v2.service.consul. SRV 1 5 9002 7f000063.addr.dc1.consul."}, nil,
			[]string{"7f000063.addr.dc1.consul. A 127.0.0.99", "node2.node.dc1.consul. TXT \"rack=r2\""}},
		{"SRV RFC 2782 tcp", "_users._tcp.service.consul.", miekg.TypeSRV, 0,
			[]string{"_users._tcp.service.consul. SRV 1 1 9001 node1.node.dc1.consul.", "_users._tcp.service.consul. SRV 1 5 9002 7f000063.addr.dc1.consul."}, nil,
			[]string{"7f000063.addr.dc1.consul. A 127.0.0.99", "node1.node.dc1.consul. A 127.0.0.21",
				"node1.node.dc1.consul. TXT \"consul-network-segment=\"", "node2.node.dc1.consul. TXT \"rack=r2\""}},
		{"SRV RFC 2782 without service label", "_users._v1.dc1.consul.", miekg.TypeSRV, 0,
			[]string{"_users._v1.dc1.consul. SRV 1 1 9001 node1.node.dc1.consul."}, nil,
			[]string{"node1.node.dc1.consul. A 127.0.0.21", "node1.node.dc1.consul. TXT \"consul-network-segment=\""}},
		{"SRV host name target", "ext.service.consul.", miekg.TypeSRV, 0,
			[]string{"ext.service.consul. SRV 1 1 5432 db.example.com."}, nil, nil},
		{"TXT: instance meta", "users.service.consul.", miekg.TypeTXT, 0,
			[]string{"users.service.consul. TXT \"version=1\"", "users.service.consul. TXT \"version=2\""}, nil, nil},
		{"known service without healthy instances", "empty.service.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"unknown service", "nope.service.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"unwatched service is fetched", "lazy.service.consul.", miekg.TypeA, 0, []string{"lazy.service.consul. A 127.0.0.21"}, nil, nil},
		{"known service Consul does not return", "gone.service.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"invalid name", "foo.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"no service name", "service.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"prepared query unsupported", "q.query.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"node A", "node1.node.consul.", miekg.TypeA, 0, []string{"node1.node.consul. A 127.0.0.21"}, nil,
			[]string{"node1.node.consul. TXT \"consul-network-segment=\""}},
		{"node with dc", "NODE2.node.dc1.consul.", miekg.TypeA, 0, []string{"node2.node.dc1.consul. A 127.0.0.22"}, nil,
			[]string{"node2.node.dc1.consul. TXT \"rack=r2\""}},
		{"node TXT", "node2.node.consul.", miekg.TypeTXT, 0, []string{"node2.node.consul. TXT \"rack=r2\""}, nil, nil},
		{"node ANY", "node2.node.consul.", miekg.TypeANY, 0, []string{"node2.node.consul. A 127.0.0.22", "node2.node.consul. TXT \"rack=r2\""}, nil, nil},
		{"node AAAA", "node6.node.consul.", miekg.TypeAAAA, 0, []string{"node6.node.consul. AAAA fd00::6"}, nil, nil},
		{"node host name", "ext.node.consul.", miekg.TypeA, 0, []string{"ext.node.consul. CNAME ext.example.com."}, nil, nil},
		{"node SRV: nothing", "node1.node.consul.", miekg.TypeSRV, 0, nil, nil, nil},
		{"unknown node", "nope.node.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"addr v4", "7f000063.addr.dc1.consul.", miekg.TypeA, 0, []string{"7f000063.addr.dc1.consul. A 127.0.0.99"}, nil, nil},
		{"addr v6", "fd000000000000000000000000000006.addr.dc1.consul.", miekg.TypeAAAA, 0,
			[]string{"fd000000000000000000000000000006.addr.dc1.consul. AAAA fd00::6"}, nil, nil},
		{"addr bad hex", "zz000063.addr.dc1.consul.", miekg.TypeA, miekg.RcodeNameError, nil, soa, nil},
		{"apex SOA", "consul.", miekg.TypeSOA, 0, soa,
			[]string{"consul. NS s1.node.dc1.consul.", "consul. NS s2.node.dc1.consul.", "consul. NS s3.node.dc1.consul."},
			[]string{"s1.node.dc1.consul. A 127.0.0.11", "s2.node.dc1.consul. A 127.0.0.12", "s3.node.dc1.consul. A 127.0.0.13"}},
		{"apex NS", "consul.", miekg.TypeNS, 0,
			[]string{"consul. NS s1.node.dc1.consul.", "consul. NS s2.node.dc1.consul.", "consul. NS s3.node.dc1.consul."}, nil,
			[]string{"s1.node.dc1.consul. A 127.0.0.11", "s2.node.dc1.consul. A 127.0.0.12", "s3.node.dc1.consul. A 127.0.0.13"}},
		{"apex A: no data", "consul.", miekg.TypeA, 0, nil, soa, nil},
		{"SOA below apex: no data", "users.service.consul.", miekg.TypeSOA, 0, nil, soa, nil},
		{"AXFR", "consul.", miekg.TypeAXFR, miekg.RcodeNotImplemented, nil, nil, nil},
		{"outside, no recursors", "example.com.", miekg.TypeA, miekg.RcodeRefused, nil, nil, nil},
		{"PTR of a node", "21.0.0.127.in-addr.arpa.", miekg.TypePTR, 0, []string{"21.0.0.127.in-addr.arpa. PTR node1.node.dc1.consul."}, nil, nil},
		{"PTR of a node, any type (as Consul)", "22.0.0.127.IN-ADDR.ARPA.", miekg.TypeA, 0, []string{"22.0.0.127.in-addr.arpa. PTR Node2.node.dc1.consul."}, nil, nil},
		{"PTR of a node, SOA", "21.0.0.127.in-addr.arpa.", miekg.TypeSOA, 0, []string{"21.0.0.127.in-addr.arpa. PTR node1.node.dc1.consul."}, soa, nil},
		{"PTR of an IPv6 node", "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.", miekg.TypePTR, 0,
			[]string{"6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa. PTR node6.node.dc1.consul."}, nil, nil},
		{"PTR of a service address", "99.0.0.127.in-addr.arpa.", miekg.TypePTR, 0, []string{"99.0.0.127.in-addr.arpa. PTR users.service.dc1.consul."}, nil, nil},
		{"PTR of an unknown address: recursors", "1.2.0.192.in-addr.arpa.", miekg.TypePTR, miekg.RcodeRefused, nil, nil, nil},
		{"PTR of a bad name: recursors", "x.in-addr.arpa.", miekg.TypePTR, miekg.RcodeRefused, nil, nil, nil},
		{"suffix is not the domain", "notconsul.", miekg.TypeA, miekg.RcodeRefused, nil, nil, nil},
	}
	s, _ := newTestServer(t, nil, nil)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := ask(s, c.qname, c.qtype, "tcp", 0, "")
			if r.Rcode != c.rcode {
				t.Fatalf("rcode %s, want %s\n%v", miekg.RcodeToString[r.Rcode], miekg.RcodeToString[c.rcode], r)
			}
			if r.Id == 0 || !r.Response {
				t.Errorf("not a reply: %v", r.MsgHdr)
			}
			for _, sec := range []struct {
				name      string
				got, want []string
			}{{"answer", rrs(r.Answer), c.answer}, {"authority", rrs(r.Ns), c.ns}, {"additional", rrs(r.Extra), c.extra}} {
				want := slices.Clone(sec.want)
				sort.Strings(want)
				if want == nil {
					want = []string{}
				}
				if !slices.Equal(sec.got, want) {
					t.Errorf("%s section:\n got %q\nwant %q", sec.name, sec.got, want)
				}
			}
			if _, err := r.Pack(); err != nil {
				t.Errorf("answer does not pack: %v", err)
			}
		})
	}
}

func TestWantOnlyForKnownUnwatched(t *testing.T) {
	s, src := newTestServer(t, nil, nil)
	for _, n := range []string{"users", "nope", "lazy", "lazy", "empty"} {
		ask(s, n+".service.consul.", miekg.TypeA, "", 0, "")
	}
	if !slices.Equal(src.wants, []string{"lazy"}) {
		t.Fatalf("Want called for %q, want only the first question about lazy", src.wants)
	}
	if !slices.Equal(src.touches, []string{"users", "lazy", "empty"}) {
		t.Fatalf("touched %q, want users, the second lazy and empty", src.touches)
	}
}

func TestEjections(t *testing.T) {
	cases := []struct {
		name    string
		ejected fakeEjections
		honour  bool
		want    []string
	}{
		{"none ejected", fakeEjections{}, true, []string{"127.0.0.21", "127.0.0.99"}},
		{"one ejected", fakeEjections{"users/u2": true}, true, []string{"127.0.0.21"}},
		{"all ejected: keep all", fakeEjections{"users/u1": true, "users/u2": true}, true, []string{"127.0.0.21", "127.0.0.99"}},
		{"switched off", fakeEjections{"users/u2": true}, false, []string{"127.0.0.21", "127.0.0.99"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, _ := newTestServer(t, func(cfg *Config) { cfg.HonourEjections = c.honour }, c.ejected)
			r := ask(s, "users.service.consul.", miekg.TypeA, "", 0, "")
			var got []string
			for _, rr := range r.Answer {
				got = append(got, rr.(*miekg.A).A.String())
			}
			sort.Strings(got)
			if !slices.Equal(got, c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
}

func TestTTLs(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) {
		c.ServiceTTL = map[string]time.Duration{"users": 30 * time.Second, "ma*": 7 * time.Second, "*": 2 * time.Second}
		c.DefaultServiceTTL = time.Second
		c.NodeTTL = 10 * time.Second
		c.NegativeTTL = 60 * time.Second
	}, nil)
	cases := []struct {
		qname string
		qtype uint16
		ttl   uint32
	}{
		{"users.service.consul.", miekg.TypeA, 30},
		{"many.service.consul.", miekg.TypeA, 7},
		{"v6.service.consul.", miekg.TypeAAAA, 2},
		{"node1.node.consul.", miekg.TypeA, 10},
	}
	for _, c := range cases {
		r := ask(s, c.qname, c.qtype, "tcp", 0, "")
		if len(r.Answer) == 0 || r.Answer[0].Header().Ttl != c.ttl {
			t.Errorf("%s: got %v, want TTL %d", c.qname, r.Answer, c.ttl)
		}
	}
	r := ask(s, "nope.service.consul.", miekg.TypeA, "", 0, "")
	soa, ok := r.Ns[0].(*miekg.SOA)
	if !ok || soa.Minttl != 60 || soa.Hdr.Ttl != 60 {
		t.Errorf("negative TTL: got %v", r.Ns)
	}
}

func TestShuffled(t *testing.T) {
	s, _ := newTestServer(t, nil, nil)
	firsts := map[string]bool{}
	for range 200 {
		r := ask(s, "many.service.consul.", miekg.TypeA, "tcp", 0, "")
		firsts[r.Answer[0].(*miekg.A).A.String()] = true
	}
	if len(firsts) < 10 {
		t.Fatalf("first answers seen: %d distinct of 40, want a shuffle", len(firsts))
	}
}

func TestNearest(t *testing.T) {
	v := catalog.NewView()
	snap := testSnapshot()
	cc := coordinate.DefaultConfig()
	near, mid, far := coordinate.NewCoordinate(cc), coordinate.NewCoordinate(cc), coordinate.NewCoordinate(cc)
	mid.Vec[0] = 0.01
	far.Vec[0] = 0.5
	snap.Coords = map[string]*coordinate.Coordinate{"node1": near, "node2": far, "s1": mid}
	snap.Services["users"].Instances = append(snap.Services["users"].Instances, inst("users", "u3", "s1", "127.0.0.11", "", 9003))
	v.Publish(snap)
	s, err := New(Config{ResolvConf: "", Nearest: true, Node: "node1", UDPAnswerLimit: 3, HonourEjections: true}, &fakeSource{view: v}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		r := ask(s, "users.service.consul.", miekg.TypeA, "", 0, "")
		var got []string
		for _, rr := range r.Answer {
			got = append(got, rr.(*miekg.A).A.String())
		}
		if want := []string{"127.0.0.21", "127.0.0.11", "127.0.0.99"}; !slices.Equal(got, want) {
			t.Fatalf("got %v, want nearest first %v", got, want)
		}
	}
}

func TestSizes(t *testing.T) {
	s, _ := newTestServer(t, nil, nil)
	cases := []struct {
		name     string
		qtype    uint16
		proto    string
		edns     uint16
		answers  int // exact, or -1 for "more than 3 and fewer than 40"
		tc       bool
		maxBytes int
	}{
		{"plain UDP A: Consul's answer limit", miekg.TypeA, "udp", 0, 3, false, 512},
		{"EDNS 512 A: Consul's answer limit too", miekg.TypeA, "udp", 512, 3, false, 512},
		{"EDNS 400 A: as 512", miekg.TypeA, "udp", 400, 3, false, 512},
		{"EDNS 4096 A: all", miekg.TypeA, "udp", 4096, 40, false, 4096},
		{"EDNS 1232 SRV: trimmed", miekg.TypeSRV, "udp", 1232, -1, true, 1232},
		{"TCP SRV: all", miekg.TypeSRV, "tcp", 0, 40, false, 65535},
		{"TCP A: all", miekg.TypeA, "tcp", 0, 40, false, 65535},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := ask(s, "many.service.consul.", c.qtype, c.proto, c.edns, "")
			b, err := r.Pack()
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > c.maxBytes {
				t.Errorf("%d bytes, limit %d", len(b), c.maxBytes)
			}
			if r.Truncated != c.tc {
				t.Errorf("TC %v, want %v", r.Truncated, c.tc)
			}
			n := len(r.Answer)
			if (c.answers >= 0 && n != c.answers) || (c.answers < 0 && (n <= 3 || n >= 40)) {
				t.Errorf("%d answers, want %d", n, c.answers)
			}
			if c.qtype == miekg.TypeSRV {
				targets := map[string]bool{}
				for _, rr := range r.Answer {
					targets[rr.(*miekg.SRV).Target] = true
				}
				addrs := map[string]bool{}
				for _, rr := range r.Extra {
					if rr.Header().Rrtype == miekg.TypeA {
						if !targets[rr.Header().Name] {
							t.Errorf("extra record %v for no SRV target", rr)
						}
						addrs[rr.Header().Name] = true
					}
				}
				// As Consul: answers are cut so that each keeps its target's address.
				for target := range targets {
					if !addrs[target] {
						t.Errorf("no address for SRV target %s", target)
					}
				}
			}
			if c.edns > 0 && r.IsEdns0() == nil {
				t.Error("no OPT record in the answer to an EDNS0 query")
			}
		})
	}
	t.Run("plain UDP SRV over 512 bytes: TC", func(t *testing.T) {
		s, _ := newTestServer(t, func(c *Config) { c.UDPAnswerLimit = 0 }, nil)
		r := ask(s, "many.service.consul.", miekg.TypeSRV, "udp", 0, "")
		b, _ := r.Pack()
		if len(b) > 512 || !r.Truncated || len(r.Answer) == 0 {
			t.Fatalf("%d bytes, TC %v, %d answers", len(b), r.Truncated, len(r.Answer))
		}
	})
}

func TestBadRequests(t *testing.T) {
	s, _ := newTestServer(t, nil, nil)
	two := new(miekg.Msg)
	two.SetQuestion("users.service.consul.", miekg.TypeA)
	two.Question = append(two.Question, two.Question[0])
	none := new(miekg.Msg)
	none.Id = 7
	resp := new(miekg.Msg)
	resp.SetQuestion("users.service.consul.", miekg.TypeA)
	resp.Response = true
	update := new(miekg.Msg)
	update.SetUpdate("consul.")
	badVers := new(miekg.Msg)
	badVers.SetQuestion("users.service.consul.", miekg.TypeA)
	badVers.SetEdns0(1232, false)
	badVers.IsEdns0().SetVersion(1)
	cases := []struct {
		name  string
		req   *miekg.Msg
		rcode int
	}{
		{"nil", nil, miekg.RcodeFormatError},
		{"two questions", two, miekg.RcodeFormatError},
		{"no question", none, miekg.RcodeFormatError},
		{"a response", resp, miekg.RcodeFormatError},
		{"update", update, miekg.RcodeNotImplemented},
		{"EDNS version 1", badVers, miekg.RcodeBadVers},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := s.Answer(c.req, netip.MustParseAddr("127.0.0.1"), "udp")
			if r.Rcode != c.rcode {
				t.Fatalf("rcode %d, want %d", r.Rcode, c.rcode)
			}
			if _, err := r.Pack(); err != nil {
				t.Fatalf("does not pack: %v", err)
			}
		})
	}
}

func TestAltDomain(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) { c.Domain = "Mesh"; c.AltDomain = "consul." }, nil)
	for _, d := range []string{"mesh.", "consul."} {
		r := ask(s, "users.service."+d, miekg.TypeSRV, "tcp", 0, "")
		if len(r.Answer) != 2 {
			t.Fatalf("%s: %v", d, r)
		}
		for _, rr := range r.Answer {
			if !strings.HasSuffix(rr.(*miekg.SRV).Target, "."+d) {
				t.Errorf("%s: target %s not in the asked domain", d, rr.(*miekg.SRV).Target)
			}
		}
		r = ask(s, "nope.service."+d, miekg.TypeA, "tcp", 0, "")
		if r.Rcode != miekg.RcodeNameError || r.Ns[0].Header().Name != d {
			t.Errorf("%s: NXDOMAIN SOA %v", d, r.Ns)
		}
	}
}

func TestEncodeKVasRFC1464(t *testing.T) {
	cases := []struct{ k, v, want string }{
		{"key", "value", "key=value"},
		{"k=y", "v", "k`=y=v"},
		{"k`y", "v`", "k``y=v``"},
		{" key ", "v", "` key` =v"},
		{"", "", "="},
	}
	for _, c := range cases {
		if got := encodeKVasRFC1464(c.k, c.v); got != c.want {
			t.Errorf("%q=%q: got %q, want %q", c.k, c.v, got, c.want)
		}
	}
}

func TestNewErrors(t *testing.T) {
	v := catalog.NewView()
	cases := []struct {
		name string
		cfg  Config
	}{
		{"bad address", Config{Addr: "nope"}},
		{"bad domain", Config{Domain: "a..b"}},
		{"bad recursor", Config{Recursors: []string{"resolver.example"}}},
		{"negative TTL", Config{NodeTTL: -time.Second}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := New(c.cfg, &fakeSource{view: v}, nil); err == nil || !strings.HasPrefix(err.Error(), "dns: ") {
				t.Fatalf("got %v, want a dns: error", err)
			}
		})
	}
	if _, err := New(Config{}, nil, nil); err == nil {
		t.Fatal("nil source accepted")
	}
}
