// Package breaker owns the sidecar's failure state: per-instance outlier
// detection (consecutive failures eject an instance for a while, then one
// probe request decides whether it comes back) and per-service circuit
// breakers over a sliding time window (closed, open, half-open). The proxy
// reports every outcome here and asks before each call; DNS asks Ejected to
// leave ejected instances out of its answers; the admin endpoint serves
// State. Nothing here talks to the network.
package breaker

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
)

// Config holds the outlier and breaker settings. Zero fields take the
// defaults documented on each field (see DefaultConfig).
type Config struct {
	// ConsecutiveFailures ejects an instance after this many failed calls in
	// a row (connect error, reset, timeout, 5xx). Default 5, as Envoy's
	// consecutive_5xx. A negative value disables outlier ejection.
	ConsecutiveFailures int
	// BaseEjectionTime is multiplied by the number of times the instance has
	// been ejected. Default 30s.
	BaseEjectionTime time.Duration
	// MaxEjectionTime caps one ejection. Default 300s (Envoy's default).
	MaxEjectionTime time.Duration
	// MaxEjectionPercent is the largest share of a service's instances that
	// may be ejected at once; at least one instance may always be ejected.
	// Default 10 (Envoy's default).
	MaxEjectionPercent int
	// ProbeTimeout frees the probe slot of an instance whose probe never
	// reported back. Default 30s.
	ProbeTimeout time.Duration

	// Window is the breaker's sliding time window. Default 10s, kept in ten
	// buckets.
	Window time.Duration
	// MinimumCalls is the number of calls in the window before rates are
	// judged. Default 20.
	MinimumCalls int
	// FailureRateThreshold opens the breaker when at least this percentage
	// of calls in the window failed. Default 50. Negative disables.
	FailureRateThreshold float64
	// SlowCallDuration makes a call slow when it takes at least this long.
	// Default 2s.
	SlowCallDuration time.Duration
	// SlowCallRateThreshold opens the breaker when at least this percentage
	// of calls in the window were slow. Default 100. Negative disables.
	SlowCallRateThreshold float64
	// OpenDuration is how long the breaker stays open before letting trial
	// calls through. Default 10s.
	OpenDuration time.Duration
	// HalfOpenCalls is the number of trial calls let through when half-open;
	// all must succeed to close the breaker, one failure opens it again.
	// Default 3.
	HalfOpenCalls int
	// Disabled turns the per-service breaker off (outlier ejection stays).
	Disabled bool
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		ConsecutiveFailures:   5,
		BaseEjectionTime:      30 * time.Second,
		MaxEjectionTime:       300 * time.Second,
		MaxEjectionPercent:    10,
		ProbeTimeout:          30 * time.Second,
		Window:                10 * time.Second,
		MinimumCalls:          20,
		FailureRateThreshold:  50,
		SlowCallDuration:      2 * time.Second,
		SlowCallRateThreshold: 100,
		OpenDuration:          10 * time.Second,
		HalfOpenCalls:         3,
	}
}

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
	if c.OpenDuration <= 0 {
		c.OpenDuration = d.OpenDuration
	}
	if c.HalfOpenCalls <= 0 {
		c.HalfOpenCalls = d.HalfOpenCalls
	}
	return c
}

// Breaker states.
const (
	Closed   = "closed"
	Open     = "open"
	HalfOpen = "half-open"
)

const (
	stClosed int32 = iota
	stOpen
	stHalfOpen
)

func stateName(s int32) string {
	switch s {
	case stOpen:
		return Open
	case stHalfOpen:
		return HalfOpen
	default:
		return Closed
	}
}

// OpenError is returned by Service.Allow when the breaker refuses the call.
type OpenError struct {
	Service    string
	State      string
	RetryAfter time.Duration
}

func (e *OpenError) Error() string {
	return fmt.Sprintf("breaker: service %q is %s, retry after %s", e.Service, e.State, e.RetryAfter.Round(time.Second))
}

// ErrOpen matches every *OpenError with errors.Is.
var ErrOpen = errors.New("breaker: open")

// Is makes errors.Is(err, ErrOpen) true.
func (e *OpenError) Is(target error) bool { return target == ErrOpen }

// Registry holds the state of every service and instance the proxy has
// called. It is safe for concurrent use.
type Registry struct {
	cfg    Config
	log    hclog.Logger
	now    func() time.Time
	mu     sync.RWMutex
	svcs   map[string]*Service
	met    *metrics
	bucket time.Duration
}

type metrics struct {
	state      *prometheus.GaugeVec
	ejected    *prometheus.GaugeVec
	ejections  *prometheus.CounterVec
	rejections *prometheus.CounterVec
	trans      *prometheus.CounterVec
}

// New returns a Registry. logger may be nil; reg may be nil (no metrics).
func New(cfg Config, logger hclog.Logger, reg prometheus.Registerer) (*Registry, error) {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	r := &Registry{
		cfg:  cfg.withDefaults(),
		log:  logger.Named("breaker"),
		now:  time.Now,
		svcs: map[string]*Service{},
	}
	r.bucket = r.cfg.Window / numBuckets
	if r.bucket <= 0 {
		r.bucket = time.Millisecond
	}
	m := &metrics{
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "breaker", Name: "state",
			Help: "Breaker state per service: 0 closed, 1 open, 2 half-open."}, []string{"service"}),
		ejected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "breaker", Name: "instance_ejected",
			Help: "1 while the instance is ejected by outlier detection."}, []string{"service", "instance"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "ejections_total",
			Help: "Outlier ejections per instance."}, []string{"service", "instance"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "rejected_total",
			Help: "Calls refused because the service's breaker was open."}, []string{"service"}),
		trans: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "breaker", Name: "transitions_total",
			Help: "Breaker state transitions per service and new state."}, []string{"service", "to"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.state, m.ejected, m.ejections, m.rejections, m.trans} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("breaker: register metrics: %w", err)
			}
		}
	}
	r.met = m
	return r, nil
}

// Config returns the effective configuration (defaults applied).
func (r *Registry) Config() Config { return r.cfg }

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
	s = &Service{r: r, name: key, insts: map[string]*Instance{},
		rejected: r.met.rejections.WithLabelValues(key)}
	r.met.state.WithLabelValues(key).Set(0)
	r.svcs[key] = s
	return s
}

func (r *Registry) lookup(service string) *Service {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.svcs[strings.ToLower(service)]
}

// Ejected reports whether outlier detection has the instance ejected now.
// Unknown services and instances are not ejected. DNS uses this to leave
// ejected instances out of its answers.
func (r *Registry) Ejected(service, instanceID string) bool {
	s := r.lookup(service)
	if s == nil {
		return false
	}
	s.mu.Lock()
	in := s.insts[instanceID]
	s.mu.Unlock()
	return in != nil && in.Ejected()
}

// BreakerOpen reports whether the service's breaker refuses calls now.
func (r *Registry) BreakerOpen(service string) bool {
	s := r.lookup(service)
	return s != nil && s.state.Load() == stOpen
}

// ---------------------------------------------------------------- service

// Service is one service's breaker and the outlier state of its instances.
type Service struct {
	r        *Registry
	name     string
	rejected prometheus.Counter

	state     atomic.Int32
	openUntil atomic.Int64 // unix nanos, while open

	mu       sync.Mutex // guards everything below
	buckets  [numBuckets]bucket
	trials   int // trial calls handed out while half-open
	trialsOK int
	opened   time.Time
	insts    map[string]*Instance
}

const numBuckets = 10

// bucket counts the calls of one slice of the window. Counters are atomic so
// that a successful call in the closed state never takes the lock.
type bucket struct {
	start atomic.Int64 // bucket start, unix nanos / bucket length
	calls atomic.Int64
	fails atomic.Int64
	slow  atomic.Int64
}

// Name returns the lower-cased service name.
func (s *Service) Name() string { return s.name }

// Call is a permission to make one call, returned by Allow; hand it back to
// Done with the outcome.
type Call struct {
	trial bool
}

// Allow asks the breaker for one call. It returns an *OpenError when the
// breaker is open, or half-open with all trial calls already handed out.
func (s *Service) Allow() (Call, error) {
	if s.r.cfg.Disabled {
		return Call{}, nil
	}
	switch s.state.Load() {
	case stClosed:
		return Call{}, nil
	case stOpen:
		now := s.r.now()
		until := s.openUntil.Load()
		if now.UnixNano() < until {
			s.rejected.Inc()
			return Call{}, &OpenError{Service: s.name, State: Open, RetryAfter: time.Duration(until - now.UnixNano())}
		}
		s.mu.Lock()
		if s.state.Load() == stOpen {
			s.transition(stHalfOpen, "open duration over")
			s.trials, s.trialsOK = 0, 0
		}
		s.mu.Unlock()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.state.Load() {
	case stClosed:
		return Call{}, nil
	case stHalfOpen:
		if s.trials < s.r.cfg.HalfOpenCalls {
			s.trials++
			return Call{trial: true}, nil
		}
		s.rejected.Inc()
		return Call{}, &OpenError{Service: s.name, State: HalfOpen, RetryAfter: time.Second}
	default:
		s.rejected.Inc()
		return Call{}, &OpenError{Service: s.name, State: Open,
			RetryAfter: time.Duration(s.openUntil.Load() - s.r.now().UnixNano())}
	}
}

// Done records the outcome of a call granted by Allow: failed is the
// caller's final verdict, d how long the call took.
func (s *Service) Done(c Call, failed bool, d time.Duration) {
	if s.r.cfg.Disabled {
		return
	}
	cfg := &s.r.cfg
	slow := d >= cfg.SlowCallDuration
	now := s.r.now()
	if !c.trial && !failed && !slow {
		// The common case: counted without the lock. A good call can never
		// open the breaker.
		if s.state.Load() == stClosed {
			s.bucketAt(now).calls.Add(1)
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state.Load()
	if c.trial {
		if st != stHalfOpen {
			return
		}
		if failed || slow {
			s.open(now, "trial call failed")
			return
		}
		s.trialsOK++
		if s.trialsOK >= cfg.HalfOpenCalls {
			s.resetBuckets()
			s.transition(stClosed, "trial calls succeeded")
		}
		return
	}
	if st != stClosed {
		return
	}
	b := s.bucketAt(now)
	b.calls.Add(1)
	if failed {
		b.fails.Add(1)
	}
	if slow {
		b.slow.Add(1)
	}
	calls, fails, slows := s.totals(now)
	if calls < cfg.MinimumCalls {
		return
	}
	if cfg.FailureRateThreshold > 0 && float64(fails)*100 >= cfg.FailureRateThreshold*float64(calls) {
		s.open(now, fmt.Sprintf("failure rate %.0f%% of %d calls", float64(fails)*100/float64(calls), calls))
		return
	}
	if cfg.SlowCallRateThreshold > 0 && float64(slows)*100 >= cfg.SlowCallRateThreshold*float64(calls) {
		s.open(now, fmt.Sprintf("slow-call rate %.0f%% of %d calls", float64(slows)*100/float64(calls), calls))
	}
}

// bucketAt returns the bucket for now, resetting it when it is stale. The
// one caller that wins the swap of start resets the counters; a call counted
// in the instant between may be lost, which a breaker can afford.
func (s *Service) bucketAt(now time.Time) *bucket {
	slot := now.UnixNano() / int64(s.r.bucket)
	b := &s.buckets[slot%numBuckets]
	if old := b.start.Load(); old != slot && b.start.CompareAndSwap(old, slot) {
		b.calls.Store(0)
		b.fails.Store(0)
		b.slow.Store(0)
	}
	return b
}

// resetBuckets empties the window.
func (s *Service) resetBuckets() {
	for i := range s.buckets {
		b := &s.buckets[i]
		b.start.Store(0)
		b.calls.Store(0)
		b.fails.Store(0)
		b.slow.Store(0)
	}
}

// totals sums the buckets inside the window.
func (s *Service) totals(now time.Time) (calls, fails, slow int) {
	slot := now.UnixNano() / int64(s.r.bucket)
	for i := range s.buckets {
		b := &s.buckets[i]
		if slot-b.start.Load() < numBuckets {
			calls += int(b.calls.Load())
			fails += int(b.fails.Load())
			slow += int(b.slow.Load())
		}
	}
	return
}

// open moves to open. s.mu must be held.
func (s *Service) open(now time.Time, why string) {
	s.openUntil.Store(now.Add(s.r.cfg.OpenDuration).UnixNano())
	s.opened = now
	s.resetBuckets()
	s.transition(stOpen, why)
}

// transition logs and counts a state change once. s.mu must be held.
func (s *Service) transition(to int32, why string) {
	from := s.state.Swap(to)
	if from == to {
		return
	}
	s.r.met.state.WithLabelValues(s.name).Set(float64(to))
	s.r.met.trans.WithLabelValues(s.name, stateName(to)).Inc()
	s.r.log.Info("breaker state changed", "service", s.name, "from", stateName(from), "to", stateName(to), "reason", why)
}

// State returns the breaker's state name.
func (s *Service) State() string { return stateName(s.state.Load()) }

// ---------------------------------------------------------------- instances

// Instance returns the outlier state of one instance of the service,
// creating it on first use.
func (s *Service) Instance(id string) *Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.insts[id]
	if in == nil {
		in = &Instance{svc: s, id: id,
			ejectedG:  s.r.met.ejected.WithLabelValues(s.name, id),
			ejections: s.r.met.ejections.WithLabelValues(s.name, id)}
		in.ejectedG.Set(0)
		s.insts[id] = in
	}
	return in
}

// Sync drops the state of instances no longer in the catalog, so that the
// ejection share is computed over the live set.
func (s *Service) Sync(ids []string) {
	keep := make(map[string]bool, len(ids))
	for _, id := range ids {
		keep[id] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, in := range s.insts {
		if !keep[id] {
			delete(s.insts, id)
			s.r.met.ejected.DeleteLabelValues(s.name, id)
			s.r.met.ejections.DeleteLabelValues(s.name, id)
			_ = in
		}
	}
}

// Instance is the outlier-detection state of one service instance.
type Instance struct {
	svc       *Service
	id        string
	ejectedG  prometheus.Gauge
	ejections prometheus.Counter

	consecutive atomic.Int32
	until       atomic.Int64 // ejected until (unix nanos); 0 when not ejected
	probing     atomic.Int64 // unix nanos when the probe slot was taken; 0 when free
	times       atomic.Int32 // how many times ejected (decides the ejection time)
	total       atomic.Int64 // ejections ever
	returned    atomic.Int64 // unix nanos when a probe last brought it back
}

// Availability of an instance for a new request.
const (
	Available  = iota // not ejected
	Ejected           // ejected, or its probe is in flight
	ProbeReady        // ejection time over: the next request is its probe
)

// Status tells whether the instance can take a request now.
func (in *Instance) Status() int {
	until := in.until.Load()
	if until == 0 {
		return Available
	}
	now := in.svc.r.now().UnixNano()
	if now < until {
		return Ejected
	}
	p := in.probing.Load()
	if p != 0 && now-p < int64(in.svc.r.cfg.ProbeTimeout) {
		return Ejected
	}
	return ProbeReady
}

// Ejected reports whether the instance must not get requests now (ejected,
// or its probe is in flight).
func (in *Instance) Ejected() bool { return in.Status() == Ejected }

// TryProbe claims the probe slot of an instance whose ejection time is over.
// Only one caller wins; the outcome it reports decides.
func (in *Instance) TryProbe() bool {
	if in.Status() != ProbeReady {
		return false
	}
	p := in.probing.Load()
	return in.probing.CompareAndSwap(p, in.svc.r.now().UnixNano())
}

// Report records the outcome of one call to the instance.
func (in *Instance) Report(failed bool) {
	cfg := &in.svc.r.cfg
	if !failed {
		if in.consecutive.Load() != 0 {
			in.consecutive.Store(0)
		}
		if in.until.Load() != 0 && in.probing.Load() != 0 {
			in.svc.mu.Lock()
			if in.until.Load() != 0 {
				in.until.Store(0)
				in.probing.Store(0)
				in.returned.Store(in.svc.r.now().UnixNano())
				in.ejectedG.Set(0)
				in.svc.r.log.Info("instance returned after probe", "service", in.svc.name, "instance", in.id)
			}
			in.svc.mu.Unlock()
		}
		return
	}
	if cfg.ConsecutiveFailures < 0 {
		return
	}
	if in.until.Load() != 0 {
		// A failed probe (or a call that was already under way when the
		// instance was ejected) ejects it again for longer.
		if in.probing.Load() != 0 {
			in.svc.mu.Lock()
			in.eject("probe failed")
			in.svc.mu.Unlock()
		}
		return
	}
	if int(in.consecutive.Add(1)) < cfg.ConsecutiveFailures {
		return
	}
	in.svc.mu.Lock()
	defer in.svc.mu.Unlock()
	if in.until.Load() != 0 {
		return
	}
	// Envoy: never eject more than max_ejection_percent, but at least one.
	ejected := 0
	for _, o := range in.svc.insts {
		if o.until.Load() != 0 {
			ejected++
		}
	}
	limit := int(math.Floor(float64(len(in.svc.insts)) * float64(cfg.MaxEjectionPercent) / 100))
	if limit < 1 {
		limit = 1
	}
	if ejected >= limit {
		in.consecutive.Store(0)
		return
	}
	in.eject(fmt.Sprintf("%d consecutive failures", cfg.ConsecutiveFailures))
}

// eject ejects the instance for base × times ejected. svc.mu must be held.
func (in *Instance) eject(why string) {
	cfg := &in.svc.r.cfg
	now := in.svc.r.now()
	// An instance that stayed healthy for MaxEjectionTime since it last
	// came back starts again from the base ejection time.
	if back := in.returned.Load(); back != 0 && now.UnixNano()-back >= int64(cfg.MaxEjectionTime) {
		in.times.Store(0)
	}
	n := in.times.Add(1)
	d := time.Duration(n) * cfg.BaseEjectionTime
	if d > cfg.MaxEjectionTime || d <= 0 {
		d = cfg.MaxEjectionTime
	}
	in.until.Store(now.Add(d).UnixNano())
	in.probing.Store(0)
	in.consecutive.Store(0)
	in.total.Add(1)
	in.ejections.Inc()
	in.ejectedG.Set(1)
	in.svc.r.log.Warn("instance ejected", "service", in.svc.name, "instance", in.id, "for", d, "reason", why)
}

// ---------------------------------------------------------------- state

// ServiceState is the JSON form of one service for /v1/breakers.
type ServiceState struct {
	Service    string          `json:"service"`
	State      string          `json:"state"`
	OpenUntil  *time.Time      `json:"open_until,omitempty"`
	Calls      int             `json:"window_calls"`
	Failures   int             `json:"window_failures"`
	SlowCalls  int             `json:"window_slow_calls"`
	Instances  []InstanceState `json:"instances"`
	TrialsLeft int             `json:"trials_left,omitempty"`
}

// InstanceState is the JSON form of one instance's outlier state.
type InstanceState struct {
	ID                  string     `json:"id"`
	Ejected             bool       `json:"ejected"`
	EjectedUntil        *time.Time `json:"ejected_until,omitempty"`
	Probing             bool       `json:"probing,omitempty"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
	TimesEjected        int        `json:"times_ejected"`
}

// State returns every service's state, sorted by name, ready to marshal.
func (r *Registry) State() []ServiceState {
	r.mu.RLock()
	svcs := make([]*Service, 0, len(r.svcs))
	for _, s := range r.svcs {
		svcs = append(svcs, s)
	}
	r.mu.RUnlock()
	sort.Slice(svcs, func(i, j int) bool { return svcs[i].name < svcs[j].name })
	now := r.now()
	out := make([]ServiceState, 0, len(svcs))
	for _, s := range svcs {
		s.mu.Lock()
		st := ServiceState{Service: s.name, State: stateName(s.state.Load()), Instances: []InstanceState{}}
		st.Calls, st.Failures, st.SlowCalls = s.totals(now)
		if s.state.Load() == stOpen {
			t := time.Unix(0, s.openUntil.Load()).UTC()
			st.OpenUntil = &t
		}
		if s.state.Load() == stHalfOpen {
			st.TrialsLeft = r.cfg.HalfOpenCalls - s.trials
		}
		for id, in := range s.insts {
			is := InstanceState{ID: id, ConsecutiveFailures: int(in.consecutive.Load()), TimesEjected: int(in.total.Load())}
			if u := in.until.Load(); u != 0 {
				is.Ejected = in.Status() != Available
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

// Handler serves State as JSON (GET /v1/breakers).
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "breaker: method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(map[string]any{"services": r.State()})
	})
}
