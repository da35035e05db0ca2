package sdnotify

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// listen makes a notify socket like systemd's, points NOTIFY_SOCKET at it
// for the test, and returns the messages it receives.
func listen(t *testing.T) <-chan string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	msgs := make(chan string, 1000)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return msgs
}

func next(t *testing.T, msgs <-chan string, within time.Duration) string {
	t.Helper()
	select {
	case m := <-msgs:
		return m
	case <-time.After(within):
		t.Fatalf("no notification within %v", within)
		return ""
	}
}

func TestWatchdogFromEnvironment(t *testing.T) {
	me := strconv.Itoa(os.Getpid())
	for _, tc := range []struct {
		name, usec, pid string
		want            time.Duration
		wantErr         bool
	}{
		{"unset", "", "", 0, false},
		{"this process", "2000000", me, 2 * time.Second, false},
		{"no pid given", "500000", "", 500 * time.Millisecond, false},
		{"another process", "2000000", "1", 0, false},
		{"malformed", "soon", "", 0, true},
		{"negative", "-5", "", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tc.usec)
			t.Setenv("WATCHDOG_PID", tc.pid)
			n, err := New(Config{Ready: func() bool { return true }})
			if tc.wantErr {
				if err == nil {
					t.Fatalf("New: no error for WATCHDOG_USEC=%q", tc.usec)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n.Watchdog() != tc.want {
				t.Errorf("Watchdog() = %v, want %v", n.Watchdog(), tc.want)
			}
		})
	}
}

func TestNewNeedsReady(t *testing.T) {
	if _, err := New(DefaultConfig()); err == nil {
		t.Fatal("New without Ready: no error")
	}
}

// TestReadyWatchdogStopping: no READY while Ready is false, READY=1 once
// (and only once) when it holds, watchdog pings meanwhile and after, and
// STOPPING=1 last when the context ends.
func TestReadyWatchdogStopping(t *testing.T) {
	msgs := listen(t)
	t.Setenv("WATCHDOG_USEC", "200000") // pings every 100ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var ready atomic.Bool
	n, err := New(Config{Ready: ready.Load, PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()

	// Not ready: only pings.
	for i := 0; i < 3; i++ {
		if m := next(t, msgs, 5*time.Second); m != "WATCHDOG=1" {
			t.Fatalf("before ready: got %q, want WATCHDOG=1", m)
		}
	}
	ready.Store(true)
	readies, pings := 0, 0
	for readies == 0 || pings < 3 {
		switch m := next(t, msgs, 5*time.Second); m {
		case "READY=1":
			readies++
		case "WATCHDOG=1":
			if readies > 0 {
				pings++
			}
		default:
			t.Fatalf("unexpected %q", m)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	var rest []string
	for {
		select {
		case m := <-msgs:
			rest = append(rest, m)
			continue
		case <-time.After(200 * time.Millisecond):
		}
		break
	}
	if len(rest) == 0 || rest[len(rest)-1] != "STOPPING=1" {
		t.Fatalf("after cancel: %q, want STOPPING=1 last", rest)
	}
	for _, m := range rest {
		if m == "READY=1" {
			t.Errorf("READY=1 sent twice")
		}
	}
}

// TestNoSocket: outside systemd nothing is sent and Run still follows ctx.
func TestNoSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "")
	n, err := New(Config{Ready: func() bool { return true }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := n.Run(ctx); err != nil {
		t.Fatal(err)
	}
}
