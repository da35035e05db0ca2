package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"attache/demo"
	"attache/internal/testcluster"
)

// notice is one sd_notify datagram and the pid that sent it.
type notice struct {
	pid int
	msg string
}

// TestUpgradeBySIGUSR2 runs the built binary as systemd would (a notify
// socket, NotifyAccess=main's view of who sent what) and upgrades it in
// place with SIGUSR2 under constant HTTP load: the running process starts
// its successor (the binary at its path, same arguments), which takes the
// sockets and serves; the old one names it the main process (MAINPID=),
// drains and exits 0 without STOPPING=1. No request fails. Then SIGTERM
// stops the successor as usual (STOPPING=1, services deregistered).
func TestUpgradeBySIGUSR2(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "attache")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	users := httptest.NewServer(demo.New("users", "users-1"))
	defer users.Close()
	host, port, _ := net.SplitHostPort(users.Listener.Addr().String())
	svc := filepath.Join(dir, "users.hcl")
	if err := os.WriteFile(svc, []byte(fmt.Sprintf("service {\n  name = \"users\"\n  id = \"users-1\"\n  address = %q\n  port = %s\n}\n", host, port)), 0o644); err != nil {
		t.Fatal(err)
	}
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	admin, up := free(), free()

	// The notify socket, telling senders apart by SO_PASSCRED.
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rc, _ := conn.SyscallConn()
	rc.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1) })
	if err != nil {
		t.Fatal(err)
	}
	notices := make(chan notice, 1000)
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, syscall.CmsgSpace(syscall.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			if cm, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil && len(cm) == 1 {
				if cred, err := syscall.ParseUnixCredentials(&cm[0]); err == nil {
					for _, m := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
						notices <- notice{int(cred.Pid), m}
					}
				}
			}
		}
	}()
	waitFor := func(what string, pid int, prefix string) string {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for {
			select {
			case n := <-notices:
				if n.pid == pid && strings.HasPrefix(n.msg, prefix) {
					return n.msg
				}
				if n.pid == pid && n.msg == "STOPPING=1" {
					t.Fatalf("waiting for %s: STOPPING=1 from %d", what, pid)
				}
			case <-deadline:
				t.Fatalf("no %s within 30s", what)
			}
		}
	}

	cmd := exec.Command(bin, "sidecar", "-admin", admin, "-consul", c.Clients[0].HTTPAddr, "-service", svc,
		"-data-dir", filepath.Join(dir, "data"), "-upstream", "users="+up, "-drain-timeout", "3s", "-log-level", "debug")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=20000000")
	// A file, not a pipe: the successor inherits it and outlives the first
	// process (Wait would wait for the pipe's end).
	logPath := filepath.Join(dir, "sidecar.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, which the successor inherits: the cleanup
	// kills both even when the test ends before it learns the successor.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var successor atomic.Int64
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if p := successor.Load(); p > 0 {
			syscall.Kill(int(p), syscall.SIGKILL)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("sidecar output:\n%s", b)
		}
	})
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waitFor("READY=1 from the first process", cmd.Process.Pid, "READY=1")

	var sent, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			end := time.Now().Add(60 * time.Second)
			for i := 0; i < 20000 && time.Now().Before(end); i++ {
				select {
				case <-stop:
					return
				default:
				}
				sent.Add(1)
				resp, err := cl.Get("http://" + up + "/items/" + strconv.Itoa(i))
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)

	if err := cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	msg := waitFor("MAINPID= from the first process", cmd.Process.Pid, "MAINPID=")
	pid, err := strconv.Atoi(strings.TrimPrefix(msg, "MAINPID="))
	if err != nil || pid == cmd.Process.Pid {
		t.Fatalf("%q: want the successor's pid", msg)
	}
	successor.Store(int64(pid))
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("the first process exited with %v, want 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the first process did not exit within 30s of handing over")
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("HTTP through the upgrade: %d sent, %d failed (first: %v)", sent.Load(), failed.Load(), firstErr.Load())
	if failed.Load() != 0 || sent.Load() < 50 {
		t.Errorf("%d of %d requests failed (first: %v)", failed.Load(), sent.Load(), firstErr.Load())
	}
	for _, n := range drain(notices) {
		if n.pid == cmd.Process.Pid && n.msg == "STOPPING=1" {
			t.Error("the first process sent STOPPING=1 while handing over")
		}
	}
	agent := c.Clients[0].API(t)
	if svcs, err := agent.Agent().Services(); err != nil || svcs["users-1"] == nil || svcs["attache"] == nil {
		t.Fatalf("after the upgrade the agent has %v (%v)", svcs, err)
	}
	resp, err := http.Get("http://" + admin + "/readyz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/readyz after the upgrade: %v %v", resp, err)
	}
	resp.Body.Close()

	// The successor alone: SIGTERM stops it as usual.
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor("STOPPING=1 from the successor", pid, "STOPPING=1")
	deadline := time.Now().Add(20 * time.Second)
	for {
		svcs, err := agent.Agent().Services()
		if err == nil && len(svcs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the successor's services still registered after its stop: %v %v", svcs, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func drain(c <-chan notice) []notice {
	var out []notice
	for {
		select {
		case n := <-c:
			out = append(out, n)
		default:
			return out
		}
	}
}
