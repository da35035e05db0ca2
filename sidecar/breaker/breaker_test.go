package breaker

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTest(t *testing.T, cfg Config) (*Registry, *clock) {
	t.Helper()
	r, err := New(cfg, nil, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	r.now = c.now
	return r, c
}

func TestOutlierEjection(t *testing.T) {
	r, c := newTest(t, Config{MaxEjectionPercent: 50})
	s := r.Service("Inventory")
	a, b := s.Instance("a"), s.Instance("b")
	s.Instance("c")
	s.Instance("d")
	for i := 0; i < 4; i++ {
		a.Report(true)
	}
	if a.Ejected() {
		t.Fatal("ejected after 4 failures")
	}
	a.Report(false) // a success resets the count
	for i := 0; i < 4; i++ {
		a.Report(true)
	}
	if a.Ejected() {
		t.Fatal("success did not reset the consecutive count")
	}
	a.Report(true)
	if !a.Ejected() || !r.Ejected("inventory", "a") {
		t.Fatal("not ejected after 5 consecutive failures")
	}
	// 50% of 4 = 2 may be ejected.
	for i := 0; i < 5; i++ {
		b.Report(true)
	}
	if !b.Ejected() {
		t.Fatal("b not ejected")
	}
	cc := s.Instance("c")
	for i := 0; i < 5; i++ {
		cc.Report(true)
	}
	if cc.Ejected() {
		t.Fatal("c ejected beyond max ejection percent")
	}
	// Base time 30s × 1.
	c.add(29 * time.Second)
	if a.Status() != Ejected {
		t.Fatal("a back too early")
	}
	c.add(2 * time.Second)
	if a.Status() != ProbeReady {
		t.Fatalf("status %d, want ProbeReady", a.Status())
	}
	if !a.TryProbe() || a.TryProbe() {
		t.Fatal("exactly one probe must win")
	}
	if !a.Ejected() {
		t.Fatal("instance with probe in flight must look ejected")
	}
	a.Report(true) // probe fails: ejected again for 2 × 30s
	c.add(59 * time.Second)
	if a.Status() != Ejected {
		t.Fatal("second ejection shorter than 2 × base")
	}
	c.add(2 * time.Second)
	if !a.TryProbe() {
		t.Fatal("probe not ready")
	}
	a.Report(false)
	if a.Status() != Available || r.Ejected("inventory", "a") {
		t.Fatal("successful probe did not bring the instance back")
	}
	st := r.State()
	if len(st) != 1 || len(st[0].Instances) != 4 || st[0].Instances[0].TimesEjected != 2 {
		t.Fatalf("state = %+v", st)
	}
}

func TestAtLeastOneEjected(t *testing.T) {
	r, _ := newTest(t, Config{}) // 10% of 2 rounds to 0, but one may always go
	s := r.Service("x")
	a, b := s.Instance("a"), s.Instance("b")
	for i := 0; i < 5; i++ {
		a.Report(true)
		b.Report(true)
	}
	if !a.Ejected() || b.Ejected() {
		t.Fatalf("a=%v b=%v, want only a ejected", a.Ejected(), b.Ejected())
	}
	// b reached the threshold but may not go: it is failing, none of two
	// is healthy, and the service panics: every instance gets requests.
	if !s.Panic() || r.Ejected("x", "a") {
		t.Fatalf("panic=%v ejected(a)=%v, want panic and a served", s.Panic(), r.Ejected("x", "a"))
	}
	b.Report(false)
	if s.Panic() || !r.Ejected("x", "a") {
		t.Fatal("b answered well: panic should be over")
	}
}

func TestEjectionBound(t *testing.T) {
	tests := []struct {
		name      string
		instances int
		percent   int
		failing   int // instances that fail 5 times in a row
		ejected   int
		panic     bool
	}{
		{"single instance never ejected", 1, 10, 1, 0, true},
		{"one of two", 2, 10, 1, 1, false},
		{"never the last of two", 2, 100, 2, 1, true},
		{"10% of ten", 10, 10, 3, 1, false},
		{"all but one of four", 4, 100, 4, 3, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := newTest(t, Config{MaxEjectionPercent: tc.percent})
			s := r.Service("svc")
			var ins []*Instance
			for i := 0; i < tc.instances; i++ {
				ins = append(ins, s.Instance(string(rune('a'+i))))
			}
			for _, in := range ins[:tc.failing] {
				for i := 0; i < 5; i++ {
					in.Report(true)
				}
			}
			n := 0
			for _, in := range ins {
				if in.Ejected() {
					n++
				}
			}
			if n != tc.ejected || s.Panic() != tc.panic {
				t.Fatalf("ejected %d panic %v, want %d %v", n, s.Panic(), tc.ejected, tc.panic)
			}
		})
	}
}

func TestRejoinStartsClean(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := New(Config{}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	s := r.Service("svc")
	s.Sync([]string{"a", "b"})
	a := s.Instance("a")
	s.Instance("b")
	for i := 0; i < 5; i++ {
		a.Report(true)
	}
	if !r.Ejected("svc", "a") {
		t.Fatal("a not ejected")
	}
	s.Sync([]string{"b"}) // a leaves the healthy set (Consul: critical)...
	a.Report(true)        // (a late report of the old record changes nothing)
	s.Sync([]string{"a", "b"})
	a2 := s.Instance("a") // ...and comes back: clean
	if a2 == a || r.Ejected("svc", "a") || a2.consecutive.Load() != 0 {
		t.Fatal("a came back with its old outlier record")
	}
	for i := 0; i < 5; i++ {
		a2.Report(true)
	}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "attache_breaker_ejections_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 2 {
				t.Fatalf("ejections_total %v after rejoin, want 2 (the series goes on)", v)
			}
			return
		}
	}
	t.Fatal("no ejections_total series")
}

func TestProbeReadyIsNotEjected(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	a := s.Instance("a")
	s.Instance("b")
	for i := 0; i < 5; i++ {
		a.Report(true)
	}
	c.add(31 * time.Second)
	st := r.State()[0].Instances[0]
	if st.Ejected || !st.ProbeReady || r.Ejected("svc", "a") {
		t.Fatalf("state %+v: an instance whose ejection is over must not show as ejected", st)
	}
}

// run makes n calls that start now and take d; failed says how they end.
func run(s *Service, c *clock, n int, failed bool, d time.Duration) {
	for i := 0; i < n; i++ {
		call, err := s.Allow(c.now())
		if err != nil {
			continue
		}
		s.Done(call, failed, c.now().Add(d))
	}
}

func TestBreakerStates(t *testing.T) {
	tests := []struct {
		name     string
		fails    int
		slow     int
		ok       int
		wantOpen bool
	}{
		{"below minimum calls", 19, 0, 0, false},
		{"half failing", 10, 0, 10, true},
		{"mostly fine", 9, 0, 11, false},
		{"all slow", 0, 20, 0, true},
		{"some slow", 0, 19, 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, c := newTest(t, Config{})
			s := r.Service("svc")
			run(s, c, tc.ok, false, time.Millisecond)
			run(s, c, tc.slow, false, 3*time.Second)
			run(s, c, tc.fails, true, time.Millisecond)
			if got := s.State() == Open; got != tc.wantOpen {
				t.Fatalf("open = %v, want %v", got, tc.wantOpen)
			}
		})
	}
}

func TestBreakerWindowSlides(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	run(s, c, 15, true, 0)
	c.add(11 * time.Second) // old failures leave the window
	run(s, c, 15, false, 0)
	if s.State() != Closed {
		t.Fatal("failures outside the window counted")
	}
}

// A hung service opens the breaker within SlowCallDuration plus a bucket,
// at any number of callers, while its earlier good calls are still in the
// window; one stuck call among good ones does not.
func TestHangOpensWhileInFlight(t *testing.T) {
	for _, callers := range []int{2, 8, 32} {
		t.Run(fmt.Sprint(callers), func(t *testing.T) {
			r, c := newTest(t, Config{})
			s := r.Service("svc")
			for i := 0; i < 50; i++ {
				run(s, c, 10, false, time.Millisecond)
				c.add(100 * time.Millisecond)
			}
			var stuck []Call
			for i := 0; i < callers; i++ {
				call, err := s.Allow(c.now())
				if err != nil {
					t.Fatal(err)
				}
				stuck = append(stuck, call)
			}
			c.add(2 * time.Second)
			s.check(c.now(), true)
			if s.State() != Closed {
				t.Fatal("opened before the calls were slow")
			}
			c.add(time.Second + time.Millisecond) // SlowCallDuration + one bucket
			s.check(c.now(), true)
			if s.State() != Open {
				t.Fatalf("state %s: %d hung calls did not open the breaker", s.State(), callers)
			}
			// Their late outcomes, after the breaker moved on, change nothing.
			c.add(10 * time.Second)
			run(s, c, 3, false, time.Millisecond) // trials close it
			if s.State() != Closed {
				t.Fatalf("state %s after good trials", s.State())
			}
			for _, call := range stuck {
				s.Done(call, true, c.now())
			}
			run(s, c, 1, false, time.Millisecond)
			if s.State() != Closed || s.inflight.Load() != 0 {
				t.Fatalf("state %s in flight %d: late outcomes reopened it", s.State(), s.inflight.Load())
			}
		})
	}
}

func TestOneStuckCallAmongGoodOnes(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	a, _ := s.Allow(c.now())
	b, _ := s.Allow(c.now())
	for i := 0; i < 40; i++ {
		c.add(100 * time.Millisecond)
		run(s, c, 5, false, time.Millisecond)
		s.check(c.now(), true)
	}
	if s.State() != Closed {
		t.Fatalf("state %s: stuck calls opened the breaker while others answered", s.State())
	}
	s.Done(a, true, c.now())
	s.Done(b, true, c.now())
}

func TestSlowTrialReopens(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	run(s, c, 20, true, 0)
	c.add(10 * time.Second)
	trial, err := s.Allow(c.now())
	if err != nil || trial.trial == 0 {
		t.Fatal("no trial")
	}
	c.add(2 * time.Second)
	s.check(c.now(), true)
	if s.State() != Open {
		t.Fatalf("state %s: a trial in flight longer than SlowCallDuration must reopen", s.State())
	}
	s.Done(trial, false, c.now()) // late: nothing
	if s.State() != Open {
		t.Fatal("late trial outcome changed the state")
	}
}

func TestCancelIsNoFailure(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	for i := 0; i < 100; i++ {
		call, err := s.Allow(c.now())
		if err != nil {
			t.Fatal(err)
		}
		s.Cancel(call) // no healthy instance
	}
	if s.State() != Closed || s.inflight.Load() != 0 {
		t.Fatalf("state %s after calls with no instance", s.State())
	}
	// A breaker that is open closes when instances appear for a service
	// that had none.
	run(s, c, 20, true, 0)
	if s.State() != Open {
		t.Fatal("not open")
	}
	s.Sync(nil)
	s.Sync([]string{"a"})
	if s.State() != Closed {
		t.Fatalf("state %s after instances appeared", s.State())
	}
}

func TestMaxRequests(t *testing.T) {
	r, c := newTest(t, Config{MaxRequests: 3})
	s := r.Service("svc")
	var calls []Call
	for i := 0; i < 3; i++ {
		call, err := s.Allow(c.now())
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, call)
	}
	_, err := s.Allow(c.now())
	var oe *OpenError
	if !errors.As(err, &oe) || oe.State != MaxRequests {
		t.Fatalf("fourth call: %v", err)
	}
	s.Done(calls[0], false, c.now())
	if _, err := s.Allow(c.now()); err != nil {
		t.Fatalf("after one finished: %v", err)
	}
}

func TestBreakerOpenHalfOpenClose(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	run(s, c, 20, true, 0)
	_, err := s.Allow(c.now())
	var oe *OpenError
	if !errors.As(err, &oe) || !errors.Is(err, ErrOpen) || oe.State != Open || oe.RetryAfter != 10*time.Second {
		t.Fatalf("Allow = %v", err)
	}
	if !r.BreakerOpen("SVC") {
		t.Fatal("BreakerOpen false")
	}
	c.add(10 * time.Second)
	var trials []Call
	for i := 0; i < 3; i++ {
		call, err := s.Allow(c.now())
		if err != nil || call.trial == 0 {
			t.Fatalf("trial %d: %v", i, err)
		}
		trials = append(trials, call)
	}
	if _, err := s.Allow(c.now()); err == nil {
		t.Fatal("fourth call let through while half-open")
	}
	s.Cancel(trials[2]) // no instance: the trial slot comes back
	if _, err := s.Allow(c.now()); err != nil {
		t.Fatal("cancelled trial did not give its slot back")
	}
	s.Done(trials[0], true, c.now()) // one trial fails: open again
	if s.State() != Open {
		t.Fatalf("state %s after failed trial", s.State())
	}
	c.add(10 * time.Second)
	run(s, c, 3, false, time.Millisecond)
	if s.State() != Closed {
		t.Fatalf("state %s after good trials", s.State())
	}
	if _, err := s.Allow(c.now()); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrent(t *testing.T) {
	r, _ := newTest(t, Config{})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := r.Service("svc")
			in := s.Instance("a")
			for i := 0; i < 500; i++ {
				call, err := s.Allow(time.Now())
				in.Report(i%3 == 0)
				in.TryProbe()
				if err == nil {
					s.Done(call, i%2 == 0, time.Now())
				}
				r.State()
				r.Ejected("svc", "a")
			}
		}()
	}
	wg.Wait()
}

func TestEjectionTimeResetsAfterHealthyPeriod(t *testing.T) {
	r, c := newTest(t, Config{BaseEjectionTime: time.Second, MaxEjectionTime: 10 * time.Second})
	s := r.Service("x")
	a := s.Instance("a")
	s.Instance("b") // a single instance is never ejected
	fail5 := func() {
		for i := 0; i < 5; i++ {
			a.Report(true)
		}
	}
	fail5() // 1s
	c.add(time.Second)
	a.TryProbe()
	a.Report(false)
	fail5() // 2s: ejected again soon after
	c.add(1500 * time.Millisecond)
	if a.Status() != Ejected {
		t.Fatal("second ejection not longer")
	}
	c.add(time.Second)
	a.TryProbe()
	a.Report(false)
	c.add(11 * time.Second) // healthy longer than MaxEjectionTime
	fail5()
	c.add(1100 * time.Millisecond)
	if a.Status() != ProbeReady {
		t.Fatal("ejection time not back to base after a long healthy period")
	}
}

// TestCustom: a breaker of its own (a gateway route's) judges by its own
// configuration, apart from the service's; the same configuration keeps
// it, a new one replaces it, Drop forgets it.
func TestCustom(t *testing.T) {
	r, c := newTest(t, Config{})
	svc := r.Service("svc")
	cfg := r.Config()
	cfg.MinimumCalls, cfg.FailureRateThreshold, cfg.OpenDuration = 4, 25, time.Minute
	route := r.Custom("svc@route", "svc", cfg)
	run(route, c, 3, false, time.Millisecond)
	run(route, c, 1, true, time.Millisecond)
	if route.State() != Open {
		t.Fatalf("route breaker %s after 1 of 4 failed at 25%%, want open", route.State())
	}
	if svc.State() != Closed {
		t.Fatalf("the service's breaker %s: a route's calls are not its", svc.State())
	}
	if _, err := route.Allow(c.now()); !errors.Is(err, ErrOpen) {
		t.Fatalf("open route breaker allowed a call: %v", err)
	}
	if got := route.Config().OpenDuration; got != time.Minute {
		t.Fatalf("OpenDuration %v, want the route's 1m", got)
	}
	if r.Custom("SVC@route", "svc", cfg) != route {
		t.Fatal("the same name and configuration should give the same breaker")
	}
	cfg.FailureRateThreshold = 50
	fresh := r.Custom("svc@route", "svc", cfg)
	if fresh == route || fresh.State() != Closed {
		t.Fatalf("a new configuration should give a fresh breaker (state %s)", fresh.State())
	}
	names := func() map[string]bool {
		m := map[string]bool{}
		for _, st := range r.State() {
			m[st.Service] = true
		}
		return m
	}
	if n := names(); !n["svc@route"] || !n["svc"] {
		t.Fatalf("State lists %v", n)
	}
	r.Drop("svc@route")
	if n := names(); n["svc@route"] || !n["svc"] {
		t.Fatalf("after Drop, State lists %v", n)
	}
}

// TestConfigure gives one service settings of its own: its instances are
// ejected after 2 failures while another service's wait for the
// registry's 5; a service already in use cannot be configured.
func TestConfigure(t *testing.T) {
	r, _ := newTest(t, Config{MaxEjectionPercent: 50})
	own := r.Config()
	own.ConsecutiveFailures = 2
	if err := r.Configure("Users", own); err != nil {
		t.Fatal(err)
	}
	users := r.Service("users")
	if users.Config().ConsecutiveFailures != 2 {
		t.Fatalf("users' settings %+v", users.Config())
	}
	other := r.Service("other")
	for _, s := range []*Service{users, other} {
		s.Instance("a")
		s.Instance("b")
		for i := 0; i < 2; i++ {
			s.Instance("a").Report(true)
		}
	}
	if !users.Instance("a").Ejected() || other.Instance("a").Ejected() {
		t.Fatalf("after 2 failures: users ejected %v (want true), other %v (want false)",
			users.Instance("a").Ejected(), other.Instance("a").Ejected())
	}
	if err := r.Configure("other", own); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Configure of a service in use = %v", err)
	}
}

// TestSetConfig: a reload's thresholds apply to the services and
// instances already known, from their next report; the window cannot change.
func TestSetConfig(t *testing.T) {
	r, _ := newTest(t, Config{ConsecutiveFailures: 5, MaxEjectionPercent: 100})
	s := r.Service("svc")
	a := s.Instance("a")
	s.Instance("b")
	a.Report(true)
	a.Report(true)
	if a.Ejected() {
		t.Fatal("ejected after 2 of 5 failures")
	}
	cfg := r.Config()
	cfg.ConsecutiveFailures = 3
	if err := r.SetConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if s.Config().ConsecutiveFailures != 3 {
		t.Fatalf("service sees %d", s.Config().ConsecutiveFailures)
	}
	a.Report(true)
	if !a.Ejected() {
		t.Fatal("not ejected after 3 failures with the new threshold of 3")
	}
	cfg.Window *= 2
	if err := r.SetConfig(cfg); err == nil || !strings.Contains(err.Error(), "window") {
		t.Fatalf("window change: %v", err)
	}
	if r.Config().Window == cfg.Window {
		t.Fatal("refused change applied")
	}
}

// TestCustomFollowsService: a route's breaker closes when its service's
// instances come back to the view after none (the service's Sync), as the
// service's breaker does; one for another service stays open.
func TestCustomFollowsService(t *testing.T) {
	r, c := newTest(t, Config{})
	svc := r.Service("svc")
	svc.Sync([]string{"a"})
	cfg := r.Config()
	cfg.MinimumCalls, cfg.FailureRateThreshold, cfg.OpenDuration = 4, 25, time.Minute
	route := r.Custom("svc@route", "svc", cfg)
	other := r.Custom("other@route", "other", cfg)
	for _, b := range []*Service{route, other} {
		run(b, c, 4, true, time.Millisecond)
		if b.State() != Open {
			t.Fatalf("%s: %s after 4 failures, want open", b.Name(), b.State())
		}
	}
	svc.Sync(nil)
	if route.State() != Open {
		t.Fatalf("route breaker %s with no instance, want open", route.State())
	}
	svc.Sync([]string{"a"})
	if route.State() != Closed || other.State() != Open {
		t.Fatalf("after svc's instance came back: route %s (want closed), other %s (want open)", route.State(), other.State())
	}
	svc.Sync([]string{"a", "b"}) // more instances, none appeared from none: nothing to close
	run(route, c, 4, true, time.Millisecond)
	svc.Sync([]string{"a"})
	if route.State() != Open {
		t.Fatalf("route breaker %s: instances stayed in the view, want open (trials close it)", route.State())
	}
}
