package catalog

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/serf/coordinate"

	"attache/internal/consulacl"
	"attache/sidecar/watch"
)

// Status is the watcher's connection state, for /readyz and /v1/snapshot.
type Status struct {
	Connected   bool      `json:"connected"`  // the last query to Consul succeeded
	Address     string    `json:"address"`    // the Consul address in use
	LastError   string    `json:"last_error"` // the last query error, if any
	LastErrorAt time.Time `json:"last_error_at"`
	// ACLDenied names each rule Consul's ACLs refused or hid from the
	// watcher (what it lacks and the policy rule that grants it).
	ACLDenied   []string      `json:"acl_denied,omitempty"`
	LastContact time.Time     `json:"last_contact"` // the last answer from Consul (or, from disk, when it was saved)
	Stale       bool          `json:"stale"`        // serving a snapshot loaded from disk not yet confirmed by Consul
	Synced      bool          `json:"synced"`       // every watch has had an answer since start
	DataAge     time.Duration `json:"data_age"`     // 0 while connected, else time since LastContact
	Watched     int           `json:"watched"`      // services watched
	Version     uint64        `json:"version"`
	Index       uint64        `json:"index"`
}

// Watcher keeps a View of the healthy instances of the catalog's services
// fresh, with a fixed number of blocking queries however many services it
// watches (see the package README). Build it with NewWatcher, run it with
// Run; Load, Want, View and Status are safe for concurrent use.
type Watcher struct {
	cfg     Config
	log     hclog.Logger
	view    *View
	clients []*api.Client
	// transports of clients, one per address: Run closes their idle
	// connections when it ends
	transports []*http.Transport
	conns      conns
	cur        atomic.Uint32 // index into clients of the address in use
	met        *metrics
	kick       chan struct{} // wakes the publisher
	pinned     map[string]bool
	queue      *queue // services to fetch or probe

	// index of watches for the lock-free fast path of Want
	watchIdx atomic.Pointer[map[string]*watched]

	mu       sync.Mutex
	ran      bool
	batching bool // reconcileLocked adds and removes many watches: reindex once
	running  bool
	stopping bool
	wg       sync.WaitGroup
	watches  map[string]*watched
	services map[string]*Service // see mutServicesLocked
	// servicesShared: a published snapshot holds services; copy before changing
	servicesShared bool
	nodes          map[string]*Node
	coords         map[string]*coordinate.Coordinate
	known          map[string]bool
	tags           map[string]string // per known service, its tags as the service list gives them
	dc             string
	updated        time.Time
	dirty          bool
	index          uint64          // highest index of the services, nodes and coordinates lists
	ready          []chan struct{} // closed after the next publish
	// change detection (health.go)
	checks   map[checkKey]checkState    // the non-passing checks Consul last listed
	fetched  map[string]uint64          // watched service -> the index of its last fetch
	svcNodes map[string][]string        // watched service -> nodes of its instances
	nodeSvcs map[string]map[string]bool // node -> watched services with an instance on it
	// state of the sync with Consul
	knownLoaded  bool
	nodesLoaded  bool
	checksLoaded bool
	checksReady  chan struct{}                      // closed once both health queries answered
	checkSets    map[string]map[checkKey]checkState // by state, as each health query last answered
	fromDisk     bool                               // the view still holds unconfirmed data from disk
	synced       bool

	contacted   atomic.Bool  // Consul answered since start
	lastContact atomic.Int64 // unix nanoseconds
	lastErrAt   atomic.Int64
	lastWarn    atomic.Int64
	lastErr     atomic.Pointer[string]
	acl         *aclGaps
	waker       *watch.Waker // ends the queries' backoff when the probe finds Consul back
	fetchErrs   atomic.Int64 // fetches failed in a row, for their backoff
}

// watched is one watched service. It costs no connection: changes are
// found by the shared blocking queries and fetched by the queue's workers.
type watched struct {
	name     string
	pinned   bool
	ready    chan struct{} // closed once its first answer is in the view
	lastUsed atomic.Int64
	answered bool // guarded by Watcher.mu
	closed   bool // ready closed; guarded by Watcher.mu
}

// NewWatcher builds a Watcher. When cfg.DataDir holds a saved snapshot it is
// loaded at once and served, marked stale, until Consul confirms it.
func NewWatcher(cfg Config) (*Watcher, error) {
	if err := cfg.finalize(); err != nil {
		return nil, err
	}
	w := &Watcher{
		cfg:         cfg,
		log:         cfg.Logger.Named("catalog"),
		acl:         newACLGaps(cfg.Logger.Named("catalog")),
		waker:       watch.NewWaker(),
		view:        NewView(),
		kick:        make(chan struct{}, 1),
		pinned:      map[string]bool{},
		queue:       newQueue(),
		watches:     map[string]*watched{},
		services:    map[string]*Service{},
		nodes:       map[string]*Node{},
		coords:      map[string]*coordinate.Coordinate{},
		known:       map[string]bool{},
		tags:        map[string]string{},
		checks:      map[checkKey]checkState{},
		fetched:     map[string]uint64{},
		checksReady: make(chan struct{}),
		checkSets:   map[string]map[checkKey]checkState{},
		svcNodes:    map[string][]string{},
		nodeSvcs:    map[string]map[string]bool{},
		dc:          cfg.Datacenter,
	}
	if cfg.Mode != ModeAll {
		for _, s := range cfg.Services {
			if s = strings.ToLower(strings.TrimSpace(s)); s != "" {
				w.pinned[s] = true
			}
		}
	}
	if err := w.buildClients(); err != nil {
		return nil, err
	}
	w.met = newMetrics(w)
	if err := w.met.register(cfg.Registerer); err != nil {
		return nil, err
	}
	empty := map[string]*watched{}
	w.watchIdx.Store(&empty)
	if cfg.DataDir != "" {
		if err := w.loadDisk(); err != nil {
			w.log.Warn("not using the saved snapshot", "error", err)
		}
	}
	w.mu.Lock()
	for name := range w.pinned {
		w.addWatchLocked(name, true, false)
	}
	w.mu.Unlock()
	return w, nil
}

// View returns the View the watcher publishes to (for Subscribe).
func (w *Watcher) View() *View { return w.view }

// Load returns the current Snapshot (never nil; must not be modified).
func (w *Watcher) Load() *Snapshot { return w.view.Load() }

// Want makes sure service is watched and returns the newest Snapshot. The
// first time a service is asked for it waits, at most until ctx ends, for
// Consul's first answer about it; afterwards it returns at once. Callers
// should call Want for every use of a service (it is cheap: a map lookup
// and a clock read), since on-demand watches nobody asks for stop after
// Config.IdleTimeout. Names the catalog does not know (once its service list
// has been read) are not watched; ModeList watches nothing but its list.
func (w *Watcher) Want(ctx context.Context, service string) *Snapshot {
	key := strings.ToLower(service)
	wt := (*w.watchIdx.Load())[key]
	if wt == nil {
		w.mu.Lock()
		wt = w.watches[key]
		if wt == nil {
			if key == "" || w.cfg.Mode == ModeList || (w.knownLoaded && !w.known[key]) || w.stopping {
				w.mu.Unlock()
				return w.view.Load()
			}
			wt = w.addWatchLocked(key, false, true)
		}
		w.mu.Unlock()
	}
	wt.lastUsed.Store(time.Now().UnixNano())
	select {
	case <-wt.ready:
	default:
		select {
		case <-wt.ready:
		case <-ctx.Done():
		}
	}
	return w.view.Load()
}

// Ready reports whether the watcher has something to serve: Consul answered
// every watch once since start, or a saved snapshot was loaded from disk.
func (w *Watcher) Ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.synced || w.fromDisk
}

// Status reports the connection state and the age of the data.
func (w *Watcher) Status() Status {
	s := w.view.Load()
	w.mu.Lock()
	st := Status{
		Stale:   w.fromDisk,
		Synced:  w.synced,
		Watched: len(w.watches),
		Version: s.Version,
		Index:   s.Index,
	}
	w.mu.Unlock()
	st.Address = w.cfg.Addresses[int(w.cur.Load())%len(w.clients)]
	lc, le := w.lastContact.Load(), w.lastErrAt.Load()
	if lc > 0 {
		st.LastContact = time.Unix(0, lc)
	}
	if le > 0 {
		st.LastErrorAt = time.Unix(0, le)
		if p := w.lastErr.Load(); p != nil {
			st.LastError = *p
		}
	}
	st.Connected = lc > 0 && lc >= le && w.contacted.Load()
	st.DataAge = w.dataAge()
	st.ACLDenied = w.acl.list()
	return st
}

// dataAge is 0 while the watcher is connected (its data is fresh as long as
// its blocking queries stand), else the time since Consul last answered.
func (w *Watcher) dataAge() time.Duration {
	lc, le := w.lastContact.Load(), w.lastErrAt.Load()
	w.mu.Lock()
	fromDisk := w.fromDisk
	w.mu.Unlock()
	if lc > 0 && lc >= le && !fromDisk && w.contacted.Load() {
		return 0
	}
	if lc == 0 {
		return 0 // never had data: nothing is old
	}
	return time.Since(time.Unix(0, lc))
}

// Run watches Consul until ctx ends. It never fails because Consul is
// unreachable: it retries with capped backoff and keeps serving the last
// view. Everything it started has stopped when it returns.
func (w *Watcher) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w.mu.Lock()
	if w.ran {
		w.mu.Unlock()
		return errors.New("catalog: Run called twice")
	}
	w.ran, w.running = true, true
	for _, wt := range w.watches {
		w.queueFirstLocked(wt, false)
	}
	w.mu.Unlock()
	w.log.Info("watching Consul", "addresses", w.cfg.Addresses, "mode", w.cfg.Mode, "stale", w.cfg.Stale, "max_conns", w.cfg.MaxConns)

	w.goRun(func() { w.publisher(ctx) })
	w.goRun(func() { w.servicesLoop(ctx) })
	for _, st := range checkStatuses {
		w.goRun(func() { w.checksLoop(ctx, st) })
	}
	w.goRun(func() { w.nodesLoop(ctx) })
	if w.cfg.CoordInterval > 0 {
		w.goRun(func() { w.coordsLoop(ctx) })
	}
	for i := 0; i < w.cfg.MaxConns-longPolls-1; i++ {
		w.goRun(func() { w.fetcher(ctx) })
	}
	if w.cfg.Mode == ModeOnDemand {
		w.goRun(func() { w.reaper(ctx) })
	}
	if w.cfg.DataDir != "" {
		w.goRun(func() { w.saver(ctx) })
	}
	if w.cfg.ProbeInterval > 0 {
		w.goRun(func() { w.prober(ctx) })
	}
	<-ctx.Done()
	w.mu.Lock()
	w.stopping = true
	for _, wt := range w.watches {
		if !wt.closed {
			wt.closed = true
			close(wt.ready)
		}
	}
	w.mu.Unlock()
	w.wg.Wait()
	for _, tr := range w.transports {
		tr.CloseIdleConnections() // the queries' own ended with their contexts
	}
	w.mu.Lock()
	w.running = false
	w.mu.Unlock()
	return nil
}

func (w *Watcher) goRun(f func()) {
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		f()
	}()
}

// addWatchLocked adds the watch of name and, if Run runs, queues its first
// fetch (urgent: someone waits for it).
func (w *Watcher) addWatchLocked(name string, pinned, urgent bool) *watched {
	wt := &watched{name: name, pinned: pinned, ready: make(chan struct{})}
	wt.lastUsed.Store(time.Now().UnixNano())
	w.watches[name] = wt
	w.reindexLocked()
	if w.running && !w.stopping {
		w.queueFirstLocked(wt, urgent)
	}
	return wt
}

// queueFirstLocked queues the first look at a watched service: a probe when
// the view already holds it (from disk: an unchanged index confirms it
// without fetching), else a fetch.
func (w *Watcher) queueFirstLocked(wt *watched, urgent bool) {
	if w.fetched[wt.name] > 0 {
		w.queue.add(wt.name, false, urgent)
		return
	}
	w.queue.add(wt.name, true, urgent)
}

// removeWatchLocked stops watching name and drops the service from the view.
func (w *Watcher) removeWatchLocked(name string) {
	wt := w.watches[name]
	if wt == nil {
		return
	}
	if !wt.closed {
		wt.closed = true
		close(wt.ready)
	}
	delete(w.watches, name)
	delete(w.fetched, name)
	w.acl.set("service/"+name, nil)
	w.setNodesLocked(name, nil)
	w.reindexLocked()
	if _, ok := w.services[name]; ok {
		delete(w.mutServicesLocked(), name)
		w.dirty = true
	}
}

func (w *Watcher) reindexLocked() {
	if w.batching {
		return // the batch reindexes once at its end
	}
	m := make(map[string]*watched, len(w.watches))
	for k, v := range w.watches {
		m[k] = v
	}
	w.watchIdx.Store(&m)
}

// ---- publishing ----

func (w *Watcher) signal() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *Watcher) publisher(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		}
		w.publish()
	}
}

// publish turns the draft into a new Snapshot if anything changed. Bursts
// of updates coalesce: they all land in the draft before the publisher
// wakes.
func (w *Watcher) publish() {
	w.mu.Lock()
	wasSynced := w.synced
	ready := w.publishLocked()
	firstSync := !wasSynced && w.synced
	w.mu.Unlock()
	closeAll(ready)
	if firstSync {
		// The first full sync decodes every watched service at once: hand
		// that burst of garbage back to the OS now rather than after
		// minutes of the runtime's background scavenging (a sidecar's RSS
		// is what the node pays). Once, so it costs one GC.
		debug.FreeOSMemory()
	}
}

// publishLocked publishes the draft if it changed and returns the ready
// channels to close once w.mu is released.
func (w *Watcher) publishLocked() []chan struct{} {
	if (w.fromDisk || !w.synced) && w.knownLoaded && w.nodesLoaded && w.checksLoaded && w.allAnsweredLocked() {
		if w.fromDisk {
			w.fromDisk = false
			w.dirty = true
			w.log.Info("saved snapshot confirmed by Consul")
		}
		w.synced = true
	}
	ready := w.ready
	w.ready = nil
	if !w.dirty {
		return ready
	}
	w.dirty = false
	// The snapshot shares the draft's maps: nodes, coordinates and known
	// are replaced whole, never changed in place, and services is copied
	// before its next change (mutServicesLocked).
	s := &Snapshot{
		Datacenter: w.dc,
		Updated:    w.updated,
		Stale:      w.fromDisk,
		Services:   w.services,
		Nodes:      w.nodes,
		Coords:     w.coords,
		Known:      w.known,
	}
	w.servicesShared = true
	for _, v := range w.services {
		s.Index = max(s.Index, v.Index)
	}
	s.Index = max(s.Index, w.index)
	// Published under mu so that snapshots go out in draft order.
	w.view.Publish(s)
	w.met.updates.Inc()
	return ready
}

// mutServicesLocked returns the draft's services map ready to be changed,
// copying it first if a published snapshot shares it.
func (w *Watcher) mutServicesLocked() map[string]*Service {
	if w.servicesShared {
		m := make(map[string]*Service, len(w.services)+1)
		for k, v := range w.services {
			m[k] = v
		}
		w.services, w.servicesShared = m, false
	}
	return w.services
}

func closeAll(chs []chan struct{}) {
	for _, ch := range chs {
		close(ch)
	}
}

func (w *Watcher) allAnsweredLocked() bool {
	for _, wt := range w.watches {
		if !wt.answered {
			return false
		}
	}
	return true
}

// ---- the blocking-query loops ----

// loopConfig is the watch.Loop configuration of the watcher's loops.
func (w *Watcher) loopConfig(minInterval time.Duration, burst int) watch.Config {
	return watch.Config{
		Wait:           w.cfg.Wait,
		MinInterval:    minInterval,
		Burst:          burst,
		RetryBase:      w.cfg.RetryBase,
		RetryMax:       w.cfg.RetryMax,
		RequestTimeout: w.cfg.RequestTimeout,
		Stale:          w.cfg.Stale,
		MaxStale:       w.cfg.MaxStale,
	}
}

// runLoop runs a watch.Loop of kind over a consul/api call against the
// address in use, with the watcher's metrics, failover and contact time.
// With blocking false every query is asked without an index (answered at
// once): the loop then runs one query per MinInterval.
func runLoop[T any](ctx context.Context, w *Watcher, kind string, cfg watch.Config, blocking bool,
	call func(c *api.Client, q *api.QueryOptions) (T, *api.QueryMeta, error), changed func(v T, index uint64)) {
	var ci uint32
	hist := w.met.duration.WithLabelValues(kind)
	l := &watch.Loop[T]{
		Config: cfg,
		Fetch: func(ctx context.Context, q watch.Query) (T, watch.Meta, error) {
			ci = w.cur.Load()
			qo := &api.QueryOptions{WaitIndex: q.Index, WaitTime: q.Wait, AllowStale: q.Stale}
			if !blocking {
				qo.WaitIndex, qo.WaitTime = 0, 0
			}
			v, meta, err := call(w.clients[int(ci)%len(w.clients)], qo.WithContext(ctx))
			if err != nil {
				var zero T
				return zero, watch.Meta{}, err
			}
			if d := filteredList(kind); d != nil {
				if !meta.ResultsFilteredByACLs {
					d = nil
				}
				w.acl.set(kind+"/", d)
			}
			return v, watch.Meta{Index: meta.LastIndex, LastContact: meta.LastContact}, nil
		},
		Changed: func(v T, m watch.Meta) { changed(v, m.Index) },
		Waker:   w.waker,
		Observe: func(took time.Duration, err error) {
			hist.Observe(took.Seconds())
			if err != nil {
				w.failed(ci, kind, "", err)
				return
			}
			w.contact()
		},
	}
	l.Run(ctx)
}

// contact records an answer from Consul.
func (w *Watcher) contact() {
	w.lastContact.Store(time.Now().UnixNano())
	w.contacted.Store(true)
}

// failed counts and logs a query error and moves on to the next address.
func (w *Watcher) failed(ci uint32, kind, name string, err error) {
	now := time.Now()
	w.lastErrAt.Store(now.UnixNano())
	w.met.errors.WithLabelValues(kind).Inc()
	if d := consulacl.Explain(err); d != nil {
		// Every address would refuse the same: stay, and name the rule
		// (logged once by acl.set).
		w.acl.set(kind+"/"+name, d)
		msg := d.Error()
		w.lastErr.Store(&msg)
		return
	}
	msg := err.Error()
	w.lastErr.Store(&msg)
	if len(w.clients) > 1 && w.cur.CompareAndSwap(ci, ci+1) {
		w.log.Warn("Consul query failed, moving on to the next address", "address", w.cfg.Addresses[int(ci)%len(w.clients)],
			"next", w.cfg.Addresses[int(ci+1)%len(w.clients)], "error", err)
		w.lastWarn.Store(now.UnixNano())
		return
	}
	// With many queries failing together, warn at most every 5s.
	if last := w.lastWarn.Load(); now.UnixNano()-last > int64(5*time.Second) && w.lastWarn.CompareAndSwap(last, now.UnixNano()) {
		w.log.Warn("Consul query failed, retrying", "loop", kind, "service", name, "error", err)
	} else {
		w.log.Debug("Consul query failed, retrying", "loop", kind, "service", name, "error", err)
	}
}

// servicesLoop follows the catalog's service list. A name that appears is
// watched (mode all), one that goes is no longer watched at once, a
// changed tag list is fetched; and since any other change of registrations
// (an instance added, removed or moved) also moves this list's index, every
// other watched service is probed: a cheap query whose index says whether
// the service changed (health.go).
func (w *Watcher) servicesLoop(ctx context.Context) {
	runLoop(ctx, w, "services", w.loopConfig(w.cfg.MinInterval, 4), true,
		func(c *api.Client, q *api.QueryOptions) (map[string][]string, *api.QueryMeta, error) {
			return c.Catalog().Services(q)
		},
		func(list map[string][]string, index uint64) {
			known := make(map[string]bool, len(list))
			tags := make(map[string]string, len(list))
			for name, t := range list {
				key := strings.ToLower(name)
				known[key] = true
				tags[key] += strings.Join(t, "\x00") + "\x01"
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			first := !w.knownLoaded
			w.knownLoaded = true
			w.index = max(w.index, index)
			if first || !reflect.DeepEqual(known, w.known) {
				w.known = known
				w.updated = time.Now()
				w.dirty = true
				w.reconcileLocked()
			}
			old := w.tags
			w.tags = tags
			if !first {
				// A new tag list is a changed registration: fetch it;
				// anything else may have changed too: probe, the services
				// used last first (the probes of a thousand services take
				// about a second).
				order := make([]*watched, 0, len(w.watches))
				for _, wt := range w.watches {
					order = append(order, wt)
				}
				sort.Slice(order, func(i, j int) bool { return order[i].lastUsed.Load() > order[j].lastUsed.Load() })
				for _, wt := range order {
					w.queue.add(wt.name, old[wt.name] != tags[wt.name], false)
				}
			}
			w.signal()
		})
}

// reconcileLocked starts and stops watches after the catalog's service
// list changed.
func (w *Watcher) reconcileLocked() {
	w.batching = true
	defer func() {
		w.batching = false
		w.reindexLocked()
	}()
	if w.cfg.Mode == ModeAll {
		for name := range w.known {
			if w.watches[name] == nil {
				w.addWatchLocked(name, false, false)
			}
		}
	}
	for name, wt := range w.watches {
		if !wt.pinned && !w.known[name] {
			w.removeWatchLocked(name)
		}
	}
}

func (w *Watcher) nodesLoop(ctx context.Context) {
	runLoop(ctx, w, "nodes", w.loopConfig(w.cfg.MinInterval, 4), true,
		func(c *api.Client, q *api.QueryOptions) ([]*api.Node, *api.QueryMeta, error) {
			return c.Catalog().Nodes(q)
		},
		func(list []*api.Node, index uint64) {
			nodes := make(map[string]*Node, len(list))
			for _, n := range list {
				if n == nil {
					continue
				}
				nodes[strings.ToLower(n.Node)] = &Node{Name: n.Node, Address: n.Address, Datacenter: n.Datacenter, Meta: nonEmpty(n.Meta)}
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			first := !w.nodesLoaded
			w.nodesLoaded = true
			w.index = max(w.index, index)
			if reflect.DeepEqual(nodes, w.nodes) {
				if first {
					w.signal() // confirms data loaded from disk
				}
				return
			}
			w.nodes = nodes
			w.updated = time.Now()
			w.dirty = true
			w.signal()
		})
}

func nonEmpty(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	return m
}

// reaper stops on-demand watches nobody asked for in IdleTimeout.
func (w *Watcher) reaper(ctx context.Context) {
	every := max(w.cfg.IdleTimeout/4, 10*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cutoff := time.Now().Add(-w.cfg.IdleTimeout).UnixNano()
		w.mu.Lock()
		for name, wt := range w.watches {
			if !wt.pinned && wt.lastUsed.Load() < cutoff {
				w.log.Debug("stopping idle watch", "service", name)
				w.removeWatchLocked(name)
			}
		}
		w.mu.Unlock()
		w.signal()
	}
}
