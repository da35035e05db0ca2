package watch

import (
	"context"
	"sync"
	"time"
)

// Waker ends the error backoff of every loop sleeping on it at once: when
// something cheap finds Consul answering again (a probe of the local
// agent), the loops need not sleep out a backoff that grew while it was
// down. The zero value is not usable: NewWaker.
type Waker struct {
	mu sync.Mutex
	ch chan struct{}
}

// NewWaker returns a Waker.
func NewWaker() *Waker { return &Waker{ch: make(chan struct{})} }

// Wake ends every Sleep under way.
func (w *Waker) Wake() {
	w.mu.Lock()
	close(w.ch)
	w.ch = make(chan struct{})
	w.mu.Unlock()
}

func (w *Waker) c() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ch
}

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
