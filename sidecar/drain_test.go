package sidecar

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/demo"
	"attache/internal/testcluster"
)

// svcFile writes a -service file registering each instance (id → the
// address of its backend) as service name.
func svcFile(t *testing.T, name string, instances map[string]string) string {
	t.Helper()
	var b strings.Builder
	for id, addr := range instances {
		host, port, _ := net.SplitHostPort(addr)
		fmt.Fprintf(&b, "service {\n  name = %q\n  id = %q\n  address = %q\n  port = %s\n}\n", name, id, host, port)
	}
	p := filepath.Join(t.TempDir(), name+".hcl")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestGracefulStop stops (as SIGTERM does: its context ends) sidecar A on
// one node of a real cluster while sidecar B, on another node, calls the
// service A registered under constant load. A must turn unready at once,
// deregister its services while its listeners still finish a request under
// way, then stop; B's callers see no failed request, even when A's backend
// goes away right after A stopped.
func TestGracefulStop(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Clients: 2})
	users1 := httptest.NewServer(demo.New("users", "users-1"))
	defer users1.Close()
	users2 := httptest.NewServer(demo.New("users", "users-2"))
	defer users2.Close()
	slowDemo := demo.New("slow", "slow-1")
	if err := slowDemo.SetFault(demo.ModeSlow, 6*time.Second); err != nil {
		t.Fatal(err)
	}
	slow := httptest.NewServer(slowDemo)
	defer slow.Close()

	upA, upSlowA, upB := freeAddr(t), freeAddr(t), freeAddr(t)
	svcA := svcFile(t, "users", map[string]string{"users-1": users1.Listener.Addr().String()})
	svcSlow := svcFile(t, "slow", map[string]string{"slow-1": slow.Listener.Addr().String()})
	adminA, stopA := runSidecar(t, "-consul", c.Clients[0].HTTPAddr, "-service", svcA, "-service", svcSlow,
		"-data-dir", t.TempDir(), "-upstream", "users="+upA, "-upstream", "slow="+upSlowA, "-drain-timeout", "10s", "-try-timeout", "10s")
	accessLog := filepath.Join(t.TempDir(), "access.log")
	adminB, _ := runSidecar(t, "-consul", c.Clients[1].HTTPAddr, "-data-dir", t.TempDir(), "-access-log", accessLog, "-access-log-all",
		"-service", svcFile(t, "users", map[string]string{"users-2": users2.Listener.Addr().String()}),
		"-upstream", "users="+upB)
	for _, a := range []string{adminA, adminB} {
		eventually(t, "/readyz 200", 15*time.Second, func() bool { code, _ := get(a, "/readyz"); return code == 200 })
	}
	// B balances over both instances.
	seen := map[string]bool{}
	eventually(t, "B to reach users-1 and users-2", 15*time.Second, func() bool {
		_, body := get(upB, "/items/1")
		for _, id := range []string{"users-1", "users-2"} {
			if strings.Contains(body, `"instance":"`+id+`"`) {
				seen[id] = true
			}
		}
		return len(seen) == 2
	})

	// Constant load through B, bounded in count and time.
	var total, failed atomic.Int64
	var firstFailure atomic.Value
	stopLoad := make(chan struct{})
	var load sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second}
	for w := 0; w < 4; w++ {
		load.Add(1)
		go func() {
			defer load.Done()
			deadline := time.Now().Add(60 * time.Second)
			for i := 0; i < 50000 && time.Now().Before(deadline); i++ {
				select {
				case <-stopLoad:
					return
				default:
				}
				resp, err := client.Get("http://" + upB + "/items/" + fmt.Sprint(i))
				total.Add(1)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)

	// A request under way through A when it is told to stop.
	inflight := make(chan int, 1)
	go func() {
		code, _ := get(upSlowA, "/x")
		inflight <- code
	}()
	eventually(t, "the slow request to reach the backend", 5*time.Second, func() bool {
		return slowDemo.Count() == 1
	})

	stopped := make(chan error, 1)
	go func() { stopped <- stopA() }()

	// At once: unready, saying why.
	eventually(t, "A's /readyz to answer 503", 2*time.Second, func() bool {
		code, body := get(adminA, "/readyz")
		return code == 503 && strings.Contains(body, "stopping")
	})
	// Deregistered while the request under way still runs.
	agentA := c.Clients[0].API(t)
	eventually(t, "A's services to leave its agent", 4*time.Second, func() bool {
		svcs, err := agentA.Agent().Services()
		return err == nil && len(svcs) == 0
	})
	select {
	case err := <-stopped:
		t.Fatalf("A stopped (%v) before the request under way finished", err)
	default:
	}
	if code := <-inflight; code != 200 {
		t.Errorf("the request under way when A stopped got %d, want 200", code)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("A's Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("A did not stop within 10s of its last request")
	}
	if conn, err := net.Dial("tcp", upA); err == nil {
		conn.Close()
		t.Error("A's upstream listener still accepts after the stop")
	}
	// The node goes away with its sidecar: its backend stops too.
	users1.Close()
	time.Sleep(1500 * time.Millisecond)
	close(stopLoad)
	load.Wait()

	t.Logf("%d requests through B while A stopped, %d failed", total.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d of %d requests failed at B's caller; first: %v", failed.Load(), total.Load(), firstFailure.Load())
	}
	if total.Load() < 100 {
		t.Errorf("only %d requests under load; the test proves nothing", total.Load())
	}
	// B's access log has a line for each of them, and the ones before.
	var lines []string
	eventually(t, "B's access log lines", 5*time.Second, func() bool {
		b, _ := os.ReadFile(accessLog)
		lines = strings.Split(strings.TrimSpace(string(b)), "\n")
		return int64(len(lines)) >= total.Load()
	})
	if l := lines[len(lines)-1]; !strings.Contains(l, `"listener":"users"`) || !strings.Contains(l, `"status":200`) || !strings.Contains(l, `"instance":"users-2"`) {
		t.Errorf("B's last access log line: %s", l)
	}
}
