package catalog

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/serf/coordinate"
)

// fakeConsul speaks the shape of Consul's HTTP API for the endpoints the
// watcher uses, with blocking queries on one global index. It exists for the
// edge cases a real server cannot be made to produce on demand (an index
// going backwards, a hung connection, garbage JSON); everything else is
// tested against a real cluster.
type fakeConsul struct {
	srv *httptest.Server

	mu       sync.Mutex
	index    uint64
	changed  chan struct{}
	entries  map[string][]*api.ServiceEntry // by service name
	nodes    []*api.Node
	coords   []*api.CoordinateEntry
	contact  time.Duration // X-Consul-LastContact for stale queries
	seen     []string      // "path index stale" of each request
	fault    func(w http.ResponseWriter, r *http.Request) bool
	requests atomic.Int64
}

func newFake(t testing.TB) *fakeConsul {
	f := &fakeConsul{index: 10, changed: make(chan struct{}), entries: map[string][]*api.ServiceEntry{}}
	f.nodes = []*api.Node{{Node: "node1", Address: "10.0.0.1", Datacenter: "dc1"}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeConsul) addr() string { return f.srv.Listener.Addr().String() }

// update changes the state under the lock and wakes blocked queries.
func (f *fakeConsul) update(fn func()) {
	f.mu.Lock()
	fn()
	f.index++
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

// setIndex forces the index (to make it go backwards) and wakes queries.
func (f *fakeConsul) setIndex(i uint64) {
	f.mu.Lock()
	f.index = i
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *fakeConsul) setFault(fn func(w http.ResponseWriter, r *http.Request) bool) {
	f.mu.Lock()
	f.fault = fn
	f.mu.Unlock()
}

func (f *fakeConsul) seenRequests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.seen...)
}

// register adds (or replaces) an instance with one check of the given status.
func (f *fakeConsul) register(service, id, node, addr string, port int, status string) {
	f.update(func() {
		list := f.entries[service]
		e := &api.ServiceEntry{
			Node:    &api.Node{Node: node, Address: "10.0.0.1", Datacenter: "dc1"},
			Service: &api.AgentService{ID: id, Service: service, Address: addr, Port: port, Weights: api.AgentWeights{Passing: 1, Warning: 1}},
			Checks:  api.HealthChecks{{Node: node, CheckID: "check:" + id, Status: status, ServiceID: id}},
		}
		for i, old := range list {
			if old.Service.ID == id && old.Node.Node == node {
				list[i] = e
				f.entries[service] = list
				return
			}
		}
		f.entries[service] = append(list, e)
	})
}

func (f *fakeConsul) deregister(service, id string) {
	f.update(func() {
		list := f.entries[service]
		out := list[:0]
		for _, e := range list {
			if e.Service.ID != id {
				out = append(out, e)
			}
		}
		if len(out) == 0 {
			delete(f.entries, service)
		} else {
			f.entries[service] = out
		}
	})
}

func (f *fakeConsul) serve(w http.ResponseWriter, r *http.Request) {
	f.requests.Add(1)
	q := r.URL.Query()
	idx, _ := strconv.ParseUint(q.Get("index"), 10, 64)
	_, stale := q["stale"]
	f.mu.Lock()
	f.seen = append(f.seen, r.URL.Path+" "+strconv.FormatUint(idx, 10)+" "+strconv.FormatBool(stale))
	fault := f.fault
	f.mu.Unlock()
	if fault != nil && fault(w, r) {
		return
	}
	wait := 5 * time.Minute
	if d, err := time.ParseDuration(q.Get("wait")); err == nil {
		wait = d
	}
	f.mu.Lock()
	if idx > 0 && idx == f.index {
		ch := f.changed
		f.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
		t.Stop()
		f.mu.Lock()
		if fault := f.fault; fault != nil { // installed while the query waited
			f.mu.Unlock()
			if fault(w, r) {
				return
			}
			f.mu.Lock()
		}
	}
	defer f.mu.Unlock()
	var body any
	switch p := r.URL.Path; {
	case p == "/v1/catalog/services":
		m := map[string][]string{"consul": {}}
		for name := range f.entries {
			m[name] = []string{}
		}
		body = m
	case strings.HasPrefix(p, "/v1/health/service/"):
		name := strings.TrimPrefix(p, "/v1/health/service/")
		_, passing := q["passing"]
		out := []*api.ServiceEntry{}
		for svc, list := range f.entries {
			if !strings.EqualFold(svc, name) || q.Get("filter") == never {
				continue
			}
			for _, e := range list {
				if passing && e.Checks.AggregatedStatus() != api.HealthPassing {
					continue
				}
				out = append(out, e)
			}
		}
		body = out
	case strings.HasPrefix(p, "/v1/health/state/"):
		state := strings.TrimPrefix(p, "/v1/health/state/")
		out := []*api.HealthCheck{}
		for _, list := range f.entries {
			for _, e := range list {
				for _, c := range e.Checks {
					if state != "any" && c.Status != state {
						continue
					}
					cc := *c
					cc.ServiceName = e.Service.Service
					out = append(out, &cc)
				}
			}
		}
		body = out
	case p == "/v1/catalog/nodes":
		body = f.nodes
	case p == "/v1/coordinate/nodes":
		body = f.coords
	default:
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	lc := time.Duration(0)
	if stale {
		lc = f.contact
	}
	w.Header().Set("X-Consul-LastContact", strconv.FormatInt(lc.Milliseconds(), 10))
	w.Header().Set("X-Consul-KnownLeader", "true")
	_ = json.NewEncoder(w).Encode(body)
}

// testConfig is a config for tests: fast loops, no disk.
func testConfig(addrs ...string) Config {
	c := DefaultConfig()
	c.Addresses = addrs
	c.Wait = 2 * time.Second
	c.MinInterval = time.Millisecond
	c.RetryBase = 10 * time.Millisecond
	c.RetryMax = 100 * time.Millisecond
	c.RequestTimeout = 2 * time.Second
	c.CoordInterval = 50 * time.Millisecond
	return c
}

// waitFor polls cond (with the newest snapshot) until it holds or d passes.
func waitFor(t testing.TB, w *Watcher, d time.Duration, what string, cond func(*Snapshot) bool) *Snapshot {
	t.Helper()
	deadline := time.Now().Add(d)
	ch, cancel := w.View().Subscribe()
	defer cancel()
	for {
		s := w.Load()
		if cond(s) {
			return s
		}
		left := time.Until(deadline)
		if left <= 0 {
			b, _ := json.MarshalIndent(s, "", " ")
			t.Fatalf("timed out waiting for %s; snapshot:\n%s\nstatus: %+v", what, b, w.Status())
		}
		select {
		case <-ch:
		case <-time.After(min(left, 50*time.Millisecond)):
		}
	}
}

// ids lists the instance IDs of service in s, sorted.
func ids(s *Snapshot, service string) []string {
	svc, ok := s.Service(service)
	if !ok {
		return nil
	}
	out := []string{}
	for _, i := range svc.Instances {
		out = append(out, i.ID)
	}
	sort.Strings(out)
	return out
}

func same(a []string, b ...string) bool {
	if a == nil {
		return false
	}
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

var _ = coordinate.NewCoordinate
