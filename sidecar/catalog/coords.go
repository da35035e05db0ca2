package catalog

import (
	"context"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/serf/coordinate"
)

// coordsLoop reads the LAN network coordinates of the datacenter's nodes
// (Consul's serf coordinates) every CoordInterval, without blocking (so it
// holds no connection between reads): coordinates move a little all the
// time, and a ranking by round-trip time needs them fresh to seconds, not
// milliseconds.
func (w *Watcher) coordsLoop(ctx context.Context) {
	runLoop(ctx, w, "coordinates", w.loopConfig(w.cfg.CoordInterval, 1), false,
		func(c *api.Client, q *api.QueryOptions) ([]*api.CoordinateEntry, *api.QueryMeta, error) {
			return c.Coordinate().Nodes(q)
		},
		func(list []*api.CoordinateEntry, index uint64) {
			coords := coordMap(list)
			w.mu.Lock()
			defer w.mu.Unlock()
			w.index = max(w.index, index)
			if reflect.DeepEqual(coords, w.coords) {
				return
			}
			w.coords = coords
			w.dirty = true
			w.signal()
		})
}

// coordMap keeps one valid coordinate per node (lower-cased name), preferring
// the default network segment.
func coordMap(list []*api.CoordinateEntry) map[string]*coordinate.Coordinate {
	m := make(map[string]*coordinate.Coordinate, len(list))
	for _, e := range list {
		if e == nil || e.Coord == nil || !validCoord(e.Coord) {
			continue
		}
		key := strings.ToLower(e.Node)
		if _, ok := m[key]; ok && e.Segment != "" {
			continue
		}
		m[key] = e.Coord
	}
	return m
}

// NearestFirst returns a copy of instances ordered by the estimated
// round-trip time from node from to each instance's node, nearest first.
// Instances whose node has no coordinate keep their order, after the others.
// With no coordinate for from, the order is unchanged.
func (s *Snapshot) NearestFirst(from string, instances []Instance) []Instance {
	out := append([]Instance(nil), instances...)
	if s == nil || s.Coords[strings.ToLower(from)] == nil {
		return out
	}
	rtt := make([]time.Duration, len(out))
	for i := range out {
		d, ok := s.RTT(from, out[i].Node)
		if !ok {
			d = time.Duration(1<<63 - 1)
		}
		rtt[i] = d
	}
	idx := make([]int, len(out))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return rtt[idx[a]] < rtt[idx[b]] })
	sorted := make([]Instance, len(out))
	for i, j := range idx {
		sorted[i] = out[j]
	}
	return sorted
}
