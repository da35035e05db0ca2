package dns

import (
	"bytes"
	"net/netip"
	"os"
	"testing"
	"time"

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

// FuzzFastPath is the differential check of the answer cache against the
// slow path: for any datagram the fast path recognises, miekg/dns must
// parse it and accept it, and the cached answer (made from whichever
// earlier datagram had the same key, then patched for this one) must be
// byte for byte the slow path's answer to this datagram in one of the
// rotations (the slow path made to use the cache's order instead of a
// shuffle).
func FuzzFastPath(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
		edns  uint16
		do    bool
	}{
		{"users.service.consul.", miekg.TypeA, 0, false},
		{"USERS.service.consul.", miekg.TypeA, 0, false},
		{"users.service.consul.", miekg.TypeSRV, 0, false},
		{"users.service.consul.", miekg.TypeSRV, 1232, true},
		{"many.service.consul.", miekg.TypeSRV, 1232, false},
		{"many.service.consul.", miekg.TypeA, 512, false},
		{"many.service.consul.", miekg.TypeA, 0, false},
		{"v1.users.service.consul.", miekg.TypeA, 4096, false},
		{"_users._tcp.service.consul.", miekg.TypeSRV, 0, false},
		{"node1.node.consul.", miekg.TypeANY, 0, false},
		{"7f000063.addr.dc1.consul.", miekg.TypeA, 0, false},
		{"nope.service.consul.", miekg.TypeA, 0, false},
		{"21.0.0.127.in-addr.arpa.", miekg.TypePTR, 0, false},
		{"99.0.0.127.in-addr.arpa.", miekg.TypePTR, 1232, false},
		{"consul.", miekg.TypeSOA, 0, false},
		{"example.com.", miekg.TypeA, 0, false},
	} {
		m := new(miekg.Msg)
		m.SetQuestion(q.name, q.qtype)
		m.Id = 0x1234
		if q.edns > 0 {
			m.SetEdns0(q.edns, q.do)
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		m.Id, m.RecursionDesired, m.CheckingDisabled = 0x4321, false, true
		if b, err = m.Pack(); err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	s, _ := newTestServer(f, func(c *Config) { c.AllowRecursion = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/25")} }, nil)
	froms := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.200")}
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, ok := parseWire(b); !ok {
			return
		}
		req := new(miekg.Msg)
		if err := req.Unpack(b); err != nil {
			t.Fatalf("the fast path takes a query miekg/dns cannot parse: %v", err)
		}
		if req.Response || req.Opcode != miekg.OpcodeQuery || len(req.Question) != 1 || len(req.Answer)+len(req.Ns) != 0 || len(req.Extra) > 1 {
			t.Fatalf("the fast path takes a query miekg/dns would reject: %v", req)
		}
		from := froms[len(b)%2]
		sec := time.Now().Unix()
		v, _ := s.lookup(b, nil, time.Now().UnixNano())
		if v == nil {
			if v, _ = s.fill(b, time.Now().UnixNano()); v == nil {
				return // not cached: the slow path answers it
			}
		}
		got := append([]byte(nil), v...)
		s.patch(got, b, from)
		bd := &build{z: s.zones.get(s.src.Load())}
		for rot := 0; ; rot++ {
			bd.rot = rot
			want, err := s.answer(req, from, "udp", bd).Pack()
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(got, want) {
				return
			}
			if rot+1 >= max(bd.n, 1) {
				if time.Now().Unix() != sec {
					return // an SOA's serial (the time) moved on meanwhile
				}
				var g, w miekg.Msg
				g.Unpack(got)
				w.Unpack(want)
				t.Fatalf("cached answer differs from the slow path's\ncached:\n%v\nslow (last rotation):\n%v", &g, &w)
			}
		}
	})
}
