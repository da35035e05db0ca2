package proxy

import (
	"bytes"
	"context"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"attache/sidecar/breaker"
	"attache/sidecar/proxy/h1"
)

// AccessEntry is one line of the access log: one proxied request, after
// its last try (retries included) or its refusal (breaker open, no
// healthy instance, unknown service).
type AccessEntry struct {
	Time     time.Time `json:"time"`     // when the request began
	Listener string    `json:"listener"` // the upstream's name, "http-proxy", "gateway-http" or "gateway-https"
	Method   string    `json:"method"`
	Host     string    `json:"host"`
	Path     string    `json:"path"`
	Service  string    `json:"service"`
	Instance string    `json:"instance,omitempty"` // the instance of the last try; empty when none was tried
	Status   int       `json:"status"`             // the status the client got (ours when no instance answered)
	Duration float64   `json:"duration_ms"`
	Tries    int       `json:"tries"`
	Breaker  string    `json:"breaker"` // the service's breaker state as the request ended
}

// accessLog is written as nginx writes its access log with buffer=: the
// request that ends encodes its line itself, in place, into one of a few
// shard buffers (a mutex each, uncontended as a rule: a request takes the
// first one free), and a shard hands its buffer to the writer goroutine
// only when it holds accessChunk bytes; the writer then writes it with one
// Write. No channel send, no copy of the entry and no goroutine wake-up per
// request: with the hand-off per line (a channel, a writer woken by the
// first line that encoded a 10 ms batch) the proxy's CPU per request was
// 1.09-1.10x the log-off figure, with this 1.04-1.06x (bench/proxy, both
// loaded at once).
// The writer also flushes what the shards hold every accessFlushEvery while
// lines come in, and everything when it stops; a quiet proxy does not wake
// it at all. Bounded: the shards and the chunks the writer has not written
// yet hold about Config.AccessLogBuffer bytes at most (a chunk per shard
// and one spare at least, and a chunk may end in one line more); a line that finds its shard full and no chunk free (the writer
// is behind) is dropped and counted, never waited for. A line is whole in
// one chunk and a chunk goes out in one Write: lines are never torn or
// interleaved (lines of requests that end at once may leave out of time
// order, as nginx's workers' do; each line has its time).
type accessLog struct {
	w       io.Writer
	sample  float64
	all     bool
	chunk   int // a shard's buffer is handed over at this many bytes
	shards  []accessShard
	freeMu  sync.Mutex
	free    [][]byte      // empty chunks, the last freed on top: it is the one still in the cache
	full    chan []byte   // chunks for the writer; room for every chunk: never blocks
	kick    chan struct{} // the first line after a quiet spell wakes the writer
	idle    atomic.Bool   // the writer has no flush timer set: the next line kicks it
	dropped prometheus.Counter
	lines   prometheus.Counter
	log     hclog.Logger
}

// accessShard is one buffer lines are appended to, under its mutex.
type accessShard struct {
	mu  sync.Mutex
	buf []byte
	tc  timeCache
	_   [64]byte // one shard's lock and slice header per cache line
}

// accessChunk is the size at which a shard hands its buffer over (nginx's
// buffer=64k), and accessFlushEvery how long a line waits at most, under
// load, before it is written.
const (
	accessChunk      = 64 << 10
	accessFlushEvery = 100 * time.Millisecond
)

func newAccessLog(cfg Config, log hclog.Logger) *accessLog {
	if cfg.AccessLog == nil {
		return nil
	}
	n := min(max(runtime.GOMAXPROCS(0), 1), 8)
	chunk := min(accessChunk, max(cfg.AccessLogBuffer/(n+1), 256))
	chunks := max(cfg.AccessLogBuffer/chunk, n+1) // n in the shards, at least one free
	a := &accessLog{
		w: cfg.AccessLog, sample: cfg.AccessLogSample, all: cfg.AccessLogAll, log: log,
		chunk: chunk, shards: make([]accessShard, n),
		free: make([][]byte, 0, chunks), full: make(chan []byte, chunks), kick: make(chan struct{}, 1),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "access_log_dropped_total",
			Help: "Access log lines dropped because the writer fell behind (its buffer was full)."}),
		lines: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "access_log_lines_total",
			Help: "Access log lines written."}),
	}
	a.idle.Store(true)
	for i := range a.shards {
		a.shards[i].buf = make([]byte, 0, chunk+512)
	}
	for range chunks - n {
		a.free = append(a.free, make([]byte, 0, chunk+512))
	}
	return a
}

// record appends e to a shard's buffer without waiting for the writer.
func (a *accessLog) record(e *AccessEntry) {
	s := a.lockShard()
	if len(s.buf) >= a.chunk && !a.handOver(s) {
		s.mu.Unlock()
		a.dropped.Inc() // the writer is behind: every chunk is full
		return
	}
	s.buf = appendAccess(s.buf, e, &s.tc)
	if len(s.buf) >= a.chunk {
		a.handOver(s) // when no chunk is free, the next line tries again
	}
	s.mu.Unlock()
	if a.idle.Load() && a.idle.CompareAndSwap(true, false) {
		select {
		case a.kick <- struct{}{}:
		default:
		}
	}
}

// lockShard locks the first shard no other request holds, else waits for
// the first: a request that ends alone (the rule) takes shard 0, and its
// lines keep their order; requests that end at once spill over.
func (a *accessLog) lockShard() *accessShard {
	for i := range a.shards {
		if s := &a.shards[i]; s.mu.TryLock() {
			return s
		}
	}
	s := &a.shards[0]
	s.mu.Lock()
	return s
}

// handOver passes s's buffer to the writer for an empty chunk; false when
// none is free. s is locked.
func (a *accessLog) handOver(s *accessShard) bool {
	nb := a.popFree()
	if nb == nil {
		return false
	}
	a.full <- s.buf
	s.buf = nb
	return true
}

// popFree takes the chunk freed last; nil when none is free.
func (a *accessLog) popFree() []byte {
	a.freeMu.Lock()
	defer a.freeMu.Unlock()
	n := len(a.free)
	if n == 0 {
		return nil
	}
	b := a.free[n-1]
	a.free = a.free[:n-1]
	return b
}

// run writes the chunks the shards hand over, and what they hold every
// accessFlushEvery while lines come in, until ctx ends; then everything.
func (a *accessLog) run(ctx context.Context) {
	timer := time.NewTimer(accessFlushEvery)
	timer.Stop()
	for {
		select {
		case b := <-a.full:
			a.write(b)
		case <-a.kick:
			timer.Reset(accessFlushEvery)
		case <-timer.C:
			if a.flushShards() {
				timer.Reset(accessFlushEvery)
				continue
			}
			// Quiet: the next line kicks. One recorded since the flush saw
			// idle false and did not: look again.
			a.idle.Store(true)
			if a.pending() && a.idle.CompareAndSwap(true, false) {
				timer.Reset(accessFlushEvery)
			}
		case <-ctx.Done():
			for len(a.full) > 0 {
				a.write(<-a.full)
			}
			a.flushShards()
			return
		}
	}
}

// write writes one chunk and frees it.
func (a *accessLog) write(b []byte) {
	if _, err := a.w.Write(b); err != nil {
		a.log.Warn("access log: write failed", "error", err)
	}
	a.lines.Add(float64(bytes.Count(b, []byte{'\n'})))
	a.freeMu.Lock()
	a.free = append(a.free, b[:0])
	a.freeMu.Unlock()
}

// flushShards writes what every shard holds; false when all were empty.
func (a *accessLog) flushShards() bool {
	any := false
	for i := range a.shards {
		s := &a.shards[i]
		s.mu.Lock()
		if len(s.buf) == 0 {
			s.mu.Unlock()
			continue
		}
		s.mu.Unlock()
		nb := a.takeFree()
		s.mu.Lock()
		b := s.buf
		s.buf = nb
		s.mu.Unlock()
		if len(b) == 0 { // handed over meanwhile
			a.freeMu.Lock()
			a.free = append(a.free, b)
			a.freeMu.Unlock()
			continue
		}
		a.write(b)
		any = true
	}
	return any
}

// takeFree returns an empty chunk, writing full ones to free them: the
// writer holds none, so one is free or full (or being handed over, then
// full at once).
func (a *accessLog) takeFree() []byte {
	for {
		if b := a.popFree(); b != nil {
			return b
		}
		a.write(<-a.full)
	}
}

// pending reports whether a shard holds a line.
func (a *accessLog) pending() bool {
	for i := range a.shards {
		s := &a.shards[i]
		s.mu.Lock()
		n := len(s.buf)
		s.mu.Unlock()
		if n > 0 {
			return true
		}
	}
	return false
}

// timeCache keeps the formatted second and zone of the last time written
// (formatting a whole time was half the writer's CPU): lines of one
// second share them. A zone's offset changes only on a second's boundary.
// It keeps the encoding of the fields that repeat too (appendConst).
type timeCache struct {
	sec    int64
	loc    *time.Location
	prefix []byte // "2006-01-02T15:04:05"
	zone   []byte // "Z" or "-07:00"
	consts [4]encoded
}

// encoded is a string as appendJSONString encodes it.
type encoded struct {
	p   *byte
	n   int
	enc []byte
}

// appendConst is appendJSONString for the fields that repeat from line to
// line (listener, service, instance, breaker state): the last string of
// slot i is encoded once. Strings are immutable: the same data at the same
// address is the same string.
func (c *timeCache) appendConst(b []byte, i int, s string) []byte {
	k := &c.consts[i]
	if p := unsafe.StringData(s); p != k.p || len(s) != k.n || k.enc == nil {
		k.p, k.n, k.enc = p, len(s), appendJSONString(k.enc[:0], s)
	}
	return append(b, k.enc...)
}

// appendTime appends t as time.RFC3339Nano does.
func (c *timeCache) appendTime(b []byte, t time.Time) []byte {
	if sec, loc := t.Unix(), t.Location(); sec != c.sec || loc != c.loc || c.prefix == nil {
		c.sec, c.loc = sec, loc
		c.prefix = t.AppendFormat(c.prefix[:0], "2006-01-02T15:04:05")
		c.zone = t.AppendFormat(c.zone[:0], "Z07:00")
	}
	b = append(b, c.prefix...)
	if ns := t.Nanosecond(); ns != 0 {
		var d [10]byte
		d[0] = '.'
		for i := 9; i >= 1; i-- {
			d[i] = byte('0' + ns%10)
			ns /= 10
		}
		n := 10
		for d[n-1] == '0' {
			n--
		}
		b = append(b, d[:n]...)
	}
	return append(b, c.zone...)
}

// appendAccess appends e as one JSON line, as encoding/json would write
// it (but <, > and & are not escaped), without reflection.
func appendAccess(b []byte, e *AccessEntry, tc *timeCache) []byte {
	b = append(b, `{"time":"`...)
	b = tc.appendTime(b, e.Time)
	b = append(b, `","listener":`...)
	b = tc.appendConst(b, 0, e.Listener)
	b = append(b, `,"method":`...)
	b = appendJSONString(b, e.Method)
	b = append(b, `,"host":`...)
	b = appendJSONString(b, e.Host)
	b = append(b, `,"path":`...)
	b = appendJSONString(b, e.Path)
	b = append(b, `,"service":`...)
	b = tc.appendConst(b, 1, e.Service)
	if e.Instance != "" {
		b = append(b, `,"instance":`...)
		b = tc.appendConst(b, 2, e.Instance)
	}
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(e.Status), 10)
	b = append(b, `,"duration_ms":`...)
	b = appendMillis(b, e.Duration)
	b = append(b, `,"tries":`...)
	b = strconv.AppendInt(b, int64(e.Tries), 10)
	b = append(b, `,"breaker":`...)
	b = tc.appendConst(b, 3, e.Breaker)
	return append(b, "}\n"...)
}

// appendMillis appends ms as strconv.AppendFloat(b, ms, 'f', -1, 64)
// does; without its shortest-digits search when ms is a whole number of
// microseconds (as logAccess makes it), below 10^12: that decimal, at most
// three places after the point, is then the shortest that reads back as ms
// (any other one is 0.001 away at least, far more than ms's precision).
func appendMillis(b []byte, ms float64) []byte {
	us := int64(math.Round(ms * 1000))
	if ms < 0 || ms >= 1e12 || float64(us)/1000 != ms || (ms == 0 && math.Signbit(ms)) {
		return strconv.AppendFloat(b, ms, 'f', -1, 64)
	}
	b = strconv.AppendInt(b, us/1000, 10)
	frac := us % 1000
	if frac == 0 {
		return b
	}
	d := [4]byte{'.', byte('0' + frac/100), byte('0' + frac/10%10), byte('0' + frac%10)}
	n := 4
	for d[n-1] == '0' {
		n--
	}
	return append(b, d[:n]...)
}

// appendJSONString appends s quoted as a JSON string: quotes, backslashes
// and control characters escaped, invalid UTF-8 replaced by U+FFFD (as
// encoding/json does), so that a hostile path cannot break a line.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// accReq is what the access log needs of a request the proxy forwards;
// nil on a request that is not logged. Its method, host and path are
// copied into one buffer, inl unless they are longer; accReqs recycles it.
type accReq struct {
	listener string
	m, h     int    // method is b[:m], host b[m:h], path b[h:]
	b        []byte // in inl unless longer
	inl      [96]byte
}

// accReqs recycles accReqs: one is taken per logged request and given
// back once its line is recorded (a request is logged once).
var accReqs = sync.Pool{New: func() any { return new(accReq) }}

func (a *accReq) method() string { return bstr(a.b[:a.m]) }
func (a *accReq) host() string   { return bstr(a.b[a.m:a.h]) }
func (a *accReq) path() string   { return bstr(a.b[a.h:]) }

// accessFor says under what listener name a request on rt is logged; ""
// when it is not (no access log, a listener the log leaves out, or not
// sampled). It is the one check on the hot path when the log is off.
func (p *Proxy) accessFor(rt *routing) string {
	a := p.acc
	if a == nil {
		return ""
	}
	name := "http-proxy"
	switch {
	case rt != nil && rt.router != nil:
		switch rt.proto {
		case "http":
			name = "gateway-http"
		case "https":
			name = "gateway-https"
		default:
			name = "gateway-" + rt.proto
		}
	case !a.all:
		return ""
	case rt != nil && rt.fixed != nil:
		name = rt.fixed.name
	}
	if a.sample < 1 && rand.Float64() >= a.sample {
		return ""
	}
	return name
}

// newAccReq returns the request's log fields, nil when it is not logged.
func newAccReq[S string | []byte](p *Proxy, rt *routing, method, host, path S) *accReq {
	l := p.accessFor(rt)
	if l == "" {
		return nil
	}
	a := accReqs.Get().(*accReq)
	a.listener, a.m, a.h = l, len(method), len(method)+len(host)
	a.b = append(append(append(a.inl[:0], method...), host...), path...)
	return a
}

// logAccess records a request that ended with res after tries tries; br
// is the breaker it went through (a route's own, or nil: the service's).
func (t *target) logAccess(a *accReq, br *breaker.Service, start, end time.Time, res result, tries int) {
	if br == nil {
		br = t.svc
	}
	e := AccessEntry{Time: start, Listener: a.listener, Method: a.method(), Host: a.host(), Path: a.path(),
		Service: t.name, Duration: float64(end.Sub(start).Microseconds()) / 1000, Tries: tries, Breaker: br.State()}
	if res.ep != nil {
		e.Instance = res.ep.id
	}
	if res.kind == outAnswered {
		e.Status = res.status
	} else {
		e.Status = t.p.cannedFor(t, res, false).status
	}
	t.p.acc.record(&e)
	a.listener = ""
	accReqs.Put(a)
}

// rawAccReq is newAccReq for a request parsed in b (the fast path and the
// event loops): host is the absolute-form target's, else the Host header's.
func rawAccReq(p *Proxy, rt *routing, b []byte, r *h1.Request, host, path h1.Span) *accReq {
	if p.acc == nil {
		return nil
	}
	if host.End <= host.Start {
		host = r.Host
	}
	var h []byte
	if host.End > host.Start {
		h = b[host.Start:host.End]
	}
	return newAccReq(p, rt, b[r.Method.Start:r.Method.End], h, b[path.Start:path.End])
}

// fastAccReq is newAccReq for a fasthttp request. It reads the header's
// bytes only: ctx.URI() would parse the request URI and, on a TLS
// listener, give it the https scheme, which the instance's HostClient then
// refuses.
func fastAccReq(p *Proxy, rt *routing, ctx *fasthttp.RequestCtx) *accReq {
	if p.acc == nil {
		return nil
	}
	h := &ctx.Request.Header
	path := h.RequestURI()
	if i := bytes.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	return newAccReq(p, rt, h.Method(), h.Host(), path)
}
