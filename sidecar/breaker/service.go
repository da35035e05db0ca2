package breaker

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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

const numBuckets = 10

// Service is one service's breaker, its calls in flight and the outlier
// state of its instances.
type Service struct {
	r        *Registry
	name     string
	cfg      *atomic.Pointer[Config] // the registry's (a reload may replace it: Registry.SetConfig), or a route's own (Registry.Custom)
	follows  string                  // Registry.Custom: the service whose view it follows
	bucket   time.Duration           // cfg.Window / numBuckets
	rejected prometheus.Counter
	overflow prometheus.Counter

	state     atomic.Int32
	epoch     atomic.Uint32 // changes with every transition
	openUntil atomic.Int64  // unix nanos, while open
	inflight  atomic.Int64  // calls allowed and not yet done
	nextCheck atomic.Int64  // unix nanos: the next look at calls in flight
	lastGood  atomic.Int64  // unix nanos: when a call last finished well (roughly)
	panic     atomic.Bool

	mu       sync.Mutex // guards everything below and transitions
	buckets  [numBuckets]bucket
	trials   []trial // trial calls handed out while half-open
	handed   int     // of those, not given back
	trialsOK int
	reason   string
	insts    map[string]*Instance // the instances in the view
	gone     map[string]time.Time // instances that left the view: when (their metric series are kept a while)
	view     int                  // instances in the view at the last Sync
}

// bucket counts the calls started in one slice of the window. Counters are
// atomic so that a successful call in the closed state never takes the
// lock.
type bucket struct {
	key      atomic.Int64 // bucketKey of its slice of time and the epoch
	calls    atomic.Int64 // started
	inflight atomic.Int64 // started and not done
	fails    atomic.Int64 // done and failed
	slow     atomic.Int64 // done and slow
}

type trial struct {
	start int64 // unix nanos
	done  bool
}

// Name returns the lower-cased service name.
func (s *Service) Name() string { return s.name }

// Config returns the service's effective configuration.
func (s *Service) Config() Config { return *s.cfg.Load() }

// Call is a permission to make one call, returned by Allow; hand it back to
// Done (or Cancel) exactly once.
type Call struct {
	start int64 // unix nanos
	key   int64 // the window bucket it was counted in (bucketKey)
	epoch uint32
	trial int // 1 + index in trials while half-open; 0: not a trial
	ok    bool
}

// Trial reports whether the call is one of a half-open breaker's trial
// calls.
func (c Call) Trial() bool { return c.trial > 0 }

// Allow asks for one call starting at now. It returns an *OpenError when
// the breaker is open (or half-open with every trial call handed out) or
// the service has MaxRequests calls in flight.
func (s *Service) Allow(now time.Time) (Call, error) {
	cfg := s.cfg.Load()
	if n := s.inflight.Add(1); !cfg.NoRequestLimit && n > int64(cfg.MaxRequests) {
		s.inflight.Add(-1)
		s.overflow.Inc()
		return Call{}, &OpenError{Service: s.name, State: MaxRequests, RetryAfter: time.Second}
	}
	c := Call{start: now.UnixNano(), ok: true}
	if cfg.Disabled {
		return c, nil
	}
	s.check(now, false)
	c.epoch = s.epoch.Load()
	switch s.state.Load() {
	case stClosed:
		// Counted in a bucket of this epoch: should the breaker change
		// state meanwhile, the call is left out of the new window.
		c.key = s.count(now, c.epoch)
		return c, nil
	case stOpen:
		if until := s.openUntil.Load(); now.UnixNano() < until {
			return Call{}, s.refuse(Open, time.Duration(until-now.UnixNano()))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.halfOpenIfDue(now)
	c.epoch = s.epoch.Load()
	switch s.state.Load() {
	case stClosed:
		c.key = s.count(now, c.epoch)
		return c, nil
	case stHalfOpen:
		if s.handed < cfg.HalfOpenCalls {
			s.handed++
			s.trials = append(s.trials, trial{start: c.start})
			c.trial = len(s.trials)
			return c, nil
		}
		return Call{}, s.refuse(HalfOpen, max(cfg.SlowCallDuration, time.Second))
	default:
		return Call{}, s.refuse(Open, time.Duration(s.openUntil.Load()-now.UnixNano()))
	}
}

func (s *Service) refuse(state string, after time.Duration) error {
	s.inflight.Add(-1)
	s.rejected.Inc()
	return &OpenError{Service: s.name, State: state, RetryAfter: after}
}

// count counts a call started at now in epoch in the window and returns
// its bucket's key.
func (s *Service) count(now time.Time, epoch uint32) int64 {
	b, key := s.bucketAt(now, epoch)
	b.calls.Add(1)
	b.inflight.Add(1)
	return key
}

// bucketKey names one bucket's slice of time in one epoch, so that calls
// counted before a change of state are never mixed with those after it.
func bucketKey(slot int64, epoch uint32) int64 { return slot<<8 | int64(epoch&0xff) }

func bucketIndex(key int64) int { return int((key >> 8) % numBuckets) }

// Done records the outcome of a call granted by Allow: failed is the
// caller's final verdict, end when it ended. An outcome that arrives after
// the breaker changed state (a call from before it opened, say) only frees
// its place.
func (s *Service) Done(c Call, failed bool, end time.Time) {
	if !c.ok {
		return
	}
	s.inflight.Add(-1)
	cfg := s.cfg.Load()
	if cfg.Disabled || c.epoch != s.epoch.Load() {
		return
	}
	slow := end.UnixNano()-c.start >= int64(cfg.SlowCallDuration)
	if c.trial > 0 {
		s.mu.Lock()
		defer s.mu.Unlock()
		if c.epoch != s.epoch.Load() || s.state.Load() != stHalfOpen {
			return
		}
		s.trials[c.trial-1].done = true
		switch {
		case failed:
			s.open(end, "trial call failed")
		case slow:
			s.open(end, "trial call slow")
		default:
			if s.trialsOK++; s.trialsOK >= cfg.HalfOpenCalls {
				s.transition(stClosed, "trial calls succeeded")
			}
		}
		return
	}
	b := &s.buckets[bucketIndex(c.key)]
	if b.key.Load() != c.key {
		return // its bucket has left the window
	}
	b.inflight.Add(-1)
	if !failed && !slow {
		// A good call never opens the breaker: no lock.
		if e := end.UnixNano(); e-s.lastGood.Load() > int64(s.bucket)/16 {
			s.lastGood.Store(e)
		}
		return
	}
	if failed {
		b.fails.Add(1)
	}
	if slow {
		b.slow.Add(1)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.epoch == s.epoch.Load() && s.state.Load() == stClosed {
		s.judge(end)
	}
}

// Cancel gives back a call that never reached an instance (the service had
// none): it counts neither as a success nor as a failure.
func (s *Service) Cancel(c Call) {
	if !c.ok {
		return
	}
	s.inflight.Add(-1)
	if s.cfg.Load().Disabled || c.epoch != s.epoch.Load() {
		return
	}
	if c.trial > 0 {
		s.mu.Lock()
		if c.epoch == s.epoch.Load() && s.state.Load() == stHalfOpen && !s.trials[c.trial-1].done {
			s.trials[c.trial-1].done = true
			s.handed--
		}
		s.mu.Unlock()
		return
	}
	b := &s.buckets[bucketIndex(c.key)]
	if b.key.Load() == c.key {
		b.calls.Add(-1)
		b.inflight.Add(-1)
	}
}

// check looks at the calls in flight at most once per bucket (always when
// force): ones in flight longer than SlowCallDuration count as slow now,
// and may open the breaker; so does a trial call that is slow.
func (s *Service) check(now time.Time, force bool) {
	n := now.UnixNano()
	next := s.nextCheck.Load()
	if !force && n < next {
		return
	}
	if !s.nextCheck.CompareAndSwap(next, n+int64(s.bucket)) && !force {
		return
	}
	if s.cfg.Load().Disabled {
		return
	}
	st := s.state.Load()
	if st == stClosed && s.inflight.Load() == 0 {
		return
	}
	if st == stOpen && n < s.openUntil.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.state.Load() {
	case stClosed:
		s.judge(now)
	case stOpen:
		s.halfOpenIfDue(now)
	case stHalfOpen:
		for _, t := range s.trials {
			if !t.done && n-t.start >= int64(s.cfg.Load().SlowCallDuration) {
				s.open(now, "trial call slow")
				return
			}
		}
	}
}

// halfOpenIfDue moves an open breaker whose time is over to half-open.
// s.mu must be held.
func (s *Service) halfOpenIfDue(now time.Time) {
	if s.state.Load() == stOpen && now.UnixNano() >= s.openUntil.Load() {
		s.trials, s.handed, s.trialsOK = s.trials[:0], 0, 0
		s.transition(stHalfOpen, "open duration over")
	}
}

// window is what the buckets in the window hold at one moment.
type window struct {
	calls, fails, slow int
	judged             int // finished, or in flight longer than SlowCallDuration
	stalled            int // in flight longer than SlowCallDuration
}

// totals sums the buckets inside the window at now.
func (s *Service) totals(now time.Time) window {
	cfg := s.cfg.Load()
	n := now.UnixNano()
	bl := int64(s.bucket)
	cur := n / bl
	epoch := s.epoch.Load()
	var w window
	for slot := cur - numBuckets + 1; slot <= cur; slot++ {
		b := &s.buckets[slot%numBuckets]
		if b.key.Load() != bucketKey(slot, epoch) {
			continue
		}
		calls, in := int(b.calls.Load()), int(b.inflight.Load())
		in = max(0, min(in, calls))
		w.calls += calls
		w.fails += int(b.fails.Load())
		w.slow += int(b.slow.Load())
		w.judged += calls - in
		if in > 0 && (slot+1)*bl+int64(cfg.SlowCallDuration) <= n {
			// every call of this bucket still in flight is slow by now
			w.slow += in
			w.judged += in
			w.stalled += in
		}
	}
	return w
}

// judge opens the breaker when the window says so. s.mu must be held.
func (s *Service) judge(now time.Time) {
	cfg := s.cfg.Load()
	w := s.totals(now)
	if !cfg.NoStallRule && !cfg.NoSlowCallRate && w.stalled >= cfg.MinimumStalledCalls &&
		now.UnixNano()-s.lastGood.Load() >= int64(cfg.SlowCallDuration) {
		// The service has stopped answering: its callers are stuck, so
		// the window would not fill up before their timeouts.
		s.open(now, fmt.Sprintf("%d calls in flight longer than %s and none answered well since", w.stalled, cfg.SlowCallDuration))
		return
	}
	if w.judged < cfg.MinimumCalls {
		return
	}
	if !cfg.NoFailureRate && float64(w.fails)*100 >= cfg.FailureRateThreshold*float64(w.judged) {
		s.open(now, fmt.Sprintf("failure rate %.0f%% of %d calls", float64(w.fails)*100/float64(w.judged), w.judged))
		return
	}
	if !cfg.NoSlowCallRate && float64(w.slow)*100 >= cfg.SlowCallRateThreshold*float64(w.judged) {
		s.open(now, fmt.Sprintf("slow-call rate %.0f%% of %d calls", float64(w.slow)*100/float64(w.judged), w.judged))
	}
}

// bucketAt returns the bucket for now in epoch and its key, resetting it
// when it is stale. The one caller that wins the swap of its key resets
// the counters; a call counted in the instant between may be lost, which
// a breaker can afford.
func (s *Service) bucketAt(now time.Time, epoch uint32) (*bucket, int64) {
	slot := now.UnixNano() / int64(s.bucket)
	key := bucketKey(slot, epoch)
	b := &s.buckets[slot%numBuckets]
	if old := b.key.Load(); old != key && b.key.CompareAndSwap(old, key) {
		b.calls.Store(0)
		b.inflight.Store(0)
		b.fails.Store(0)
		b.slow.Store(0)
	}
	return b, key
}

// resetBuckets empties the window.
func (s *Service) resetBuckets() {
	for i := range s.buckets {
		b := &s.buckets[i]
		b.key.Store(-1)
		b.calls.Store(0)
		b.inflight.Store(0)
		b.fails.Store(0)
		b.slow.Store(0)
	}
}

// open moves to open. s.mu must be held.
func (s *Service) open(now time.Time, why string) {
	s.openUntil.Store(now.Add(s.cfg.Load().OpenDuration).UnixNano())
	s.reason = why
	s.transition(stOpen, why)
}

// transition logs and counts a state change once, starts a new epoch and
// empties the window. s.mu must be held.
func (s *Service) transition(to int32, why string) {
	from := s.state.Load()
	if from == to {
		return
	}
	s.epoch.Add(1)
	s.state.Store(to)
	s.resetBuckets()
	if to == stClosed {
		s.lastGood.Store(s.r.now().UnixNano())
	}
	s.r.met.state.WithLabelValues(s.name).Set(float64(to))
	s.r.met.trans.WithLabelValues(s.name, stateName(to)).Inc()
	s.r.log.Info("breaker state changed", "service", s.name, "from", stateName(from), "to", stateName(to), "reason", why)
}

// State returns the breaker's state name.
func (s *Service) State() string { return stateName(s.state.Load()) }

// Tripped reports whether the breaker is not closed (open, or half-open
// and trying): a request under way stops retrying then, and its caller
// gets an answer (or the fallback) at once.
func (s *Service) Tripped() bool { return s.state.Load() != stClosed }

// Panic reports whether too few of the service's instances are healthy:
// the proxy then sends requests to all of them, ejected or not.
func (s *Service) Panic() bool { return s.panic.Load() }

// Sync tells the service which instances are in the view now: the state of
// instances that left is dropped (one that comes back starts clean: Consul
// found it healthy again), the ejection bound and the panic threshold
// follow the new set, and a breaker that is not closed closes when
// instances appear for a service that had none — the service's own and
// the route breakers made for it (Registry.Custom): Consul found them
// healthy again, which no trial call has to prove.
func (s *Service) Sync(ids []string) {
	if !s.sync(ids) {
		return
	}
	for _, f := range s.r.followers(s.name) {
		f.mu.Lock()
		if f.state.Load() != stClosed && !f.cfg.Load().Disabled {
			f.transition(stClosed, "instances of "+s.name+" appeared")
		}
		f.mu.Unlock()
	}
}

// sync is Sync for s alone: true when instances appeared for a service
// that had none.
func (s *Service) sync(ids []string) bool {
	keep := make(map[string]bool, len(ids))
	for _, id := range ids {
		keep[id] = true
	}
	now := s.r.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, in := range s.insts {
		if !keep[id] {
			in.gone.Store(true)
			delete(s.insts, id)
			in.ejectedG.Set(0)
			s.gone[id] = now
		}
	}
	for id, t := range s.gone {
		if now.Sub(t) > departedRetention && s.insts[id] == nil {
			delete(s.gone, id)
			s.r.met.ejected.DeleteLabelValues(s.name, id)
			s.r.met.ejections.DeleteLabelValues(s.name, id)
		}
	}
	had := s.view
	s.view = len(keep)
	appeared := had == 0 && s.view > 0
	if appeared && s.state.Load() != stClosed && !s.cfg.Load().Disabled {
		s.transition(stClosed, "instances appeared")
	}
	s.refreshPanic()
	return appeared
}

// refreshPanic recomputes the panic state. s.mu must be held.
func (s *Service) refreshPanic() {
	cfg := s.cfg.Load()
	th := cfg.PanicThreshold
	n, healthy := len(s.insts), 0
	for _, in := range s.insts {
		if in.until.Load() == 0 && !in.failing.Load() {
			healthy++
		}
	}
	p := !cfg.NoPanic && n > 0 && float64(healthy)*100 < th*float64(n)
	if s.panic.Swap(p) != p {
		v := 0.0
		if p {
			v = 1
			s.r.log.Warn("panic: too few healthy instances, using all of them", "service", s.name, "healthy", healthy, "instances", n)
		} else {
			s.r.log.Info("panic over", "service", s.name, "healthy", healthy, "instances", n)
		}
		s.r.met.panic.WithLabelValues(s.name).Set(v)
	}
}
