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

// forward runs the request through the breaker, the balancer and the retry
// policy. replayable says whether the request may be sent more than once.
func (t *target) forward(ctx context.Context, x exchange, replayable bool) result {
	p := t.p
	start := time.Now()
	t.keepWanted(ctx, start)
	set := t.endpoints()
	if !set.found {
		set = t.want(ctx)
		if !set.found && !set.known {
			t.met.count(classUnknown)
			return result{kind: outUnknown}
		}
	}
	call, err := t.svc.Allow()
	if err != nil {
		var oe *breaker.OpenError
		errors.As(err, &oe)
		t.met.count(classOpen)
		return result{kind: outOpen, open: oe}
	}
	deadline := start.Add(p.cfg.RequestTimeout)
	t.budget.request(start)
	var tried [maxTries]*endpoint
	n := 0
	var res result
	t0 := start
	var end time.Time
	for {
		ep := t.pick(set, tried[:n])
		if ep == nil {
			if n == 0 {
				t.svc.Done(call, true, time.Since(start))
				t.met.count(classNoHealthy)
				return result{kind: outNoHealthy}
			}
			break // res holds the last failure, its answer not yet discarded
		}
		if n > 0 {
			// Only now is the last answer certainly unused: a request that
			// runs out of instances (or time) answers with it.
			x.discard()
		}
		tryDeadline := t0.Add(p.cfg.TryTimeout)
		if tryDeadline.After(deadline) {
			tryDeadline = deadline
		}
		ep.inflight.Add(1)
		status, err := x.try(ep, tryDeadline)
		ep.inflight.Add(-1)
		end = time.Now()
		d := end.Sub(t0)
		failed := err != nil || p.failureOn[status%600]
		if !errors.Is(err, fasthttp.ErrNoFreeConns) { // our own pool limit says nothing about the instance
			ep.out.Report(failed)
		}
		ep.met.observe(d, failed)
		if err != nil {
			res = result{kind: outError, err: err, ep: ep}
		} else {
			res = result{kind: outAnswered, status: status, ep: ep}
		}
		if !failed {
			break
		}
		tried[n] = ep
		n++
		if !replayable || n > p.cfg.MaxRetries || (err == nil && !p.retryOn[status%600]) {
			break
		}
		if !t.budget.retry(end, p.cfg.RetryBudget, p.cfg.MinRetries) {
			t.met.budgetExhausted.Inc()
			break
		}
		// Full-jitter backoff, never past the request deadline.
		back := p.cfg.RetryBackoff << (n - 1)
		if back > p.cfg.RetryBackoffMax || back <= 0 {
			back = p.cfg.RetryBackoffMax
		}
		back = time.Duration(rand.Int64N(int64(back) + 1))
		if end.Add(back + time.Millisecond).After(deadline) {
			break
		}
		t.met.retries.Inc()
		if back > 0 {
			timer := time.NewTimer(back)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				t.svc.Done(call, true, time.Since(start))
				return res // the last answer, still readable
			}
		}
		set = t.endpoints()
		t0 = time.Now()
	}
	total := end.Sub(start)
	finalFailed := res.kind == outError || p.failureOn[res.status%600]
	t.svc.Done(call, finalFailed, total)
	t.met.latency.Observe(total.Seconds())
	if res.kind == outError {
		t.met.count(classError)
	} else {
		t.met.count(statusClass(res.status))
	}
	return res
}

// keepWanted tells the source, at most once a second, that the service is
// still in use (an on-demand watch nobody asks for is stopped).
func (t *target) keepWanted(ctx context.Context, now time.Time) {
	s := now.Unix()
	if t.lastWant.Load() == s {
		return
	}
	t.lastWant.Store(s)
	wctx, cancel := context.WithTimeout(ctx, t.p.cfg.WantTimeout)
	t.p.src.Want(wctx, t.name)
	cancel()
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
