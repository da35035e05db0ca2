// Package breaker owns the sidecar's failure state: per-instance outlier
// detection (consecutive failures eject an instance for a while, then one
// probe request decides whether it comes back; never the last instances,
// and too few healthy ones means all are used: the panic threshold) and
// per-service circuit breakers over a sliding time window of calls started
// (closed, open, half-open), with a limit on the calls in flight. The proxy
// asks before each call and reports every outcome here; DNS asks Ejected to
// leave ejected instances out of its answers; the admin endpoint serves
// State. Nothing here talks to the network.
package breaker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/fielderr"
)

// Config holds the outlier and breaker settings. Zero fields take the
// defaults documented on each field (see DefaultConfig).
type Config struct {
	// ConsecutiveFailures ejects an instance after this many failed calls in
	// a row (connect error, reset, timeout, 5xx). Default 5, as Envoy's
	// consecutive_5xx. Not used with NoEjection.
	ConsecutiveFailures int
	// NoEjection turns outlier ejection off: no instance is ever ejected.
	// Default false.
	NoEjection bool
	// BaseEjectionTime is multiplied by the number of times the instance has
	// been ejected. Default 30s (Envoy's).
	BaseEjectionTime time.Duration
	// MaxEjectionTime caps one ejection. Default 300s (Envoy's default).
	MaxEjectionTime time.Duration
	// MaxEjectionPercent is the largest share of the instances in the view
	// that may be ejected at once; at least one may always be ejected, but
	// never the last one. Default 10 (Envoy's default).
	MaxEjectionPercent int
	// PanicThreshold: when fewer than this percentage of the instances in
	// the view are healthy (not ejected, not failing), requests go to all of
	// them and DNS answers with all of them. Default 50 (Envoy's
	// healthy_panic_threshold). Not used with NoPanic.
	PanicThreshold float64
	// NoPanic turns the panic rule off: ejected and failing instances stay
	// out however few are left. Default false.
	NoPanic bool
	// ProbeTimeout frees the probe slot of an instance whose probe never
	// reported back. Default 30s.
	ProbeTimeout time.Duration

	// Window is the breaker's sliding time window over the calls started in
	// it. Default 10s, kept in ten buckets.
	Window time.Duration
	// MinimumCalls is the number of judged calls (finished, or in flight
	// for longer than SlowCallDuration) in the window before rates are
	// judged. Default 20.
	MinimumCalls int
	// FailureRateThreshold opens the breaker when at least this percentage
	// of judged calls in the window failed. Default 50. Not used with
	// NoFailureRate.
	FailureRateThreshold float64
	// NoFailureRate turns the failure-rate rule off. Default false.
	NoFailureRate bool
	// SlowCallDuration makes a call slow when it takes at least this long;
	// a call still in flight counts as slow from then on. Default 2s.
	SlowCallDuration time.Duration
	// SlowCallRateThreshold opens the breaker when at least this percentage
	// of judged calls in the window were slow. Default 100. Not used with
	// NoSlowCallRate.
	SlowCallRateThreshold float64
	// NoSlowCallRate turns the slow-call rule off, and the stall rule with
	// it. Default false.
	NoSlowCallRate bool
	// MinimumStalledCalls opens the breaker when this many calls have been
	// in flight for longer than SlowCallDuration while no call started
	// after them has finished well (the service has stopped answering; the
	// callers are stuck, so the window will never hold MinimumCalls).
	// Default 2. Not used with NoStallRule.
	MinimumStalledCalls int
	// NoStallRule turns the stall rule off. Default false.
	NoStallRule bool
	// OpenDuration is how long the breaker stays open before letting trial
	// calls through. Default 10s.
	OpenDuration time.Duration
	// HalfOpenCalls is the number of trial calls let through when half-open;
	// all must succeed (and be faster than SlowCallDuration) to close the
	// breaker, one failure opens it again. Default 3.
	HalfOpenCalls int
	// MaxRequests is the most calls in flight per service; more are refused
	// at once (Envoy's max_requests). Default 1024 (Envoy's). Not used with
	// NoRequestLimit.
	MaxRequests int
	// NoRequestLimit lets any number of calls be in flight per service.
	// Default false.
	NoRequestLimit bool
	// Disabled turns the per-service breaker off (outlier ejection and
	// MaxRequests stay).
	Disabled bool
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		ConsecutiveFailures:   5,
		BaseEjectionTime:      30 * time.Second,
		MaxEjectionTime:       300 * time.Second,
		MaxEjectionPercent:    10,
		PanicThreshold:        50,
		ProbeTimeout:          30 * time.Second,
		Window:                10 * time.Second,
		MinimumCalls:          20,
		FailureRateThreshold:  50,
		SlowCallDuration:      2 * time.Second,
		SlowCallRateThreshold: 100,
		MinimumStalledCalls:   2,
		OpenDuration:          10 * time.Second,
		HalfOpenCalls:         3,
		MaxRequests:           1024,
	}
}

// Validate says what is wrong with c, each bad field as a
// *fielderr.Error (zero fields are fine: they take the defaults). New,
// SetConfig and Configure call it.
func (c Config) Validate() error {
	var errs []error
	if c.ConsecutiveFailures < 0 {
		errs = append(errs, fielderr.New("ConsecutiveFailures", "%d: must not be negative (NoEjection turns ejection off)", c.ConsecutiveFailures))
	}
	if c.MaxRequests < 0 {
		errs = append(errs, fielderr.New("MaxRequests", "%d: must not be negative (NoRequestLimit lifts the limit)", c.MaxRequests))
	}
	for _, p := range []struct {
		name, off string
		v         float64
	}{
		{"PanicThreshold", "NoPanic", c.PanicThreshold},
		{"FailureRateThreshold", "NoFailureRate", c.FailureRateThreshold},
		{"SlowCallRateThreshold", "NoSlowCallRate", c.SlowCallRateThreshold},
	} {
		if p.v < 0 || p.v > 100 {
			errs = append(errs, fielderr.New(p.name, "%g: a percentage from 0 to 100 (%s turns the rule off)", p.v, p.off))
		}
	}
	if c.MinimumStalledCalls < 0 {
		errs = append(errs, fielderr.New("MinimumStalledCalls", "%d: must not be negative (NoStallRule turns the rule off)", c.MinimumStalledCalls))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("breaker: %w", err)
	}
	return nil
}

// withDefaults gives zero fields DefaultConfig's values.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.ConsecutiveFailures == 0 {
		c.ConsecutiveFailures = d.ConsecutiveFailures
	}
	if c.BaseEjectionTime <= 0 {
		c.BaseEjectionTime = d.BaseEjectionTime
	}
	if c.MaxEjectionTime <= 0 {
		c.MaxEjectionTime = d.MaxEjectionTime
	}
	if c.MaxEjectionTime < c.BaseEjectionTime {
		c.MaxEjectionTime = c.BaseEjectionTime
	}
	if c.MaxEjectionPercent <= 0 {
		c.MaxEjectionPercent = d.MaxEjectionPercent
	}
	if c.MaxEjectionPercent > 100 {
		c.MaxEjectionPercent = 100
	}
	if c.PanicThreshold == 0 {
		c.PanicThreshold = d.PanicThreshold
	}
	if c.ProbeTimeout <= 0 {
		c.ProbeTimeout = d.ProbeTimeout
	}
	if c.Window <= 0 {
		c.Window = d.Window
	}
	if c.MinimumCalls <= 0 {
		c.MinimumCalls = d.MinimumCalls
	}
	if c.FailureRateThreshold == 0 {
		c.FailureRateThreshold = d.FailureRateThreshold
	}
	if c.SlowCallDuration <= 0 {
		c.SlowCallDuration = d.SlowCallDuration
	}
	if c.SlowCallRateThreshold == 0 {
		c.SlowCallRateThreshold = d.SlowCallRateThreshold
	}
	if c.MinimumStalledCalls == 0 {
		c.MinimumStalledCalls = d.MinimumStalledCalls
	}
	if c.OpenDuration <= 0 {
		c.OpenDuration = d.OpenDuration
	}
	if c.HalfOpenCalls <= 0 {
		c.HalfOpenCalls = d.HalfOpenCalls
	}
	if c.MaxRequests == 0 {
		c.MaxRequests = d.MaxRequests
	}
	return c
}

// Breaker states, and the State of an OpenError when the limit of calls in
// flight refused the call.
const (
	Closed      = "closed"
	Open        = "open"
	HalfOpen    = "half-open"
	MaxRequests = "max-requests"
)

// OpenError is returned by Service.Allow when the call is refused: the
// breaker is open (or half-open with its trial calls handed out), or the
// service has MaxRequests calls in flight.
type OpenError struct {
	Service    string
	State      string // Open, HalfOpen or MaxRequests
	RetryAfter time.Duration
}

func (e *OpenError) Error() string {
	if e.State == MaxRequests {
		return fmt.Sprintf("breaker: service %q has too many calls in flight", e.Service)
	}
	return fmt.Sprintf("breaker: service %q is %s, retry after %s", e.Service, e.State, e.RetryAfter.Round(time.Second))
}

// ErrOpen matches every *OpenError with errors.Is.
var ErrOpen = errors.New("breaker: open")

// Is makes errors.Is(err, ErrOpen) true.
func (e *OpenError) Is(target error) bool { return target == ErrOpen }

// departedRetention is how long the metric series of an instance that left
// the view are kept, so that one coming back continues its counters.
const departedRetention = 10 * time.Minute

// Registry holds the state of every service and instance the proxy has
// called. It is safe for concurrent use.
type Registry struct {
	cfg    atomic.Pointer[Config] // replaced whole by SetConfig; the services read it per call
	log    hclog.Logger
	now    func() time.Time
	mu     sync.RWMutex
	svcs   map[string]*Service
	met    *metrics
	bucket time.Duration
}

type metrics struct {
	state      *prometheus.GaugeVec
	panic      *prometheus.GaugeVec
	ejected    *prometheus.GaugeVec
	ejections  *prometheus.CounterVec
	rejections *prometheus.CounterVec
	overflow   *prometheus.CounterVec
	trans      *prometheus.CounterVec
}

// New returns a Registry. logger may be nil; reg may be nil (no metrics).
func New(cfg Config, logger hclog.Logger, reg prometheus.Registerer) (*Registry, error) {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	r := &Registry{
		log:  logger.Named("breaker"),
		now:  time.Now,
		svcs: map[string]*Service{},
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	r.cfg.Store(&cfg)
	r.bucket = cfg.Window / numBuckets
	if r.bucket <= 0 {
		r.bucket = time.Millisecond
	}
	m := &metrics{
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "breaker", Name: "state",
			Help: "Breaker state per service: 0 closed, 1 open, 2 half-open."}, []string{"service"}),
		panic: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "breaker", Name: "panic",
			Help: "1 while too few of the service's instances are healthy and all of them get requests (panic threshold)."}, []string{"service"}),
		ejected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "breaker", Name: "instance_ejected",
			Help: "1 while the instance is ejected by outlier detection."}, []string{"service", "instance"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "ejections_total",
			Help: "Outlier ejections per instance."}, []string{"service", "instance"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "rejected_total",
			Help: "Calls refused because the service's breaker was open."}, []string{"service"}),
		overflow: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "max_requests_rejected_total",
			Help: "Calls refused because the service had MaxRequests calls in flight."}, []string{"service"}),
		trans: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "transitions_total",
			Help: "Breaker state transitions per service and new state."}, []string{"service", "to"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.state, m.panic, m.ejected, m.ejections, m.rejections, m.overflow, m.trans} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("breaker: register metrics: %w", err)
			}
		}
	}
	r.met = m
	return r, nil
}

// Config returns the effective configuration (defaults applied).
func (r *Registry) Config() Config { return *r.cfg.Load() }

// SetConfig replaces the registry's settings (a reload): calls, instances
// and services carry on with their state and follow the new thresholds
// from their next call or report. The window cannot change (its buckets
// are sized by it): a new Window is an error and nothing changes. Route
// breakers (Custom) keep their own settings.
func (r *Registry) SetConfig(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	if cur := r.cfg.Load(); cfg.Window != cur.Window {
		return fmt.Errorf("breaker: the window (%v) cannot change without a restart", cur.Window)
	}
	r.cfg.Store(&cfg)
	return nil
}

// Run looks at every service four times per window bucket until ctx ends,
// so that calls in flight for longer than SlowCallDuration and the end of
// an open period change the state when they happen, not at the next call.
func (r *Registry) Run(ctx context.Context) error {
	tick := time.NewTicker(max(r.bucket/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			for _, s := range r.services() {
				s.check(r.now(), true)
			}
		}
	}
}

func (r *Registry) services() []*Service {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*Service, 0, len(r.svcs))
	for _, s := range r.svcs {
		out = append(out, s)
	}
	return out
}

// Service returns the state of the named service (case-insensitive),
// creating it on first use. Callers keep the pointer: it never changes.
func (r *Registry) Service(name string) *Service {
	key := strings.ToLower(name)
	r.mu.RLock()
	s := r.svcs[key]
	r.mu.RUnlock()
	if s != nil {
		return s
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if s = r.svcs[key]; s != nil {
		return s
	}
	s = r.newService(key, &r.cfg, r.bucket)
	r.svcs[key] = s
	return s
}

func (r *Registry) newService(key string, cfg *atomic.Pointer[Config], bucket time.Duration) *Service {
	s := &Service{r: r, name: key, cfg: cfg, bucket: bucket, insts: map[string]*Instance{}, gone: map[string]time.Time{},
		rejected: r.met.rejections.WithLabelValues(key),
		overflow: r.met.overflow.WithLabelValues(key)}
	s.lastGood.Store(r.now().UnixNano())
	r.met.state.WithLabelValues(key).Set(0)
	r.met.panic.WithLabelValues(key).Set(0)
	return s
}

// Configure gives the named service settings of its own (zero fields take
// DefaultConfig's; start from Config() to keep the registry's), for all of
// it: outlier ejection, panic, the breaker and MaxRequests. It must come
// before the service's first use (Service): a service already in use keeps
// the settings it has, and Configure says so. A reload (SetConfig) leaves
// these settings alone: they are the service's own.
func (r *Registry) Configure(name string, cfg Config) error {
	key := strings.ToLower(name)
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("breaker settings of %s: %w", name, err)
	}
	cfg = cfg.withDefaults()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.svcs[key] != nil {
		return fmt.Errorf("breaker settings of %s: the service is in use already", name)
	}
	bucket := cfg.Window / numBuckets
	if bucket <= 0 {
		bucket = time.Millisecond
	}
	own := new(atomic.Pointer[Config]) // its own: a reload's SetConfig leaves it alone
	own.Store(&cfg)
	r.svcs[key] = r.newService(key, own, bucket)
	return nil
}

// Custom returns a breaker of its own under name (case-insensitive), with
// cfg (zero fields take DefaultConfig's; start from Config() to keep the
// registry's): a gateway route's breaker for calls to service. The same
// name, service and cfg give the same Service (its state carries on); a new
// cfg replaces it with a fresh one. Only its breaker and MaxRequests are
// used: the proxy keeps judging instances (ejection, panic) by the
// service's own state. It follows the service's view as the service's own
// breaker does: when the service's Sync sees instances again after none,
// both close. Run looks at it at the registry's pace; Drop removes it.
func (r *Registry) Custom(name, service string, cfg Config) *Service {
	key, follows := strings.ToLower(name), strings.ToLower(service)
	cfg = cfg.withDefaults()
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.svcs[key]; s != nil && *s.cfg.Load() == cfg && s.follows == follows {
		return s
	} else if s != nil {
		r.forgetLocked(s)
	}
	bucket := cfg.Window / numBuckets
	if bucket <= 0 {
		bucket = time.Millisecond
	}
	own := new(atomic.Pointer[Config])
	own.Store(&cfg)
	s := r.newService(key, own, bucket)
	s.follows = follows
	r.svcs[key] = s
	return s
}

// followers are the breakers made by Custom for calls to service.
func (r *Registry) followers(service string) []*Service {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []*Service
	for _, s := range r.svcs {
		if s.follows == service && s.follows != "" {
			out = append(out, s)
		}
	}
	return out
}

// Drop forgets the named breaker (made by Custom) and its metric series. A
// Service still held by a caller keeps working, unseen.
func (r *Registry) Drop(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.svcs[strings.ToLower(name)]; s != nil {
		r.forgetLocked(s)
	}
}

func (r *Registry) forgetLocked(s *Service) {
	delete(r.svcs, s.name)
	for _, v := range []interface{ DeleteLabelValues(...string) bool }{r.met.state, r.met.panic, r.met.rejections, r.met.overflow} {
		v.DeleteLabelValues(s.name)
	}
	for _, to := range []string{Closed, Open, HalfOpen} {
		r.met.trans.DeleteLabelValues(s.name, to)
	}
}

func (r *Registry) lookup(service string) *Service {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.svcs[strings.ToLower(service)]
}

// Ejected reports whether the proxy leaves the instance out now: outlier
// detection has it ejected (or its probe is in flight) and the service is
// not in panic. An instance whose ejection time is over, waiting for its
// probe, is not ejected. Unknown services and instances are not ejected.
// DNS uses this to leave ejected instances out of its answers, so that its
// answers follow the proxy's rule.
func (r *Registry) Ejected(service, instanceID string) bool {
	s := r.lookup(service)
	if s == nil || s.panic.Load() {
		return false
	}
	s.mu.Lock()
	in := s.insts[instanceID]
	s.mu.Unlock()
	return in != nil && in.Status() == Ejected
}

// BreakerOpen reports whether the service's breaker refuses calls now.
func (r *Registry) BreakerOpen(service string) bool {
	s := r.lookup(service)
	return s != nil && s.state.Load() == stOpen
}

// ---------------------------------------------------------------- state

// ServiceState is one service's breaker and the outlier state of its
// instances, as State reads them (the admin API renders it as JSON).
type ServiceState struct {
	Service    string
	State      string
	Panic      bool
	OpenUntil  *time.Time // while open
	Reason     string     // why it last opened
	InFlight   int
	Calls      int // started in the window
	Failures   int
	SlowCalls  int // finished slow, or in flight longer than SlowCallDuration
	Instances  []InstanceState
	TrialsLeft int // while half-open
}

// InstanceState is one instance's outlier state.
type InstanceState struct {
	ID                  string
	Ejected             bool // left out now (as DNS leaves it out)
	EjectedUntil        *time.Time
	ProbeReady          bool // ejection over; the next request is its probe
	Probing             bool
	Failing             bool // would be ejected but for MaxEjectionPercent
	ConsecutiveFailures int
	TimesEjected        int // since it last joined the view
}

// State returns every service's state, sorted by name.
func (r *Registry) State() []ServiceState {
	svcs := r.services()
	sort.Slice(svcs, func(i, j int) bool { return svcs[i].name < svcs[j].name })
	now := r.now()
	out := make([]ServiceState, 0, len(svcs))
	for _, s := range svcs {
		s.check(now, true)
		s.mu.Lock()
		st := ServiceState{Service: s.name, State: stateName(s.state.Load()), Panic: s.panic.Load(),
			InFlight: int(s.inflight.Load()), Reason: s.reason, Instances: []InstanceState{}}
		w := s.totals(now)
		st.Calls, st.Failures, st.SlowCalls = w.calls, w.fails, w.slow
		if s.state.Load() == stOpen {
			t := time.Unix(0, s.openUntil.Load()).UTC()
			st.OpenUntil = &t
		}
		if s.state.Load() == stHalfOpen {
			st.TrialsLeft = s.cfg.Load().HalfOpenCalls - s.handed
		}
		for id, in := range s.insts {
			status := in.Status()
			is := InstanceState{ID: id, ConsecutiveFailures: int(in.consecutive.Load()), TimesEjected: int(in.total.Load()),
				Failing: in.failing.Load()}
			if u := in.until.Load(); u != 0 {
				is.Ejected = status == Ejected && !st.Panic
				is.ProbeReady = status == ProbeReady
				t := time.Unix(0, u).UTC()
				is.EjectedUntil = &t
				is.Probing = in.probing.Load() != 0
			}
			st.Instances = append(st.Instances, is)
		}
		s.mu.Unlock()
		sort.Slice(st.Instances, func(i, j int) bool { return st.Instances[i].ID < st.Instances[j].ID })
		out = append(out, st)
	}
	return out
}
