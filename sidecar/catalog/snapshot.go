// Package catalog owns the sidecar's view of the Consul catalog: the blocking
// query watcher that keeps it fresh, the immutable Snapshot that DNS, the proxy
// and the gateway read without ever waiting on Consul, the last-known-good copy
// on disk, and the registration of local services with the node's agent.
package catalog

import (
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/serf/coordinate"
)

// Instance is one healthy (or, when configured, warning) instance of a service.
type Instance struct {
	ID          string            `json:"id"`
	Service     string            `json:"service"`
	Node        string            `json:"node"`
	NodeAddress string            `json:"node_address"`
	Address     string            `json:"address"` // the service address, falling back to the node's
	Port        int               `json:"port"`
	Tags        []string          `json:"tags,omitempty"`
	Meta        map[string]string `json:"meta,omitempty"`
	Weight      int               `json:"weight"` // Consul's Weights.Passing (or Warning for warning instances)
	Datacenter  string            `json:"datacenter"`
	Status      string            `json:"status"` // "passing" or "warning"
}

// HasTag reports whether the instance carries tag, compared case-insensitively
// as Consul's DNS does.
func (i *Instance) HasTag(tag string) bool {
	for _, t := range i.Tags {
		if strings.EqualFold(t, tag) {
			return true
		}
	}
	return false
}

// Node is a Consul node known to the view.
type Node struct {
	Name       string            `json:"name"`
	Address    string            `json:"address"`
	Datacenter string            `json:"datacenter"`
	Meta       map[string]string `json:"meta,omitempty"`
}

// Service is the set of instances of one service, sorted by ID.
type Service struct {
	Name      string     `json:"name"`
	Index     uint64     `json:"index"` // the Consul index this service's entry came from
	Instances []Instance `json:"instances"`
}

// Snapshot is an immutable view of the catalog. It is never modified after it
// is published: a change produces a new Snapshot that replaces it whole.
type Snapshot struct {
	Version    uint64                            `json:"version"`    // increases by one with every published change
	Index      uint64                            `json:"index"`      // the highest Consul index it reflects
	Datacenter string                            `json:"datacenter"` // the local datacenter
	Updated    time.Time                         `json:"updated"`    // when Consul last told us something new
	Stale      bool                              `json:"stale"`      // loaded from disk and not yet confirmed by Consul
	Services   map[string]*Service               `json:"services"`   // by lower-cased name
	Nodes      map[string]*Node                  `json:"nodes"`      // by lower-cased name
	Coords     map[string]*coordinate.Coordinate `json:"coords,omitempty"`
	// Known lists every service name the catalog has, watched or not
	// (lower-cased), so that a question about an unknown name can be told
	// apart from one about a known service with no healthy instance.
	Known map[string]bool `json:"known,omitempty"`
}

// Service returns the named service (case-insensitive) and whether it is in
// the view. A service present with no instances is known but has none healthy.
func (s *Snapshot) Service(name string) (*Service, bool) {
	if s == nil {
		return nil, false
	}
	svc, ok := s.Services[strings.ToLower(name)]
	return svc, ok
}

// Node returns the named node (case-insensitive).
func (s *Snapshot) Node(name string) (*Node, bool) {
	if s == nil {
		return nil, false
	}
	n, ok := s.Nodes[strings.ToLower(name)]
	return n, ok
}

// RTT estimates the round-trip time between two nodes from their network
// coordinates. ok is false when either coordinate is unknown.
func (s *Snapshot) RTT(from, to string) (time.Duration, bool) {
	if s == nil {
		return 0, false
	}
	a, b := s.Coords[strings.ToLower(from)], s.Coords[strings.ToLower(to)]
	if a == nil || b == nil || !a.IsCompatibleWith(b) {
		return 0, false
	}
	return a.DistanceTo(b), true
}

// ServiceNames returns the names of the services in the view, sorted.
func (s *Snapshot) ServiceNames() []string {
	if s == nil {
		return nil
	}
	names := make([]string, 0, len(s.Services))
	for n := range s.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
