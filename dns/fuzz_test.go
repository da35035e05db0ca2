package dns

import (
	"net/netip"
	"os"
	"testing"

	miekg "github.com/miekg/dns"
)

func writeFile(p, s string) error { return os.WriteFile(p, []byte(s), 0o644) }

// FuzzAnswer feeds raw DNS messages to the handler: whatever miekg/dns can
// unpack must get an answer that packs, and nothing may panic.
func FuzzAnswer(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
		edns  bool
	}{
		{"users.service.consul.", miekg.TypeA, false},
		{"v1.users.service.dc1.consul.", miekg.TypeSRV, true},
		{"_users._tcp.service.consul.", miekg.TypeSRV, false},
		{"node1.node.consul.", miekg.TypeANY, false},
		{"7f000063.addr.dc1.consul.", miekg.TypeA, false},
		{"consul.", miekg.TypeSOA, false},
		{"many.service.consul.", miekg.TypeSRV, false},
		{"x.y.p.peer.consul.", miekg.TypeA, true},
	} {
		m := new(miekg.Msg)
		m.SetQuestion(q.name, q.qtype)
		if q.edns {
			m.SetEdns0(1232, true)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	s, _ := newTestServer(f, nil, nil)
	from := netip.MustParseAddr("192.0.2.1") // not allowed to recurse: no network
	f.Fuzz(func(t *testing.T, b []byte, tcp bool) {
		req := new(miekg.Msg)
		if err := req.Unpack(b); err != nil {
			return // miekg/dns answers FORMERR itself
		}
		proto := "udp"
		if tcp {
			proto = "tcp"
		}
		resp := s.Answer(req, from, proto)
		out, err := resp.Pack()
		if err != nil {
			t.Fatalf("answer does not pack: %v\n%v", err, resp)
		}
		limit := miekg.MaxMsgSize
		if !tcp {
			limit = miekg.MinMsgSize
			if o := req.IsEdns0(); o != nil && len(req.Question) == 1 && o.Version() == 0 {
				limit = max(limit, int(o.UDPSize()))
			}
		}
		if len(out) > limit && len(resp.Answer)+len(resp.Ns) > 0 {
			t.Fatalf("answer of %d bytes over %s, limit %d", len(out), proto, limit)
		}
	})
}
