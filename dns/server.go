// Package dns is the sidecar's DNS server: it answers Consul's DNS interface
// (<svc>.service.consul, <tag>.<svc>.service.consul, RFC 2782 SRV names,
// <node>.node.consul, <hex>.addr.consul) from the in-memory catalog view,
// without a round trip to Consul per query, and forwards other names to
// recursors for loopback and configured clients only.
//
// Answer is the request-to-response function; ServeDNS is a thin adapter
// around it (TCP); UDP has its own loop, which answers from answers Answer
// made and packed once per catalog change (cache.go, udp.go). Run binds UDP
// and TCP on one address and serves until its context ends. README.md lists
// every difference from Consul's DNS.
package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"

	"attache/internal/reuseport"
	"attache/sidecar/catalog"
)

// Source is the catalog view the answers come from: the catalog watcher.
type Source interface {
	// Load returns the current snapshot without waiting.
	Load() *catalog.Snapshot
	// Want makes sure service is watched, waits at most until ctx ends for
	// its first answer from Consul and returns the newest snapshot.
	Want(ctx context.Context, service string) *catalog.Snapshot
}

// Ejections tells which instances the proxy has ejected (open breaker).
type Ejections interface {
	Ejected(service, instanceID string) bool
}

// Server answers DNS questions from a Source.
type Server struct {
	cfg Config
	src Source
	ej  Ejections
	log hclog.Logger
	m   *metrics

	domains     []string // lower-cased, fully qualified: Domain, then AltDomain if any
	domainOrder []int    // indexes of domains, longest first

	allow []netip.Prefix
	tun   atomic.Pointer[tuning] // what a reload may change (SetTuning)

	zones zoneCache
	cache atomic.Pointer[answerCache] // packed answers of the current snapshot (cache.go)
	limit *limiter                    // nil: no per-client rate limit
	done  context.Context             // already cancelled: Want without waiting
	bufs  sync.Pool                   // *[]byte for packing answers

	ready     chan struct{}
	readyOnce sync.Once
	mu        sync.Mutex
	addr      string
	udpConns  int         // UDP sockets bound by Run
	draining  atomic.Bool // Run is stopping: a read's timeout ends its reader
	linger    atomic.Bool // HandOver was called
}

// tuning is the part of the configuration a reload may change (TTLs,
// recursors, nearest-first order, ejections honoured): one immutable value
// that a query reads with an atomic load, replaced whole by SetTuning.
// Cached answers are kept per tuning (answerCache.tun).
type tuning struct {
	recursors       []string
	ttlExact        map[string]uint32
	ttlPrefix       []ttlPrefix // longest first
	defTTL          uint32
	nodeTTL         uint32
	negTTL          uint32
	nearest         bool
	honourEjections bool
}

// newTuning checks the tunable fields of cfg (its defaults filled).
func (s *Server) newTuning(cfg Config) (*tuning, error) {
	t := &tuning{nearest: cfg.Nearest, honourEjections: cfg.HonourEjections}
	recs := cfg.Recursors
	if len(recs) == 0 && cfg.ResolvConf != "" {
		r, err := parseResolvConf(cfg.ResolvConf)
		if err != nil {
			s.log.Warn("no recursors: names outside the domain will be refused", "error", err)
		}
		recs = r
	}
	for _, r := range recs {
		a, err := recursorAddr(r)
		if err != nil {
			return nil, fmt.Errorf("dns: %w", err)
		}
		if a == s.cfg.Addr {
			s.log.Warn("skipping recursor that is this server's own address", "recursor", a)
			continue
		}
		t.recursors = append(t.recursors, a)
	}
	t.ttlExact = map[string]uint32{}
	for k, v := range cfg.ServiceTTL { // not negative: checked by Validate
		k = toLower(k)
		if len(k) > 0 && k[len(k)-1] == '*' {
			t.ttlPrefix = append(t.ttlPrefix, ttlPrefix{k[:len(k)-1], seconds(v)})
		} else {
			t.ttlExact[k] = seconds(v)
		}
	}
	sort.Slice(t.ttlPrefix, func(a, b int) bool { return len(t.ttlPrefix[a].prefix) > len(t.ttlPrefix[b].prefix) })
	t.defTTL, t.nodeTTL, t.negTTL = seconds(cfg.DefaultServiceTTL), seconds(cfg.NodeTTL), seconds(cfg.NegativeTTL)
	return t, nil
}

// SetTuning applies a reload's Recursors (ResolvConf when none), TTLs,
// Nearest and HonourEjections from cfg; its other fields need a restart
// and are not looked at. Answers cached with the old settings are dropped;
// queries under way finish with the settings they started with. An error
// changes nothing.
func (s *Server) SetTuning(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = s.cfg.ResolvConf
	}
	t, err := s.newTuning(cfg)
	if err != nil {
		return err
	}
	s.tun.Store(t)
	return nil
}

type ttlPrefix struct {
	prefix string
	ttl    uint32
}

// New checks cfg, fills its defaults and returns a Server. ej may be nil.
func New(cfg Config, src Source, ej Ejections) (*Server, error) {
	if src == nil {
		return nil, errors.New("dns: a catalog source is required")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	def := DefaultConfig()
	if cfg.Addr == "" {
		cfg.Addr = def.Addr
	}
	if cfg.Domain == "" {
		cfg.Domain = def.Domain
	}
	if cfg.RecursorTimeout <= 0 {
		cfg.RecursorTimeout = def.RecursorTimeout
	}
	if cfg.AllowRecursion == nil {
		cfg.AllowRecursion = def.AllowRecursion
	}
	if cfg.WantTimeout <= 0 {
		cfg.WantTimeout = def.WantTimeout
	}
	if cfg.UDPSockets <= 0 {
		// GOMAXPROCS, not NumCPU: it follows a container's CPU limit.
		cfg.UDPSockets = runtime.GOMAXPROCS(0)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	s := &Server{cfg: cfg, src: src, ej: ej, log: cfg.Logger.Named("dns"), ready: make(chan struct{})}

	d, err := normalizeDomain(cfg.Domain)
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	s.domains = []string{d}
	if cfg.AltDomain != "" {
		a, err := normalizeDomain(cfg.AltDomain)
		if err != nil {
			return nil, fmt.Errorf("dns: alt domain: %w", err)
		}
		if a != d {
			s.domains = append(s.domains, a)
		}
	}
	s.domainOrder = []int{0}
	if len(s.domains) == 2 {
		if len(s.domains[1]) > len(s.domains[0]) {
			s.domainOrder = []int{1, 0}
		} else {
			s.domainOrder = []int{0, 1}
		}
	}

	for _, p := range cfg.AllowRecursion {
		s.allow = append(s.allow, p.Masked())
	}
	tun, err := s.newTuning(cfg)
	if err != nil {
		return nil, err
	}
	s.tun.Store(tun)

	s.m, err = newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	if cfg.RateLimit > 0 {
		s.limit = newLimiter(cfg.RateLimit, cfg.RateBurst, cfg.RateLimitClients)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	s.done = done
	s.bufs.New = func() any { b := make([]byte, 0, 1232); return &b }
	return s, nil
}

func seconds(d time.Duration) uint32 {
	s := d / time.Second
	if s > 1<<31-1 {
		s = 1<<31 - 1
	}
	return uint32(s)
}

func toLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// canRecurse reports whether from may use the recursors.
func (s *Server) canRecurse(from netip.Addr) bool {
	if len(s.tun.Load().recursors) == 0 {
		return false
	}
	from = from.Unmap()
	for _, p := range s.allow {
		if p.Contains(from) {
			return true
		}
	}
	return false
}

// ServeDNS answers one request; it is the miekg/dns adapter around Answer,
// used for TCP (UDP has its own loop, udp.go).
func (s *Server) ServeDNS(w miekg.ResponseWriter, req *miekg.Msg) {
	start := time.Now()
	from, proto := remote(w.RemoteAddr())
	if s.limit != nil && !s.limit.allow(from, start.UnixNano()) {
		s.m.limited.Inc()
		resp := new(miekg.Msg)
		resp.SetRcode(req, miekg.RcodeRefused)
		resp.Answer, resp.Ns, resp.Extra = nil, nil, nil
		if req.IsEdns0() != nil {
			resp.Extra = append(resp.Extra, newOPT())
		}
		w.WriteMsg(resp)
		return
	}
	resp := s.Answer(req, from, proto)
	bp := s.bufs.Get().(*[]byte)
	b := s.pack(req, resp, start, (*bp)[:cap(*bp)])
	if b != nil {
		if _, err := w.Write(b); err != nil {
			s.log.Debug("cannot write answer", "error", err, "client", w.RemoteAddr())
		}
	}
	if cap(b) <= 64<<10 {
		*bp = b[:0]
		s.bufs.Put(bp)
	}
}

// pack packs resp (into buf when it is large enough), or a SERVFAIL when
// it does not pack, and counts it in the metrics.
func (s *Server) pack(req, resp *miekg.Msg, start time.Time, buf []byte) []byte {
	b, err := resp.PackBuffer(buf)
	if err != nil {
		s.log.Warn("cannot pack answer", "error", err)
		fail := &miekg.Msg{MsgHdr: miekg.MsgHdr{Id: resp.Id, Response: true, Rcode: miekg.RcodeServerFailure}}
		b, err = fail.PackBuffer(buf)
		resp = fail
	}
	var qt uint16
	if req != nil && len(req.Question) > 0 {
		qt = req.Question[0].Qtype
	}
	s.m.observe(qt, resp.Rcode, time.Since(start))
	if err != nil {
		return nil
	}
	return b
}

func remote(a net.Addr) (netip.Addr, string) {
	switch a := a.(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap(), "udp"
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap(), "tcp"
	}
	return netip.Addr{}, "udp"
}

// Ready is closed once Run has bound its sockets.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Addr returns the bound address ("ip:port") once Ready is closed, else "".
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Run binds UDP (UDPSockets sockets) and TCP on Addr, all with
// SO_REUSEPORT (or takes them from Binder), and serves until ctx ends. Then
// it stops reading, answers every query it has read, and only then closes
// the sockets: a datagram still queued stays in the socket for whoever
// else has it (a successor that took it over, see internal/handover).
func (s *Server) Run(ctx context.Context) error {
	pcs, ln, err := s.listen(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.addr = ln.Addr().String()
	s.udpConns = len(pcs)
	s.mu.Unlock()

	invalid := func(_ []byte, err error) { s.m.malformed.Inc(); s.log.Trace("malformed query", "error", err) }
	hl := &lingerListener{Listener: ln, closed: make(chan struct{})}
	tcp := &miekg.Server{Listener: hl, Handler: s, MsgInvalidFunc: invalid,
		ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second, IdleTimeout: func() time.Duration { return 10 * time.Second }}

	errc := make(chan error, len(pcs)+1)
	var wg, slow sync.WaitGroup
	slowSem := make(chan struct{}, maxSlowInFlight)
	for _, pc := range pcs {
		u := newUDPServer(s, pc, slowSem, &slow)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := u.serve(); err != nil {
				errc <- err
			}
		}()
	}
	started := make(chan struct{})
	tcp.NotifyStartedFunc = func() { close(started) }
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := tcp.ActivateAndServe(); err != nil {
			errc <- err
		}
	}()
	select {
	case <-started:
	case err := <-errc:
		errc <- err
	}
	s.readyOnce.Do(func() { close(s.ready) })
	s.log.Info("serving DNS", "addr", s.Addr(), "domains", s.domains, "udp_sockets", len(pcs), "recursors", s.tun.Load().recursors)

	var runErr error
	select {
	case <-ctx.Done():
	case err := <-errc:
		runErr = fmt.Errorf("dns: serve on %s: %w", s.Addr(), err)
	}
	if s.linger.Load() {
		hl.pause(tcpFirstQueryWait)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tcp.ShutdownContext(sctx); err != nil && !errors.Is(err, context.Canceled) {
		s.log.Debug("shutdown", "error", err)
	}
	// A read deadline in the past ends each reader's read once it has
	// answered what it read; the slow path's answers are written before
	// the sockets close too.
	s.draining.Store(true)
	for _, pc := range pcs {
		_ = pc.SetReadDeadline(time.Unix(1, 0))
	}
	wg.Wait()
	slow.Wait()
	for _, pc := range pcs {
		pc.Close()
	}
	ln.Close()
	return runErr
}

// HandOver makes the coming stop (Run's ctx ending) gentler on TCP, for
// when a successor process serves the same sockets (internal/handover): the
// listener stops accepting without closing (what is queued stays for the
// successor), and each connection accepted has its first query answered
// before the server shuts down (up to tcpFirstQueryWait): a client writes
// its query right after connecting, and a connection closed before it is
// read would lose it. UDP needs nothing more than every stop does.
func (s *Server) HandOver() { s.linger.Store(true) }

// tcpFirstQueryWait bounds the wait for accepted TCP connections' first
// query when handing over.
const tcpFirstQueryWait = 2 * time.Second

// lingerListener is the TCP listener as miekg/dns's server sees it: pause
// stops accepting without closing the socket, and waits for the
// connections accepted to have their first query answered.
type lingerListener struct {
	net.Listener
	paused    atomic.Bool
	parked    atomic.Bool  // the accept loop saw the pause
	fresh     atomic.Int64 // accepted connections not answered yet
	closed    chan struct{}
	closeOnce sync.Once
}

func (l *lingerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.fresh.Add(1)
		return &firstRead{Conn: c, l: l}, nil
	}
	if l.paused.Load() {
		l.parked.Store(true) // every connection accepted before is counted in fresh
		<-l.closed           // not accepting any more: miekg/dns's loop waits here for its shutdown
		return nil, net.ErrClosed
	}
	return nil, err
}

func (l *lingerListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// pause stops accepting (a deadline in the past ends the Accept under way)
// and waits up to max for the fresh connections' first answers.
func (l *lingerListener) pause(max time.Duration) {
	l.paused.Store(true)
	if tl, ok := l.Listener.(*net.TCPListener); ok {
		_ = tl.SetDeadline(time.Unix(1, 0))
	}
	// The accept loop parks first (a connection it accepted just before is
	// counted by then), then the fresh connections get their answers.
	for end := time.Now().Add(max); (!l.parked.Load() || l.fresh.Load() > 0) && time.Now().Before(end); {
		time.Sleep(5 * time.Millisecond)
	}
}

// firstRead counts its connection fresh until its first answer is
// written (miekg/dns reads a query in two reads, length then message: the
// shutdown's read deadline between them would lose it).
type firstRead struct {
	net.Conn
	l    *lingerListener
	once sync.Once
}

func (c *firstRead) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.once.Do(func() { c.l.fresh.Add(-1) })
	return n, err
}

func (c *firstRead) Close() error {
	c.once.Do(func() { c.l.fresh.Add(-1) })
	return c.Conn.Close()
}

// listen binds the UDP sockets and the TCP listener on the same port. With
// port 0 it retries a few times when TCP's twin port is taken.
func (s *Server) listen(ctx context.Context) ([]*net.UDPConn, net.Listener, error) {
	host, port, _ := net.SplitHostPort(s.cfg.Addr)
	lc := reuseport.Or(s.cfg.Binder)
	tries := 1
	if port == "0" {
		tries = 10
	}
	var lastErr error
	for range tries {
		first, err := lc.ListenPacket(ctx, "udp", s.cfg.Addr)
		if err != nil {
			return nil, nil, fmt.Errorf("dns: listen on udp %s: %w", s.cfg.Addr, err)
		}
		bound := net.JoinHostPort(host, strconv.Itoa(first.LocalAddr().(*net.UDPAddr).Port))
		ln, err := lc.Listen(ctx, "tcp", bound)
		if err != nil {
			first.Close()
			lastErr = fmt.Errorf("dns: listen on tcp %s: %w", bound, err)
			continue
		}
		pcs := []*net.UDPConn{first.(*net.UDPConn)}
		for i := 1; i < s.cfg.UDPSockets; i++ {
			pc, err := lc.ListenPacket(ctx, "udp", bound)
			if err != nil {
				s.log.Warn("extra UDP socket not bound; serving with fewer", "addr", bound, "error", err)
				break
			}
			pcs = append(pcs, pc.(*net.UDPConn))
		}
		return pcs, ln, nil
	}
	return nil, nil, lastErr
}
