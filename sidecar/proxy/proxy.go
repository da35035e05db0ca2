// Package proxy owns the sidecar's outbound path: upstream listeners (one
// service each, HTTP/1.1 and h2c or raw TCP) and an HTTP proxy listener
// (service from the request's host), load balancing over the healthy
// instances in the catalog Snapshot, keepalive pools per instance, retries
// with a budget, timeouts, and the fallback answers given when a service's
// breaker is open or it has no healthy instance. Failure state lives in
// package breaker; the proxy reports every outcome there.
//
// Plain HTTP/1.1 goes through a hand-written fast path that parses heads in
// place and copies bytes through per-instance keepalive pools; a connection
// with a request it does not handle exactly is handed to valyala/fasthttp
// (server and per-instance HostClient); h2c connections are recognised by
// their preface and served by net/http; WebSocket and other Upgrade
// requests are tunnelled byte for byte.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"attache/internal/fielderr"
	"attache/internal/reuseport"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"
)

// Source gives the proxy the catalog view. *catalog.Watcher implements it.
type Source interface {
	// Load returns the newest snapshot; never blocks.
	Load() *catalog.Snapshot
	// Want makes sure service is watched, waiting at most until ctx ends
	// for its first answer, and returns the newest snapshot.
	Want(ctx context.Context, service string) *catalog.Snapshot
}

// Config configures the proxy. DefaultConfig holds the defaults noted on
// each field; a zero field takes its default too.
type Config struct {
	Upstreams     []Upstream
	HTTPProxyAddr string   // "" disables the HTTP proxy listener
	Balancer      Balancer // default LeastRequest
	Domain        string   // DNS domain for http-proxy hosts, default "consul"
	// Binder binds every listener with SO_REUSEPORT; default nil:
	// reuseport.Plain (the sidecar passes its handover.Sockets, which
	// hands out a predecessor's listeners first).
	Binder reuseport.Binder

	ConnectTimeout time.Duration // dial timeout per attempt, default 1s
	TryTimeout     time.Duration // per try, until the whole answer is read, default 5s
	RequestTimeout time.Duration // whole request including retries, default 15s
	IdleTimeout    time.Duration // client keepalive idle timeout, default 75s (nginx's keepalive_timeout)
	HeaderTimeout  time.Duration // a request head must arrive whole within this of its first byte, default 10s
	BodyTimeout    time.Duration // a request body may pause this long between two reads, default 30s
	MaxClientConns int           // open client connections per HTTP listener; more get a 503 and are closed (over TLS closed at once), default 16384

	MaxRetries      int           // extra tries after the first (at most 7), default 2; not used with NoRetries
	NoRetries       bool          // no request is tried again, default false
	RetryBudget     float64       // retries at most this share of requests (10s window), default 0.2
	MinRetries      int           // retries always allowed per 10s window, default 10
	RetryBackoff    time.Duration // base of the full-jitter backoff, default 25ms
	RetryBackoffMax time.Duration // default 250ms
	RetryStatuses   []int         // answers retried (idempotent requests only, on another instance), default 500, 502, 503, 504
	FailureStatuses []int         // answers counted as instance failures, default every 5xx
	MaxReplayBody   int           // request bodies up to this size are buffered for retries, default 64 KiB
	MaxConnsPerHost int           // connection pool limit per instance, default 512
	MaxIdleConnTime time.Duration // idle pooled connection lifetime, default 10s
	WantTimeout     time.Duration // wait for a service's first catalog answer, default 2s
	MaxServices     int           // distinct services the HTTP proxy keeps state for, default 1024
	Fallbacks       map[string]Fallback
	// Policies are per-service forwarding settings (the sidecar's
	// `upstream "NAME" { ... }` blocks), used by every request to that
	// service through any listener; a gateway route's own Policy wins.
	// Keys are service names; Tag and Breaker are not used here (a
	// service's breaker settings belong to its breaker.Registry entry).
	Policies          map[string]*Policy
	Node              string // this node's name, for the nearest balancer
	Logger            hclog.Logger
	Registerer        prometheus.Registerer
	DisableHTTP2      bool          // don't recognise h2c on HTTP listeners
	EventLoops        int           // event loops shared by the HTTP listeners (Linux), default half of GOMAXPROCS, at least 1
	ShutdownGraceTime time.Duration // default 5s

	// AccessLog, when not nil, gets one JSON line per proxied request on
	// the gateway listeners (and, with AccessLogAll, on the upstream and
	// HTTP-proxy listeners too), written in chunks by a writer goroutine:
	// a request never waits for it; a line the buffer has no room for is
	// dropped and counted (attache_proxy_access_log_dropped_total).
	AccessLog       io.Writer
	AccessLogAll    bool
	AccessLogSample float64 // the share of requests logged, default 1 (all)
	AccessLogBuffer int     // bytes of lines buffered for the writer, default 1 MiB (about 4000 lines)

	Gateways            []GatewayListener // gateway listeners (package sidecar/gateway), routed by their Router
	TLSHandshakeTimeout time.Duration     // gateway TLS listeners, default 10s
}

// DefaultConfig returns the defaults documented on Config.
func DefaultConfig() Config {
	return Config{
		Balancer:            LeastRequest,
		Domain:              "consul",
		ConnectTimeout:      time.Second,
		TryTimeout:          5 * time.Second,
		RequestTimeout:      15 * time.Second,
		IdleTimeout:         75 * time.Second,
		HeaderTimeout:       10 * time.Second,
		BodyTimeout:         30 * time.Second,
		MaxClientConns:      16384,
		MaxRetries:          2,
		RetryBudget:         0.2,
		MinRetries:          10,
		RetryBackoff:        25 * time.Millisecond,
		RetryBackoffMax:     250 * time.Millisecond,
		RetryStatuses:       []int{500, 502, 503, 504},
		MaxReplayBody:       64 << 10,
		MaxConnsPerHost:     512,
		MaxIdleConnTime:     10 * time.Second,
		WantTimeout:         2 * time.Second,
		MaxServices:         1024,
		ShutdownGraceTime:   5 * time.Second,
		AccessLogSample:     1,
		AccessLogBuffer:     1 << 20,
		TLSHandshakeTimeout: 10 * time.Second,
	}
}

// Validate says what is wrong with c, each bad field as a
// *fielderr.Error (zero fields are fine: they take the defaults). New and
// Update call it; they check the upstreams and gateways further.
func (c Config) Validate() error {
	var errs []error
	if c.MaxRetries < 0 || c.MaxRetries > MostRetries {
		errs = append(errs, fielderr.New("MaxRetries", "%d: want 0 to %d (NoRetries turns retries off)", c.MaxRetries, MostRetries))
	}
	if _, err := ParseBalancer(string(c.Balancer)); err != nil {
		errs = append(errs, fielderr.New("Balancer", "%q: %v", c.Balancer, err))
	}
	if c.HTTPProxyAddr != "" {
		if err := checkListenAddr(c.HTTPProxyAddr); err != nil {
			errs = append(errs, fielderr.New("HTTPProxyAddr", "%q: %v", c.HTTPProxyAddr, err))
		}
	}
	return errors.Join(errs...)
}

// withDefaults gives zero fields DefaultConfig's values.
func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if c.Balancer == "" {
		c.Balancer = LeastRequest
	}
	if c.Domain == "" {
		c.Domain = "consul"
	}
	c.Domain = strings.Trim(strings.ToLower(c.Domain), ".")
	def(&c.ConnectTimeout, time.Second)
	def(&c.TryTimeout, 5*time.Second)
	def(&c.RequestTimeout, 15*time.Second)
	def(&c.IdleTimeout, 75*time.Second)
	def(&c.HeaderTimeout, 10*time.Second)
	def(&c.BodyTimeout, 30*time.Second)
	if c.MaxClientConns <= 0 {
		c.MaxClientConns = 16384
	}
	def(&c.RetryBackoff, 25*time.Millisecond)
	def(&c.RetryBackoffMax, 250*time.Millisecond)
	def(&c.MaxIdleConnTime, 10*time.Second)
	def(&c.WantTimeout, 2*time.Second)
	def(&c.ShutdownGraceTime, 5*time.Second)
	if c.AccessLogSample <= 0 || c.AccessLogSample > 1 {
		c.AccessLogSample = 1
	}
	if c.AccessLogBuffer <= 0 {
		c.AccessLogBuffer = 1 << 20
	}
	def(&c.TLSHandshakeTimeout, 10*time.Second)
	if c.TryTimeout > c.RequestTimeout {
		c.TryTimeout = c.RequestTimeout
	}
	if c.MaxRetries == 0 {
		c.MaxRetries = 2
	}
	if c.RetryBudget <= 0 {
		c.RetryBudget = 0.2
	}
	if c.MinRetries <= 0 {
		c.MinRetries = 10
	}
	if c.RetryStatuses == nil {
		c.RetryStatuses = []int{500, 502, 503, 504}
	}
	if c.MaxReplayBody <= 0 {
		c.MaxReplayBody = 64 << 10
	}
	if c.MaxConnsPerHost <= 0 {
		c.MaxConnsPerHost = 512
	}
	if c.MaxServices <= 0 {
		c.MaxServices = 1024
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c
}

const maxTries = 8

// MostRetries is the most Config.MaxRetries may be.
const MostRetries = maxTries - 1

// Proxy is the set of listeners and the per-service forwarding state.
type Proxy struct {
	cfg       Config
	eng       Engines // which wire engines serve (WithEngines)
	src       Source
	br        *breaker.Registry
	log       hclog.Logger
	met       *metrics
	slack     time.Duration // how late a try timeout may fire (deadlines are shared)
	retryOn   [600]bool
	failureOn [600]bool
	dialer    net.Dialer
	fallbacks map[string]*fallback
	policies  map[string]*Policy // Config.Policies by lower-case name
	// maxRequestTimeout is the longest request timeout of the proxy's and
	// the services' own: the write timeout of fasthttp's server.
	maxRequestTimeout time.Duration
	acc               *accessLog           // nil: no access log
	live              atomic.Pointer[live] // the settings a reload may change (reload.go)

	// The listeners (reload.go): lnMu serialises Run's binding, Update and
	// the shutdown's look at them.
	lnMu      sync.Mutex
	run       *runState          // nil until Run binds
	stopped   bool               // the shutdown has taken the list: no more listeners
	ev        *evServer          // the event loops, nil where goroutines serve
	hls       []*httpListener    // every HTTP listener served, removed ones too
	served    map[string]*served // the upstream and HTTP proxy listeners serving, by key (listenerKey)
	parker    *parker            // idle connections of the goroutine path (Linux; nil elsewhere), while Run runs
	parkAfter time.Duration

	mu      sync.Mutex
	targets map[string]*target

	ready   chan struct{}
	boundMu sync.Mutex
	bound   map[string]net.Addr // by service name; "" is the HTTP proxy

	connsMu sync.Mutex
	conns   map[net.Conn]struct{} // tunnelled connections, closed on shutdown
	linger  atomic.Bool           // HandOver: the stop lingers for idle clients' next requests
	closing bool
	tunnels sync.WaitGroup
}

// New checks the configuration and builds the proxy; Run binds and serves.
// Options are for benchmarks and tests (WithEngines).
func New(cfg Config, src Source, br *breaker.Registry, opts ...Option) (*Proxy, error) {
	if src == nil {
		return nil, errors.New("proxy: no catalog source")
	}
	if br == nil {
		return nil, errors.New("proxy: no breaker registry")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	cfg = cfg.withDefaults()
	seen := map[string]bool{}
	for i, u := range cfg.Upstreams {
		if err := checkServiceName(u.Name); err != nil {
			return nil, fmt.Errorf("proxy: upstream %d: %w", i, err)
		}
		if err := checkListenAddr(u.Addr); err != nil {
			return nil, fmt.Errorf("proxy: upstream %s: %w", u.Name, err)
		}
		switch u.Protocol {
		case "":
			cfg.Upstreams[i].Protocol = ProtoHTTP
		case ProtoHTTP, ProtoHTTP2, ProtoTCP:
		default:
			return nil, fmt.Errorf("proxy: upstream %s: unknown protocol %q", u.Name, u.Protocol)
		}
		if _, err := ParseBalancer(string(u.Balancer)); err != nil {
			return nil, err
		}
		if u.Balancer == "" {
			cfg.Upstreams[i].Balancer = cfg.Balancer
		}
		if seen[u.Addr] && !strings.HasSuffix(u.Addr, ":0") {
			return nil, fmt.Errorf("proxy: two upstreams listen on %s", u.Addr)
		}
		seen[u.Addr] = true
	}
	for _, g := range cfg.Gateways {
		if err := checkListenAddr(g.Addr); err != nil {
			return nil, fmt.Errorf("proxy: gateway: %w", err)
		}
		if g.Router == nil {
			return nil, fmt.Errorf("proxy: gateway %s: no router", g.Addr)
		}
	}
	fallbacks := make(map[string]*fallback, len(cfg.Fallbacks))
	for name, fb := range cfg.Fallbacks {
		f, err := newFallback(name, fb)
		if err != nil {
			return nil, err
		}
		fallbacks[strings.ToLower(name)] = f
	}
	policies := make(map[string]*Policy, len(cfg.Policies))
	for name, pol := range cfg.Policies {
		if err := checkServiceName(strings.ToLower(name)); err != nil {
			return nil, fmt.Errorf("proxy: settings of %q: %w", name, err)
		}
		if _, err := ParseBalancer(string(pol.Balancer)); pol.Balancer != "" && err != nil {
			return nil, fmt.Errorf("proxy: settings of %s: %w", name, err)
		}
		if pol.Tag != "" || pol.Breaker != nil {
			return nil, fmt.Errorf("proxy: settings of %s: a service's own settings take no tag or breaker", name)
		}
		policies[strings.ToLower(name)] = pol
	}
	p := &Proxy{
		cfg:       cfg,
		policies:  policies,
		fallbacks: fallbacks,
		src:       src,
		br:        br,
		log:       cfg.Logger.Named("proxy"),
		targets:   map[string]*target{},
		conns:     map[net.Conn]struct{}{},
		ready:     make(chan struct{}),
		bound:     map[string]net.Addr{},
		served:    map[string]*served{},
		dialer:    net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second},
	}
	for _, o := range opts {
		o(p)
	}
	p.slack = cfg.TryTimeout / 32
	p.maxRequestTimeout = cfg.RequestTimeout
	for _, pol := range policies { // timeouts are swept at a 32nd of the shortest try timeout
		if pol.TryTimeout > 0 {
			p.slack = min(p.slack, pol.TryTimeout/32)
		}
		p.maxRequestTimeout = max(p.maxRequestTimeout, pol.RequestTimeout)
	}
	p.live.Store(newLive(cfg))
	p.parkAfter = defaultParkAfter
	for _, s := range cfg.RetryStatuses {
		if s >= 100 && s < 600 {
			p.retryOn[s] = true
		}
	}
	if cfg.FailureStatuses == nil {
		for s := 500; s < 600; s++ {
			p.failureOn[s] = true
		}
	}
	for _, s := range cfg.FailureStatuses {
		if s >= 100 && s < 600 {
			p.failureOn[s] = true
		}
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	p.met = m
	if p.acc = newAccessLog(cfg, p.log); p.acc != nil && cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{p.acc.dropped, p.acc.lines} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("proxy: register metrics: %w", err)
			}
		}
	}
	// Targets of the upstream listeners exist before anything serves, so
	// their settings never change under a request.
	for _, u := range cfg.Upstreams {
		p.target(u.Name, u.Balancer, u.Protocol)
	}
	return p, nil
}

// HandOver makes the coming stop (Run's ctx ending) linger, for when a
// successor process serves the same listening sockets (internal/handover):
// the event loops stop accepting at once but close no idle client
// connection; each is answered its next request, with Connection: close,
// until the client closes it or ShutdownGraceTime ends. A client of the
// keep-alive kind that sends its next request just as an idle connection
// closes sees it fail, and nothing hurries this stop: the successor serves
// every new connection. The fast path's goroutines (-noloop, and off Linux)
// linger the same way; a connection handed to fasthttp (a chunked request
// body, say) still has its idle time cut short.
func (p *Proxy) HandOver() { p.linger.Store(true) }

// Run binds every listener (an error names the address), serves until ctx
// ends, then stops them all and returns when everything has stopped.
func (p *Proxy) Run(ctx context.Context) error {
	if p.acc != nil { // the writer outlives the listeners: what they drain is logged too
		actx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); p.acc.run(actx) }()
		defer func() { stop(); <-done }()
	}
	type bound struct {
		up  Upstream
		ln  net.Listener
		pxy bool
		gw  *GatewayListener
		key string // for Addr
	}
	var all []bound
	closeAll := func() {
		for _, b := range all {
			b.ln.Close()
		}
	}
	lc := reuseport.Or(p.cfg.Binder)
	for _, u := range p.cfg.Upstreams {
		ln, err := lc.Listen(ctx, "tcp", u.Addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: upstream %s: listen on %s: %w", u.Name, u.Addr, err)
		}
		all = append(all, bound{up: u, ln: ln})
	}
	if p.cfg.HTTPProxyAddr != "" {
		ln, err := lc.Listen(ctx, "tcp", p.cfg.HTTPProxyAddr)
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: http proxy: listen on %s: %w", p.cfg.HTTPProxyAddr, err)
		}
		all = append(all, bound{ln: ln, pxy: true})
	}
	for i := range p.cfg.Gateways {
		g := &p.cfg.Gateways[i]
		ln, err := lc.Listen(ctx, "tcp", g.Addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: gateway: listen on %s: %w", g.Addr, err)
		}
		all = append(all, bound{ln: ln, gw: g, key: gatewayKey(i)})
	}

	if k, err := newParker(min(max(p.cfg.IdleTimeout/8, 10*time.Millisecond), time.Second)); err == nil {
		p.parker = k
		go k.run()
		defer k.close() // after every server has stopped (wg.Wait below)
	} else {
		p.log.Debug("idle connections of the goroutine path keep their goroutine", "reason", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 2*len(all)+1)
	var hls []*httpListener
	p.lnMu.Lock()
	p.run = &runState{ctx: ctx, wg: &wg, errc: errc}
	for _, b := range all {
		switch {
		case b.gw != nil && b.gw.TLS != nil:
			p.log.Info("gateway listening", "addr", b.ln.Addr().String(), "tls", true)
			p.serveGatewayTLS(ctx, &wg, errc, b.ln, b.gw)
		case b.gw != nil:
			p.log.Info("gateway listening", "addr", b.ln.Addr().String())
			hls = append(hls, p.newHTTPListener(ctx, b.ln, &routing{router: b.gw.Router, proto: "http"}))
		case b.pxy:
			p.log.Info("http proxy listening", "addr", b.ln.Addr().String())
			h := p.newHTTPListener(ctx, b.ln, nil)
			hls = append(hls, h)
			p.served[httpProxyKey] = &served{addr: p.cfg.HTTPProxyAddr, ln: b.ln, h: h}
		default:
			hls = append(hls, p.startUpstream(b.up, b.ln)...)
		}
	}
	p.serveHTTP(ctx, &wg, errc, hls)
	p.lnMu.Unlock()
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.closeIdleLoop(ctx)
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.followLoop(ctx)
	}()
	p.boundMu.Lock()
	for _, b := range all {
		if b.key != "" {
			p.bound[b.key] = b.ln.Addr()
			continue
		}
		p.bound[b.up.Name] = b.ln.Addr()
	}
	p.boundMu.Unlock()
	close(p.ready)

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	cancel() // each server closes its listeners (the loops must let go of theirs first)
	p.connsMu.Lock()
	p.closing = true
	for c := range p.conns {
		c.Close()
	}
	p.connsMu.Unlock()
	wg.Wait()
	p.tunnels.Wait()
	p.mu.Lock()
	for _, t := range p.targets {
		t.close()
	}
	p.mu.Unlock()
	return err
}

// closeIdleLoop closes the raw pools' connections idle for longer than
// MaxIdleConnTime, until ctx ends.
func (p *Proxy) closeIdleLoop(ctx context.Context) {
	every := max(p.cfg.MaxIdleConnTime/4, 100*time.Millisecond)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			p.mu.Lock()
			ts := make([]*target, 0, len(p.targets))
			for _, t := range p.targets {
				ts = append(ts, t)
			}
			p.mu.Unlock()
			for _, t := range ts {
				t.mu.Lock()
				for _, ep := range t.eps {
					ep.pool.closeIdle(now.Add(-p.cfg.MaxIdleConnTime))
				}
				t.mu.Unlock()
			}
		}
	}
}

// notifier is a Source that says when it has a new snapshot
// (*catalog.Watcher is one).
type notifier interface {
	View() *catalog.View
}

// followLoop rebuilds every target's endpoints when the catalog view
// changes, until ctx ends, so that the breaker sees instances leave and
// come back even while nobody calls the service (one that comes back
// starts with a clean outlier record). A Source that cannot say when it
// changed is looked at every 100 ms.
func (p *Proxy) followLoop(ctx context.Context) {
	var changed <-chan struct{}
	if n, ok := p.src.(notifier); ok && n.View() != nil {
		ch, stop := n.View().Subscribe()
		defer stop()
		changed = ch
	} else {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		ch := make(chan struct{}, 1)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
					select {
					case ch <- struct{}{}:
					default:
					}
				}
			}
		}()
		changed = ch
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
			p.mu.Lock()
			ts := make([]*target, 0, len(p.targets))
			for _, t := range p.targets {
				ts = append(ts, t)
			}
			p.mu.Unlock()
			for _, t := range ts {
				t.endpoints()
			}
		}
	}
}

// Ready is closed once Run has bound every listener.
func (p *Proxy) Ready() <-chan struct{} { return p.ready }

// Addr returns the bound address of the upstream listener for service, or
// of the HTTP proxy listener when service is "". It is nil before Ready.
func (p *Proxy) Addr(service string) net.Addr {
	p.boundMu.Lock()
	defer p.boundMu.Unlock()
	return p.bound[strings.ToLower(service)]
}

// GatewayAddr returns the bound address of Config.Gateways[i]; nil before
// Ready.
func (p *Proxy) GatewayAddr(i int) net.Addr {
	p.boundMu.Lock()
	defer p.boundMu.Unlock()
	return p.bound[gatewayKey(i)]
}

func gatewayKey(i int) string { return fmt.Sprintf("\x00gateway%d", i) }

// track registers the two connections of a tunnel, to close on shutdown
// (Run waits for the tunnel to end); it returns false when the proxy is
// already shutting down.
func (p *Proxy) track(a, b net.Conn) bool {
	p.connsMu.Lock()
	defer p.connsMu.Unlock()
	if p.closing {
		return false
	}
	p.conns[a] = struct{}{}
	p.conns[b] = struct{}{}
	p.tunnels.Add(1)
	return true
}

func (p *Proxy) untrack(a, b net.Conn) {
	p.connsMu.Lock()
	delete(p.conns, a)
	delete(p.conns, b)
	p.connsMu.Unlock()
	p.tunnels.Done()
}

// target returns the forwarding state for a service, creating it. bal and
// proto adjust an existing target only while New runs (nothing serves yet);
// afterwards callers pass "" for both.
func (p *Proxy) target(name string, bal Balancer, proto string) *target {
	name = strings.ToLower(name)
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := p.targets[name]; t != nil {
		if bal != "" {
			t.bal = bal
		}
		if proto == ProtoHTTP2 {
			t.h2up = true
		}
		return t
	}
	if bal == "" {
		bal = p.cfg.Balancer
	}
	t := &target{
		p:    p,
		name: name,
		bal:  bal,
		h2up: proto == ProtoHTTP2,
		svc:  p.br.Service(name),
		eps:  map[string]*endpoint{},
		met:  p.met.forTarget(name),
	}
	t.fallback = p.fallbacks[name]
	if t.pol = p.policies[name]; t.pol != nil && t.pol.Balancer != "" {
		t.bal = t.pol.Balancer // the service's own balancer: a route's wins in pick
	}
	p.targets[name] = t
	return t
}

// errNotInCatalog answers a host naming a service the catalog does not have.
var errNotInCatalog = errors.New("service not in the catalog")

// lookupTarget returns the state for a service named by a request's host.
// It keeps state only for services the catalog knows (asking the source to
// watch a new name first, for at most WantTimeout), so that made-up hosts
// neither grow memory nor the metrics' label sets; and never more than
// MaxServices.
func (p *Proxy) lookupTarget(ctx context.Context, name string) (*target, error) {
	p.mu.Lock()
	t := p.targets[name]
	n := len(p.targets)
	p.mu.Unlock()
	if t != nil {
		return t, nil
	}
	known := func(s *catalog.Snapshot) bool {
		_, ok := s.Service(name)
		return ok || s.Known[name]
	}
	if !known(p.src.Load()) {
		wctx, cancel := context.WithTimeout(ctx, p.cfg.WantTimeout)
		snap := p.src.Want(wctx, name)
		cancel()
		if !known(snap) {
			return nil, errNotInCatalog
		}
	}
	if n >= p.cfg.MaxServices {
		return nil, fmt.Errorf("proxy: more than %d services called through the HTTP proxy", p.cfg.MaxServices)
	}
	return p.target(name, "", ""), nil
}

// ---------------------------------------------------------------- target

// target is the forwarding state of one service.
type target struct {
	p        *Proxy
	name     string
	bal      Balancer
	h2up     bool // send h2c requests to instances over h2c
	svc      *breaker.Service
	fallback *fallback
	pol      *Policy // the service's own settings (Config.Policies); nil: the proxy's
	met      *targetMetrics
	rr       atomic.Uint64
	budget   budget

	set atomic.Pointer[epSet]

	mu       sync.Mutex // guards eps, rebuilds and the transports
	eps      map[string]*endpoint
	h1tr     *http.Transport
	h2tr     *http.Transport
	lastWant atomic.Int64 // unix second of the last Want
}

// epSet is the list of endpoints built from one snapshot.
type epSet struct {
	snap  *catalog.Snapshot
	svc   *catalog.Service
	found bool // the service is in the snapshot
	known bool // the catalog knows the service name
	ips   bool // every instance has an IP address (an event loop can dial them)
	list  []*endpoint
	byTag map[string][]*endpoint // lower-cased tag -> the instances carrying it, in list's order
}

// endpoint is one instance with its connection pool and counters.
type endpoint struct {
	id       string
	node     string
	addr     string
	weight   int
	rtt      time.Duration
	rttKnown bool
	tags     []string // lower-cased, without duplicates
	inflight atomic.Int64
	out      *breaker.Instance
	hc       *fasthttp.HostClient // the fasthttp path's pool
	pool     *bpool               // the raw fast path's pool
	ap       netip.AddrPort       // addr, when it is an IP address without a zone
	met      *endpointMetrics
}

// endpoints returns the endpoint set for the current snapshot, rebuilding it
// when the snapshot changed.
func (t *target) endpoints() *epSet {
	snap := t.p.src.Load()
	s := t.set.Load()
	if s != nil && s.snap == snap {
		return s
	}
	return t.rebuild(snap)
}

func (t *target) rebuild(snap *catalog.Snapshot) *epSet {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := t.set.Load(); s != nil && s.snap == snap {
		return s
	}
	svc, found := snap.Service(t.name)
	if s := t.set.Load(); s != nil && found && s.svc == svc && s.found {
		ns := *s
		ns.snap = snap
		t.set.Store(&ns)
		return &ns
	}
	set := &epSet{snap: snap, svc: svc, found: found, known: found || snap.Known[t.name], ips: true}
	keep := map[string]bool{}
	live := map[string]bool{}
	var ids []string
	if found {
		for i := range svc.Instances {
			in := &svc.Instances[i]
			addr := in.Address
			if addr == "" {
				addr = in.NodeAddress
			}
			if addr == "" || in.Port <= 0 {
				continue
			}
			hp := net.JoinHostPort(addr, fmt.Sprint(in.Port))
			key := in.ID + "\x00" + hp
			ep := t.eps[key]
			if ep == nil {
				ep = t.newEndpoint(in.ID, hp)
				t.eps[key] = ep
			}
			ep.node = in.Node
			ep.tags = lowerTags(in.Tags)
			ep.weight = in.Weight
			if ep.weight <= 0 {
				ep.weight = 1
			}
			ep.rtt, ep.rttKnown = snap.RTT(t.p.cfg.Node, in.Node)
			keep[key] = true
			set.ips = set.ips && ep.ap.IsValid()
			ids = append(ids, in.ID)
			live[in.ID] = true
			set.list = append(set.list, ep)
		}
	}
	now := time.Now()
	for key, ep := range t.eps {
		if !keep[key] {
			delete(t.eps, key)
			ep.hc.CloseIdleConnections()
			ep.pool.close()
			t.met.drop(ep.id, now)
		}
	}
	t.met.retain(live, now)
	// Nearest first, whatever the service's balancer: a gateway route may
	// pick with the nearest balancer from the same set.
	sort.SliceStable(set.list, func(i, j int) bool {
		a, b := set.list[i], set.list[j]
		if a.rttKnown != b.rttKnown {
			return a.rttKnown
		}
		return a.rtt < b.rtt
	})
	if found {
		for _, ep := range set.list {
			for _, tag := range ep.tags {
				if set.byTag == nil {
					set.byTag = map[string][]*endpoint{}
				}
				set.byTag[tag] = append(set.byTag[tag], ep)
			}
		}
	}
	// The breaker follows the view: an instance that left it (Consul
	// found it unhealthy) and came back starts with a clean record.
	t.svc.Sync(ids)
	t.set.Store(set)
	return set
}

// lowerTags returns tags lower-cased, each once.
func lowerTags(tags []string) []string {
	var out []string
outer:
	for _, tag := range tags {
		tag = strings.ToLower(tag)
		for _, x := range out {
			if x == tag {
				continue outer
			}
		}
		out = append(out, tag)
	}
	return out
}

func (t *target) newEndpoint(id, addr string) *endpoint {
	p := t.p
	ep := &endpoint{id: id, addr: addr, out: t.svc.Instance(id), met: t.met.forEndpoint(id)}
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Zone() == "" {
		ep.ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ep.pool = newBPool(addr, p.cfg.MaxConnsPerHost, p.cfg.MaxIdleConnTime, func(a string, timeout time.Duration) (net.Conn, error) {
		d := p.dialer
		if timeout < d.Timeout {
			d.Timeout = timeout
		}
		return d.Dial("tcp", a)
	})
	ep.hc = &fasthttp.HostClient{
		Addr:                      addr,
		NoDefaultUserAgentHeader:  true,
		MaxConns:                  p.cfg.MaxConnsPerHost,
		MaxIdleConnDuration:       p.cfg.MaxIdleConnTime,
		MaxConnWaitTimeout:        p.cfg.ConnectTimeout,
		ReadBufferSize:            8 << 10,
		WriteBufferSize:           4 << 10,
		DisablePathNormalizing:    true,
		StreamResponseBody:        true,
		MaxIdemponentCallAttempts: 2,
		RetryIfErr:                retryStaleConn,
		Dial: func(a string) (net.Conn, error) {
			return p.dialer.Dial("tcp", a)
		},
	}
	return ep
}

// retryStaleConn lets fasthttp retry once, on a new connection, a request
// whose pooled keepalive connection turned out to be closed by the instance
// before it answered. Our own retries (other instances, budget) do the rest.
func retryStaleConn(req *fasthttp.Request, attempts int, err error) (bool, bool) {
	if attempts > 1 || !replaySafe(req) {
		return false, false
	}
	return false, errors.Is(err, fasthttp.ErrConnectionClosed) || errors.Is(err, errEOF) || isReset(err)
}

func (t *target) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, ep := range t.eps {
		ep.hc.CloseIdleConnections()
		ep.pool.close()
	}
	if t.h1tr != nil {
		t.h1tr.CloseIdleConnections()
	}
	if t.h2tr != nil {
		t.h2tr.CloseIdleConnections()
	}
}

// want asks the source to watch the service and waits for it, at most
// WantTimeout; concurrent callers share one wait.
func (t *target) want(ctx context.Context) *epSet {
	ctx, cancel := context.WithTimeout(ctx, t.p.cfg.WantTimeout)
	defer cancel()
	t.p.src.Want(ctx, t.name)
	return t.endpoints()
}

// pick chooses an endpoint not in tried, among those carrying pol's tag
// (every one without) with pol's balancer (the service's without). An
// instance whose ejection time is over is taken first, as its probe. While
// the service panics (too few healthy instances) every instance may be
// picked. nil means no instance can be tried.
func (t *target) pick(set *epSet, tried []*endpoint, pol *Policy) *endpoint {
	var buf [16]*endpoint
	cand := buf[:0]
	panicking := t.svc.Panic()
	list, bal := set.list, t.bal
	if pol != nil {
		if pol.Tag != "" {
			list = set.byTag[strings.ToLower(pol.Tag)]
		}
		if pol.Balancer != "" {
			bal = pol.Balancer
		}
	}
outer:
	for _, ep := range list {
		for _, x := range tried {
			if x == ep {
				continue outer
			}
		}
		if panicking {
			cand = append(cand, ep)
			continue
		}
		switch ep.out.Status() {
		case breaker.Available:
			cand = append(cand, ep)
		case breaker.ProbeReady:
			if ep.out.TryProbe() {
				return ep
			}
		}
	}
	switch len(cand) {
	case 0:
		return nil
	case 1:
		return cand[0]
	}
	switch bal {
	case RoundRobin:
		return cand[t.rr.Add(1)%uint64(len(cand))]
	case Weighted:
		total := 0
		for _, ep := range cand {
			total += ep.weight
		}
		r := rand.IntN(total)
		for _, ep := range cand {
			if r < ep.weight {
				return ep
			}
			r -= ep.weight
		}
		return cand[len(cand)-1]
	case Nearest:
		// cand is sorted by RTT; least-request among the nearest ones
		// (within 10% or 1ms of the best).
		n := 1
		best := cand[0]
		for n < len(cand) && cand[n].rttKnown == best.rttKnown &&
			cand[n].rtt <= best.rtt+max(best.rtt/10, time.Millisecond) {
			n++
		}
		cand = cand[:n]
		if n == 1 {
			return cand[0]
		}
	}
	// power of two choices, fewer requests in flight wins
	i := rand.IntN(len(cand))
	j := rand.IntN(len(cand) - 1)
	if j >= i {
		j++
	}
	a, b := cand[i], cand[j]
	if b.inflight.Load() < a.inflight.Load() {
		return b
	}
	return a
}
