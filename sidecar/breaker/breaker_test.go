package breaker

import (
	"encoding/json"
	"errors"
	"net/http/httptest"
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
			r, _ := newTest(t, Config{})
			s := r.Service("svc")
			for i := 0; i < tc.ok; i++ {
				s.Done(Call{}, false, time.Millisecond)
			}
			for i := 0; i < tc.slow; i++ {
				s.Done(Call{}, false, 3*time.Second)
			}
			for i := 0; i < tc.fails; i++ {
				s.Done(Call{}, true, time.Millisecond)
			}
			if got := s.State() == Open; got != tc.wantOpen {
				t.Fatalf("open = %v, want %v", got, tc.wantOpen)
			}
		})
	}
}

func TestBreakerWindowSlides(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	for i := 0; i < 15; i++ {
		s.Done(Call{}, true, 0)
	}
	c.add(11 * time.Second) // old failures leave the window
	for i := 0; i < 15; i++ {
		s.Done(Call{}, false, 0)
	}
	if s.State() != Closed {
		t.Fatal("failures outside the window counted")
	}
}

func TestBreakerOpenHalfOpenClose(t *testing.T) {
	r, c := newTest(t, Config{})
	s := r.Service("svc")
	for i := 0; i < 20; i++ {
		s.Done(Call{}, true, 0)
	}
	_, err := s.Allow()
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
		call, err := s.Allow()
		if err != nil || !call.trial {
			t.Fatalf("trial %d: %v", i, err)
		}
		trials = append(trials, call)
	}
	if _, err := s.Allow(); err == nil {
		t.Fatal("fourth call let through while half-open")
	}
	s.Done(trials[0], true, 0) // one trial fails: open again
	if s.State() != Open {
		t.Fatalf("state %s after failed trial", s.State())
	}
	c.add(10 * time.Second)
	for i := 0; i < 3; i++ {
		call, err := s.Allow()
		if err != nil {
			t.Fatal(err)
		}
		s.Done(call, false, time.Millisecond)
	}
	if s.State() != Closed {
		t.Fatalf("state %s after good trials", s.State())
	}
	if _, err := s.Allow(); err != nil {
		t.Fatal(err)
	}
}

func TestHandler(t *testing.T) {
	r, _ := newTest(t, Config{})
	r.Service("b").Instance("i1")
	r.Service("a")
	rec := httptest.NewRecorder()
	r.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/v1/breakers", nil))
	var body struct {
		Services []ServiceState `json:"services"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatal(err)
	}
	if len(body.Services) != 2 || body.Services[0].Service != "a" || body.Services[1].Instances[0].ID != "i1" {
		t.Fatalf("body %s", rec.Body)
	}
	rec = httptest.NewRecorder()
	r.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/breakers", nil))
	if rec.Code != 405 {
		t.Fatalf("POST code %d", rec.Code)
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
				call, err := s.Allow()
				in.Report(i%3 == 0)
				in.TryProbe()
				if err == nil {
					s.Done(call, i%2 == 0, 0)
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
