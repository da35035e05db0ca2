package proxy

import (
	"context"
	"net"
	"time"
)

// serveTCP accepts connections for a raw TCP upstream and splices each to
// one instance. A failed connect is tried on another instance (nothing has
// been sent yet, so this is always safe), within the retry limits.
func (p *Proxy) serveTCP(ctx context.Context, ln net.Listener, t *target) {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	acceptEach(ctx, ln, func(c net.Conn) { p.handleTCP(ctx, c, t) })
}

func (p *Proxy) handleTCP(ctx context.Context, c net.Conn, t *target) {
	t.keepWanted(ctx, time.Now(), false)
	set := t.endpoints()
	if !set.found {
		set = t.want(ctx)
	}
	start := time.Now()
	call, err := t.svc.Allow(start)
	if err != nil {
		p.log.Debug("tcp connection refused", "service", t.name, "error", err)
		t.met.count(classOpen)
		c.Close()
		return
	}
	t.budget.request(start)
	var tried [maxTries]*endpoint
	n := 0
	for {
		ep := t.pick(set, tried[:n], nil)
		if ep == nil {
			if n == 0 {
				t.svc.Cancel(call)
				t.met.count(classNoHealthy)
			} else {
				t.svc.Done(call, true, time.Now())
				t.met.count(classError)
			}
			c.Close()
			return
		}
		ep.inflight.Add(1)
		t0 := time.Now()
		up, err := p.dialer.DialContext(ctx, "tcp", ep.addr)
		ep.met.observe(time.Since(t0), err != nil)
		ep.out.Report(err != nil)
		if err == nil {
			t.svc.Done(call, false, time.Now())
			t.met.count(class2xx)
			p.splice(c, up)
			ep.inflight.Add(-1)
			return
		}
		ep.inflight.Add(-1)
		tried[n] = ep
		n++
		if n > p.live.Load().maxRetries || !t.budget.retry(time.Now(), p.cfg.RetryBudget, p.cfg.MinRetries) {
			t.svc.Done(call, true, time.Now())
			t.met.count(classError)
			c.Close()
			return
		}
		t.met.retries.Inc()
	}
}
