package catalog

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// scaleSubtests run inside TestIntegration, on its cluster: many services,
// the connection bound counted from the OS, a neighbour on the same
// address, flaps, a restart from disk, and a mass deregistration.
func scaleSubtests(t *testing.T, srv *api.Client, agentAddr string) {
	const n = 300
	name := func(i int) string { return fmt.Sprintf("many%03d", i) }
	if err := registerMany(srv, "many-node", n, name); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := integrationConfig(agentAddr)
	cfg.Mode = ModeOnDemand
	cfg.DataDir = dir
	cfg.SaveInterval = 50 * time.Millisecond
	// Writes and Consul's answers go through a server, never the agent:
	// every connection of this process to the agent is the watcher's.
	mon := monitorConns(t, agentAddr)
	nb := startNeighbour(t, "http://"+agentAddr+"/v1/status/leader")

	w1, err := NewWatcher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx1, cancel1 := context.WithCancel(context.Background())
	done1 := make(chan error, 1)
	go func() { done1 <- w1.Run(ctx1) }()
	defer func() { cancel1(); <-done1 }()
	waitFor(t, w1, 30*time.Second, "the service list", func(s *Snapshot) bool { return s.Known[name(n-1)] })

	t.Run("300 services asked for at once all answer", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		var missing atomic.Int64
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				if s := w1.Want(ctx, name(i)); !same(ids(s, name(i)), name(i)+"-1") {
					missing.Add(1)
				}
			}(i)
		}
		wg.Wait()
		if m := missing.Load(); m > 0 {
			t.Fatalf("%d of %d services did not answer", m, n)
		}
	})

	t.Run("1000 flaps across 300 services end in Consul's state", func(t *testing.T) {
		var wg sync.WaitGroup
		const writers = 10
		errs := make(chan error, writers)
		for g := 0; g < writers; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(g), 7))
				for k := 0; k < 1000/writers; k++ {
					i := g + writers*r.IntN(n/writers) // each goroutine its own services: one writer per check
					st := api.HealthCritical
					if r.IntN(2) == 0 {
						st = api.HealthPassing
					}
					if err := setCheck(srv, "many-node", name(i), st); err != nil {
						errs <- err
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		want := map[string][]string{}
		for i := 0; i < n; i++ {
			want[name(i)] = consulPassing(t, srv, name(i))
		}
		waitFor(t, w1, 30*time.Second, "the view equal to Consul's", func(s *Snapshot) bool {
			for svc, ids0 := range want {
				if !same(ids(s, svc), ids0...) {
					return false
				}
			}
			return true
		})
		// And it stays there (no late, stale update overwrites it).
		time.Sleep(500 * time.Millisecond)
		for svc, ids0 := range want {
			if got := ids(w1.Load(), svc); !same(got, ids0...) {
				t.Fatalf("%s after settling: %v, want %v", svc, got, ids0)
			}
		}
	})

	t.Run("a restart from disk probes, within the bound", func(t *testing.T) {
		time.Sleep(200 * time.Millisecond) // a save
		cancel1()
		<-done1
		done1 <- nil // for the deferred stop
		w2 := runWatcher(t, cfg)
		if s := w2.Load(); !s.Stale || len(s.Services) < n {
			t.Fatalf("not served from disk: stale %v, %d services", s.Stale, len(s.Services))
		}
		if st := w2.Status(); st.Watched < n {
			t.Fatalf("watching %d after the restart", st.Watched)
		}
		waitFor(t, w2, 30*time.Second, "confirmed by Consul", func(s *Snapshot) bool { return !s.Stale && w2.Status().Synced })

		t.Run("deregistered services stop being watched at once", func(t *testing.T) {
			before := w2.Status().Watched
			if _, _, _, err := srv.Txn().Txn(api.TxnOps{{Node: &api.NodeTxnOp{Verb: api.NodeDelete, Node: api.Node{Node: "many-node"}}}}, nil); err != nil {
				t.Fatal(err)
			}
			waitFor(t, w2, 10*time.Second, "the watches gone", func(s *Snapshot) bool {
				_, ok := s.Service(name(0))
				return !ok && w2.Status().Watched <= before-n
			})
		})
	})

	peak, samples := mon.stop()
	ok, other := nb.stop(t)
	t.Logf("connections to the agent: at most %d (bound %d) over %d samples; neighbour: %d answered 200, %d otherwise", peak, cfg.MaxConns, samples, ok, other)
	if samples < 10 || peak == 0 {
		t.Fatalf("the connection count saw nothing: %d samples, peak %d", samples, peak)
	}
	if peak > cfg.MaxConns {
		t.Fatalf("%d connections to the agent, over the bound of %d", peak, cfg.MaxConns)
	}
	if ok == 0 || other > 0 {
		t.Fatalf("the neighbour got %d answers 200 and %d others", ok, other)
	}
}

// registerMany registers n services (one instance each, with a passing
// check) on an external node, in transactions.
func registerMany(c *api.Client, node string, n int, name func(int) string) error {
	var ops api.TxnOps
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		ok, resp, _, err := c.Txn().Txn(ops, nil)
		if err == nil && !ok {
			err = fmt.Errorf("transaction refused: %v", resp.Errors)
		}
		ops = nil
		return err
	}
	for i := 0; i < n; i++ {
		if len(ops) == 0 {
			ops = append(ops, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet, Node: api.Node{Node: node, Address: "10.7.0.1"}}})
		}
		svc := name(i)
		ops = append(ops,
			&api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: node, Service: api.AgentService{ID: svc + "-1", Service: svc, Port: 1000 + i}}},
			&api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: api.HealthCheck{Node: node, CheckID: svc + "-check", Name: "check",
				Status: api.HealthPassing, ServiceID: svc + "-1", ServiceName: svc}}})
		if len(ops) >= 61 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// setCheck sets the status of the check registerMany gave service.
func setCheck(c *api.Client, node, svc, status string) error {
	ok, resp, _, err := c.Txn().Txn(api.TxnOps{{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: api.HealthCheck{Node: node,
		CheckID: svc + "-check", Name: "check", Status: status, ServiceID: svc + "-1", ServiceName: svc}}}}, nil)
	if err == nil && !ok {
		err = fmt.Errorf("transaction refused: %v", resp.Errors)
	}
	return err
}

// connMonitor samples, from /proc, this process's established TCP
// connections to one address.
type connMonitor struct {
	stopc   chan struct{}
	done    chan struct{}
	peak    int
	samples int
}

func monitorConns(t *testing.T, addr string) *connMonitor {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	ip := net.ParseIP(host).To4()
	p, _ := strconv.Atoi(port)
	if ip == nil {
		t.Fatalf("monitorConns wants an IPv4 address, not %s", addr)
	}
	// /proc/net/tcp writes an IPv4 address as the hex of its 32 bits in
	// host (little-endian) order, then the port in hex.
	want := strings.ToUpper(hex.EncodeToString([]byte{ip[3], ip[2], ip[1], ip[0]})) + ":" + fmt.Sprintf("%04X", p)
	m := &connMonitor{stopc: make(chan struct{}), done: make(chan struct{})}
	if _, err := countConns(want); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(m.done)
		for {
			if c, err := countConns(want); err == nil {
				m.peak = max(m.peak, c)
				m.samples++
			}
			select {
			case <-m.stopc:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-m.done:
		default:
			m.stop()
		}
	})
	return m
}

func (m *connMonitor) stop() (peak, samples int) {
	close(m.stopc)
	<-m.done
	return m.peak, m.samples
}

// countConns counts the sockets of this process in /proc/net/tcp that are
// ESTABLISHED (state 01) to remote.
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

// neighbour is another process on this machine asking the agent over new
// connections all the time, as the consul CLI or an application would.
type neighbour struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *strings.Builder
}

func startNeighbour(t *testing.T, url string) *neighbour {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestNeighbourHelper$")
	cmd.Env = append(os.Environ(), "ATTACHE_NEIGHBOUR_URL="+url)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	nb := &neighbour{cmd: cmd, stdin: stdin, out: &strings.Builder{}}
	cmd.Stdout = nb.out
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	return nb
}

// stop ends the neighbour and returns how many of its requests got 200 and
// how many did not.
func (nb *neighbour) stop(t *testing.T) (ok, other int) {
	t.Helper()
	nb.stdin.Close()
	if err := nb.cmd.Wait(); err != nil {
		t.Fatalf("neighbour: %v (%s)", err, nb.out.String())
	}
	for _, line := range strings.Split(nb.out.String(), "\n") {
		var a, b int
		if _, err := fmt.Sscanf(line, "neighbour %d %d", &a, &b); err == nil {
			return a, b
		}
	}
	t.Fatalf("neighbour printed no counts: %q", nb.out.String())
	return 0, 0
}

// TestNeighbourHelper is the neighbour process (startNeighbour): it asks
// ATTACHE_NEIGHBOUR_URL every 10ms, each time over a new connection, until
// its stdin closes, then prints its counts.
func TestNeighbourHelper(t *testing.T) {
	url := os.Getenv("ATTACHE_NEIGHBOUR_URL")
	if url == "" {
		t.Skip("the neighbour process of the scale test")
	}
	stop := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(stop) }()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	ok, other := 0, 0
	for {
		select {
		case <-stop:
			fmt.Printf("neighbour %d %d\n", ok, other)
			return
		case <-time.After(10 * time.Millisecond):
		}
		resp, err := hc.Get(url)
		if err != nil {
			other++
			fmt.Fprintln(os.Stderr, "neighbour:", err)
			continue
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			ok++
		} else {
			other++
			fmt.Fprintln(os.Stderr, "neighbour:", resp.Status)
		}
	}
}
