package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"time"

	"attache/internal/testcluster"
	"attache/sidecar/catalog"

	"github.com/hashicorp/consul/api"
	"github.com/miekg/dns"
)

// An observer watches whether the instance "prop1" of service "prop" is
// healthy, by its own means, and reports what it sees each time it looks.
// To add a column, append one to the list in propagation.
type observer struct {
	name string
	ref  bool // the reference the ratios are relative to
	run  func(ctx context.Context, report func(present bool)) error
}

// recorder keeps an observer's state transitions with their times.
type recorder struct {
	mu    sync.Mutex
	known bool
	last  bool
	trans []transition
}

type transition struct {
	at      time.Time
	present bool
}

func (r *recorder) report(present bool) {
	now := time.Now()
	r.mu.Lock()
	if !r.known || present != r.last {
		r.trans = append(r.trans, transition{now, present})
		r.known, r.last = true, present
	}
	r.mu.Unlock()
}

func (r *recorder) is(present bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.known && r.last == present
}

// after returns how long after t0 the observer first saw present.
func (r *recorder) after(t0 time.Time, present bool) (time.Duration, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range r.trans {
		if !t.at.Before(t0) && t.present == present {
			return t.at.Sub(t0), true
		}
	}
	return 0, false
}

const (
	propService = "prop"
	propID      = "prop1"
	propCheck   = "prop1-ttl"
)

// propagation times health changes of prop1 made through the client
// agent's API (via "agent": a TTL check update, which the agent then syncs
// to the servers) or written straight into the catalog (via "catalog": a
// catalog register of the check's status, forwarded to the leader), to
// separate the agent's sync from the read path.
func propagation(ctx context.Context, c *testcluster.Cluster, changes int, attacheDNS, attacheBin, via string) error {
	capi := c.Clients[0].Client()
	set := func(status string) error { return capi.Agent().UpdateTTL(propCheck, "", status) }
	how := "TTL check changes through the client agent's HTTP API (PUT /v1/agent/check/update, which the agent syncs to the servers)"
	switch via {
	case "agent":
		if err := capi.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: propID, Name: propService, Port: 9999,
			Check: &api.AgentServiceCheck{CheckID: propCheck, TTL: "1h", Status: api.HealthPassing}}); err != nil {
			return fmt.Errorf("registering %s: %w", propID, err)
		}
	case "catalog":
		how = "check status changes written into the catalog through the client agent (PUT /v1/catalog/register, forwarded to the leader)"
		set = func(status string) error {
			_, err := capi.Catalog().Register(&api.CatalogRegistration{Node: "prop-node", Address: "10.2.0.1",
				Service: &api.AgentService{ID: propID, Service: propService, Port: 9999},
				Check:   &api.AgentCheck{Node: "prop-node", CheckID: propCheck, Name: propCheck, Status: status, ServiceID: propID}}, nil)
			return err
		}
		if err := set(api.HealthPassing); err != nil {
			return fmt.Errorf("registering %s: %w", propID, err)
		}
	default:
		return fmt.Errorf("unknown -via %q (agent or catalog)", via)
	}
	observers := []observer{
		watcherObserver("attache watcher View, default mode", c.Clients[0].HTTPAddr, false),
		watcherObserver("attache watcher View, stale mode", c.Clients[0].HTTPAddr, true),
		rawObserver("raw consul/api blocking query, default mode", capi, false, false),
		func() observer {
			o := rawObserver("raw consul/api blocking query, default mode, near=_agent (no streaming)", capi, false, true)
			o.ref = true
			return o
		}(),
		rawObserver("raw consul/api blocking query, stale mode", capi, true, false),
		dnsObserver("Consul DNS on the client agent (polled every 1 ms)", c.Clients[0].DNSAddr),
	}
	if attacheDNS == "" && attacheBin != "" {
		if _, err := os.Stat(attacheBin); err == nil {
			// The real sidecar beside the client agent, as on a node.
			attacheDNS = c.Clients[0].IP + ":8653"
			sc := exec.CommandContext(ctx, attacheBin, "sidecar", "-node", c.Clients[0].Name,
				"-consul", c.Clients[0].HTTPAddr, "-admin", c.Clients[0].IP+":19001", "-dns", attacheDNS,
				"-watch-service", propService, "-log-level", "warn")
			sc.Stderr = os.Stderr
			sc.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := sc.Start(); err != nil {
				return fmt.Errorf("starting %s: %w", attacheBin, err)
			}
			defer func() { _ = sc.Process.Signal(os.Interrupt); _ = sc.Wait() }()
		}
	}
	if attacheDNS != "" {
		observers = append(observers, dnsObserver("attache DNS: the attache sidecar beside the agent (polled every 1 ms)", attacheDNS))
	}
	octx, cancel := context.WithCancel(ctx)
	defer cancel()
	recs := make([]*recorder, len(observers))
	errs := make(chan error, len(observers))
	var wg sync.WaitGroup
	for i, o := range observers {
		recs[i] = &recorder{}
		wg.Add(1)
		go func(o observer, r *recorder) {
			defer wg.Done()
			if err := o.run(octx, r.report); err != nil && octx.Err() == nil {
				errs <- fmt.Errorf("%s: %w", o.name, err)
			}
		}(o, recs[i])
	}
	defer wg.Wait()
	defer cancel()

	all := func(present bool, d time.Duration) bool {
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			ok := true
			for _, r := range recs {
				ok = ok && r.is(present)
			}
			if ok {
				return true
			}
			select {
			case err := <-errs:
				fmt.Println("error:", err)
				return false
			case <-ctx.Done():
				return false
			case <-time.After(time.Millisecond):
			}
		}
		return false
	}
	if !all(true, 30*time.Second) {
		return errors.New("not every observer saw the instance within 30s")
	}
	type change struct {
		t0      time.Time
		present bool
	}
	var done []change
	missed := 0
	var writes []time.Duration
	present := true
	start := time.Now()
	const warmup = 10
	for i := -warmup; i < changes && ctx.Err() == nil; i++ {
		if i == 0 {
			done, writes, missed, start = nil, nil, 0, time.Now()
		}
		present = !present
		status := api.HealthPassing
		if !present {
			status = api.HealthCritical
		}
		t0 := time.Now()
		if err := set(status); err != nil {
			return fmt.Errorf("changing the check: %w", err)
		}
		writes = append(writes, time.Since(t0))
		done = append(done, change{t0, present})
		if !all(present, 5*time.Second) {
			missed++
		}
		// Spaced beyond the watcher's rate limit (MinInterval 100ms + jitter),
		// so that each change is timed on its own.
		time.Sleep(150*time.Millisecond + rand.N(50*time.Millisecond))
	}
	cancel()
	elapsed := time.Since(start)

	lat := make([][]time.Duration, len(recs))
	for i, r := range recs {
		for _, ch := range done {
			if d, ok := r.after(ch.t0, ch.present); ok {
				lat[i] = append(lat[i], d)
			}
		}
		slices.Sort(lat[i])
	}
	pct := func(l []time.Duration, p float64) time.Duration {
		if len(l) == 0 {
			return 0
		}
		return l[min(len(l)-1, int(p*float64(len(l))))]
	}
	var ref time.Duration
	for i, o := range observers {
		if o.ref {
			ref = pct(lat[i], 0.99)
		}
	}
	fmt.Printf("## Catalog propagation (%s): health change → observer\n", via)
	fmt.Println()
	fmt.Printf("%d %s, alternating passing/critical (%s in all, %d not seen by everyone within 5s); "+
		"time from the API call to each observer seeing the instance appear or disappear. The agent is a client, not a server. "+
		"ratio = p99 relative to the p99 of the raw default-mode blocking query with near=_agent "+
		"(which the agent forwards to the leader; without near, a client agent answers blocking health queries from its streaming backend, "+
		"fed by whichever server it subscribed to, so even default mode lags like stale mode when that server is a follower). "+
		"%d warm-up changes first, not counted.\n\n", len(done), how, elapsed.Round(time.Second), missed, warmup)
	slices.Sort(writes)
	var rows [][]string
	rows = append(rows, []string{"(the write call itself returning)", fmt.Sprint(len(writes)), ms(pct(writes, 0.5)), ms(pct(writes, 0.99)), ms(pct(writes, 1)), "—"})
	for i, o := range observers {
		ratio := "—"
		if ref > 0 {
			ratio = fmt.Sprintf("%.2f×", float64(pct(lat[i], 0.99))/float64(ref))
		}
		rows = append(rows, []string{o.name, fmt.Sprint(len(lat[i])), ms(pct(lat[i], 0.5)), ms(pct(lat[i], 0.99)), ms(pct(lat[i], 1)), ratio})
	}
	table([]string{"observer", "changes seen", "p50 ms", "p99 ms", "max ms", "p99 ratio vs raw default (near=_agent)"}, rows)
	return nil
}

func hasProp(s *catalog.Snapshot) bool {
	svc, ok := s.Service(propService)
	if !ok {
		return false
	}
	for _, in := range svc.Instances {
		if in.ID == propID {
			return true
		}
	}
	return false
}

// watcherObserver runs a catalog.Watcher with its defaults (one service
// listed) and looks at its View on every Subscribe notification.
func watcherObserver(name, addr string, stale bool) observer {
	return observer{name: name, run: func(ctx context.Context, report func(bool)) error {
		cfg := catalog.DefaultConfig()
		cfg.Addresses = []string{addr}
		cfg.Mode = catalog.ModeList
		cfg.Services = []string{propService}
		cfg.Stale = stale
		w, err := catalog.NewWatcher(cfg)
		if err != nil {
			return err
		}
		ch, unsub := w.View().Subscribe()
		defer unsub()
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		for {
			select {
			case <-ch:
				report(hasProp(w.Load()))
			case err := <-done:
				return err
			}
		}
	}}
}

// rawObserver is the plain consul/api blocking-query loop a client would
// write: pass the last index, wait 5m. With near, it asks for near=_agent,
// which keeps the client agent from answering from its streaming backend.
func rawObserver(name string, c *api.Client, stale, near bool) observer {
	return observer{name: name, run: func(ctx context.Context, report func(bool)) error {
		var index uint64
		for ctx.Err() == nil {
			q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute, AllowStale: stale}).WithContext(ctx)
			if near {
				q.Near = "_agent"
			}
			entries, meta, err := c.Health().Service(propService, "", true, q)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				time.Sleep(100 * time.Millisecond)
				index = 0
				continue
			}
			if meta.LastIndex < index {
				index = 0
			} else {
				index = meta.LastIndex
			}
			found := false
			for _, e := range entries {
				found = found || e.Service.ID == propID
			}
			report(found)
		}
		return nil
	}}
}

// dnsObserver asks a DNS server for prop.service.consul every millisecond.
func dnsObserver(name, addr string) observer {
	return observer{name: name, run: func(ctx context.Context, report func(bool)) error {
		cl := &dns.Client{Net: "udp", Timeout: time.Second}
		m := new(dns.Msg)
		m.SetQuestion(propService+".service.consul.", dns.TypeA)
		for ctx.Err() == nil {
			r, _, err := cl.Exchange(m, addr)
			if err == nil {
				report(len(r.Answer) > 0)
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}}
}
