package dns

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	miekg "github.com/miekg/dns"

	"attache/sidecar/catalog"
)

// viewSource is a Source over a View whose Want only loads, as the
// watcher's does for a watched service.
type viewSource struct{ v *catalog.View }

func (v viewSource) Load() *catalog.Snapshot                        { return v.v.Load() }
func (v viewSource) Want(context.Context, string) *catalog.Snapshot { return v.v.Load() }

func benchServer(b *testing.B) *Server {
	v := catalog.NewView()
	v.Publish(testSnapshot())
	cfg := DefaultConfig()
	cfg.ResolvConf = ""
	s, err := New(cfg, viewSource{v}, nil)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// discard is a ResponseWriter that drops what is written.
type discard struct{ addr net.Addr }

func (d discard) LocalAddr() net.Addr         { return d.addr }
func (d discard) RemoteAddr() net.Addr        { return d.addr }
func (d discard) WriteMsg(*miekg.Msg) error   { return nil }
func (d discard) Write(b []byte) (int, error) { return len(b), nil }
func (d discard) Close() error                { return nil }
func (d discard) TsigStatus() error           { return nil }
func (d discard) TsigTimersOnly(bool)         {}
func (d discard) Hijack()                     {}

func BenchmarkServeDNS(b *testing.B) {
	s := benchServer(b)
	w := discard{&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5353}}
	for _, q := range []struct {
		name  string
		qtype uint16
	}{
		{"users.service.consul.", miekg.TypeA},
		{"users.service.consul.", miekg.TypeSRV},
		{"v1.users.service.consul.", miekg.TypeA},
		{"nope.service.consul.", miekg.TypeA},
	} {
		req := new(miekg.Msg)
		req.SetQuestion(q.name, q.qtype)
		b.Run(miekg.TypeToString[q.qtype]+" "+q.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				s.ServeDNS(w, req)
			}
		})
	}
}

func BenchmarkAnswer(b *testing.B) {
	s := benchServer(b)
	req := new(miekg.Msg)
	req.SetQuestion("users.service.consul.", miekg.TypeA)
	from := netip.MustParseAddr("127.0.0.1")
	b.ReportAllocs()
	for b.Loop() {
		s.Answer(req, from, "udp")
	}
}

func BenchmarkParseName(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		parseName("v1.users.service.dc1", miekg.TypeA)
	}
}

// BenchmarkFastPath is what the UDP loop does for a query the answer cache
// has: parse, look up, copy one rotation, patch the header. 0 allocs.
func BenchmarkFastPath(b *testing.B) {
	s := benchServer(b)
	from := netip.MustParseAddr("127.0.0.1")
	for _, q := range []struct {
		name  string
		qtype uint16
		edns  uint16
	}{
		{"users.service.consul.", miekg.TypeA, 0},
		{"users.service.consul.", miekg.TypeSRV, 0},
		{"many.service.consul.", miekg.TypeSRV, 1232},
		{"v1.users.service.consul.", miekg.TypeA, 0},
		{"nope.service.consul.", miekg.TypeA, 0},
	} {
		req := new(miekg.Msg)
		req.SetQuestion(q.name, q.qtype)
		if q.edns > 0 {
			req.SetEdns0(q.edns, false)
		}
		pkt, err := req.Pack()
		if err != nil {
			b.Fatal(err)
		}
		if v, _ := s.fill(pkt, time.Now().UnixNano()); v == nil {
			b.Fatalf("%s: not cached", q.name)
		}
		key := make([]byte, 0, 512)
		out := make([]byte, 0, maxUDPSize)
		b.Run(miekg.TypeToString[q.qtype]+" "+q.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				v, _ := s.lookup(pkt, key, time.Now().UnixNano())
				if v == nil {
					// an answer with an SOA lives until the next second
					v, _ = s.fill(pkt, time.Now().UnixNano())
				}
				r := append(out[:0], v...)
				s.patch(r, pkt, from)
			}
		})
	}
}
