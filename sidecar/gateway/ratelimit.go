package gateway

import (
	"hash/maphash"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// limiter is one route's rate limit: a token bucket per key (the client's
// address or a header's value), kept as GCRA's theoretical arrival time —
// one int64 per key. A key whose time has passed holds a full bucket, which
// is what a key never seen holds too, so such entries are dropped at will:
// the state held is only that of keys seen in the last burst/rate seconds,
// and never more than maxKeys (+25 %: each of the 32 shards holds up to
// 1.25 × maxKeys/32 keys, so that uneven hashing does not cut below
// maxKeys); when a shard is full of live keys, a random one is dropped:
// that client gets a fresh bucket, the limit fails open for it.
type limiter struct {
	rps, share atomic.Uint64 // float64 bits: the configured rate; the divisor (healthy gateways, cluster scope)
	burst      int
	cluster    bool
	seed       maphash.Seed
	shards     [limiterShards]limShard
	maxPer     int
}

const limiterShards = 32

type limShard struct {
	mu   sync.Mutex
	tats map[uint64]int64 // key's hash -> theoretical arrival time, unix ns
}

func newLimiter(rps float64, burst int, cluster bool, maxKeys int) *limiter {
	l := &limiter{burst: max(burst, 1), cluster: cluster, seed: maphash.MakeSeed(), maxPer: max(maxKeys*5/4/limiterShards, 1)}
	l.rps.Store(math.Float64bits(rps))
	l.share.Store(math.Float64bits(1))
	for i := range l.shards {
		l.shards[i].tats = map[uint64]int64{}
	}
	return l
}

// setShare divides the rate (and burst) by n gateways: cluster scope.
func (l *limiter) setShare(n int) {
	if !l.cluster || n < 1 {
		n = 1
	}
	l.share.Store(math.Float64bits(float64(n)))
}

// rate is this gateway's rate and burst now.
func (l *limiter) rate() (float64, int) {
	n := math.Float64frombits(l.share.Load())
	r := math.Float64frombits(l.rps.Load()) / n
	b := max(int(float64(l.burst)/n), 1)
	return r, b
}

// verdict is the outcome of one request against a limit.
type verdict struct {
	ok        bool
	limit     float64       // requests per second this gateway allows
	remaining int           // requests left in the bucket
	reset     time.Duration // until the bucket is full again
	retry     time.Duration // when denied: until one more request is allowed
}

// allow takes a token for key at now.
func (l *limiter) allow(key string, now time.Time) verdict {
	r, burst := l.rate()
	t := int64(float64(time.Second) / r) // emission interval
	if t < 1 {
		t = 1
	}
	tau := int64(burst) * t // the bucket, in time
	n := now.UnixNano()
	// Keys are held as their 64-bit hash (seeded per limiter): no copy of
	// the key is kept (it may point into a connection's buffer), and two
	// of 100,000 clients share a bucket with odds of about 3 in 10^10.
	h := maphash.String(l.seed, key)
	sh := &l.shards[h%limiterShards]
	sh.mu.Lock()
	tat, ok := sh.tats[h]
	if !ok || tat < n {
		tat = n
	}
	next := tat + t
	if next-n > tau {
		sh.mu.Unlock()
		return verdict{limit: r, reset: time.Duration(tat - n), retry: time.Duration(next - tau - n)}
	}
	if !ok && len(sh.tats) >= l.maxPer {
		sh.evict(n)
	}
	sh.tats[h] = next
	sh.mu.Unlock()
	return verdict{ok: true, limit: r, remaining: int((tau - (next - n)) / t), reset: time.Duration(next - n)}
}

// evict makes room: drops every key whose bucket is full again, and one
// live key if none was.
func (sh *limShard) evict(now int64) {
	dropped := false
	for k, tat := range sh.tats {
		if tat <= now {
			delete(sh.tats, k)
			dropped = true
		}
	}
	if !dropped {
		for k := range sh.tats {
			delete(sh.tats, k)
			break
		}
	}
}

// sweep drops the keys whose buckets are full again.
func (l *limiter) sweep(now time.Time) {
	n := now.UnixNano()
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		for k, tat := range sh.tats {
			if tat <= n {
				delete(sh.tats, k)
			}
		}
		sh.mu.Unlock()
	}
}

// keys is how many keys the limiter holds.
func (l *limiter) keys() int {
	n := 0
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		n += len(sh.tats)
		sh.mu.Unlock()
	}
	return n
}

// headers are the 429 answer's headers (RateLimit-* as the IETF draft
// "RateLimit header fields for HTTP" names them, Retry-After as RFC 9110).
func (v verdict) headers() [][2]string {
	secs := func(d time.Duration) string { return strconv.Itoa(int(math.Ceil(d.Seconds()))) }
	retry := secs(v.retry)
	if retry == "0" {
		retry = "1"
	}
	return [][2]string{
		{"Content-Type", "application/json"},
		{"Retry-After", retry},
		{"RateLimit-Limit", strconv.FormatFloat(v.limit, 'f', -1, 64)},
		{"RateLimit-Remaining", strconv.Itoa(v.remaining)},
		{"RateLimit-Reset", secs(v.reset)},
	}
}
