package breaker

import (
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Instance returns the outlier state of one instance of the service,
// creating it on first use (clean: an instance that left the view and came
// back starts again).
func (s *Service) Instance(id string) *Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.insts[id]
	if in == nil {
		in = &Instance{svc: s, id: id,
			ejectedG:  s.r.met.ejected.WithLabelValues(s.name, id),
			ejections: s.r.met.ejections.WithLabelValues(s.name, id)}
		in.ejectedG.Set(0)
		delete(s.gone, id)
		s.insts[id] = in
		s.refreshPanic()
	}
	return in
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
	total       atomic.Int64 // ejections since it joined the view
	returned    atomic.Int64 // unix nanos when a probe last brought it back
	failing     atomic.Bool  // ConsecutiveFailures reached, not ejected because of the bound
	gone        atomic.Bool  // left the view: its reports no longer count
}

// Availability of an instance for a new request.
const (
	Available  = iota // not ejected
	Ejected           // ejected, or its probe is in flight
	ProbeReady        // ejection time over: the next request is its probe
)

// Status tells whether the instance can take a request now (the service's
// panic state aside: see Service.Panic).
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
	if p != 0 && now-p < int64(in.svc.cfg.Load().ProbeTimeout) {
		return Ejected
	}
	return ProbeReady
}

// Ejected reports whether the instance must not get requests now (ejected,
// or its probe is in flight), the service's panic state aside.
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
	if in.gone.Load() {
		return
	}
	s := in.svc
	cfg := s.cfg.Load()
	if !failed {
		if in.consecutive.Load() != 0 {
			in.consecutive.Store(0)
		}
		if in.failing.Load() || in.until.Load() != 0 && (in.probing.Load() != 0 || s.panic.Load()) {
			// a good answer from its probe, or from an ejected instance
			// used in panic, brings it back
			s.mu.Lock()
			if in.until.Load() != 0 && (in.probing.Load() != 0 || s.panic.Load()) {
				in.until.Store(0)
				in.probing.Store(0)
				in.returned.Store(s.r.now().UnixNano())
				in.ejectedG.Set(0)
				s.r.log.Info("instance returned", "service", s.name, "instance", in.id)
			}
			in.failing.Store(false)
			s.refreshPanic()
			s.mu.Unlock()
		}
		return
	}
	if cfg.NoEjection {
		return
	}
	if in.until.Load() != 0 {
		// A failed probe ejects it again for longer; a call that was
		// under way when it was ejected (or one sent in panic) says
		// nothing new.
		if in.probing.Load() != 0 {
			s.mu.Lock()
			if in.until.Load() != 0 && in.probing.Load() != 0 {
				in.eject("probe failed")
			}
			s.mu.Unlock()
		}
		return
	}
	if int(in.consecutive.Add(1)) < cfg.ConsecutiveFailures {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if in.until.Load() != 0 || in.gone.Load() {
		return
	}
	// Envoy: never eject more than max_ejection_percent, but at least one;
	// here never the last instance in the view either.
	ejected := 0
	for _, o := range s.insts {
		if o.until.Load() != 0 {
			ejected++
		}
	}
	n := len(s.insts)
	limit := min(max(1, int(math.Floor(float64(n)*float64(cfg.MaxEjectionPercent)/100))), n-1)
	if ejected >= limit {
		if !in.failing.Swap(true) {
			s.refreshPanic()
		}
		return
	}
	in.eject(fmt.Sprintf("%d consecutive failures", cfg.ConsecutiveFailures))
}

// eject ejects the instance for base × times ejected. svc.mu must be held.
func (in *Instance) eject(why string) {
	s := in.svc
	cfg := s.cfg.Load()
	now := s.r.now()
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
	in.failing.Store(false)
	in.total.Add(1)
	in.ejections.Inc()
	in.ejectedG.Set(1)
	s.refreshPanic()
	s.r.log.Warn("instance ejected", "service", s.name, "instance", in.id, "for", d, "reason", why)
}
