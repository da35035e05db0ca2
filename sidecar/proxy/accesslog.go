package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"attache/sidecar/breaker"
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

// run writes queued entries until ctx ends, then what is still queued.
// Lines are buffered and written when the queue runs empty (or the buffer
// fills): one write for a burst, not one per line.
func (a *accessLog) run(ctx context.Context) {
	bw := bufio.NewWriterSize(a.w, 64<<10)
	enc := json.NewEncoder(bw)
	write := func(e *AccessEntry) {
		if err := enc.Encode(e); err != nil {
			a.log.Warn("access log: write failed", "error", err)
			return
		}
		a.lines.Inc()
	}
	flush := func() {
		if err := bw.Flush(); err != nil {
			a.log.Warn("access log: write failed", "error", err)
			bw.Reset(a.w)
		}
	}
	for {
		select {
		case e := <-a.ch:
			write(&e)
			if len(a.ch) == 0 {
				flush()
			}
		case <-ctx.Done():
			for {
				select {
				case e := <-a.ch:
					write(&e)
				default:
					flush()
					return
				}
			}
		}
	}
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
func rawAccReq(p *Proxy, rt *routing, b []byte, r *rawReq, host, path span) *accReq {
	if p.acc == nil {
		return nil
	}
	if host.e <= host.s {
		host = r.host
	}
	var h []byte
	if host.e > host.s {
		h = b[host.s:host.e]
	}
	return newAccReq(p, rt, b[r.method.s:r.method.e], h, b[path.s:path.e])
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
