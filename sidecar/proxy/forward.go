package proxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"attache/sidecar/breaker"

	"github.com/valyala/fasthttp"
)

// exchange is one protocol's way of sending a request to an instance.
type exchange interface {
	// try sends the request to ep, giving up at deadline. It returns the
	// answer's status, or an error when there is no answer.
	try(ep *endpoint, deadline time.Time) (status int, err error)
	// discard drops an answer that will not be used (before a retry).
	discard()
}

// outcome of forwarding one request.
type outcome int

const (
	outAnswered  outcome = iota // status holds the instance's answer (maybe a 5xx)
	outError                    // err holds why no instance answered
	outOpen                     // the breaker refused
	outNoHealthy                // no instance to send to
	outUnknown                  // the catalog does not know the service
)

type result struct {
	kind   outcome
	status int
	err    error
	ep     *endpoint
	open   *breaker.OpenError
}

// fwd is one request's way through forward: the breaker call, the
// instances tried so far and the last try's result. The event loop runs
// the first try itself and hands a fwd to forwardFrom for the retries.
type fwd struct {
	set      *epSet
	svc      *breaker.Service // the breaker asked: the route's own, else the service's
	call     breaker.Call
	start    time.Time
	deadline time.Time
	t0, end  time.Time // the current try's start; the last try's end
	tried    [maxTries]*endpoint
	n        int
	res      result
	next     *endpoint // already picked for the next try
	pol      *Policy   // a gateway route's settings; nil: none
	own      *Policy   // the service's own settings (Config.Policies); nil: none
	acc      *accReq   // the access log's fields; nil: not logged
}

// forward runs the request through the breaker, the balancer and the retry
// policy. replayable says whether the request may be sent more than once.
func (t *target) forward(ctx context.Context, x exchange, replayable bool) result {
	return t.forwardWith(ctx, x, replayable, nil, nil)
}

// forwardWith is forward with a gateway route's settings (nil: the
// proxy's) and the request's access log fields (nil: not logged).
func (t *target) forwardWith(ctx context.Context, x exchange, replayable bool, pol *Policy, acc *accReq) result {
	f := fwd{acc: acc}
	start := time.Now()
	if res, ok := t.begin(ctx, &f, start, pol); !ok {
		if acc != nil {
			t.logAccess(acc, nil, start, time.Now(), res, 0)
		}
		return res
	}
	return t.forwardFrom(ctx, x, replayable, &f, 0)
}

// begin asks the catalog and the breaker whether the request may go out
// at all; false: res is the answer (unknown service, breaker open).
func (t *target) begin(ctx context.Context, f *fwd, start time.Time, pol *Policy) (result, bool) {
	t.keepWanted(ctx, start, false)
	set := t.endpoints()
	if !set.found {
		set = t.want(ctx)
		if !set.found && !set.known {
			t.met.count(classUnknown)
			return result{kind: outUnknown}, false
		}
	}
	return t.admit(f, set, start, pol)
}

// admit is begin's part that never waits: the breaker (pol's own, else the
// service's) and the budget; once admitted, f follows pol, then the
// service's own settings, then the proxy's.
func (t *target) admit(f *fwd, set *epSet, start time.Time, pol *Policy) (result, bool) {
	svc := t.breakerFor(pol)
	call, err := svc.Allow(start)
	if err != nil {
		res := openResult(err)
		if res.open != nil && res.open.State == breaker.MaxRequests {
			t.met.count(classOverflow)
		} else {
			t.met.count(classOpen)
		}
		return res, false
	}
	*f = fwd{set: set, svc: svc, call: call, start: start, deadline: start.Add(t.p.live.Load().requestTimeout), t0: start, acc: f.acc}
	f.with(t.p, pol, t.pol)
	t.budget.request(start)
	return result{}, true
}

// breakerFor is the breaker a request with pol asks: the route's own for
// this service, else the service's.
func (t *target) breakerFor(pol *Policy) *breaker.Service {
	if pol != nil && pol.Breaker != nil {
		return pol.Breaker
	}
	return t.svc
}

// forwardFrom tries instances until one answers well or the retry policy
// says stop, starting after f.n failed tries (the last one's answer, if
// any, still in x) and a backoff of back.
func (t *target) forwardFrom(ctx context.Context, x exchange, replayable bool, f *fwd, back time.Duration) result {
	for {
		if f.n > 0 { // after a failed try: back off, then pick from the newest view
			if back > 0 {
				timer := time.NewTimer(back)
				select {
				case <-timer.C:
				case <-ctx.Done():
					timer.Stop()
					f.svc.Done(f.call, true, time.Now())
					return f.res // the last answer, still readable
				}
			}
			f.set, f.t0 = t.endpoints(), time.Now()
		}
		ep := f.next
		f.next = nil
		if ep == nil {
			ep = t.pick(f.set, f.tried[:f.n], f.pol)
		}
		if ep == nil {
			if f.n == 0 {
				return t.noHealthy(f)
			}
			break // f.res holds the last failure, its answer not yet discarded
		}
		if f.n > 0 {
			// Only now is the last answer certainly unused: a request that
			// runs out of instances (or time) answers with it.
			x.discard()
		}
		ep.inflight.Add(1)
		status, err := x.try(ep, f.tryDeadline(t.p))
		ep.inflight.Add(-1)
		if !t.report(f, ep, status, err, time.Now()) {
			break
		}
		var ok bool
		if back, ok = t.retryAfter(f, replayable, status, err); !ok {
			break
		}
	}
	return t.done(f)
}

// tryDeadline is when the current try gives up. A half-open breaker's
// trial call gives up at SlowCallDuration: slower, it fails the trial
// anyway, and its caller gets the fallback rather than waiting.
func (f *fwd) tryDeadline(p *Proxy) time.Time {
	d := f.t0.Add(f.tryTimeout(p))
	if f.call.Trial() {
		d = f.t0.Add(min(f.tryTimeout(p), f.svc.Config().SlowCallDuration))
	}
	if d.After(f.deadline) {
		return f.deadline
	}
	return d
}

// noHealthy ends a request no instance could be picked for: the service
// has none, which says nothing about its instances (the breaker does not
// count it).
func (t *target) noHealthy(f *fwd) result {
	f.svc.Cancel(f.call)
	t.met.count(classNoHealthy)
	res := result{kind: outNoHealthy}
	if f.acc != nil {
		t.logAccess(f.acc, f.svc, f.start, time.Now(), res, 0)
	}
	return res
}

// report records a try's outcome (status, or err when there is no answer)
// at end, and says whether it failed.
func (t *target) report(f *fwd, ep *endpoint, status int, err error, end time.Time) bool {
	p := t.p
	f.end = end
	d := end.Sub(f.t0)
	failed := err != nil || p.failureOn[status%600]
	if !errors.Is(err, fasthttp.ErrNoFreeConns) { // our own pool limit says nothing about the instance
		ep.out.Report(failed)
	}
	ep.met.observe(d, failed)
	if err != nil {
		f.res = result{kind: outError, err: err, ep: ep}
	} else {
		f.res = result{kind: outAnswered, status: status, ep: ep}
	}
	if failed {
		f.tried[f.n] = ep
		f.n++
	}
	return failed
}

// retryAfter says whether a failed try is retried, and after what backoff.
func (t *target) retryAfter(f *fwd, replayable bool, status int, err error) (time.Duration, bool) {
	p := t.p
	if !replayable || f.n > f.maxRetries(p) || (err == nil && !p.retryOn[status%600]) {
		return 0, false
	}
	if f.svc.Tripped() { // the breaker opened meanwhile: answer now
		return 0, false
	}
	if !t.budget.retry(f.end, p.cfg.RetryBudget, p.cfg.MinRetries) {
		t.met.budgetExhausted.Inc()
		return 0, false
	}
	// Full-jitter backoff, never past the request deadline.
	back := p.cfg.RetryBackoff << (f.n - 1)
	if back > p.cfg.RetryBackoffMax || back <= 0 {
		back = p.cfg.RetryBackoffMax
	}
	back = time.Duration(rand.Int64N(int64(back) + 1))
	if f.end.Add(back + time.Millisecond).After(f.deadline) {
		return 0, false
	}
	t.met.retries.Inc()
	return back, true
}

// done ends a request with the last try's result.
func (t *target) done(f *fwd) result {
	p := t.p
	res := f.res
	total := f.end.Sub(f.start)
	finalFailed := res.kind == outError || p.failureOn[res.status%600]
	f.svc.Done(f.call, finalFailed, f.end)
	t.met.latency.Observe(total.Seconds())
	if res.kind == outError {
		if isTimeout(res.err) {
			t.met.count(class5xx) // answered 504
		} else {
			t.met.count(classError)
		}
	} else {
		t.met.count(statusClass(res.status))
	}
	if f.acc != nil {
		tries := f.n // the failed tries
		if !finalFailed && res.ep != nil {
			tries++ // and the last one, which answered
		}
		t.logAccess(f.acc, f.svc, f.start, f.end, res, tries)
	}
	return res
}

// keepWanted tells the source, at most once a second, that the service is
// still in use (an on-demand watch nobody asks for is stopped).
// An event loop, which must never wait, asks in a goroutine (async).
func (t *target) keepWanted(ctx context.Context, now time.Time, async bool) {
	s := now.Unix()
	if t.lastWant.Load() == s {
		return
	}
	t.lastWant.Store(s)
	want := func() {
		wctx, cancel := context.WithTimeout(ctx, t.p.cfg.WantTimeout)
		t.p.src.Want(wctx, t.name)
		cancel()
	}
	if async {
		go want()
	} else {
		want()
	}
}

// budget limits retries to a share of requests over a 10s window of
// one-second buckets, plus a small floor so that a quiet service can still
// retry.
type budget struct {
	buckets [10]struct {
		sec     atomic.Int64
		reqs    atomic.Int64
		retries atomic.Int64
	}
}

func (b *budget) slot(t time.Time) int {
	now := t.Unix()
	i := int(now % 10)
	bk := &b.buckets[i]
	if s := bk.sec.Load(); s != now && bk.sec.CompareAndSwap(s, now) {
		bk.reqs.Store(0)
		bk.retries.Store(0)
	}
	return i
}

func (b *budget) request(now time.Time) { b.buckets[b.slot(now)].reqs.Add(1) }

// retry takes one retry from the budget if there is one left.
func (b *budget) retry(t time.Time, ratio float64, floor int) bool {
	i := b.slot(t)
	now := t.Unix()
	var reqs, retries int64
	for j := range b.buckets {
		bk := &b.buckets[j]
		if now-bk.sec.Load() < 10 {
			reqs += bk.reqs.Load()
			retries += bk.retries.Load()
		}
	}
	if float64(retries+1) > ratio*float64(reqs)+float64(floor) {
		return false
	}
	b.buckets[i].retries.Add(1)
	return true
}

// replaySafe says whether a request may be sent again: idempotent methods
// (RFC 9110 §9.2.2) or a request carrying an Idempotency-Key.
func replaySafe(req *fasthttp.Request) bool {
	return idempotent(req.Header.Method()) || len(req.Header.Peek("Idempotency-Key")) > 0
}

func idempotent(m []byte) bool {
	switch string(m) {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

var errEOF = io.EOF

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrUnexpectedEOF)
}

func isTimeout(err error) bool {
	if errors.Is(err, fasthttp.ErrTimeout) || errors.Is(err, fasthttp.ErrDialTimeout) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
