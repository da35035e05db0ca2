package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"attache/internal/testcluster"
	"attache/sidecar/catalog"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
)

// childReport is what the child process prints when done.
type childReport struct {
	Mode        string  `json:"mode"`
	Watched     int     `json:"watched"`
	Services    int     `json:"services"`
	Instances   int     `json:"instances"`
	Answered    int     `json:"answered"` // on-demand: names that answered with every instance when all were asked at once
	SyncMS      float64 `json:"sync_ms"`
	RSSKB       int     `json:"rss_kb"`
	SettledKB   int     `json:"settled_rss_kb"`
	LiveKB      int     `json:"live_heap_kb"`
	HeapKB      int     `json:"heap_kb"`
	StackKB     int     `json:"stack_kb"`
	Goroutines  int     `json:"goroutines"`
	Queries     float64 `json:"queries"`
	RestBytes   float64 `json:"rest_bytes"`
	WindowS     float64 `json:"window_s"`
	PeakConns   int     `json:"peak_conns"`
	PeakOpen    int     `json:"peak_open"` // the watcher's own count of its open connections
	MaxConns    int     `json:"max_conns"`
	Changes     int     `json:"changes"`
	Seen        int     `json:"seen"`
	P50MS       float64 `json:"p50_ms"`
	P99MS       float64 `json:"p99_ms"`
	MaxMS       float64 `json:"max_ms"`
	BytesPer    float64 `json:"bytes_per_change"`
	CPUPerMS    float64 `json:"cpu_ms_per_change"`
	WriteCPUMS  float64 `json:"write_cpu_ms"`
	HotChanges  int     `json:"hot_changes"`
	HotSeen     int     `json:"hot_seen"`
	RawSeen     int     `json:"raw_seen"`
	HotP50MS    float64 `json:"hot_p50_ms"`
	HotP99MS    float64 `json:"hot_p99_ms"`
	RawP50MS    float64 `json:"raw_p50_ms"`
	RawP99MS    float64 `json:"raw_p99_ms"`
	RestRSSKB   int     `json:"rest_rss_kb"`
	RegChanges  int     `json:"reg_changes"`
	RegSeen     int     `json:"reg_seen"`
	RegP50MS    float64 `json:"reg_p50_ms"`
	RegP99MS    float64 `json:"reg_p99_ms"`
	RegBytesPer float64 `json:"reg_bytes_per_change"`
	RegCPUPerMS float64 `json:"reg_cpu_ms_per_change"`
}

func scale(ctx context.Context, c *testcluster.Cluster, services, instances int, window time.Duration, changes int) error {
	start := time.Now()
	if err := register(ctx, c, services, instances); err != nil {
		return err
	}
	regTime := time.Since(start)
	// Until the client agent sees them all.
	for {
		m, _, err := c.Clients[0].Client().Catalog().Services(nil)
		if err == nil && len(m) >= services {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(200 * time.Millisecond)
	}
	var rows [][]string
	var reports []childReport
	// The propagation part may have left its service: not counted.
	for _, run := range []struct {
		mode string
		want int
	}{{"all", services}, {"on-demand", services}} {
		r, err := runChild(ctx, c.Clients[0].HTTPAddr, c.Servers[0].HTTPAddr, run.mode, run.want, instances, window, changes)
		if err != nil {
			return err
		}
		reports = append(reports, r)
	}
	agentRSS := rssOf(c.Clients[0].Pid())
	fmt.Println("## Catalog watcher at scale")
	fmt.Println()
	fmt.Printf("%d services × %d instances (each with a check) registered in %s (catalog transactions against the servers). "+
		"The watcher runs alone in a child process against the client agent, whose per-client connection limit is Consul's default (200); "+
		"Consul's default consistency. `all` watches every service; `on-demand` asks for all %d names at once through Want, right after start. "+
		"Connections = the most ESTABLISHED TCP connections from the child to the agent seen in /proc/net/tcp (sampled every 5 ms from start until the view is complete: the most queries at once), and the watcher's own count of its open connections. "+
		"Queries and bytes at rest are counted over a %s window after the view is complete. "+
		"Health changes (mode all): check status changes (critical, then passing again) of random instances, written to a server (a catalog transaction), one at a time, "+
		"each timed from the write until the watcher's View shows it. First %d changes of 8 services that a plain consul/api blocking query each also watches "+
		"(default mode, near=_agent, through the agent: the reference at this scale), then %d of any service with nothing else running: "+
		"bytes = bytes read from Consul, CPU = the child's user+system CPU, both per change, "+
		"the CPU of the writes themselves (%.2f ms each, measured before the watcher ran) subtracted. "+
		"Registration changes: an instance added to a random service, then removed (catalog transactions), timed the same way; each makes the watcher probe every watched service. "+
		"RSS is read at rest (after the window, as the goal is stated), after the changes, and settled (after a GC and returning free pages, as Go's periodic GC leaves an idle process). "+
		"For scale: the client agent's own RSS is %.1f MB.\n\n",
		services, instances, regTime.Round(100*time.Millisecond), services, window, reports[0].HotChanges, reports[0].Changes, reports[0].WriteCPUMS, float64(agentRSS)/1024)
	for _, r := range reports {
		answered := "—"
		if r.Mode == "on-demand" {
			answered = fmt.Sprintf("%d / %d", r.Answered, services)
		}
		hot, chg, per, regc := "—", "—", "—", "—"
		if r.RegChanges > 0 {
			regc = fmt.Sprintf("%d / %d: %.1f / %.1f ms, %.1f kB, %.1f ms CPU", r.RegSeen, r.RegChanges, r.RegP50MS, r.RegP99MS, r.RegBytesPer/1024, r.RegCPUPerMS)
		}
		if r.HotChanges > 0 && r.RawP99MS > 0 {
			hot = fmt.Sprintf("%d, %d / %d: %.1f / %.1f vs %.1f / %.1f = %.2f×", r.HotChanges, r.HotSeen, r.RawSeen,
				r.HotP50MS, r.HotP99MS, r.RawP50MS, r.RawP99MS, r.HotP99MS/r.RawP99MS)
		}
		if r.Changes > 0 {
			chg = fmt.Sprintf("%d / %d: %.1f / %.1f / %.1f", r.Seen, r.Changes, r.P50MS, r.P99MS, r.MaxMS)
			per = fmt.Sprintf("%.1f kB, %.2f ms", r.BytesPer/1024, r.CPUPerMS)
		}
		rows = append(rows, []string{
			r.Mode, strconv.Itoa(r.Watched), strconv.Itoa(r.Instances), answered, fmt.Sprintf("%.0f", r.SyncMS),
			fmt.Sprintf("%d (bound %d; its own count %d)", r.PeakConns, r.MaxConns, r.PeakOpen),
			hot, chg, per, regc,
			fmt.Sprintf("%.1f / %.1f / %.1f", float64(r.RestRSSKB)/1024, float64(r.RSSKB)/1024, float64(r.SettledKB)/1024),
			fmt.Sprintf("%.2f×", float64(r.RestRSSKB)/1024/30),
			fmt.Sprintf("%.1f", float64(r.LiveKB)/1024), strconv.Itoa(r.Goroutines),
			fmt.Sprintf("%.2f", r.Queries/r.WindowS), fmt.Sprintf("%.0f", r.RestBytes/r.WindowS),
		})
	}
	table([]string{"mode", "services watched", "instances in view", "names answered (all asked at once)", "full view ms",
		"connections to the agent (max seen)",
		"changes of 8 services, seen by watcher / raw: watcher p50 / p99 vs raw p50 / p99 ms = p99 ratio",
		"changes of any service, seen: p50 / p99 / max ms", "per change: bytes read, CPU",
		"registration changes (an instance added, removed), seen: p50 / p99, bytes read and CPU per change",
		"RSS MB at rest / after the changes / settled", "RSS at rest ÷ 30 MB goal",
		"live heap MB", "goroutines", "queries/s at rest", "bytes/s at rest"}, rows)
	return nil
}

// register writes services × instances into the catalog with transactions
// (a node op and up to 31 service+check pairs each) from a few goroutines
// spread over the servers. Instance j of every service lives on node
// scale-node-j; each instance has a passing check "<id>-check".
func register(ctx context.Context, c *testcluster.Cluster, services, instances int) error {
	type batch = api.TxnOps
	var batches []batch
	var cur batch
	for j := 0; j < instances; j++ {
		node := fmt.Sprintf("scale-node-%d", j)
		for i := 0; i < services; i++ {
			if len(cur) == 0 {
				cur = append(cur, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet,
					Node: api.Node{Node: node, Address: fmt.Sprintf("10.1.%d.%d", j/250, j%250+1), Datacenter: "dc1"}}})
			}
			id, svc := fmt.Sprintf("svc%04d-%d", i, j), fmt.Sprintf("svc%04d", i)
			cur = append(cur, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: node,
				Service: api.AgentService{ID: id, Service: svc, Port: 10000 + i, Tags: []string{"bench"}, Meta: map[string]string{"i": strconv.Itoa(j)}}}},
				checkOp(node, svc, id, api.HealthPassing))
			if len(cur) >= 63 {
				batches = append(batches, cur)
				cur = nil
			}
		}
		if len(cur) > 0 {
			batches = append(batches, cur)
			cur = nil
		}
	}
	work := make(chan batch)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func(cl *api.Client) {
			defer wg.Done()
			for b := range work {
				var err error
				for try := 0; try < 5; try++ { // a loaded machine may lose the leader meanwhile
					var ok bool
					var resp *api.TxnResponse
					ok, resp, _, err = cl.Txn().Txn(b, nil)
					if err == nil && !ok {
						err = fmt.Errorf("transaction refused: %v", resp.Errors)
					}
					if err == nil {
						break
					}
					time.Sleep(time.Second)
				}
				if err != nil {
					select {
					case errs <- err:
					default:
					}
					return
				}
			}
		}(c.Servers[g%len(c.Servers)].Client())
	}
	deadline := time.After(2 * time.Minute)
	var err error
feed:
	for _, b := range batches {
		select {
		case work <- b:
		case err = <-errs:
			break feed
		case <-deadline:
			err = fmt.Errorf("registering took over 2 minutes")
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

func checkOp(node, svc, id, status string) *api.TxnOp {
	return &api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: api.HealthCheck{Node: node, CheckID: id + "-check", Name: "check",
		Status: status, ServiceID: id, ServiceName: svc}}}
}

func runChild(ctx context.Context, addr, server, mode string, want, instances int, window time.Duration, changes int) (childReport, error) {
	var r childReport
	self, err := os.Executable()
	if err != nil {
		return r, err
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, self, "-scenario", "child", "-consul", addr, "-server", server, "-mode", mode,
		"-want", strconv.Itoa(want), "-instances", strconv.Itoa(instances), "-window", window.String(), "-changes", strconv.Itoa(changes))
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return r, fmt.Errorf("watcher child (%s): %w", mode, err)
	}
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &r); err == nil {
			return r, nil
		}
	}
	return r, fmt.Errorf("watcher child (%s) printed no report", mode)
}

// child runs only the watcher (mode all: until its view holds want
// services; on-demand: asking for want services at once), counts its
// queries during window, times health changes (mode all), and prints a
// childReport. server is where the changes are written (not the agent, so
// that every connection to the agent is the watcher's).
func child(ctx context.Context, addr, server, mode string, want, instances int, window time.Duration, changes int) error {
	m, err := catalog.ParseMode(mode)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	cfg := catalog.DefaultConfig()
	cfg.Addresses = []string{addr}
	cfg.Mode = m
	cfg.Registerer = reg
	w, err := catalog.NewWatcher(cfg)
	if err != nil {
		return err
	}
	var writeCPU float64
	if m == catalog.ModeAll && changes > 0 {
		// The writes' own CPU, measured before the watcher runs.
		if writeCPU, err = measureWrites(server, want, instances); err != nil {
			return err
		}
	}
	mon, err := watchConns(addr, func() int { return int(metric(reg, "attache_catalog_consul_connections")) })
	if err != nil {
		return err
	}
	defer mon.stop()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	name := func(i int) string { return fmt.Sprintf("svc%04d", i) }
	start := time.Now()
	answered := 0
	if m == catalog.ModeOnDemand {
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
		var ok atomic.Int64
		var wg sync.WaitGroup
		for i := 0; i < want; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				if svc, found := w.Want(wctx, name(i)).Service(name(i)); found && len(svc.Instances) == instances {
					ok.Add(1)
				}
			}(i)
		}
		wg.Wait()
		wcancel()
		answered = int(ok.Load())
	}
	for {
		st := w.Status()
		if st.Synced && len(w.Load().Services) >= want {
			break
		}
		if time.Since(start) > 2*time.Minute {
			return fmt.Errorf("view incomplete after 2 minutes: %d services, status %+v", len(w.Load().Services), st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	syncDur := time.Since(start)
	// Connections are counted while the view fills (the most queries at
	// once); reading /proc every 5 ms makes garbage that would count in the
	// RSS at rest and CPU in the changes.
	mon.paused.Store(true)
	time.Sleep(2 * time.Second) // let the first round of queries settle
	q0, b0 := metric(reg, "attache_catalog_query_duration_seconds"), metric(reg, "attache_catalog_consul_read_bytes_total")
	select {
	case <-time.After(window):
	case <-ctx.Done():
		return ctx.Err()
	}
	q1, b1 := metric(reg, "attache_catalog_query_duration_seconds"), metric(reg, "attache_catalog_consul_read_bytes_total")
	rep := childReport{Mode: mode, SyncMS: float64(syncDur) / float64(time.Millisecond), Answered: answered, RestRSSKB: rssOf(os.Getpid()),
		Queries: q1 - q0, RestBytes: b1 - b0, WindowS: window.Seconds(), MaxConns: cfg.MaxConns}
	if m == catalog.ModeAll && changes > 0 {
		var stopProf func()
		if f := os.Getenv("BENCH_CPU_PROFILE"); f != "" {
			if pf, err := os.Create(f); err == nil {
				_ = pprof.StartCPUProfile(pf)
				stopProf = func() { pprof.StopCPUProfile(); pf.Close() }
			}
		}
		err := timeChanges(ctx, w, reg, addr, server, want, instances, changes, writeCPU, &rep)
		if stopProf != nil {
			stopProf()
		}
		if err != nil {
			return err
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if f := os.Getenv("BENCH_HEAP_PROFILE"); f != "" && mode == "all" {
		if pf, err := os.Create(f); err == nil {
			_ = pprof.WriteHeapProfile(pf)
			pf.Close()
		}
	}
	s := w.Load()
	n := 0
	for _, svc := range s.Services {
		n += len(svc.Instances)
	}
	rep.Watched, rep.Services, rep.Instances = w.Status().Watched, len(s.Services), n
	rep.RSSKB, rep.HeapKB, rep.StackKB, rep.Goroutines = rssOf(os.Getpid()), int(ms.HeapInuse/1024), int(ms.StackInuse/1024), runtime.NumGoroutine()
	rep.PeakConns, rep.PeakOpen = mon.stop()
	// Settled: after a collection and returning free pages, as Go's
	// periodic GC (every 2 minutes) and scavenger leave an idle process.
	runtime.GC()
	debug.FreeOSMemory()
	runtime.ReadMemStats(&ms)
	rep.SettledKB, rep.LiveKB = rssOf(os.Getpid()), int(ms.HeapAlloc/1024)
	return json.NewEncoder(os.Stdout).Encode(rep)
}

// timeChanges times health changes twice. First against a raw blocking
// query: changes of random instances of 8 services, each of which a plain
// consul/api blocking query (default mode, near=_agent, through the agent)
// also watches, for the ratio. Then the cost: changes of random instances
// of any service, with nothing else running, for bytes and CPU per change.
func timeChanges(ctx context.Context, w *catalog.Watcher, reg *prometheus.Registry, agent, server string, services, instances, changes int, writeCPU float64, rep *childReport) error {
	set, err := setter(server)
	if err != nil {
		return err
	}
	has := func(i, j int) bool {
		svc, ok := w.Load().Service(fmt.Sprintf("svc%04d", i))
		if !ok {
			return false
		}
		id := fmt.Sprintf("svc%04d-%d", i, j)
		for _, in := range svc.Instances {
			if in.ID == id {
				return true
			}
		}
		return false
	}
	ch, unsub := w.View().Subscribe()
	defer unsub()
	r := rand.New(rand.NewPCG(1, 2))
	// flip makes n changes (a flip to critical and back counts two) of
	// instances pick chooses, and returns when each was seen and t0s.
	type change struct {
		i, j    int
		present bool
		t0      time.Time
		seen    time.Duration // 0: not within 5s
	}
	flip := func(n int, pick func() (int, int)) ([]change, error) {
		var out []change
		for k := 0; k < n/2 && ctx.Err() == nil; k++ {
			i, j := pick()
			for _, present := range []bool{false, true} { // critical, then passing again
				st := api.HealthCritical
				if present {
					st = api.HealthPassing
				}
				t0, err := set(i, j, st)
				if err != nil {
					return nil, err
				}
				c := change{i: i, j: j, present: present, t0: t0}
				deadline := time.After(5 * time.Second)
			wait:
				for has(i, j) != present {
					select {
					case <-ch:
					case <-deadline:
						break wait
					case <-ctx.Done():
						return nil, ctx.Err()
					}
				}
				if has(i, j) == present {
					c.seen = time.Since(c.t0)
				}
				out = append(out, c)
				time.Sleep(30*time.Millisecond + rand.N(20*time.Millisecond))
			}
		}
		return out, ctx.Err()
	}
	pct := func(lat []time.Duration, p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		slices.Sort(lat)
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / float64(time.Millisecond)
	}

	// Against raw blocking queries on 8 services.
	const hot = 8
	raws := make([]*rawWatch, hot)
	rctx, rcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := range raws {
		raws[i] = &rawWatch{}
		wg.Add(1)
		go func(i int) { defer wg.Done(); raws[i].run(rctx, agent, fmt.Sprintf("svc%04d", i)) }(i)
	}
	time.Sleep(time.Second) // every raw query is blocking
	chA, err := flip(changes, func() (int, int) { return r.IntN(hot), r.IntN(instances) })
	rcancel()
	wg.Wait()
	if err != nil {
		return err
	}
	var wl, rl []time.Duration
	for _, c := range chA {
		if c.seen > 0 {
			wl = append(wl, c.seen)
		}
		if d, ok := raws[c.i].after(c.t0, fmt.Sprintf("svc%04d-%d", c.i, c.j), c.present); ok {
			rl = append(rl, d)
		}
	}
	rep.HotChanges, rep.HotSeen, rep.RawSeen = len(chA), len(wl), len(rl)
	rep.HotP50MS, rep.HotP99MS, rep.RawP50MS, rep.RawP99MS = pct(wl, 0.5), pct(wl, 0.99), pct(rl, 0.5), pct(rl, 0.99)

	// The cost, on any service.
	time.Sleep(500 * time.Millisecond)
	b0, c1 := metric(reg, "attache_catalog_consul_read_bytes_total"), cpuMS()
	chB, err := flip(2*changes, func() (int, int) { return r.IntN(services - 1), r.IntN(instances) })
	if err != nil {
		return err
	}
	b1, c2 := metric(reg, "attache_catalog_consul_read_bytes_total"), cpuMS()
	var lat []time.Duration
	for _, c := range chB {
		if c.seen > 0 {
			lat = append(lat, c.seen)
		}
	}
	rep.Changes, rep.Seen = len(chB), len(lat)
	rep.P50MS, rep.P99MS, rep.MaxMS = pct(lat, 0.5), pct(lat, 0.99), pct(lat, 1)
	rep.BytesPer = (b1 - b0) / float64(rep.Changes)
	// The sleeps between changes cost nothing; the writes (measured alone
	// before the watcher ran) are subtracted.
	rep.CPUPerMS = (c2-c1)/float64(rep.Changes) - writeCPU
	rep.WriteCPUMS = writeCPU

	// Registration changes: an instance added to a random service, then
	// removed; every watched service is probed after each.
	acfg := api.DefaultNonPooledConfig()
	acfg.Address = server
	cl, err := api.NewClient(acfg)
	if err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	b2, c3 := metric(reg, "attache_catalog_consul_read_bytes_total"), cpuMS()
	var regLat []time.Duration
	const regs = 20
	for k := 0; k < regs/2 && ctx.Err() == nil; k++ {
		i := r.IntN(services - 1)
		svc, id := fmt.Sprintf("svc%04d", i), fmt.Sprintf("svc%04d-extra", i)
		for _, present := range []bool{true, false} {
			op := &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: "scale-node-0",
				Service: api.AgentService{ID: id, Service: svc, Port: 20000 + i, Tags: []string{"bench"}}}}
			if !present {
				op = &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceDelete, Node: "scale-node-0", Service: api.AgentService{ID: id, Service: svc}}}
			}
			t0 := time.Now()
			ok, resp, _, err := cl.Txn().Txn(api.TxnOps{op}, nil)
			if err == nil && !ok {
				for _, e := range resp.Errors {
					err = fmt.Errorf("transaction refused: %s", e.What)
				}
			}
			if err != nil {
				return fmt.Errorf("registration change: %w", err)
			}
			deadline := time.After(10 * time.Second)
			in := func() bool {
				s, _ := w.Load().Service(svc)
				for _, x := range s.Instances {
					if x.ID == id {
						return true
					}
				}
				return false
			}
		wait:
			for in() != present {
				select {
				case <-ch:
				case <-deadline:
					break wait
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			if in() == present {
				regLat = append(regLat, time.Since(t0))
			}
			rep.RegChanges++
			time.Sleep(300 * time.Millisecond) // the probes of the last change are done
		}
	}
	b3, c4 := metric(reg, "attache_catalog_consul_read_bytes_total"), cpuMS()
	rep.RegSeen = len(regLat)
	rep.RegP50MS, rep.RegP99MS = pct(regLat, 0.5), pct(regLat, 0.99)
	rep.RegBytesPer = (b3 - b2) / float64(rep.RegChanges)
	rep.RegCPUPerMS = (c4-c3)/float64(rep.RegChanges) - writeCPU
	return nil
}

// rawWatch is a plain consul/api blocking-query loop on one service's
// passing instances (default mode, near=_agent), recording what it saw when.
type rawWatch struct {
	mu   sync.Mutex
	seen []rawSeen
}

type rawSeen struct {
	at  time.Time
	ids map[string]bool
}

func (rw *rawWatch) run(ctx context.Context, addr, service string) {
	acfg := api.DefaultNonPooledConfig()
	acfg.Address = addr
	cl, err := api.NewClient(acfg)
	if err != nil {
		return
	}
	var index uint64
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute, Near: "_agent"}).WithContext(ctx)
		entries, meta, err := cl.Health().Service(service, "", true, q)
		if err != nil {
			index = 0
			time.Sleep(100 * time.Millisecond)
			continue
		}
		now := time.Now()
		if meta.LastIndex < index {
			index = 0
		} else {
			index = meta.LastIndex
		}
		ids := map[string]bool{}
		for _, e := range entries {
			ids[e.Service.ID] = true
		}
		rw.mu.Lock()
		rw.seen = append(rw.seen, rawSeen{now, ids})
		rw.mu.Unlock()
	}
}

// after returns how long after t0 the raw query first saw id present (or not).
func (rw *rawWatch) after(t0 time.Time, id string, present bool) (time.Duration, bool) {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	for _, s := range rw.seen {
		if !s.at.Before(t0) && s.ids[id] == present {
			return s.at.Sub(t0), true
		}
	}
	return 0, false
}

// setter returns a function that sets the status of instance j of service
// i through the server at addr, and returns when the write that succeeded
// started (a loaded machine may lose the leader: a failed write is retried).
func setter(addr string) (func(i, j int, status string) (time.Time, error), error) {
	acfg := api.DefaultNonPooledConfig()
	acfg.Address = addr
	cl, err := api.NewClient(acfg)
	if err != nil {
		return nil, err
	}
	return func(i, j int, status string) (time.Time, error) {
		svc, id := fmt.Sprintf("svc%04d", i), fmt.Sprintf("svc%04d-%d", i, j)
		var err error
		for try := 0; try < 5; try++ {
			t0 := time.Now()
			var ok bool
			var resp *api.TxnResponse
			ok, resp, _, err = cl.Txn().Txn(api.TxnOps{checkOp(fmt.Sprintf("scale-node-%d", j), svc, id, status)}, nil)
			if err == nil && !ok {
				err = fmt.Errorf("transaction refused: %v", resp.Errors)
			}
			if err == nil {
				return t0, nil
			}
			time.Sleep(time.Second)
		}
		return time.Time{}, err
	}, nil
}

// measureWrites returns the CPU (ms) of one write of a check status, made
// as timeChanges makes them, with no watcher running in this process.
func measureWrites(server string, services, instances int) (float64, error) {
	set, err := setter(server)
	if err != nil {
		return 0, err
	}
	const n = 40
	c0 := cpuMS()
	for k := 0; k < n; k++ {
		st := api.HealthPassing
		if k%2 == 0 {
			st = api.HealthCritical
		}
		if _, err := set(services-1, instances-1, st); err != nil {
			return 0, err
		}
	}
	return (cpuMS() - c0) / n, nil
}

// cpuMS is this process's user+system CPU time so far, in ms.
func cpuMS() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6
}

// metric sums a counter's or histogram's count from the registry.
func metric(reg *prometheus.Registry, name string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return 0
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if h := m.GetHistogram(); h != nil {
				n += float64(h.GetSampleCount())
			} else if c := m.GetCounter(); c != nil {
				n += c.GetValue()
			} else if g := m.GetGauge(); g != nil {
				n += g.GetValue()
			}
		}
	}
	return n
}

// connWatch samples this process's ESTABLISHED connections to one address
// from /proc/net/tcp every 5 ms and keeps the most seen.
type connWatch struct {
	stopc    chan struct{}
	done     chan struct{}
	peak     int
	peakOpen int
	paused   atomic.Bool // while CPU is being measured: the sampling costs CPU too
	once     sync.Once
}

func watchConns(addr string, open func() int) (*connWatch, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(host).To4()
	p, _ := strconv.Atoi(port)
	if ip == nil {
		return nil, fmt.Errorf("watchConns wants an IPv4 address, not %s", addr)
	}
	want := strings.ToUpper(hex.EncodeToString([]byte{ip[3], ip[2], ip[1], ip[0]})) + ":" + fmt.Sprintf("%04X", p)
	m := &connWatch{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		for {
			if !m.paused.Load() {
				if c, err := countConns(want); err == nil {
					m.peak = max(m.peak, c)
				}
				m.peakOpen = max(m.peakOpen, open())
			}
			select {
			case <-m.stopc:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return m, nil
}

func (m *connWatch) stop() (peak, peakOpen int) {
	m.once.Do(func() { close(m.stopc) })
	<-m.done
	return m.peak, m.peakOpen
}

// countConns counts this process's sockets in /proc/net/tcp that are
// ESTABLISHED (state 01) to remote (hex as /proc writes it).
func countConns(remote string) (int, error) {
	inodes := map[string]bool{}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	seen := map[string]bool{} // a socket that moves while /proc/net/tcp is read may be listed twice
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) >= 10 && fl[2] == remote && fl[3] == "01" && inodes[fl[9]] {
			seen[fl[9]] = true
		}
	}
	return len(seen), sc.Err()
}

// rssOf reads VmRSS (kB) of a process from /proc.
func rssOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}
