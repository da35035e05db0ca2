package catalog

import (
	"context"
	"reflect"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/sidecar/watch"
)

// How the watcher learns what changed without a connection per service:
//
//   - checksLoop holds two blocking queries, /v1/health/state/critical and
//     /v1/health/state/warning: the checks that are not passing (usually
//     few). The difference between two answers names the services whose
//     health changed (a node's own checks name every watched service with
//     an instance on that node).
//   - servicesLoop (watch.go) holds one on /v1/catalog/services, which wakes
//     on any change of registrations; it probes the watched services.
//   - A few fetcher goroutines (Config.MaxConns - 5) take the services to
//     look at from a queue: a fetch reads /v1/health/service/<name>; a
//     probe asks the same with a filter that matches nothing, so the answer
//     is "[]" and its X-Consul-Index, the service's own index, says whether
//     a fetch is needed.

// healthEntry is the part of an entry of /v1/health/service that the view
// keeps; the JSON decoder skips the rest.
type healthEntry struct {
	Node struct {
		Node       string
		Address    string
		Datacenter string
	}
	Service struct {
		ID      string
		Service string
		Address string
		Port    int
		Tags    []string
		Meta    map[string]string
		Weights struct{ Passing, Warning int }
	}
	Checks []struct {
		CheckID string
		Status  string
	}
}

// status is Consul's aggregated status of the entry's checks (as
// api.HealthChecks.AggregatedStatus): maintenance, then critical, then
// warning, then passing; no checks is passing; an unknown status is not
// healthy.
func (e *healthEntry) status() string {
	var warning, critical, maint bool
	for _, c := range e.Checks {
		if c.CheckID == api.NodeMaint || strings.HasPrefix(c.CheckID, api.ServiceMaintPrefix) {
			maint = true
			continue
		}
		switch c.Status {
		case api.HealthPassing:
		case api.HealthWarning:
			warning = true
		case api.HealthCritical:
			critical = true
		default:
			return ""
		}
	}
	switch {
	case maint:
		return api.HealthMaint
	case critical:
		return api.HealthCritical
	case warning:
		return api.HealthWarning
	}
	return api.HealthPassing
}

// buildService turns Consul's health entries into a Service, keeping the
// passing instances (and warning ones when includeWarning), sorted by ID
// then node. nodes lists the (lower-cased) nodes of every instance, healthy
// or not.
func buildService(name string, index uint64, entries []healthEntry, includeWarning bool) (svc *Service, nodes []string) {
	svc = &Service{Name: name, Index: index, Instances: []Instance{}}
	for i := range entries {
		e := &entries[i]
		if e.Service.ID == "" && e.Service.Service == "" {
			continue
		}
		if n := strings.ToLower(e.Node.Node); n != "" && !contains(nodes, n) {
			nodes = append(nodes, n)
		}
		status := e.status()
		weight := e.Service.Weights.Passing
		switch {
		case status == api.HealthPassing:
		case status == api.HealthWarning && includeWarning:
			weight = e.Service.Weights.Warning
		default:
			continue
		}
		if e.Service.Weights.Passing == 0 && e.Service.Weights.Warning == 0 {
			weight = 1 // registered without weights
		}
		svc.Name = e.Service.Service
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		inst := Instance{
			ID:          e.Service.ID,
			Service:     e.Service.Service,
			Node:        e.Node.Node,
			NodeAddress: e.Node.Address,
			Address:     addr,
			Port:        e.Service.Port,
			Weight:      weight,
			Datacenter:  e.Node.Datacenter,
			Status:      status,
		}
		if len(e.Service.Tags) > 0 {
			inst.Tags = e.Service.Tags
		}
		if len(e.Service.Meta) > 0 {
			inst.Meta = e.Service.Meta
		}
		svc.Instances = append(svc.Instances, inst)
	}
	sort.Slice(svc.Instances, func(i, j int) bool {
		a, b := &svc.Instances[i], &svc.Instances[j]
		if a.ID != b.ID {
			return a.ID < b.ID
		}
		return a.Node < b.Node
	})
	return svc, nodes
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// ---- health changes ----

// checkEntry is the part of a /v1/health/state answer the diff needs.
type checkEntry struct {
	Node        string
	CheckID     string
	Status      string
	ServiceID   string
	ServiceName string
}

type checkKey struct{ node, id string }

type checkState struct {
	status  string
	service string // lower-cased service name; "" for a node's own check
	node    string // lower-cased
}

// changedChecks returns the states, old and new, of the checks that differ
// between two answers (appeared, left, or changed status or service).
func changedChecks(old, cur map[checkKey]checkState) []checkState {
	var out []checkState
	for k, o := range old {
		if c, ok := cur[k]; !ok || c != o {
			out = append(out, o)
		}
	}
	for k, c := range cur {
		if o, ok := old[k]; !ok || c != o {
			out = append(out, c)
		}
	}
	return out
}

func checkMap(list []checkEntry) map[checkKey]checkState {
	m := make(map[checkKey]checkState, len(list))
	for _, c := range list {
		st := checkState{status: c.Status, node: strings.ToLower(c.Node)}
		if c.ServiceID != "" {
			st.service = strings.ToLower(c.ServiceName)
		}
		m[checkKey{st.node, c.CheckID}] = st
	}
	return m
}

// checkStatuses are the states the health queries follow: an instance
// with a check in either is not passing.
var checkStatuses = []string{api.HealthCritical, api.HealthWarning}

// checksLoop follows the checks in one state (critical or warning) and
// queues a fetch of every watched service whose health may have changed.
// Consul answers /v1/health/state/<state> from its index by status and
// wakes the query only when a check enters, leaves or changes in that
// state: a passing check's output changing wakes neither query, and the
// servers never walk every check of the datacenter. Together the two
// detect the changes of every service at once, so their rate limit is a
// tenth of the other loops' (MinInterval/10, a burst of 10): a datacenter
// whose checks change more than 10 times a second must not delay each
// change by up to MinInterval.
func (w *Watcher) checksLoop(ctx context.Context, status string) {
	runLoop(ctx, w, "health", w.loopConfig(w.cfg.MinInterval/10, 10), true,
		func(c *api.Client, q *api.QueryOptions) ([]checkEntry, *api.QueryMeta, error) {
			var out []checkEntry
			meta, err := c.Raw().Query("/v1/health/state/"+status, &out, q)
			return out, meta, err
		},
		func(list []checkEntry, index uint64) {
			set := checkMap(list)
			w.mu.Lock()
			defer w.mu.Unlock()
			w.checkSets[status] = set
			cur := make(map[checkKey]checkState, len(w.checks)+1)
			for _, m := range w.checkSets {
				for k, v := range m {
					cur[k] = v
				}
			}
			for _, st := range changedChecks(w.checks, cur) {
				if st.service == "" {
					for svc := range w.nodeSvcs[st.node] {
						w.queue.add(svc, true, true)
					}
				} else if w.watches[st.service] != nil {
					w.queue.add(st.service, true, true)
				}
			}
			w.checks = cur
			if !w.checksLoaded && len(w.checkSets) == len(checkStatuses) {
				// Fetches start now: whatever changes after these answers
				// shows in a later one's difference.
				w.checksLoaded = true
				close(w.checksReady)
				w.signal()
			}
		})
}

// ---- the fetch queue ----

// queue holds the services to fetch or probe, each at most once: urgent
// ones (a health change, a first Want) before the rest (probes, a cold
// start's first fetches). A service queued again while its job runs runs
// once more afterwards.
type queue struct {
	mu     sync.Mutex
	urgent []string
	bulk   []string
	jobs   map[string]*job
	wake   chan struct{}
}

type job struct {
	queued, running bool
	fetch           bool // fetch, not only probe
	urgent          bool // in the urgent list
	again           bool // queued again while running
	againFetch      bool
	againUrgent     bool
}

func newQueue() *queue {
	return &queue{jobs: map[string]*job{}, wake: make(chan struct{}, 1)}
}

// add queues a probe (fetch false) or a fetch of name.
func (q *queue) add(name string, fetch, urgent bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.addLocked(name, fetch, urgent)
}

func (q *queue) addLocked(name string, fetch, urgent bool) {
	j := q.jobs[name]
	if j == nil {
		j = &job{}
		q.jobs[name] = j
	}
	switch {
	case j.running:
		j.again = true
		j.againFetch = j.againFetch || fetch
		j.againUrgent = j.againUrgent || urgent
		return
	case j.queued:
		j.fetch = j.fetch || fetch
		if urgent && !j.urgent {
			j.urgent = true
			q.urgent = append(q.urgent, name) // its place in bulk is skipped
		}
		return
	}
	j.queued, j.fetch, j.urgent = true, fetch, urgent
	if urgent {
		q.urgent = append(q.urgent, name)
	} else {
		q.bulk = append(q.bulk, name)
	}
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// next waits for a job; ok is false when ctx ended.
func (q *queue) next(ctx context.Context) (name string, fetch, urgent, ok bool) {
	for {
		q.mu.Lock()
		for len(q.urgent)+len(q.bulk) > 0 {
			fromUrgent := len(q.urgent) > 0
			if fromUrgent {
				name, q.urgent = q.urgent[0], q.urgent[1:]
			} else {
				name, q.bulk = q.bulk[0], q.bulk[1:]
			}
			j := q.jobs[name]
			if j == nil || !j.queued || j.urgent != fromUrgent {
				continue // a stale place: the job ran or moved to the urgent list
			}
			j.queued, j.running = false, true
			more := len(q.urgent)+len(q.bulk) > 0
			q.mu.Unlock()
			if more {
				select {
				case q.wake <- struct{}{}: // another worker may take the rest
				default:
				}
			}
			return name, j.fetch, j.urgent, true
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return "", false, false, false
		case <-q.wake:
		}
	}
}

// done ends the running job of name, queueing it again if asked meanwhile.
func (q *queue) done(name string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	j := q.jobs[name]
	if j == nil {
		return
	}
	j.running = false
	if !j.again {
		delete(q.jobs, name)
		return
	}
	fetch, urgent := j.againFetch, j.againUrgent
	j.again, j.againFetch, j.againUrgent = false, false, false
	q.addLocked(name, fetch, urgent)
}

// ---- fetching ----

// staleCatchUp is how long a fetch in stale mode, after a change, waits for
// the answering server to hold a newer index of the service than the one
// in the view (a follower may lag the change that woke us).
const staleCatchUp = time.Second

// never is a filter no instance matches: the answer of a probe is "[]" with
// the service's index.
const never = `Service.Port == 1 and Service.Port == 2`

// fetcher runs jobs from the queue until ctx ends. It starts once both
// health queries have answered (see checksLoop).
func (w *Watcher) fetcher(ctx context.Context) {
	select {
	case <-w.checksReady:
	case <-ctx.Done():
		return
	}
	for {
		name, fetch, urgent, ok := w.queue.next(ctx)
		if !ok {
			return
		}
		err := w.look(ctx, name, fetch, urgent)
		w.queue.done(name)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			n := w.fetchErrs.Add(1)
			if !w.waker.Sleep(ctx, watch.Backoff(w.cfg.RetryBase, w.cfg.RetryMax, int(n-1))) {
				return
			}
			w.queue.add(name, fetch, urgent)
			continue
		}
		w.fetchErrs.Store(0)
	}
}

// look probes or fetches one watched service and applies the answer.
func (w *Watcher) look(ctx context.Context, name string, fetch, urgent bool) error {
	w.mu.Lock()
	wt := w.watches[name]
	known := w.fetched[name]
	w.mu.Unlock()
	if wt == nil {
		return nil // no longer watched
	}
	if !fetch && known > 0 {
		var none []struct{}
		index, _, err := w.query(ctx, "probe", name, &none, known, false, never)
		if err != nil {
			return err
		}
		if index == known {
			w.mu.Lock()
			if w.watches[name] == wt {
				w.answeredLocked(wt)
			}
			w.mu.Unlock()
			return nil
		}
	}
	var entries []healthEntry
	index, filtered, err := w.query(ctx, "service", name, &entries, known, urgent, "")
	if err != nil {
		return err
	}
	if filtered {
		w.acl.set("service/"+name, filteredService(name, len(entries)))
	} else {
		w.acl.set("service/"+name, nil)
	}
	svc, nodes := buildService(name, index, entries, w.cfg.IncludeWarning)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.watches[name] != wt {
		return nil // stopped meanwhile
	}
	w.fetched[name] = index
	w.setNodesLocked(name, nodes)
	w.answeredLocked(wt)
	if old := w.services[name]; old != nil && old.Name == svc.Name && reflect.DeepEqual(old.Instances, svc.Instances) {
		return nil // a new index, the same data
	}
	if w.dc == "" && len(svc.Instances) > 0 {
		w.dc = svc.Instances[0].Datacenter
	}
	w.mutServicesLocked()[name] = svc
	w.updated = time.Now()
	w.dirty = true
	w.signal()
	return nil
}

// query asks /v1/health/service/<name> (near=_agent unless Streaming, with
// filter when set) and decodes the answer into out. In stale mode an
// answer staler than MaxStale is asked again of the leader, and after a
// change (catchUp) the query waits up to staleCatchUp for an index past
// known. filtered reports that Consul's ACLs left part of the answer out.
func (w *Watcher) query(ctx context.Context, kind, name string, out any, known uint64, catchUp bool, filter string) (index uint64, filtered bool, err error) {
	stale := w.cfg.Stale
	hist := w.met.duration.WithLabelValues(kind)
	for {
		ci := w.cur.Load()
		q := &api.QueryOptions{AllowStale: stale, Filter: filter}
		if !w.cfg.Streaming {
			q.Near = "_agent" // bypasses the agent's streaming backend: the servers answer
		}
		timeout := w.cfg.RequestTimeout
		if stale && catchUp && known > 0 {
			q.WaitIndex, q.WaitTime = known, staleCatchUp
			timeout += staleCatchUp + staleCatchUp/16
		}
		qctx, cancel := context.WithTimeout(ctx, timeout)
		start := time.Now()
		meta, err := w.clients[int(ci)%len(w.clients)].Raw().Query("/v1/health/service/"+name, out, q.WithContext(qctx))
		cancel()
		if ctx.Err() != nil {
			return 0, false, ctx.Err()
		}
		hist.Observe(time.Since(start).Seconds())
		if err == nil && meta.LastIndex == 0 {
			err = watch.ErrZeroIndex
		}
		if err != nil {
			w.failed(ci, kind, name, err)
			return 0, false, err
		}
		w.contact()
		if stale && w.cfg.MaxStale > 0 && meta.LastContact > w.cfg.MaxStale {
			stale = false // too stale: ask the leader
			continue
		}
		return meta.LastIndex, meta.ResultsFilteredByACLs, nil
	}
}

// answeredLocked marks the first answer about a watched service.
func (w *Watcher) answeredLocked(wt *watched) {
	if wt.answered {
		return
	}
	wt.answered = true
	if !wt.closed {
		wt.closed = true
		w.ready = append(w.ready, wt.ready)
	}
	w.signal()
}

// setNodesLocked records the nodes of a watched service's instances (nil:
// none, or no longer watched), for the node checks' changes.
func (w *Watcher) setNodesLocked(name string, nodes []string) {
	for _, n := range w.svcNodes[name] {
		if m := w.nodeSvcs[n]; m != nil {
			delete(m, name)
			if len(m) == 0 {
				delete(w.nodeSvcs, n)
			}
		}
	}
	if len(nodes) == 0 {
		delete(w.svcNodes, name)
		return
	}
	w.svcNodes[name] = nodes
	for _, n := range nodes {
		m := w.nodeSvcs[n]
		if m == nil {
			m = map[string]bool{}
			w.nodeSvcs[n] = m
		}
		m[name] = true
	}
}
