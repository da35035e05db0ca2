package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"attache/demo"
	"attache/internal/testcluster"
)

// TestMain lets a test run this binary as the attache command (a real
// process, to send it real signals).
func TestMain(m *testing.M) {
	if os.Getenv("ATTACHE_TEST_RUN_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitFor(t *testing.T, what string, timeout time.Duration, f func() bool) {
	t.Helper()
	for end := time.Now().Add(timeout); !f(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

// TestSIGHUPUnderLoad runs the sidecar as a process beside a real Consul
// agent. While keep-alive clients call users through its upstream
// listener without a pause, SIGHUP with an edited file adds an inventory
// upstream and shortens the timeouts; then a broken file is refused with
// one log line naming file and line. No call to users fails; inventory
// serves; its calls end by the new try timeout; SIGTERM ends the process
// with status 0.
func TestSIGHUPUnderLoad(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Servers: 1, Clients: 1})
	agent := c.Clients[0]
	dir := t.TempDir()
	users := httptest.NewServer(demo.New("users", "users-1"))
	defer users.Close()
	invDemo := demo.New("inventory", "inventory-1")
	inv := httptest.NewServer(invDemo)
	defer inv.Close()
	var svcs []string
	for _, s := range []struct{ name, id, url string }{{"users", "users-1", users.URL}, {"inventory", "inventory-1", inv.URL}} {
		_, port, _ := net.SplitHostPort(strings.TrimPrefix(s.url, "http://"))
		p := filepath.Join(dir, s.id+".hcl")
		os.WriteFile(p, []byte(fmt.Sprintf("service {\n  name = %q\n  id = %q\n  address = \"127.0.0.1\"\n  port = %s\n}\n", s.name, s.id, port)), 0o644)
		svcs = append(svcs, fmt.Sprintf("%q", p))
	}
	admin, usersAddr, invAddr := freePort(t), freePort(t), freePort(t)
	conf := filepath.Join(dir, "attache.hcl")
	base := fmt.Sprintf("consul = [%q]\nnode = \"reload-test\"\nservice = [%s]\naccess_log = \"off\"\n", agent.HTTPAddr, strings.Join(svcs, ", "))
	write := func(s string) {
		if err := os.WriteFile(conf, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(base + fmt.Sprintf("upstream = [\"users=%s\"]\n", usersAddr))

	var out lockedBuffer
	cmd := exec.Command(os.Args[0], "sidecar", "-config", conf, "-admin", admin)
	cmd.Env = append(os.Environ(), "ATTACHE_TEST_RUN_MAIN=1")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("sidecar output:\n%s", out.String())
		}
	}()
	get := func(addr, path string) (int, string) {
		cl := &http.Client{Timeout: 10 * time.Second}
		resp, err := cl.Get("http://" + addr + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitFor(t, "users through the sidecar", 30*time.Second, func() bool { code, _ := get(usersAddr, "/u"); return code == 200 })

	// Constant load on users: 4 keep-alive clients, bounded.
	const workers, maxCalls = 4, 100000
	var calls, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := &http.Client{Timeout: 10 * time.Second}
			for calls.Add(1) < maxCalls {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := cl.Get("http://" + usersAddr + "/u")
				if err != nil {
					t.Logf("users: %v", err)
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Logf("users: %s", resp.Status)
					failed.Add(1)
				}
			}
		}()
	}
	stopLoad := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	defer stopLoad()
	more := func(n int64) {
		from := calls.Load()
		waitFor(t, "the load to go on", 20*time.Second, func() bool { return calls.Load() >= from+n })
	}
	more(200)

	// 1: inventory added, timeouts shortened, retries off.
	write(base + fmt.Sprintf("upstream = [\"users=%s\", \"inventory=%s\"]\ntry_timeout = \"1s\"\nrequest_timeout = \"1500ms\"\nretries = -1\n", usersAddr, invAddr))
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "inventory through the new upstream", 20*time.Second, func() bool {
		code, body := get(invAddr, "/i")
		return code == 200 && strings.Contains(body, "inventory-1")
	})
	more(200)
	// The new try timeout ends a call the instance answers after 5 s
	// (before the reload: 5 s per try, 15 s in all).
	invDemo.SetFault(demo.ModeSlow, 5*time.Second)
	start := time.Now()
	code, _ := get(invAddr, "/slow")
	if took := time.Since(start); code != http.StatusGatewayTimeout || took > 4*time.Second {
		t.Errorf("slow inventory after the reload: %d after %v, want 504 by the 1s try timeout", code, took)
	}
	invDemo.SetFault(demo.ModeOK, 0)

	// 2: a broken file is refused; everything keeps serving as it was.
	write(base + "upstream = [\"users=" + usersAddr + "\",\n  try_timeout = \n")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the refusal in the log", 10*time.Second, func() bool { return strings.Contains(out.String(), "reload refused") })
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "reload refused") && !regexp.MustCompile(`attache\.hcl:6,\d+: Missing item separator`).MatchString(line) {
			t.Errorf("refusal does not name file and line: %s", line)
		}
	}
	more(200)
	if code, _ := get(invAddr, "/i"); code != 200 {
		t.Errorf("inventory after the refused reload: %d", code)
	}
	stopLoad()
	t.Logf("%d calls to users across the reloads, %d failed", calls.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d calls to users failed", failed.Load())
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit 30s after SIGTERM")
	}
}
