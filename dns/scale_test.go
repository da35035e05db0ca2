package dns

import (
	"fmt"
	"net/netip"
	"testing"

	miekg "github.com/miekg/dns"

	"attache/sidecar/catalog"
)

// bigServer answers from a snapshot with a service "big" of n instances,
// each on its own node with an address of its own.
func bigServer(t testing.TB, n int) *Server {
	t.Helper()
	snap := testSnapshot()
	snap.Nodes = maps1(snap.Nodes)
	snap.Services = maps1(snap.Services)
	var big []catalog.Instance
	for i := range n {
		node := fmt.Sprintf("big-%04d", i)
		nodeAddr := fmt.Sprintf("10.1.%d.%d", i/250, i%250+1)
		snap.Nodes[node] = &catalog.Node{Name: node, Address: nodeAddr, Datacenter: "dc1", Meta: map[string]string{"rack": "r1"}}
		big = append(big, inst("big", fmt.Sprintf("b%04d", i), node, nodeAddr, fmt.Sprintf("10.2.%d.%d", i/250, i%250+1), 9000+i%1000))
	}
	snap.Services["big"] = &catalog.Service{Name: "big", Instances: big}
	snap.Known = maps1(snap.Known)
	snap.Known["big"] = true
	v := catalog.NewView()
	v.Publish(snap)
	cfg := DefaultConfig()
	cfg.ResolvConf = ""
	s, err := New(cfg, &fakeSource{view: v}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestScale: the answers about a service of 1,000 instances keep to the
// size rules over UDP (plain, small and large EDNS0 buffers) and TCP, and
// every SRV record keeps its target's address.
func TestScale(t *testing.T) {
	s := bigServer(t, 1000)
	cases := []struct {
		qtype   uint16
		proto   string
		edns    uint16
		limit   int
		atLeast int
	}{
		{miekg.TypeA, "udp", 0, 512, 3},
		{miekg.TypeA, "udp", 512, 512, 3},
		{miekg.TypeA, "udp", 1232, 1232, 40},
		{miekg.TypeA, "udp", 4096, 4096, 150},
		{miekg.TypeA, "tcp", 0, 65535, 1000},
		{miekg.TypeSRV, "udp", 0, 512, 3},
		{miekg.TypeSRV, "udp", 1232, 1232, 15},
		{miekg.TypeSRV, "udp", 4096, 4096, 60},
		{miekg.TypeSRV, "tcp", 0, 65535, 990}, // node meta makes it too long: cut as Consul
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s %s %d", miekg.TypeToString[c.qtype], c.proto, c.edns), func(t *testing.T) {
			r := ask(s, "big.service.consul.", c.qtype, c.proto, c.edns, "")
			b, err := r.Pack()
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > c.limit {
				t.Errorf("%d bytes, limit %d", len(b), c.limit)
			}
			if len(r.Answer) < c.atLeast {
				t.Errorf("%d answers, want at least %d", len(r.Answer), c.atLeast)
			}
			addrs := map[string]bool{}
			for _, rr := range r.Extra {
				if rr.Header().Rrtype == miekg.TypeA {
					addrs[rr.Header().Name] = true
				}
			}
			for _, rr := range r.Answer {
				if srv, ok := rr.(*miekg.SRV); ok && !addrs[srv.Target] {
					t.Fatalf("no address for %s", srv.Target)
				}
			}
		})
	}
}

// BenchmarkScale answers SRV over TCP (every instance in the answer) for
// services of 10, 100 and 1,000 instances: the time per instance stays flat
// (linear in the answer's size).
func BenchmarkScale(b *testing.B) {
	from := netip.MustParseAddr("127.0.0.1")
	for _, n := range []int{10, 100, 1000} {
		s := bigServer(b, n)
		req := new(miekg.Msg)
		req.SetQuestion("big.service.consul.", miekg.TypeSRV)
		b.Run(fmt.Sprintf("SRV TCP %d instances", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r := s.Answer(req, from, "tcp")
				if _, err := r.Pack(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/instance")
		})
		reqA := new(miekg.Msg)
		reqA.SetQuestion("big.service.consul.", miekg.TypeA)
		b.Run(fmt.Sprintf("A UDP %d instances", n), func(b *testing.B) {
			for b.Loop() {
				r := s.Answer(reqA, from, "udp")
				if _, err := r.Pack(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/instance")
		})
	}
}
