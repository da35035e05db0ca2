package watch

import (
	"context"
	"sync"
	"time"
)

// Waker ends the error backoff of every loop sleeping on it at once: when
// something cheap finds Consul answering again (a probe of the local
// agent), the loops need not sleep out a backoff that grew while it was
// down. It also ends the queries its loops have under way, which they ask
// again at once: one sent before the outage may hang on a connection that
// broke meanwhile (after a network partition, the agent's forwarded query
// waits on TCP retransmissions, which back off to tens of seconds). The
// zero value is not usable: NewWaker.
type Waker struct {
	mu     sync.Mutex
	ctx    context.Context // ends at the next Wake
	cancel context.CancelFunc
}

// NewWaker returns a Waker.
func NewWaker() *Waker {
	w := &Waker{}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	return w
}

// Wake ends every Sleep and every query under way.
func (w *Waker) Wake() {
	w.mu.Lock()
	w.cancel()
	w.ctx, w.cancel = context.WithCancel(context.Background())
	w.mu.Unlock()
}

// context returns a context that ends at the next Wake.
func (w *Waker) context() context.Context {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ctx
}

func (w *Waker) c() <-chan struct{} { return w.context().Done() }

// Sleep waits d, or until ctx ends, or until Wake (a nil Waker: d or ctx
// alone); it reports whether ctx is still live.
func (w *Waker) Sleep(ctx context.Context, d time.Duration) bool {
	if w == nil {
		return Sleep(ctx, d)
	}
	if d <= 0 {
		return ctx.Err() == nil
	}
	woken := w.c()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	case <-woken:
	}
	return ctx.Err() == nil
}
