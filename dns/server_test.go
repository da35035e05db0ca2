package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	miekg "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/testrun"
)

// runServer starts s.Run on 127.0.0.1:0 and returns its address; the server
// stops at the end of the test.
func runServer(t *testing.T, s *Server) string {
	t.Helper()
	testrun.Start(t, s).WaitReady(s.Ready())
	return s.Addr()
}

// upstream is a real DNS server on loopback standing in for a recursor: it
// answers every A question with 192.0.2.1, or with rcode when non-zero.
func upstream(t *testing.T, rcode int) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &miekg.Server{PacketConn: pc, Handler: miekg.HandlerFunc(func(w miekg.ResponseWriter, r *miekg.Msg) {
		m := new(miekg.Msg)
		m.SetReply(r)
		m.RecursionAvailable = true
		if rcode != 0 {
			m.Rcode = rcode
		} else {
			m.Answer = append(m.Answer, &miekg.A{Hdr: miekg.RR_Header{Name: r.Question[0].Name, Rrtype: miekg.TypeA, Class: miekg.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 1)})
		}
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

func TestServeUDPAndTCP(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, _ := newTestServer(t, func(c *Config) { c.Addr = "127.0.0.1:0"; c.UDPSockets = 2; c.Registerer = reg }, nil)
	addr := runServer(t, s)
	for _, proto := range []string{"udp", "tcp"} {
		c := &miekg.Client{Net: proto, Timeout: 2 * time.Second}
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeSRV)
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			t.Fatalf("%s: %v", proto, err)
		}
		if r.Rcode != miekg.RcodeSuccess || len(r.Answer) != 2 || !r.Authoritative {
			t.Fatalf("%s: %v", proto, r)
		}
	}
	// Many SRV records: plain UDP is trimmed and marked, TCP carries all.
	m := new(miekg.Msg)
	m.SetQuestion("many.service.consul.", miekg.TypeA)
	r, _, err := (&miekg.Client{Net: "tcp"}).Exchange(m, addr)
	if err != nil || len(r.Answer) != 40 {
		t.Fatalf("tcp many: %v %v", err, r)
	}

	// Malformed: a header claiming one question, and nothing else.
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 'a'})
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	var bad miekg.Msg
	if err := bad.Unpack(buf[:n]); err != nil || bad.Rcode != miekg.RcodeFormatError {
		t.Fatalf("malformed query: %v rcode %v", err, bad.Rcode)
	}
	// Two questions: FORMERR.
	two := new(miekg.Msg)
	two.SetQuestion("users.service.consul.", miekg.TypeA)
	two.Question = append(two.Question, two.Question[0])
	r, _, err = (&miekg.Client{Net: "udp"}).Exchange(two, addr)
	if err != nil || r.Rcode != miekg.RcodeFormatError {
		t.Fatalf("two questions: %v %v", err, r)
	}

	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			key := f.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetValue()
			}
			if m.Counter != nil {
				found[key] = m.GetCounter().GetValue()
			}
			if m.Histogram != nil {
				found[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	if found["attache_dns_queries_total,NOERROR,SRV"] != 2 || found["attache_dns_query_duration_seconds"] < 3 || found["attache_dns_malformed_total"] != 1 {
		t.Errorf("metrics: %v", found)
	}
}

func TestRunAddressInUse(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	s, _ := newTestServer(t, func(c *Config) { c.Addr = pc.LocalAddr().String() }, nil)
	err = s.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), pc.LocalAddr().String()) {
		t.Fatalf("got %v, want an error naming %s", err, pc.LocalAddr())
	}
}

func TestRecursion(t *testing.T) {
	good := upstream(t, 0)
	failing := upstream(t, miekg.RcodeServerFailure)
	// A port nobody answers on (bound, never read): times out.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	cases := []struct {
		name      string
		recursors []string
		allow     []netip.Prefix
		from      string
		rcode     int
		answers   int
	}{
		{"forwarded", []string{good}, nil, "127.0.0.1", miekg.RcodeSuccess, 1},
		{"failover after SERVFAIL", []string{failing, good}, nil, "127.0.0.1", miekg.RcodeSuccess, 1},
		{"failover after timeout", []string{silent.LocalAddr().String(), good}, nil, "127.0.0.1", miekg.RcodeSuccess, 1},
		{"all fail", []string{failing}, nil, "127.0.0.1", miekg.RcodeServerFailure, 0},
		{"not loopback: refused", []string{good}, nil, "192.0.2.7", miekg.RcodeRefused, 0},
		{"configured network", []string{good}, []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, "192.0.2.7", miekg.RcodeSuccess, 1},
		{"no recursors", nil, nil, "127.0.0.1", miekg.RcodeRefused, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, _ := newTestServer(t, func(cfg *Config) {
				cfg.Recursors = c.recursors
				cfg.RecursorTimeout = 300 * time.Millisecond
				if c.allow != nil {
					cfg.AllowRecursion = c.allow
				}
			}, nil)
			r := ask(s, "www.example.com.", miekg.TypeA, "udp", 0, c.from)
			if r.Rcode != c.rcode || len(r.Answer) != c.answers {
				t.Fatalf("got %v", r)
			}
			// The domain is answered to everybody; RA says whether recursion is offered.
			r = ask(s, "users.service.consul.", miekg.TypeA, "udp", 0, c.from)
			wantRA := c.rcode != miekg.RcodeRefused
			if r.Rcode != 0 || r.RecursionAvailable != wantRA {
				t.Fatalf("local answer: rcode %d RA %v, want RA %v", r.Rcode, r.RecursionAvailable, wantRA)
			}
		})
	}
}

func TestParseResolvConf(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/resolv.conf"
	if err := writeFile(p, "# test\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0\n"); err != nil {
		t.Fatal(err)
	}
	got, err := ParseResolvConf(p)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "127.0.0.53:53,[::1]:53" {
		t.Fatalf("got %v", got)
	}
	if _, err := ParseResolvConf(dir + "/missing"); err == nil {
		t.Fatal("no error for a missing file")
	}
	for in, want := range map[string]string{"1.1.1.1": "1.1.1.1:53", "127.0.0.1:5353": "127.0.0.1:5353", "::1": "[::1]:53", "[::1]:54": "[::1]:54"} {
		if got, err := recursorAddr(in); err != nil || got != want {
			t.Errorf("recursorAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestRunStopsWithContext(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) { c.Addr = "127.0.0.1:0" }, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := s.Run(ctx)
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	// The port is free again.
	pc, err := net.ListenPacket("udp", s.Addr())
	if err != nil {
		t.Fatalf("socket still bound after Run returned: %v", err)
	}
	pc.Close()
}
