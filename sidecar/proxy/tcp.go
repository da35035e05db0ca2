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

// handleTCP goes through the same policy as an HTTP request (forward: the
// breaker, the balancer, retries with their budget and backoff, outlier
// reports), a try being a connect; then it splices the two connections.
func (p *Proxy) handleTCP(ctx context.Context, c net.Conn, t *target) {
	x := &tcpConnect{ctx: ctx, d: &p.dialer}
	res := t.forward(ctx, x, true)
	if res.kind != outAnswered || x.up == nil {
		p.log.Debug("tcp connection refused", "service", t.name, "outcome", res.kind, "error", res.err)
		c.Close()
		return
	}
	// The connection counts as in flight for the least-request balancer as
	// long as it lasts.
	res.ep.inflight.Add(1)
	p.splice(c, x.up)
	res.ep.inflight.Add(-1)
}

// tcpConnect is the exchange of a raw TCP upstream: a try connects to the
// instance; a connection counts as an answer (status 200: the breaker and
// the outlier detector count it a success), a refused or timed-out connect
// as a failed try.
type tcpConnect struct {
	ctx context.Context
	d   *net.Dialer
	up  net.Conn // the connection of the try that succeeded
}

func (x *tcpConnect) try(ep *endpoint, deadline time.Time) (int, error) {
	ctx, cancel := context.WithDeadline(x.ctx, deadline)
	defer cancel()
	up, err := x.d.DialContext(ctx, "tcp", ep.addr)
	if err != nil {
		return 0, err
	}
	x.up = up
	return 200, nil
}

// discard has nothing to drop: a failed connect left no connection.
func (x *tcpConnect) discard() {}
