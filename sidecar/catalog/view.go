package catalog

import "attache/sidecar/watch"

// View holds the current Snapshot: Load never blocks, Publish swaps the
// whole Snapshot (setting its Version) and tells subscribers.
type View = watch.View[Snapshot]

// NewView returns a View holding an empty, non-nil Snapshot (version 0).
func NewView() *View {
	return watch.NewView(&Snapshot{
		Services: map[string]*Service{},
		Nodes:    map[string]*Node{},
		Known:    map[string]bool{},
	}, func(s *Snapshot, version uint64) { s.Version = version })
}
