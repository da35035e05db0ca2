package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"time"

	"attache/internal/testcluster"
	"attache/sidecar/catalog"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
)

// childReport is what the child process prints when done.
type childReport struct {
	Mode       string  `json:"mode"`
	Watched    int     `json:"watched"`
	Services   int     `json:"services"`
	Instances  int     `json:"instances"`
	SyncMS     float64 `json:"sync_ms"`
	RSSKB      int     `json:"rss_kb"`
	SettledKB  int     `json:"settled_rss_kb"`
	LiveKB     int     `json:"live_heap_kb"`
	HeapKB     int     `json:"heap_kb"`
	StackKB    int     `json:"stack_kb"`
	HeapIdle   int     `json:"heap_idle_kb"`
	HeapRel    int     `json:"heap_released_kb"`
	SysKB      int     `json:"sys_kb"`
	NumGC      uint32  `json:"num_gc"`
	Goroutines int     `json:"goroutines"`
	Queries    float64 `json:"queries"`
	WindowS    float64 `json:"window_s"`
	WaitS      float64 `json:"wait_s"`
}

func scale(ctx context.Context, c *testcluster.Cluster, services, instances int, window time.Duration) error {
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
	}{{"all", services}, {"on-demand", 0}} {
		r, err := runChild(ctx, c.Clients[0].HTTPAddr, run.mode, run.want, window)
		if err != nil {
			return err
		}
		reports = append(reports, r)
	}
	agentRSS := rssOf(c.Clients[0].Pid())
	fmt.Println("## Catalog watcher at scale")
	fmt.Println()
	fmt.Printf("%d services × %d instances registered in %s (catalog transactions against the servers). "+
		"The watcher runs alone in a child process against the client agent (Consul's default consistency, wait %s); "+
		"queries are those completed during a %s window after the view is complete; at rest each watch asks once per wait, "+
		"so the steady rate is watched ÷ wait. Goal: RSS ≤ 30 MB with every service watched. "+
		"RSS is read at the end of the window, and again settled: after a GC and returning free pages, the state Go's periodic GC (every 2 minutes) brings an idle process to. "+
		"For scale: the client agent's own RSS is %.1f MB.\n\n",
		services, instances, regTime.Round(100*time.Millisecond), time.Duration(reports[0].WaitS*float64(time.Second)), window, float64(agentRSS)/1024)
	for _, r := range reports {
		steady := float64(r.Watched+2) / r.WaitS // + the services and nodes lists
		rows = append(rows, []string{
			r.Mode, strconv.Itoa(r.Watched), strconv.Itoa(r.Instances), fmt.Sprintf("%.0f", r.SyncMS),
			fmt.Sprintf("%.1f", float64(r.RSSKB)/1024), fmt.Sprintf("%.1f", float64(r.SettledKB)/1024),
			fmt.Sprintf("%.2f× / %.2f×", float64(r.RSSKB)/1024/30, float64(r.SettledKB)/1024/30),
			fmt.Sprintf("%.1f", float64(r.LiveKB)/1024), fmt.Sprintf("%.1f", float64(r.StackKB)/1024), strconv.Itoa(r.Goroutines),
			fmt.Sprintf("%.2f", r.Queries/r.WindowS), fmt.Sprintf("%.2f", steady),
		})
	}
	table([]string{"mode", "services watched", "instances in view", "full view ms", "RSS MB", "RSS MB settled", "RSS ÷ 30 MB goal (end / settled)", "live heap MB", "stacks MB", "goroutines", "queries/s in window", "queries/s at rest (steady)"}, rows)
	return nil
}

// register writes services × instances into the catalog with transactions
// (a node op and up to 63 service ops each) from a few goroutines spread
// over the servers. Instance j of every service lives on node scale-node-j.
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
			cur = append(cur, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: node,
				Service: api.AgentService{ID: fmt.Sprintf("svc%04d-%d", i, j), Service: fmt.Sprintf("svc%04d", i),
					Port: 10000 + i, Tags: []string{"bench"}, Meta: map[string]string{"i": strconv.Itoa(j)}}}})
			if len(cur) == 64 {
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
				ok, resp, _, err := cl.Txn().Txn(b, nil)
				if err == nil && !ok {
					err = fmt.Errorf("transaction refused: %v", resp.Errors)
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

func runChild(ctx context.Context, addr, mode string, want int, window time.Duration) (childReport, error) {
	var r childReport
	self, err := os.Executable()
	if err != nil {
		return r, err
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, self, "-scenario", "child", "-consul", addr, "-mode", mode,
		"-want", strconv.Itoa(want), "-window", window.String())
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

// child runs only the watcher, waits until its view holds want services,
// counts its queries during window, and prints a childReport.
func child(ctx context.Context, addr, mode string, want int, window time.Duration) error {
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
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	start := time.Now()
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
	time.Sleep(2 * time.Second) // let the first round of long polls settle
	q0 := queries(reg)
	select {
	case <-time.After(window):
	case <-ctx.Done():
		return ctx.Err()
	}
	q1 := queries(reg)
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
	rep := childReport{
		Mode: mode, Watched: w.Status().Watched, Services: len(s.Services), Instances: n,
		SyncMS: float64(syncDur) / float64(time.Millisecond), RSSKB: rssOf(os.Getpid()),
		HeapKB: int(ms.HeapInuse / 1024), StackKB: int(ms.StackInuse / 1024), Goroutines: runtime.NumGoroutine(),
		HeapIdle: int(ms.HeapIdle / 1024), HeapRel: int(ms.HeapReleased / 1024), SysKB: int(ms.Sys / 1024), NumGC: ms.NumGC,
		Queries: q1 - q0, WindowS: window.Seconds(), WaitS: cfg.Wait.Seconds(),
	}
	// Settled: after a collection and returning free pages, as Go's
	// periodic GC (every 2 minutes) and scavenger leave an idle process.
	runtime.GC()
	debug.FreeOSMemory()
	runtime.ReadMemStats(&ms)
	rep.SettledKB, rep.LiveKB = rssOf(os.Getpid()), int(ms.HeapAlloc/1024)
	return json.NewEncoder(os.Stdout).Encode(rep)
}

// queries counts the Consul queries the watcher has completed.
func queries(reg *prometheus.Registry) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return 0
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "attache_catalog_query_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			n += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return n
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
