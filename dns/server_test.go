package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	miekg "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/testrun"
	"attache/sidecar/catalog"
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
	got, err := parseResolvConf(p)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "127.0.0.53:53,[::1]:53" {
		t.Fatalf("got %v", got)
	}
	if _, err := parseResolvConf(dir + "/missing"); err == nil {
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

func TestUDPReadersFollowGOMAXPROCS(t *testing.T) {
	// A container's CPU limit sets GOMAXPROCS; the readers follow it.
	for _, procs := range []int{1, 3} {
		t.Run(strconv.Itoa(procs), func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(procs))
			s, _ := newTestServer(t, func(c *Config) { c.Addr = "127.0.0.1:0"; c.UDPSockets = 0 }, nil)
			addr := runServer(t, s)
			s.mu.Lock()
			n := s.udpConns
			s.mu.Unlock()
			if n != procs {
				t.Fatalf("%d UDP sockets, want %d", n, procs)
			}
			// Every socket answers: distinct client sockets land on them.
			for i := range 3 * procs {
				m := new(miekg.Msg)
				m.SetQuestion("users.service.consul.", miekg.TypeA)
				r, _, err := (&miekg.Client{Timeout: 2 * time.Second}).Exchange(m, addr)
				if err != nil || len(r.Answer) != 2 || r.Id != m.Id {
					t.Fatalf("query %d: %v %v", i, err, r)
				}
			}
		})
	}
}

// blockingSource is a Source whose Want for "slow" waits until its
// context ends: a question held on the slow path.
type blockingSource struct {
	*fakeSource
	asked chan struct{}
}

func (b blockingSource) Want(ctx context.Context, service string) *catalog.Snapshot {
	if service == "slow" && ctx.Err() == nil {
		close(b.asked)
		<-ctx.Done()
	}
	return b.fakeSource.Want(ctx, service)
}

func TestShutdownWithSlowQuery(t *testing.T) {
	_, fs := newTestServer(t, nil, nil)
	snap := *fs.view.Load()
	snap.Known = maps1(snap.Known)
	snap.Known["slow"] = true
	fs.view.Publish(&snap)
	src := blockingSource{fs, make(chan struct{})}
	cfg := DefaultConfig()
	cfg.Addr, cfg.ResolvConf, cfg.WantTimeout = "127.0.0.1:0", "", 3*time.Second
	s, err := New(cfg, src, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	<-s.Ready()
	conn, err := net.Dial("udp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write(packQuery(t, "slow.service.consul.", miekg.TypeA, 0))
	<-src.asked
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	// Every goroutine of the slow path has ended with Run: the socket is free.
	pc, err := net.ListenPacket("udp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	pc.Close()
}

func TestRateLimit(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, _ := newTestServer(t, func(c *Config) {
		c.Addr = "127.0.0.1:0"
		c.RateLimit, c.RateBurst = 0.001, 3 // three queries, then one every 1000 s
		c.Registerer = reg
	}, nil)
	addr := runServer(t, s)
	ask := func(local string, proto string, edns bool) *miekg.Msg {
		t.Helper()
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		if edns {
			m.SetEdns0(1232, false)
		}
		c := &miekg.Client{Net: proto, Timeout: 2 * time.Second}
		if proto == "udp" {
			c.Dialer = &net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP(local)}}
		} else {
			c.Dialer = &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		}
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			t.Fatal(err)
		}
		if r.Id != m.Id {
			t.Fatalf("ID %d, want %d", r.Id, m.Id)
		}
		return r
	}
	for i := range 3 {
		if r := ask("127.0.0.1", "udp", false); r.Rcode != miekg.RcodeSuccess {
			t.Fatalf("query %d within the burst: %v", i, r)
		}
	}
	r := ask("127.0.0.1", "udp", true)
	if r.Rcode != miekg.RcodeRefused || len(r.Answer) != 0 || r.IsEdns0() == nil || len(r.Question) != 1 {
		t.Fatalf("over the limit: %v", r)
	}
	if r := ask("127.0.0.1", "tcp", false); r.Rcode != miekg.RcodeRefused {
		t.Fatalf("over the limit over TCP: %v", r)
	}
	// Another client has its own bucket.
	if r := ask("127.0.0.2", "udp", false); r.Rcode != miekg.RcodeSuccess {
		t.Fatalf("another client: %v", r)
	}
	fams, _ := reg.Gather()
	var refused float64
	for _, f := range fams {
		if f.GetName() == "attache_dns_rate_limited_total" {
			refused = f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if refused != 2 {
		t.Fatalf("attache_dns_rate_limited_total = %v, want 2", refused)
	}
}

func TestLimiterBoundedState(t *testing.T) {
	l := newLimiter(10, 1, 100)
	now := time.Now().UnixNano()
	for i := range 1000 {
		a := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		if !l.allow(a, now) {
			t.Fatalf("new client %v refused", a)
		}
		if len(l.m) > 100 {
			t.Fatalf("%d clients tracked, limit 100", len(l.m))
		}
	}
	a := netip.MustParseAddr("10.9.9.9")
	if !l.allow(a, now) || l.allow(a, now) {
		t.Fatal("burst of 1 not kept")
	}
	if !l.allow(a, now+int64(100*time.Millisecond)) {
		t.Fatal("token not refilled after 1/qps")
	}
}

// TestUDPBurst sends many queries at once, so that reads and writes come in
// batches, from two clients, and checks every query gets its own answer.
func TestUDPBurst(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) { c.Addr = "127.0.0.1:0"; c.UDPSockets = 1 }, nil)
	addr := runServer(t, s)
	names := []string{"users.service.consul.", "many.service.consul.", "nope.service.consul.", "node1.node.consul."}
	for _, local := range []string{"127.0.0.1", "127.0.0.3"} {
		conn, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(local)}, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetReadBuffer(1 << 20)
		const n = 200
		want := map[uint16]string{}
		for i := range n {
			m := new(miekg.Msg)
			m.SetQuestion(names[i%len(names)], miekg.TypeA)
			m.Id = uint16(1000 + i)
			want[m.Id] = m.Question[0].Name
			b, _ := m.Pack()
			if _, err := conn.Write(b); err != nil {
				t.Fatal(err)
			}
		}
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		for len(want) > 0 {
			k, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("%s: %d answers missing: %v", local, len(want), err)
			}
			var r miekg.Msg
			if err := r.Unpack(buf[:k]); err != nil {
				t.Fatal(err)
			}
			name, ok := want[r.Id]
			if !ok || len(r.Question) != 1 || r.Question[0].Name != name {
				t.Fatalf("answer %d for %v, want one for %q", r.Id, r.Question, name)
			}
			delete(want, r.Id)
		}
	}
}

// TestUDPOneAtATime runs the loop a wildcard socket gets (one datagram per
// read, each answered from its destination address) on a loopback socket:
// tests bind loopback only.
func TestUDPOneAtATime(t *testing.T) {
	s, _ := newTestServer(t, nil, nil)
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	u := newUDPServer(s, conn, make(chan struct{}, 8), &wg)
	u.answerFromDestination()
	done := make(chan error, 1)
	go func() { done <- u.serve() }()
	defer func() {
		conn.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
		wg.Wait()
	}()
	for i := range 4 { // the slow path first, then the cache
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeSRV)
		r, _, err := (&miekg.Client{Timeout: 2 * time.Second}).Exchange(m, conn.LocalAddr().String())
		if err != nil || len(r.Answer) != 2 || r.Id != m.Id {
			t.Fatalf("query %d: %v %v", i, err, r)
		}
	}
	if b := replySource(nil); b != nil {
		t.Fatalf("reply control message without a query's: %x", b)
	}
}

// TestSetTuning: a reload's TTLs show in the next answers over UDP (the
// cached path) and TCP; a bad one changes nothing.
func TestSetTuning(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) { c.Addr = "127.0.0.1:0"; c.DefaultServiceTTL = 5 * time.Second }, nil)
	addr := runServer(t, s)
	ttl := func(proto string) uint32 {
		t.Helper()
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		r, _, err := (&miekg.Client{Net: proto, Timeout: 2 * time.Second}).Exchange(m, addr)
		if err != nil || len(r.Answer) == 0 {
			t.Fatalf("%s: %v %v", proto, err, r)
		}
		return r.Answer[0].Header().Ttl
	}
	for range 3 { // cached after the first
		if got := ttl("udp"); got != 5 {
			t.Fatalf("TTL %d before the reload, want 5", got)
		}
	}
	cfg := DefaultConfig()
	cfg.ResolvConf = ""
	cfg.DefaultServiceTTL = 5 * time.Second
	cfg.ServiceTTL = map[string]time.Duration{"users": 42 * time.Second}
	if err := s.SetTuning(cfg); err != nil {
		t.Fatal(err)
	}
	for _, proto := range []string{"udp", "udp", "tcp"} {
		if got := ttl(proto); got != 42 {
			t.Fatalf("%s: TTL %d after the reload, want 42", proto, got)
		}
	}
	cfg.NodeTTL = -time.Second
	if err := s.SetTuning(cfg); err == nil {
		t.Fatal("negative TTL accepted")
	}
	if got := ttl("udp"); got != 42 {
		t.Fatalf("TTL %d after a refused reload, want 42", got)
	}
}
