//go:build linux

package sidecar

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	miekg "github.com/miekg/dns"

	"attache/internal/testcluster"
)

// notifySocket listens like systemd's notify socket, points NOTIFY_SOCKET at
// it with a watchdog of the given timeout for this process, and returns the
// datagrams this process sends (like systemd, it takes the sender's pid from
// SO_PASSCRED: the Consul agents the test starts inherit NOTIFY_SOCKET and
// send their own READY=1).
func notifySocket(t *testing.T, watchdog time.Duration) <-chan string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	raw, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1) })
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", path)
	t.Setenv("WATCHDOG_USEC", strconv.FormatInt(watchdog.Microseconds(), 10))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	c := make(chan string, 1000)
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, syscall.CmsgSpace(syscall.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			if cmsgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil && len(cmsgs) == 1 {
				if cred, err := syscall.ParseUnixCredentials(&cmsgs[0]); err == nil && int(cred.Pid) == os.Getpid() {
					c <- string(buf[:n])
				}
			}
		}
	}()
	return c
}

// collect returns what arrives on c during d.
func collect(c <-chan string, d time.Duration) []string {
	var got []string
	end := time.After(d)
	for {
		select {
		case n := <-c:
			got = append(got, n)
		case <-end:
			return got
		}
	}
}

func count(states []string, s string) int {
	n := 0
	for _, x := range states {
		if x == s {
			n++
		}
	}
	return n
}

// TestSystemdNotify runs the sidecar as systemd would, with NOTIFY_SOCKET and
// a watchdog, beside a real client agent:
//   - while the agent is down (and the data dir is empty, so there is no
//     last-known-good view) the sidecar pings the watchdog but never says
//     READY, and /readyz answers 503;
//   - once the agent is back, READY=1 comes once, and at that moment every
//     listener answers (DNS, the upstream and HTTP proxy listeners) and
//     /readyz is 200;
//   - the watchdog pings keep coming at half the timeout;
//   - on shutdown STOPPING=1 is the last message.
func TestSystemdNotify(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	agent := c.Clients[0]
	agent.Stop()

	const watchdog = time.Second // pings every 500ms
	msgs := notifySocket(t, watchdog)
	dnsAddr, upstream, httpProxy := freeAddr(t), freeAddr(t), freeAddr(t)
	admin, stop := runSidecar(t, "-consul", agent.HTTPAddr, "-dns", dnsAddr, "-data-dir", t.TempDir(),
		"-upstream", "users="+upstream, "-http-proxy", httpProxy)

	got := collect(msgs, 3*time.Second)
	if n := count(got, "READY=1"); n != 0 {
		t.Fatalf("READY=1 sent while Consul is unreachable and there is no last-known-good view: %q", got)
	}
	if n := count(got, "WATCHDOG=1"); n < 2 || n != len(got) {
		t.Fatalf("in 3s before ready: %q, want only watchdog pings (every 500ms)", got)
	}
	if code, body := get(admin, "/readyz"); code != 503 {
		t.Fatalf("/readyz = %d %s while the agent is down", code, body)
	}

	agent.Start(t)
	deadline := time.After(30 * time.Second)
wait:
	for {
		select {
		case n := <-msgs:
			if n == "READY=1" {
				break wait
			}
			if n != "WATCHDOG=1" {
				t.Fatalf("unexpected %q before READY=1", n)
			}
		case <-deadline:
			t.Fatal("no READY=1 within 30s of the agent coming back")
		}
	}
	// Right at READY, every listener is bound and /readyz agrees.
	m := new(miekg.Msg)
	m.SetQuestion("attache.service.consul.", miekg.TypeA)
	if in, err := miekg.Exchange(m, dnsAddr); err != nil || in.Rcode == miekg.RcodeServerFailure {
		t.Errorf("DNS at READY: %v %v", in, err)
	}
	for _, a := range []string{upstream, httpProxy} {
		if conn, err := net.Dial("tcp", a); err != nil {
			t.Errorf("listener %s at READY: %v", a, err)
		} else {
			conn.Close()
		}
	}
	if code, body := get(admin, "/readyz"); code != 200 {
		t.Errorf("/readyz at READY = %d %s", code, body)
	}

	// Pings at half the timeout: in 3 s, 6 ticks (a ticker never ticks
	// early; a loaded machine may delay some, hence the lower bound of 2).
	got = collect(msgs, 3*time.Second)
	if n := count(got, "WATCHDOG=1"); n < 2 || n > 7 || n != len(got) {
		t.Errorf("in 3s after READY: %q, want 2-7 watchdog pings and nothing else (READY=1 once)", got)
	}

	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	got = collect(msgs, 300*time.Millisecond)
	if len(got) == 0 || got[len(got)-1] != "STOPPING=1" {
		t.Fatalf("after shutdown: %q, want STOPPING=1 last", got)
	}
}
