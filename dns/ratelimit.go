package dns

import (
	"net/netip"
	"sync"
	"time"
)

// limiter is a token bucket per client address (queries per second and a
// burst), with bounded state: at most max clients are tracked; when a new
// one comes past that, the clients whose buckets have refilled (idle, so
// the same as new) are forgotten, and if none has, one at random is.
type limiter struct {
	rate  float64 // tokens per nanosecond
	burst float64
	max   int

	mu    sync.Mutex
	m     map[netip.Addr]*bucket
	swept int64 // when evict last looked at every client
}

type bucket struct {
	tokens float64
	last   int64 // unix nanoseconds of the last refill
}

func newLimiter(qps float64, burst, clients int) *limiter {
	if burst <= 0 {
		burst = max(int(qps), 1)
	}
	if clients <= 0 {
		clients = 10000
	}
	return &limiter{rate: qps / float64(time.Second), burst: float64(burst), max: clients, m: map[netip.Addr]*bucket{}}
}

// allow takes a token from from's bucket and reports whether there was one.
func (l *limiter) allow(from netip.Addr, now int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.m[from]
	if b == nil {
		if len(l.m) >= l.max {
			l.evict(now)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.m[from] = b
	}
	b.tokens = min(l.burst, b.tokens+float64(now-b.last)*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// evict forgets the clients whose buckets are full again (looking at all of
// them at most once a second), or else one at random.
func (l *limiter) evict(now int64) {
	if now-l.swept >= int64(time.Second) {
		l.swept = now
		full := l.burst / l.rate // nanoseconds to refill from empty
		for a, b := range l.m {
			if float64(now-b.last) >= full {
				delete(l.m, a)
			}
		}
		if len(l.m) < l.max {
			return
		}
	}
	for a := range l.m {
		delete(l.m, a)
		return
	}
}
