package proxy

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"strconv"
	"time"
	"unicode/utf8"

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

// accessLog queues entries for one writer goroutine: a request never
// waits for it; a full queue drops the entry and counts it.
type accessLog struct {
	w       io.Writer
	sample  float64
	all     bool
	ch      chan AccessEntry
	dropped prometheus.Counter
	lines   prometheus.Counter
	log     hclog.Logger
}

func newAccessLog(cfg Config, log hclog.Logger) *accessLog {
	if cfg.AccessLog == nil {
		return nil
	}
	return &accessLog{
		w: cfg.AccessLog, sample: cfg.AccessLogSample, all: cfg.AccessLogAll, log: log,
		ch: make(chan AccessEntry, cfg.AccessLogBuffer),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "access_log_dropped_total",
			Help: "Access log lines dropped because the writer fell behind (its buffer was full)."}),
		lines: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "access_log_lines_total",
			Help: "Access log lines written."}),
	}
}

// record queues e without waiting.
func (a *accessLog) record(e *AccessEntry) {
	select {
	case a.ch <- *e:
	default:
		a.dropped.Inc()
	}
}

// accessBatchWait is how long the writer, woken by a line after a quiet
// spell, lets more lines queue before it writes them: under load it wakes
// about 100 times a second, not once per request (each wake-up of a parked
// goroutine costs the request that causes it a futex call and the
// scheduler's work on both sides: measured at 0.86x requests/s with the
// log on, woken per line). A quiet proxy does not wake it at all.
const accessBatchWait = 10 * time.Millisecond

// run writes queued entries until ctx ends, then what is still queued:
// one write per batch, encoded by hand (appendAccess) into one buffer.
func (a *accessLog) run(ctx context.Context) {
	buf := make([]byte, 0, 64<<10)
	var tc timeCache
	flush := func() {
		if len(buf) == 0 {
			return
		}
		if _, err := a.w.Write(buf); err != nil {
			a.log.Warn("access log: write failed", "error", err)
		}
		buf = buf[:0]
	}
	drain := func() {
		for {
			select {
			case e := <-a.ch:
				buf = appendAccess(buf, &e, &tc)
				a.lines.Inc()
				if len(buf) >= 60<<10 {
					flush()
				}
			default:
				flush()
				return
			}
		}
	}
	timer := time.NewTimer(accessBatchWait)
	timer.Stop()
	for {
		select {
		case e := <-a.ch:
			buf = appendAccess(buf, &e, &tc)
			a.lines.Inc()
			timer.Reset(accessBatchWait)
			select {
			case <-timer.C:
			case <-ctx.Done():
			}
			drain()
		case <-ctx.Done():
			drain()
			return
		}
	}
}

// timeCache keeps the formatted second and zone of the last time written
// (formatting a whole time was half the writer's CPU): lines of one
// second share them. A zone's offset changes only on a second's boundary.
type timeCache struct {
	sec    int64
	loc    *time.Location
	prefix []byte // "2006-01-02T15:04:05"
	zone   []byte // "Z" or "-07:00"
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
	b = appendJSONString(b, e.Listener)
	b = append(b, `,"method":`...)
	b = appendJSONString(b, e.Method)
	b = append(b, `,"host":`...)
	b = appendJSONString(b, e.Host)
	b = append(b, `,"path":`...)
	b = appendJSONString(b, e.Path)
	b = append(b, `,"service":`...)
	b = appendJSONString(b, e.Service)
	if e.Instance != "" {
		b = append(b, `,"instance":`...)
		b = appendJSONString(b, e.Instance)
	}
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(e.Status), 10)
	b = append(b, `,"duration_ms":`...)
	b = strconv.AppendFloat(b, e.Duration, 'f', -1, 64)
	b = append(b, `,"tries":`...)
	b = strconv.AppendInt(b, int64(e.Tries), 10)
	b = append(b, `,"breaker":`...)
	b = appendJSONString(b, e.Breaker)
	return append(b, "}\n"...)
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
// nil on a request that is not logged.
type accReq struct {
	listener, method, host, path string
}

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
		name = "gateway-" + rt.proto
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
	return &accReq{listener: l, method: string(method), host: string(host), path: string(path)}
}

// logAccess records a request that ended with res after tries tries; br
// is the breaker it went through (a route's own, or nil: the service's).
func (t *target) logAccess(a *accReq, br *breaker.Service, start, end time.Time, res result, tries int) {
	if br == nil {
		br = t.svc
	}
	e := AccessEntry{Time: start, Listener: a.listener, Method: a.method, Host: a.host, Path: a.path,
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
