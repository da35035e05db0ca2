package sidecar

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"

	"attache/demo"
	"attache/internal/testcluster"
)

var partitionFor = flag.Duration("fault-partition", 25*time.Second, "TestPartition: how long the node stays cut off (scripts/faults: 60s)")

// nodeEnv names the environment variable that makes this test binary a
// node of TestPartition instead of running tests: a demo instance and a
// sidecar, run in a network namespace (a separate process, since a
// process's sockets are made in the namespace of the thread making them).
const nodeEnv = "ATTACHE_TEST_NODE"

// nodeSpec is what the node process runs, passed as JSON in nodeEnv.
type nodeSpec struct {
	Service, ID, Addr string   // the demo instance: its service, id and listen address
	Args              []string // the sidecar's arguments
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(nodeEnv); spec != "" {
		os.Exit(runNode(spec))
	}
	os.Exit(m.Run())
}

// runNode runs a node of TestPartition until SIGTERM.
func runNode(spec string) int {
	var n nodeSpec
	if err := json.Unmarshal([]byte(spec), &n); err != nil {
		fmt.Fprintln(os.Stderr, "node:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ln, err := net.Listen("tcp", n.Addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "node:", err)
		return 1
	}
	go http.Serve(ln, demo.New(n.Service, n.ID))
	cfg, err := ParseArgs(n.Args, DefaultConfig(noEnv), io.Discard)
	if err != nil {
		fmt.Fprintln(os.Stderr, "node:", err)
		return 2
	}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Name: "cut-node", Output: os.Stderr, Level: hclog.LevelFromString(os.Getenv("ATTACHE_TEST_NODE_LOG"))}))
	if err != nil {
		fmt.Fprintln(os.Stderr, "node:", err)
		return 2
	}
	if err := s.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "node:", err)
		return 1
	}
	return 0
}

// TestPartition cuts a node off by a network partition and heals it, under
// a bounded load (a DNS question and a proxied request every 20 ms) on two
// sidecars: the cut node's own and another node's. The network is made by
// the test (testcluster.NewNet): three servers and the other node's agent
// on host addresses of a bridge, the cut node (its Consul client agent, a
// sidecar and a demo users instance, users-a) in a network namespace joined
// to the bridge by a veth pair; the cut takes the host end of the pair down.
// Another users instance, users-b, is on the other node, and users-c is
// registered there while the cut lasts.
//   - Its instance leaves the other node's answers once Serf declares the
//     node failed (the time is measured and logged), and nothing sent
//     through the other node's sidecar fails meanwhile.
//   - The cut node's sidecar keeps serving its last view: DNS answers and
//     proxying to the instance it can still reach, its own; nothing fails.
//   - When the cut ends the node rejoins: users-a is back in the other
//     node's answers and users-c in the cut node's (times logged); users-b
//     is back in the cut node's once the ejection by its breaker ends.
//
// It logs FAULT lines as TestFaults does; scripts/faults runs it with a
// 60 s cut: Serf gossips to a member it declared failed for 30 s only, so
// after a longer cut the node rejoins through Serf's reconnect attempts
// (every 30 s).
func TestPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("faults of a real cluster")
	}
	nw := testcluster.NewNet(t, 5, "cut")
	ns := nw.Spaces[0]
	otherIP, cIP := nw.HostIP(3), nw.HostIP(4)
	c := testcluster.Start(t, testcluster.Options{Clients: 2,
		IPs:   []string{nw.HostIP(0), nw.HostIP(1), nw.HostIP(2), otherIP, ns.IP},
		NetNS: []*testcluster.NetNS{nil, ns}})
	other, cut := c.Clients[0], c.Clients[1]

	// The other node: users-b (and later users-c), a sidecar in this process.
	backend := func(ip, id string) string {
		ln, err := net.Listen("tcp", ip+":0")
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewUnstartedServer(demo.New("users", id))
		srv.Listener.Close()
		srv.Listener = ln
		srv.Start()
		t.Cleanup(srv.Close)
		return ln.Addr().String()
	}
	usersB, usersC := backend(otherIP, "users-b"), backend(cIP, "users-c")
	hostAddr := func() string {
		ln, err := net.Listen("tcp", otherIP+":0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	otherDNS, otherUp := hostAddr(), hostAddr()
	otherAdmin, _ := runSidecar(t, "-consul", other.HTTPAddr, "-dns", otherDNS, "-upstream", "users="+otherUp,
		"-service", svcFile(t, "users", map[string]string{"users-b": usersB}), "-data-dir", t.TempDir())

	// The cut node: this test binary as a node process in the namespace
	// (a fresh namespace: its ports are free).
	cutDNS, cutUp, usersA := ns.IP+":8653", ns.IP+":9191", ns.IP+":18080"
	spec, _ := json.Marshal(nodeSpec{Service: "users", ID: "users-a", Addr: usersA, Args: []string{
		"-consul", cut.HTTPAddr, "-dns", cutDNS, "-upstream", "users=" + cutUp, "-admin", "127.0.0.1:19001",
		"-service", svcFile(t, "users", map[string]string{"users-a": usersA}), "-data-dir", t.TempDir()}})
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "cut-node.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	node := ns.Command(exe, "-test.run=^$")
	node.Env = append(os.Environ(), nodeEnv+"="+string(spec))
	node.Stdout, node.Stderr = logf, logf
	node.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := node.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = node.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { node.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = node.Process.Kill()
			<-done
		}
		if t.Failed() || os.Getenv("ATTACHE_TEST_NODE_LOG") != "" {
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Logf("cut node's log (last 40 lines):\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})

	// The users addresses a sidecar's DNS answers.
	addrs := func(dial dialFunc, dnsAddr string) []string {
		in, err := askDNS(dial, dnsAddr, "users.service.consul.")
		if err != nil {
			return nil
		}
		var out []string
		for _, rr := range in.Answer {
			if a, ok := rr.(*miekg.A); ok {
				out = append(out, a.A.String())
			}
		}
		slices.Sort(out)
		return out
	}
	same := func(got []string, want ...string) bool { slices.Sort(want); return slices.Equal(got, want) }
	eventually(t, "the other sidecar ready", 20*time.Second, func() bool { code, _ := get(otherAdmin, "/readyz"); return code == 200 })
	eventually(t, "users-a and users-b in both sidecars' answers", 30*time.Second, func() bool {
		return same(addrs(nil, otherDNS), ns.IP, otherIP) && same(addrs(ns.DialContext, cutDNS), ns.IP, otherIP)
	})

	loadOther := startLoad(otherDNS, otherUp)
	loadCut := startLoadVia(ns.DialContext, cutDNS, cutUp)
	// When the cut heals, Serf may mark a healthy member failed for a
	// moment, and Consul then has no passing users instance at all: both
	// views follow it (as the all-servers-down fault), which is no failure.
	hasUsers := func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		entries, _, err := c.Servers[0].Client().Health().Service("users", "", true, (&api.QueryOptions{}).WithContext(ctx))
		return err != nil || len(entries) > 0 // no answer: not Consul's word
	}
	loadOther.followConsul(hasUsers)
	loadCut.followConsul(hasUsers)
	time.Sleep(2 * time.Second) // some load before the cut
	if err := ns.Cut(); err != nil {
		t.Fatal(err)
	}
	cutAt := time.Now()
	healed := false
	defer func() {
		if !healed {
			_ = ns.Heal()
		}
	}()
	// Consul's own word (a server's health endpoint) and the other
	// sidecar's answers, polled together.
	consulPassing := func() []string {
		entries, _, err := c.Servers[0].Client().Health().Service("users", "", true, nil)
		if err != nil {
			return nil
		}
		var out []string
		for _, e := range entries {
			out = append(out, e.Service.ID)
		}
		slices.Sort(out)
		return out
	}
	var consulLeft, otherLeft time.Duration
	for consulLeft == 0 || otherLeft == 0 {
		if time.Since(cutAt) > *partitionFor {
			t.Fatalf("users-a still in answers %v after the cut (Consul's passing %v, the other sidecar's %v)",
				*partitionFor, consulPassing(), addrs(nil, otherDNS))
		}
		if consulLeft == 0 && same(consulPassing(), "users-b") {
			consulLeft = time.Since(cutAt)
		}
		if otherLeft == 0 && same(addrs(nil, otherDNS), otherIP) {
			otherLeft = time.Since(cutAt)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("users-a left Consul's passing instances %v after the cut, the other sidecar's answers %v after",
		consulLeft.Round(time.Millisecond), otherLeft.Round(time.Millisecond))

	// A change made while the node is cut off: users-c on the other node.
	h, p, _ := net.SplitHostPort(usersC)
	if err := other.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "users-c", Name: "users",
		Address: h, Port: atoi(p)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "users-c in the other sidecar's answers", 10*time.Second, func() bool {
		return same(addrs(nil, otherDNS), otherIP, cIP)
	})
	if got := addrs(ns.DialContext, cutDNS); len(got) == 0 {
		t.Errorf("the cut node's sidecar answers nothing for users while cut off")
	}
	time.Sleep(time.Until(cutAt.Add(*partitionFor)))

	if err := ns.Heal(); err != nil {
		t.Fatal(err)
	}
	healed = true
	healAt := time.Now()
	// After the cut: users-a back in the other node's answers, users-c
	// (made meanwhile) in the cut node's. users-b too, in the end: the cut
	// node's breaker ejected it while it could not reach it, and readmits it
	// when the ejection (doubled at each failed probe) ends.
	var consulBack, otherBack, cutBack, allBack time.Duration
	for consulBack == 0 || otherBack == 0 || cutBack == 0 || allBack == 0 {
		if since := time.Since(healAt); since > 60*time.Second && (otherBack == 0 || cutBack == 0) || since > 150*time.Second {
			t.Fatalf("not healed %v after the cut ended: the other sidecar answers %v, the cut node's %v, Consul's passing %v (want users-a, -b, -c: %s, %s, %s)",
				since.Round(time.Second), addrs(nil, otherDNS), addrs(ns.DialContext, cutDNS), consulPassing(), ns.IP, otherIP, cIP)
		}
		if otherBack == 0 && same(addrs(nil, otherDNS), ns.IP, otherIP, cIP) {
			otherBack = time.Since(healAt)
		}
		if got := addrs(ns.DialContext, cutDNS); cutBack == 0 && slices.Contains(got, cIP) || allBack == 0 && same(got, ns.IP, otherIP, cIP) {
			if cutBack == 0 {
				cutBack = time.Since(healAt)
			}
			if allBack == 0 && same(got, ns.IP, otherIP, cIP) {
				allBack = time.Since(healAt)
			}
		}
		if consulBack == 0 && same(consulPassing(), "users-a", "users-b", "users-c") {
			consulBack = time.Since(healAt)
		}
		time.Sleep(20 * time.Millisecond)
	}
	sentO, failedO := loadOther.end()
	sentC, failedC := loadCut.end()
	scenario := fmt.Sprintf("node cut off %v", partitionFor.Round(time.Second))
	t.Logf("FAULT\t%s: another node\tsent=%d\tfailed=%d\trecover=%v", scenario, sentO, failedO, otherBack.Round(time.Millisecond))
	t.Logf("FAULT\t%s: the cut node\tsent=%d\tfailed=%d\trecover=%v", scenario, sentC, failedC, cutBack.Round(time.Millisecond))
	t.Logf("partition: the slowest proxied request took %v through another node's sidecar, %v through the cut node's",
		time.Duration(loadOther.slowest.Load()).Round(time.Millisecond), time.Duration(loadCut.slowest.Load()).Round(time.Millisecond))
	t.Logf("partition: users-a left Consul's passing instances %v after the cut, the other sidecar's answers %v after; after the cut ended, users-a was back in the other sidecar's answers in %v, users-c in the cut node's in %v (users-a was back in Consul's passing instances in %v: Serf's rejoin); users-b, ejected by the cut node's breaker while unreachable, was back in its answers in %v",
		consulLeft.Round(time.Millisecond), otherLeft.Round(time.Millisecond), otherBack.Round(time.Millisecond), cutBack.Round(time.Millisecond), consulBack.Round(time.Millisecond), allBack.Round(time.Millisecond))
	for _, l := range []struct {
		who          string
		l            *load
		sent, failed int64
	}{{"another node's sidecar", loadOther, sentO, failedO}, {"the cut node's sidecar", loadCut, sentC, failedC}} {
		if n := l.l.followed.Load(); n > 0 {
			t.Logf("%s: %d answers without an instance while Consul itself had no passing users instance (the view follows Consul)", l.who, n)
		}
		if l.failed > 0 {
			t.Errorf("%s: %d of %d requests failed:\n%s", l.who, l.failed, l.sent, strings.Join(l.l.why, "\n"))
		}
	}
}
