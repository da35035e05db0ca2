package watch

import (
	"sync"
	"sync/atomic"
)

// View holds the current value of type T, replaced whole. Readers call
// Load, which never blocks; a writer calls Publish, which swaps the value,
// gives it the next version and notifies subscribers without ever waiting
// on them. Values must not be modified once published.
type View[T any] struct {
	cur   atomic.Pointer[versioned[T]]
	stamp func(*T, uint64)
	mu    sync.Mutex // guards subs and serialises Publish
	subs  map[chan struct{}]struct{}
}

type versioned[T any] struct {
	val     *T
	version uint64
}

// NewView returns a View holding initial (version 0; it must not be nil).
// stamp, when not nil, is called with each published value and its version
// before the value becomes visible, for types that carry their version.
func NewView[T any](initial *T, stamp func(v *T, version uint64)) *View[T] {
	v := &View[T]{stamp: stamp, subs: map[chan struct{}]struct{}{}}
	v.cur.Store(&versioned[T]{val: initial})
	return v
}

// Load returns the current value (never nil).
func (v *View[T]) Load() *T { return v.cur.Load().val }

// Version returns the current value's version: 0 for the initial value,
// then one more with every Publish.
func (v *View[T]) Version() uint64 { return v.cur.Load().version }

// Publish makes x the current value with the next version, notifies
// subscribers and returns the version.
func (v *View[T]) Publish(x *T) uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	n := v.cur.Load().version + 1
	if v.stamp != nil {
		v.stamp(x, n)
	}
	v.cur.Store(&versioned[T]{val: x, version: n})
	for ch := range v.subs {
		select {
		case ch <- struct{}{}:
		default: // already has a pending notification
		}
	}
	return n
}

// Subscribe returns a channel that receives a value after each Publish
// (notifications coalesce: a slow reader sees one for several publishes)
// and a function that ends the subscription.
func (v *View[T]) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	v.mu.Lock()
	v.subs[ch] = struct{}{}
	v.mu.Unlock()
	return ch, func() {
		v.mu.Lock()
		delete(v.subs, ch)
		v.mu.Unlock()
	}
}
