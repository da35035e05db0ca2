package sidecar

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	miekg "github.com/miekg/dns"

	"attache/demo"
	"attache/internal/testcluster"
)

var (
	agentDown   = flag.Duration("fault-agent-down", 5*time.Second, "TestFaults: how long the node's agent stays down (scripts/faults: 20s)")
	serversDown = flag.Duration("fault-servers-down", 5*time.Second, "TestFaults: how long all three servers stay down (scripts/faults: 30s)")
)

// load sends DNS questions for users and requests through the upstream
// listener, one of each every 20 ms, until stopped; it counts what it sent
// and what failed (an error, no answer, a status other than 200).
type load struct {
	sent, failed atomic.Int64
	// followed counts answers without an instance given while Consul
	// itself had no passing users instance (after a restart of every
	// server, the leader may report the node critical until gossip
	// confirms it): the view follows Consul then, as it should.
	followed atomic.Int64
	consul   atomic.Pointer[func() bool] // set once Consul answers again: has it a passing users instance?
	lastNone atomic.Int64                // when Consul was last seen without one (unix ns), by followConsul
	ctx      context.Context
	slowest  atomic.Int64 // the longest proxied request, in ns
	stop     context.CancelFunc
	wg       sync.WaitGroup
	mu       sync.Mutex
	why      []string // the first few failures, for the log
}

// empty records an answer that had no instance: a failure, unless Consul
// itself had none to give, now or within the last second (the view
// follows Consul a blocking query's round trip later).
func (l *load) empty(format string, args ...any) {
	if has := l.consul.Load(); has != nil && (!(*has)() || time.Since(time.Unix(0, l.lastNone.Load())) < time.Second) {
		l.followed.Add(1)
		return
	}
	l.fail(format, args...)
}

// followConsul sets has as Consul's word on the users instances and asks
// it every 10 ms until the load stops, remembering when it had none.
func (l *load) followConsul(has func() bool) {
	l.consul.Store(&has)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for l.ctx.Err() == nil {
			if !has() {
				l.lastNone.Store(time.Now().UnixNano())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
}

func (l *load) fail(format string, args ...any) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.why) < 5 {
		l.why = append(l.why, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	}
}

func startLoad(dnsAddr, upstream string) *load { return startLoadVia(nil, dnsAddr, upstream) }

// dialFunc dials a connection (net.Dialer's DialContext, or one that
// dials from inside a network namespace).
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// askDNS asks dnsAddr for the A records of name through dial (nil: the
// host's network) and returns the answer.
func askDNS(dial dialFunc, dnsAddr, name string) (*miekg.Msg, error) {
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := dial(ctx, "udp", dnsAddr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	co := &miekg.Conn{Conn: c}
	m := new(miekg.Msg)
	m.SetQuestion(name, miekg.TypeA)
	if err := co.WriteMsg(m); err != nil {
		return nil, err
	}
	return co.ReadMsg()
}

// startLoadVia is startLoad through dial (nil: the host's network).
func startLoadVia(dial dialFunc, dnsAddr, upstream string) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{ctx: ctx, stop: cancel}
	tr := &http.Transport{}
	if dial != nil {
		tr.DialContext = dial
	}
	// The client waits a little longer than the sidecar's whole request
	// timeout (15 s by default), as a caller of the sidecar should: a
	// request sent to an instance just before it became unreachable gets
	// its answer from a retry after the sidecar's try timeout (5 s).
	hc := &http.Client{Timeout: 16 * time.Second, Transport: tr}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer tr.CloseIdleConnections()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for n := 0; n < 10000; n++ { // bounded: at most 200 s of it
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			l.sent.Add(2)
			if in, err := askDNS(dial, dnsAddr, "users.service.consul."); err != nil {
				l.fail("DNS: %v", err)
			} else if len(in.Answer) == 0 {
				l.empty("DNS: no answer (%s)", miekg.RcodeToString[in.Rcode])
			}
			start := time.Now()
			resp, err := hc.Get("http://" + upstream + "/x")
			if d := int64(time.Since(start)); d > l.slowest.Load() {
				l.slowest.Store(d)
			}
			if err != nil {
				l.fail("proxy: %v", err)
				continue
			}
			resp.Body.Close()
			if resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("X-Attache-Fallback") == "" {
				l.empty("proxy: %s", resp.Status)
			} else if resp.StatusCode != 200 {
				l.fail("proxy: %s (%s)", resp.Status, resp.Header.Get("X-Attache-Fallback"))
			}
		}
	}()
	return l
}

func (l *load) end() (sent, failed int64) {
	l.stop()
	l.wg.Wait()
	return l.sent.Load(), l.failed.Load()
}

// TestFaults runs a sidecar (DNS, an upstream listener) under a bounded
// load through two faults of a real three-server cluster, each with a
// change to the catalog made while the fault lasts: the node's agent
// killed and started again, and all three servers stopped and started
// again. DNS and the proxy keep serving the last view throughout (nothing
// sent fails), and the view catches up after each. It logs one FAULT line
// per scenario (scenario, sent, failed, time to recover), which
// scripts/faults prints as a table; scripts/test runs it with 5 s faults.
func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("faults of a real cluster")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	agent := c.Clients[0]
	// One backend per instance, each on its own loopback address (DNS
	// answers one A record per address).
	backends := map[string]string{}
	for i, id := range []string{"users-1", "users-2", "users-3"} {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:0", i+1))
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewUnstartedServer(demo.New("users", id))
		srv.Listener.Close()
		srv.Listener = ln
		srv.Start()
		defer srv.Close()
		backends[id] = ln.Addr().String()
	}
	hostPort := func(id string) (string, int) {
		h, p, _ := net.SplitHostPort(backends[id])
		return h, atoi(p)
	}
	dnsAddr, upstream := freeAddr(t), freeAddr(t)
	admin, _ := runSidecar(t, "-consul", agent.HTTPAddr, "-dns", dnsAddr, "-upstream", "users="+upstream,
		"-watch-service", "users", "-data-dir", t.TempDir())
	eventually(t, "/readyz", 20*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	answers := func() int {
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		in, err := miekg.Exchange(m, dnsAddr)
		if err != nil {
			return -1
		}
		return len(in.Answer)
	}
	// Instances on external nodes, registered through whichever server
	// answers: each points at the backend (127.0.0.1, its port).
	register := func(id string) error {
		var last error
		for _, s := range c.Servers {
			if !s.Running() {
				continue
			}
			h, p := hostPort(id)
			_, err := s.Client().Catalog().Register(&api.CatalogRegistration{Node: "ext-" + id, Address: h,
				Service: &api.AgentService{ID: id, Service: "users", Port: p}}, nil)
			if err == nil {
				return nil
			}
			last = err
		}
		return last
	}
	if err := register("users-1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "users-1 in DNS", 15*time.Second, func() bool { return answers() == 1 })

	report := func(scenario string, l *load, back time.Time, want int) {
		t.Helper()
		var took time.Duration
		for answers() != want {
			if time.Since(back) > 30*time.Second {
				t.Fatalf("%s: the view did not catch up within 30 s (DNS answers %d, want %d)", scenario, answers(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
		took = time.Since(back)
		sent, failed := l.end()
		t.Logf("FAULT\t%s\tsent=%d\tfailed=%d\trecover=%v", scenario, sent, failed, took.Round(time.Millisecond))
		if n := l.followed.Load(); n > 0 {
			t.Logf("%s: %d answers without an instance while Consul itself had no passing instance (the view follows Consul)", scenario, n)
		}
		if failed > 0 {
			t.Errorf("%s: %d of %d requests failed: the last view was not served throughout:\n%s", scenario, failed, sent, strings.Join(l.why, "\n"))
		}
	}

	t.Run("agent", func(t *testing.T) {
		l := startLoad(dnsAddr, upstream)
		agent.Kill()
		time.Sleep(*agentDown / 2)
		if err := register("users-2"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(*agentDown - *agentDown/2)
		agent.Start(t)
		for {
			if _, _, err := agent.Client().Catalog().Services(nil); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		report(fmt.Sprintf("node's agent killed %v", *agentDown), l, time.Now(), 2)
	})

	t.Run("servers", func(t *testing.T) {
		l := startLoad(dnsAddr, upstream)
		for _, s := range c.Servers {
			s.Stop()
		}
		// A change the agent keeps until the servers are back: a local
		// registration, synced by anti-entropy.
		time.Sleep(*serversDown / 2)
		h, p := hostPort("users-3")
		if err := agent.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "users-3", Name: "users",
			Address: h, Port: p}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(*serversDown - *serversDown/2)
		has := func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			entries, _, err := c.Servers[0].Client().Health().Service("users", "", true, (&api.QueryOptions{}).WithContext(ctx))
			return err != nil || len(entries) > 0 // no answer: not Consul's word
		}
		l.followConsul(has)
		for _, s := range c.Servers {
			s.Start(t)
		}
		c.WaitLeader(t)
		leader := time.Now()
		// The agent syncs its registration on its own schedule (its
		// anti-entropy retries every ~15 s after a failure): recovery is
		// counted from Consul's catalog holding the change.
		for {
			entries, _, err := c.Servers[0].Client().Catalog().Service("users", "", nil)
			if err == nil && len(entries) == 3 {
				break
			}
			if time.Since(leader) > 60*time.Second {
				t.Fatal("the agent did not sync users-3 within 60 s of the election")
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("Consul's catalog had the change %v after the election", time.Since(leader).Round(time.Millisecond))
		report(fmt.Sprintf("all 3 servers stopped %v", *serversDown), l, time.Now(), 3)
	})
}

func atoi(s string) int {
	n := 0
	fmt.Sscan(s, &n)
	return n
}
