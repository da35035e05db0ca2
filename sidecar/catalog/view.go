package catalog

import (
	"sync"
	"sync/atomic"
)

// View holds the current Snapshot. Readers call Load, which never blocks; the
// watcher calls Publish, which swaps the whole Snapshot and tells subscribers
// without ever waiting on them.
type View struct {
	cur  atomic.Pointer[Snapshot]
	mu   sync.Mutex // guards subs and serialises Publish
	subs map[chan struct{}]struct{}
}

// NewView returns a View holding an empty, non-nil Snapshot (version 0).
func NewView() *View {
	v := &View{subs: make(map[chan struct{}]struct{})}
	v.cur.Store(&Snapshot{
		Services: map[string]*Service{},
		Nodes:    map[string]*Node{},
		Known:    map[string]bool{},
	})
	return v
}

// Load returns the current Snapshot. It is never nil and must not be modified.
func (v *View) Load() *Snapshot { return v.cur.Load() }

// Publish makes s the current Snapshot, giving it the next version number,
// and notifies subscribers. s must not be modified afterwards.
func (v *View) Publish(s *Snapshot) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s.Version = v.cur.Load().Version + 1
	v.cur.Store(s)
	for ch := range v.subs {
		select {
		case ch <- struct{}{}:
		default: // already has a pending notification
		}
	}
}

// Subscribe returns a channel that receives a value after each Publish
// (notifications coalesce: a slow reader sees one for several publishes) and
// a function that ends the subscription.
func (v *View) Subscribe() (<-chan struct{}, func()) {
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
