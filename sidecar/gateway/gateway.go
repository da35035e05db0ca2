// Package gateway is the sidecar's API gateway: it keeps the route table
// that the control service publishes in the Consul KV store (and the routes
// services publish in their meta) compiled and current, and routes each
// request of the proxy's gateway listeners with it — path and host match,
// weighted splits, path rewrites, per-route timeouts and retries, rate
// limits — while the proxy forwards (picking, pools, retries, outlier
// ejection, breakers). It also holds the TLS certificates the route
// document names, chosen by SNI and reloaded when their files change.
package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"attache/control/routes"
	"attache/internal/fielderr"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/proxy"
)

// ServiceName is the gateways' own service in Consul: cluster-scope rate
// limits divide by the number of its healthy instances.
const ServiceName = "attache-gateway"

// Config configures the gateway. DefaultConfig holds the defaults.
type Config struct {
	Addr    string // plain HTTP listen address; "" none
	TLSAddr string // HTTPS listen address (HTTP/2 by ALPN); "" none
	Prefix  string // KV prefix of the routes, default "attache/"
	Node    string // this node: the key of routes/applied/<node>
	DataDir string // where the applied version is kept; "" nowhere

	// MaxKeys bounds the keys (clients, API keys) one route's rate limit
	// holds state for (default 100000).
	MaxKeys int
	// CertCheck is how often certificate files are looked at for changes
	// (default 1s).
	CertCheck time.Duration
	// Watch holds the blocking-query rules for routes/current (defaults of
	// package sidecar/watch).
	Wait time.Duration // blocking wait, default 5m
	// Breakers makes the breakers of routes with a breaker block
	// (breaker.Registry.Custom, starting from its configuration). nil: a
	// version with such a route is refused.
	Breakers *breaker.Registry

	Logger     hclog.Logger
	Registerer prometheus.Registerer
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Prefix: "attache/", MaxKeys: 100_000, CertCheck: time.Second, Wait: 5 * time.Minute}
}

// Catalog is what the gateway needs of the catalog view: the snapshot (for
// the healthy gateways of cluster-scope limits, services' route meta and
// the gateway's fallback) and a way to have a service watched.
type Catalog interface {
	Load() *catalog.Snapshot
	Want(ctx context.Context, service string) *catalog.Snapshot
	View() *catalog.View
}

// Gateway routes the requests of the proxy's gateway listeners.
type Gateway struct {
	cfg     Config
	log     hclog.Logger
	kv      *api.Client
	cat     Catalog
	keys    routes.KV
	met     *metrics
	certs   *certStore
	cur     atomic.Pointer[table]
	doc     atomic.Pointer[applied] // the applied document version (before service routes join)
	mu      sync.Mutex              // serialises rebuilds
	swapped chan struct{}           // a new table is in
	toSave  chan *applied           // the newest applied version not saved to the data dir yet
	// metaServices are the services publishing a route in their meta
	// (watchServiceRoutes), for the catalog to watch.
	metaServices atomic.Pointer[[]string]
	status       atomic.Pointer[Status]
}

// applied is a document version the gateway took.
type applied struct {
	Version uint64 `json:"version"`
	Source  string `json:"source"` // as stored in KV (a routes.Version)
	doc     *routes.Document
}

// table is one compiled route table with each route's settings: immutable.
type table struct {
	version  uint64
	doc      *routes.Document
	tbl      *routes.Table
	per      map[*routes.Route]*routeState
	byIndex  []*routeState // per's, by the route's index in doc.Routes (routes.Table.MatchIndex)
	fallback *proxy.Answer
	built    time.Time
	breakers map[string]bool // names of the routes' own breakers (Registry.Custom)
}

// routeState is what Route needs of one route, built off the request path.
type routeState struct {
	pols    []*proxy.Policy    // by destination: the route's settings and the destination's tag; nil: the proxy's
	targets []proxy.TargetSlot // by destination: the proxy's state for its service, once looked up
	lim     *limiter
	hdr     string // the rate-limit key's header, "" for the client address
}

// Status is the gateway's state for /v1/routes and tests.
type Status struct {
	Version     uint64    `json:"version"`   // applied document version, 0: none
	FromDisk    bool      `json:"from_disk"` // the version came from the data dir (Consul not heard yet)
	AppliedAt   time.Time `json:"applied_at,omitzero"`
	Refused     uint64    `json:"refused_version,omitempty"` // the last version refused
	RefusedWhy  string    `json:"refused_error,omitempty"`
	LastError   string    `json:"last_error,omitempty"` // the last KV error
	ServiceErrs []string  `json:"service_route_errors,omitempty"`
}

// Validate says what is wrong with c, each bad field as a
// *fielderr.Error (zero fields are fine: New gives them their defaults).
// New calls it.
func (c Config) Validate() error {
	var errs []error
	for _, a := range []struct{ field, v string }{{"Addr", c.Addr}, {"TLSAddr", c.TLSAddr}} {
		if a.v == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.v); err != nil {
			errs = append(errs, fielderr.New(a.field, "%q: want HOST:PORT, e.g. 127.0.0.1:8080 (%v)", a.v, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	return nil
}

// New builds the gateway; kv talks to the local agent (KV reads, the
// applied key). It binds nothing: the proxy serves Listeners, Run watches.
func New(cfg Config, kv *api.Client, cat Catalog) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := DefaultConfig()
	if cfg.Prefix == "" {
		cfg.Prefix = d.Prefix
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.MaxKeys <= 0 {
		cfg.MaxKeys = d.MaxKeys
	}
	if cfg.CertCheck <= 0 {
		cfg.CertCheck = d.CertCheck
	}
	if cfg.Wait <= 0 {
		cfg.Wait = d.Wait
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Addr == "" && cfg.TLSAddr == "" {
		return nil, fmt.Errorf("gateway: no listen address")
	}
	if cfg.Node == "" {
		return nil, fmt.Errorf("gateway: the node name is needed (the key of routes/applied/<node>)")
	}
	met, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	g := &Gateway{cfg: cfg, log: cfg.Logger.Named("gateway"), kv: kv, cat: cat, met: met, keys: routes.NewKV(cfg.Prefix), swapped: make(chan struct{}, 1), toSave: make(chan *applied, 1)}
	g.certs = newCertStore(g.log)
	g.status.Store(&Status{})
	g.cur.Store(&table{doc: &routes.Document{}, per: map[*routes.Route]*routeState{}})
	if a, err := g.loadDisk(); err != nil {
		g.log.Warn("no saved routes", "error", err)
	} else if a != nil {
		if err := g.install(a, true); err != nil {
			g.log.Warn("saved routes refused", "version", a.Version, "error", err)
		}
	}
	return g, nil
}

// Listeners are the proxy's gateway listeners, routed by g.
func (g *Gateway) Listeners() []proxy.GatewayListener {
	var ls []proxy.GatewayListener
	if g.cfg.Addr != "" {
		ls = append(ls, proxy.GatewayListener{Addr: g.cfg.Addr, Router: g})
	}
	if g.cfg.TLSAddr != "" {
		ls = append(ls, proxy.GatewayListener{Addr: g.cfg.TLSAddr, Router: g, TLS: g.certs.tlsConfig()})
	}
	return ls
}

// Registration is the gateway's entry in Consul: service attache-gateway
// at its listen address, with a TCP check of it. Its ID,
// attache-gateway-<node>, is this gateway's own, so that gateways of
// several nodes (even on one agent) each keep their registration.
func (g *Gateway) Registration() (*api.AgentServiceRegistration, error) {
	addr := g.cfg.Addr
	if addr == "" {
		addr = g.cfg.TLSAddr
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("gateway: %q: %w", addr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, fmt.Errorf("gateway: %q: port: %w", addr, err)
	}
	checkHost := host
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host, checkHost = "", "127.0.0.1"
	}
	meta := map[string]string{}
	if g.cfg.TLSAddr != "" {
		meta["tls"] = g.cfg.TLSAddr
	}
	return &api.AgentServiceRegistration{
		ID: ServiceName + "-" + g.cfg.Node, Name: ServiceName, Address: host, Port: p, Meta: meta,
		Check: &api.AgentServiceCheck{
			TCP:      net.JoinHostPort(checkHost, port),
			Interval: "5s",
			Timeout:  "2s",
			Status:   api.HealthPassing,
		},
	}, nil
}

// Status returns the gateway's state.
func (g *Gateway) Status() Status { return *g.status.Load() }

func (g *Gateway) setStatus(f func(s *Status)) {
	for {
		old := g.status.Load()
		s := *old
		f(&s)
		if g.status.CompareAndSwap(old, &s) {
			return
		}
	}
}

// Run watches the routes in KV and the catalog (service routes, healthy
// gateways), and the certificate files, until ctx ends.
func (g *Gateway) Run(ctx context.Context) error {
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { g.watchKV(ctx); return nil })
	eg.Go(func() error { g.watchCatalog(ctx); return nil })
	eg.Go(func() error { g.watchServiceRoutes(ctx); return nil })
	eg.Go(func() error { g.certs.run(ctx, g.cfg.CertCheck); return nil })
	eg.Go(func() error { g.sweepLimiters(ctx); return nil })
	eg.Go(func() error { g.saveLoop(ctx); return nil })
	return eg.Wait()
}

// ---------------------------------------------------------------- routing

var notFound = &proxy.Answer{Status: http.StatusNotFound, Header: [][2]string{{"Content-Type", "application/json"}},
	Body: []byte(`{"error":"no route for this path"}` + "\n")}

// Route implements proxy.Router. It allocates nothing but for a 429.
func (g *Gateway) Route(h *proxy.Head) proxy.Decision {
	t := g.cur.Load()
	if t.tbl == nil {
		return proxy.Decision{Answer: notFound}
	}
	path, query := h.Path, ""
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path, query = path[:i], path[i:]
	}
	ri := t.tbl.MatchIndex(h.Host, path, h.Method, h.Header)
	if ri < 0 {
		return proxy.Decision{Answer: notFound}
	}
	r, rs := &t.doc.Routes[ri], t.byIndex[ri]
	if rs.lim != nil {
		key := h.RemoteIP
		if rs.hdr != "" {
			if v := h.Header(rs.hdr); v != "" {
				key = v
			}
		}
		now := h.Now
		if now.IsZero() {
			now = time.Now()
		}
		if v := rs.lim.allow(key, now); !v.ok {
			g.met.limited.WithLabelValues(r.Name).Inc()
			return proxy.Decision{Answer: &proxy.Answer{Status: http.StatusTooManyRequests, Header: v.headers(),
				Body: []byte(`{"error":"rate limit exceeded","route":` + strconv.Quote(r.Name) + "}\n")}}
		}
	}
	i := 0
	if len(r.Destinations) > 1 {
		i = pickIndex(r, rand.IntN(100))
	}
	dst := &r.Destinations[i]
	d := proxy.Decision{Service: dst.Service, Policy: rs.pols[i], Target: &rs.targets[i]}
	if r.StripPrefix || r.Rewrite != "" {
		d.Path = r.RewritePath(path) + query
	}
	if t.fallback != nil {
		if svc, ok := g.cat.Load().Service(dst.Service); ok && !hasInstance(svc, dst.Tag) {
			return proxy.Decision{Answer: t.fallback}
		}
	}
	return d
}

// pickIndex is routes.Route.Pick's choice as an index into r.Destinations.
func pickIndex(r *routes.Route, n int) int {
	for i, d := range r.Destinations {
		if n < d.Weight {
			return i
		}
		n -= d.Weight
	}
	return len(r.Destinations) - 1
}

// hasInstance says whether svc has a healthy instance carrying tag (any
// instance when tag is "").
func hasInstance(svc *catalog.Service, tag string) bool {
	if tag == "" {
		return len(svc.Instances) > 0
	}
	for i := range svc.Instances {
		if svc.Instances[i].HasTag(tag) {
			return true
		}
	}
	return false
}

// policies builds a route's proxy policy per destination: its timeouts,
// retries and balancer, the destination's tag, and the route's own breaker
// for the destination's service (from brk, by service name). A destination
// with none of these gets nil (the proxy's settings).
func policies(r *routes.Route, brk map[string]*breaker.Service) []*proxy.Policy {
	base := proxy.Policy{TryTimeout: r.TryTimeout, RequestTimeout: r.RequestTimeout, Balancer: proxy.Balancer(r.Balancer)}
	if r.Retries != nil {
		base.Retries, base.NoRetries = *r.Retries, *r.Retries == 0
	}
	pols := make([]*proxy.Policy, len(r.Destinations))
	for i, d := range r.Destinations {
		if p := base; p != (proxy.Policy{}) || d.Tag != "" || brk[d.Service] != nil {
			p.Tag, p.Breaker = d.Tag, brk[d.Service]
			pols[i] = &p
		}
	}
	return pols
}

// ---------------------------------------------------------------- building

// install compiles a document version with the service routes of the
// current catalog view and swaps the table in; an error leaves the table
// serving as it was.
func (g *Gateway) install(a *applied, fromDisk bool) error {
	if a.doc == nil {
		v, doc, err := routes.DecodeVersion([]byte(a.Source))
		if err != nil {
			return fmt.Errorf("%s: %w", g.keys.Version(a.Version), err)
		}
		if v.Number != a.Version {
			return fmt.Errorf("%s holds version %d", g.keys.Version(a.Version), v.Number)
		}
		a.doc = doc
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	// One compile, of the document with the service routes: a document
	// that does not compile alone does not with them either.
	if err := g.rebuildLocked(a); err != nil {
		return err
	}
	g.doc.Store(a)
	g.setStatus(func(s *Status) {
		s.Version, s.FromDisk, s.AppliedAt = a.Version, fromDisk, time.Now()
	})
	g.met.version.Set(float64(a.Version))
	return nil
}

// rebuild recompiles the table for the current document and catalog view
// (a service's route meta changed).
func (g *Gateway) rebuild() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.rebuildLocked(g.doc.Load()); err != nil {
		g.log.Error("route table not rebuilt", "error", err)
	}
}

func (g *Gateway) rebuildLocked(a *applied) error {
	var doc *routes.Document
	var version uint64
	if a != nil {
		doc, version = a.doc, a.Version
	} else {
		doc = &routes.Document{}
	}
	merged, errs := mergeServiceRoutes(doc, g.cat.Load())
	tbl, err := routes.Compile(merged)
	if err != nil {
		return err
	}
	g.setStatus(func(s *Status) { s.ServiceErrs = errs })
	old := g.cur.Load()
	oldLim := map[string]*routeState{}
	for r, rs := range old.per {
		oldLim[limKey(r)] = rs
	}
	n := g.healthyGateways()
	t := &table{version: version, doc: merged, tbl: tbl, per: map[*routes.Route]*routeState{}, built: time.Now(), breakers: map[string]bool{}}
	for _, r := range tbl.Routes() {
		var brk map[string]*breaker.Service
		if r.Breaker != nil {
			if g.cfg.Breakers == nil {
				return fmt.Errorf("gateway: route %q has a breaker block, but this gateway has no breaker registry", r.Name)
			}
			brk = map[string]*breaker.Service{}
			cfg := breakerConfig(g.cfg.Breakers.Config(), r.Breaker)
			for _, d := range r.Destinations {
				name := routeBreakerName(d.Service, r.Name)
				brk[d.Service] = g.cfg.Breakers.Custom(name, d.Service, cfg)
				t.breakers[strings.ToLower(name)] = true
			}
		}
		rs := &routeState{pols: policies(r, brk), targets: make([]proxy.TargetSlot, len(r.Destinations))}
		if rl := tbl.RateLimit(r); rl != nil {
			if prev := oldLim[limKey(r)]; prev != nil && prev.lim != nil {
				rs.lim = prev.lim // same limit: the buckets carry over
			} else {
				rs.lim = newLimiter(rl.RPS, burstOf(rl), rl.Scope == routes.ScopeCluster, g.cfg.MaxKeys)
			}
			rs.lim.setShare(n)
			rs.hdr = rl.Header
		}
		t.per[r] = rs
	}
	t.byIndex = make([]*routeState, len(merged.Routes))
	for i := range merged.Routes {
		t.byIndex[i] = t.per[&merged.Routes[i]]
	}
	if fb := merged.Gateway.Fallback; fb != nil {
		st, ct := fb.Status, fb.ContentType
		if st == 0 {
			st = http.StatusServiceUnavailable
		}
		if ct == "" {
			ct = "text/plain; charset=utf-8"
		}
		t.fallback = &proxy.Answer{Status: st, Header: [][2]string{{"Content-Type", ct}, {"X-Attache-Fallback", "gateway"}}, Body: []byte(fb.Body)}
	}
	g.certs.set(merged.Gateway.TLS)
	g.cur.Store(t)
	for name := range old.breakers {
		if !t.breakers[name] {
			g.cfg.Breakers.Drop(name)
		}
	}
	select { // watchCatalog asks the catalog for the table's services
	case g.swapped <- struct{}{}:
	default:
	}
	return nil
}

// routeBreakerName names a route's own breaker for one of its services, in
// /v1/breakers and the breaker metrics: SERVICE@ROUTE.
func routeBreakerName(service, route string) string { return service + "@" + route }

// breakerConfig is base with a route's breaker block over it. A rate of 0
// turns that rule off; 0 calls mean 1.
func breakerConfig(base breaker.Config, b *routes.Breaker) breaker.Config {
	c := base
	if b.Window > 0 {
		c.Window = b.Window
	}
	if b.MinimumCalls != nil {
		c.MinimumCalls = max(*b.MinimumCalls, 1)
	}
	rate := func(dst *float64, off *bool, v *float64) {
		if v != nil {
			*dst, *off = *v, *v == 0
		}
	}
	rate(&c.FailureRateThreshold, &c.NoFailureRate, b.FailureRate)
	rate(&c.SlowCallRateThreshold, &c.NoSlowCallRate, b.SlowRate)
	if b.SlowCall > 0 {
		c.SlowCallDuration = b.SlowCall
	}
	if b.OpenTime > 0 {
		c.OpenDuration = b.OpenTime
	}
	if b.HalfOpenCalls != nil {
		c.HalfOpenCalls = max(*b.HalfOpenCalls, 1)
	}
	if b.Disabled {
		c.Disabled = true
	}
	return c
}

// limKey identifies a route's limit across tables: a route keeps its
// buckets while its name and limit stay the same.
func limKey(r *routes.Route) string {
	b, _ := json.Marshal(r.RateLimit)
	return r.Name + "\x00" + string(b)
}

func burstOf(rl *routes.RateLimit) int {
	if rl.Burst > 0 {
		return rl.Burst
	}
	return max(int(rl.RPS+0.999999), 1)
}

// healthyGateways counts the healthy attache-gateway instances in the
// catalog view (at least 1: this one).
func (g *Gateway) healthyGateways() int {
	if svc, ok := g.cat.Load().Service(ServiceName); ok && len(svc.Instances) > 0 {
		return len(svc.Instances)
	}
	return 1
}

// watchCatalog follows the catalog view: the healthy gateways (cluster
// shares) and services' route meta.
func (g *Gateway) watchCatalog(ctx context.Context) {
	ch, stop := g.cat.View().Subscribe()
	defer stop()
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	// The gateways (for cluster shares) and the table's services are
	// asked for: the proxy would watch a route's service from its first
	// request, asking now makes that request as quick as the next. The
	// catalog watches only names it knows, so names not known yet are
	// asked for again as the catalog changes (this gateway registers after
	// it first asks); and all of them every 30 s, which keeps on-demand
	// watches alive.
	// One round of asking at a time; a change seen while one runs asks
	// again when it ends (else the next chance would be the 30 s tick).
	var wanting, again atomic.Bool
	var wg sync.WaitGroup
	defer wg.Wait()
	var want func(all bool)
	want = func(all bool) {
		if !wanting.CompareAndSwap(false, true) {
			again.Store(true)
			return
		}
		snap := g.cat.Load()
		var names []string
		for _, n := range append([]string{ServiceName}, g.cur.Load().doc.Services()...) {
			if _, ok := snap.Service(n); all || !ok && (snap.Known[n] || len(snap.Known) == 0) {
				names = append(names, n)
			}
		}
		if ms := g.metaServices.Load(); ms != nil {
			for _, n := range *ms { // Consul just named them: no need to wait for Known
				if _, ok := snap.Service(n); (all || !ok) && !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
		if len(names) == 0 {
			wanting.Store(false)
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, n := range names {
				wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				g.cat.Want(wctx, n)
				cancel()
			}
			wanting.Store(false)
			if again.Swap(false) && ctx.Err() == nil {
				want(false) // still counted in wg: this goroutine has not returned
			}
		}()
	}
	want(true)
	lastShare, lastMeta := 0, ""
	check := func() {
		want(false)
		n := g.healthyGateways()
		if n != lastShare {
			lastShare = n
			for _, rs := range g.cur.Load().per {
				if rs.lim != nil {
					rs.lim.setShare(n)
				}
			}
			g.met.gateways.Set(float64(n))
			g.log.Debug("healthy gateways", "count", n)
		}
		if m := serviceRouteKey(g.cat.Load()); m != lastMeta {
			if lastMeta != "" || m != "" {
				g.rebuild()
			}
			lastMeta = m
		}
	}
	check()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
			check()
		case <-g.swapped:
			check()
		case <-tick.C:
			want(true)
			check()
		}
	}
}

// sweepLimiters drops rate-limit keys whose buckets are full again, so that
// memory follows the clients seen lately.
func (g *Gateway) sweepLimiters(ctx context.Context) {
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			keys := 0
			for _, rs := range g.cur.Load().per {
				if rs.lim != nil {
					rs.lim.sweep(now)
					keys += rs.lim.keys()
				}
			}
			g.met.limitKeys.Set(float64(keys))
		}
	}
}
