package watch

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// answer is one scripted reply of a fake fetch.
type answer struct {
	v     string
	index uint64
	lc    time.Duration
	err   error
	hang  bool // block until the query's context ends
}

// script is a fetch function that replies from a list and records queries.
type script struct {
	mu      sync.Mutex
	answers []answer
	queries []Query
	done    chan struct{} // closed when the answers ran out
}

func newScript(a ...answer) *script { return &script{answers: a, done: make(chan struct{})} }

func (s *script) fetch(ctx context.Context, q Query) (string, Meta, error) {
	s.mu.Lock()
	s.queries = append(s.queries, q)
	if len(s.answers) == 0 {
		select {
		case <-s.done:
		default:
			close(s.done)
		}
		s.mu.Unlock()
		<-ctx.Done()
		return "", Meta{}, ctx.Err()
	}
	a := s.answers[0]
	s.answers = s.answers[1:]
	s.mu.Unlock()
	if a.hang {
		<-ctx.Done()
		return "", Meta{}, ctx.Err()
	}
	return a.v, Meta{Index: a.index, LastContact: a.lc}, a.err
}

func fast() Config {
	return Config{Wait: time.Second, RetryBase: time.Millisecond, RetryMax: 4 * time.Millisecond, RequestTimeout: 50 * time.Millisecond}
}

func TestLoop(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name      string
		cfg       func(c *Config)
		answers   []answer
		equal     bool
		want      []string // values delivered
		wantIndex []uint64 // indexes asked, in order (before running out)
		wantStale []bool   // stale flag of each query, when set
		wantErrs  int
	}{
		{name: "passes the last index", answers: []answer{{v: "a", index: 5}, {v: "b", index: 7}},
			want: []string{"a", "b"}, wantIndex: []uint64{0, 5, 7}},
		{name: "an unchanged index is skipped", answers: []answer{{v: "a", index: 5}, {v: "a2", index: 5}, {v: "b", index: 6}},
			want: []string{"a", "b"}, wantIndex: []uint64{0, 5, 5, 6}},
		{name: "an index going backwards resets to 0", answers: []answer{{v: "a", index: 9}, {v: "x", index: 3}, {v: "c", index: 3}},
			want: []string{"a", "c"}, wantIndex: []uint64{0, 9, 0, 3}},
		{name: "index 0 is an error", answers: []answer{{v: "a", index: 0}, {v: "b", index: 2}},
			want: []string{"b"}, wantIndex: []uint64{0, 0, 2}, wantErrs: 1},
		{name: "errors back off and reset the index", answers: []answer{{v: "a", index: 4}, {err: boom}, {err: boom}, {v: "b", index: 8}},
			want: []string{"a", "b"}, wantIndex: []uint64{0, 4, 0, 0, 8}, wantErrs: 2},
		{name: "equal values are not delivered twice", equal: true, answers: []answer{{v: "a", index: 4}, {v: "a", index: 5}, {v: "b", index: 6}},
			want: []string{"a", "b"}, wantIndex: []uint64{0, 4, 5, 6}},
		{name: "a hung query is abandoned", answers: []answer{{v: "a", index: 4}, {hang: true}, {v: "b", index: 5}},
			cfg: func(c *Config) { c.Wait = 10 * time.Millisecond }, want: []string{"a", "b"}, wantIndex: []uint64{0, 4, 0, 5}, wantErrs: 1},
		{name: "too stale asks the leader", cfg: func(c *Config) { c.Stale, c.MaxStale = true, time.Second },
			answers: []answer{{v: "old", index: 4, lc: 5 * time.Second}, {v: "a", index: 4}, {v: "b", index: 6, lc: time.Millisecond}},
			want:    []string{"a", "b"}, wantIndex: []uint64{0, 0, 4, 6}, wantStale: []bool{true, false, true, true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newScript(tc.answers...)
			cfg := fast()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			var got []string
			errs := 0
			l := &Loop[string]{Config: cfg, Fetch: s.fetch,
				Changed: func(v string, m Meta) { got = append(got, v) },
				Observe: func(_ time.Duration, err error) {
					if err != nil {
						errs++
					}
				}}
			if tc.equal {
				l.Equal = func(a, b string) bool { return a == b }
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { l.Run(ctx); close(done) }()
			select {
			case <-s.done:
			case <-time.After(5 * time.Second):
				t.Fatal("the loop did not use its answers")
			}
			cancel()
			<-done
			if len(got) != len(tc.want) || (len(got) > 0 && got[len(got)-1] != tc.want[len(tc.want)-1]) {
				t.Fatalf("delivered %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("delivered %v, want %v", got, tc.want)
				}
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			if len(s.queries) != len(tc.wantIndex) {
				t.Fatalf("queries %+v, want indexes %v", s.queries, tc.wantIndex)
			}
			for i, q := range s.queries {
				if q.Index != tc.wantIndex[i] {
					t.Fatalf("queries %+v, want indexes %v", s.queries, tc.wantIndex)
				}
				if tc.wantStale != nil && q.Stale != tc.wantStale[i] {
					t.Fatalf("query %d stale %v, want %v", i, q.Stale, tc.wantStale[i])
				}
			}
			if errs != tc.wantErrs {
				t.Fatalf("%d errors observed, want %d", errs, tc.wantErrs)
			}
		})
	}
}

// TestLoopRateLimit: answers that come back at once (a flapping value) are
// held to about one query per MinInterval after the burst.
func TestLoopRateLimit(t *testing.T) {
	var n uint64
	var mu sync.Mutex
	cfg := fast()
	cfg.MinInterval, cfg.Burst = 20*time.Millisecond, 2
	l := &Loop[uint64]{Config: cfg,
		Fetch: func(ctx context.Context, q Query) (uint64, Meta, error) {
			mu.Lock()
			defer mu.Unlock()
			n++
			return n, Meta{Index: n}, nil
		},
		Changed: func(uint64, Meta) {}}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	l.Run(ctx)
	mu.Lock()
	defer mu.Unlock()
	// 2 at once, then one per 20-24ms: about 10 in 200ms; never hundreds.
	if n < 3 || n > 15 {
		t.Fatalf("%d queries in 200ms with a 20ms interval", n)
	}
}

func TestBackoff(t *testing.T) {
	for retries, want := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		for i := 0; i < 50; i++ {
			d := Backoff(100, 1000, retries)
			if d < want/2 || d >= want {
				t.Fatalf("retry %d: %v, want [%v, %v)", retries, d, want/2, want)
			}
		}
	}
}

func TestView(t *testing.T) {
	type val struct {
		s       string
		version uint64
	}
	v := NewView(&val{s: "init"}, func(x *val, n uint64) { x.version = n })
	if v.Load().s != "init" || v.Version() != 0 {
		t.Fatalf("initial %+v %d", v.Load(), v.Version())
	}
	ch, unsub := v.Subscribe()
	first := &val{s: "a"}
	if n := v.Publish(first); n != 1 || v.Load() != first || first.version != 1 || v.Version() != 1 {
		t.Fatalf("publish: %d %+v", n, v.Load())
	}
	v.Publish(&val{s: "b"}) // coalesces with the first notification
	select {
	case <-ch:
	default:
		t.Fatal("no notification")
	}
	select {
	case <-ch:
		t.Fatal("notifications did not coalesce")
	default:
	}
	unsub()
	v.Publish(&val{s: "c"})
	select {
	case <-ch:
		t.Fatal("notified after unsubscribing")
	default:
	}
	if v.Load().s != "c" || v.Version() != 3 || first.s != "a" {
		t.Fatalf("after three publishes: %+v %d", v.Load(), v.Version())
	}
}

// TestWakerEndsBackoff: a loop backing off after errors (here 30 s) queries
// again at once when its Waker wakes.
func TestWakerEndsBackoff(t *testing.T) {
	waker := NewWaker()
	var calls atomic.Int32
	answered := make(chan struct{})
	l := &Loop[int]{
		Config: Config{RetryBase: 30 * time.Second, RetryMax: 30 * time.Second, MinInterval: -1},
		Fetch: func(ctx context.Context, q Query) (int, Meta, error) {
			if calls.Add(1) == 1 {
				return 0, Meta{}, errors.New("agent down")
			}
			return 1, Meta{Index: 1}, nil
		},
		Changed: func(int, Meta) { close(answered) },
		Waker:   waker,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go l.Run(ctx)
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // into its backoff (15-30 s)
	waker.Wake()
	select {
	case <-answered:
	case <-time.After(10 * time.Second):
		t.Fatal("the loop slept on after Wake")
	}
	var nilWaker *Waker
	if !nilWaker.Sleep(ctx, time.Millisecond) {
		t.Fatal("a nil Waker's Sleep reported the context ended")
	}
}
