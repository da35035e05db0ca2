package evloop

import (
	"bytes"
	"io"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

func TestCPULimitFrom(t *testing.T) {
	files := map[string]string{
		"/sys/fs/cgroup/a/cpu.max":                              "max 100000\n",
		"/sys/fs/cgroup/a/b/cpu.max":                            "150000 100000\n",
		"/sys/fs/cgroup/cpu.max":                                "max 100000",
		"/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_quota_us":  "200000\n",
		"/sys/fs/cgroup/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
		"/sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_quota_us":    "-1\n",
		"/sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_period_us":   "100000\n",
		"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":           "50000\n",
		"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":          "100000\n",
		"/c/x/cpu.cfs_quota_us":                                 "200000\n",
		"/c/x/cpu.cfs_period_us":                                "100000\n",
	}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	v2 := "30 20 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
	v1 := "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
	v1root := "32 31 0:29 /docker /c rw - cgroup cgroup rw,cpu,cpuacct\n" // the container's view
	for _, tc := range []struct {
		name, cgroup, mountinfo string
		want                    int
	}{
		{"v2 nested, rounded up", "0::/a/b\n", v2, 2},
		{"v2 no limit", "0::/a\n", v2, 0},
		{"v1 quota of an ancestor counts", "4:cpu,cpuacct:/docker/x\n", v1, 1},
		{"v1 under a mount root", "4:cpu,cpuacct:/docker/x\n", v1root, 2},
		{"no cgroup mount", "0::/a/b\n", "", 0},
		{"v1 controller elsewhere", "4:memory:/docker/x\n", v1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := cpuLimitFrom(tc.cgroup, tc.mountinfo, read); got != tc.want {
				t.Errorf("got %d, want %d", got, tc.want)
			}
		})
	}
}

func TestAsyncPreemptOff(t *testing.T) {
	for in, want := range map[string]bool{
		"": false, "asyncpreemptoff=1": true, "gctrace=1,asyncpreemptoff=1": true,
		"asyncpreemptoff=1,asyncpreemptoff=0": false, "asyncpreemptoff=0": false, "xasyncpreemptoff=1": false,
	} {
		if got := AsyncPreemptOff(in); got != want {
			t.Errorf("%q: %v, want %v", in, got, want)
		}
	}
}

// HoldP raises GOMAXPROCS by one per loop only within the CPU limit and
// with asynchronous preemption on; Release gives the runtime its default
// back, or the program its own setting.
func TestHoldPRelease(t *testing.T) {
	def := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(def) })
	for _, tc := range []struct {
		name    string
		own     int    // GOMAXPROCS the program set itself (0: the default)
		godebug string // added to GODEBUG
		n       int
		limit   func(cur int) int
		held    bool
	}{
		{"no limit", 0, "", 2, func(int) int { return 0 }, true},
		{"room under the limit", 0, "", 1, func(cur int) int { return cur + 1 }, true},
		{"no room under the limit", 0, "", 2, func(cur int) int { return cur + 1 }, false},
		{"limit already reached", 0, "", 1, func(cur int) int { return cur }, false},
		{"the program's own setting", 3, "", 1, func(int) int { return 0 }, true},
		{"asyncpreemptoff", 0, "asyncpreemptoff=1", 1, func(int) int { return 0 }, false},
		{"asyncpreemptoff set back", 0, "asyncpreemptoff=1,asyncpreemptoff=0", 1, func(int) int { return 0 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("GODEBUG", os.Getenv("GODEBUG")+","+tc.godebug)
			runtime.SetDefaultGOMAXPROCS()
			dflt := runtime.GOMAXPROCS(0)
			if tc.own > 0 {
				runtime.GOMAXPROCS(tc.own)
			}
			before := runtime.GOMAXPROCS(0)
			held := HoldP(tc.n, tc.limit(before))
			if held != tc.held {
				t.Fatalf("HoldP: %v, want %v", held, tc.held)
			}
			if !held {
				if got := runtime.GOMAXPROCS(0); got != before {
					t.Fatalf("GOMAXPROCS %d without a hold, want %d", got, before)
				}
				return
			}
			if got := runtime.GOMAXPROCS(0); got != before+tc.n {
				t.Errorf("GOMAXPROCS %d while held, want %d", got, before+tc.n)
			}
			if got := Others(); got != before {
				t.Errorf("others have %d processors, want %d", got, before)
			}
			if want := tc.own == 0 || tc.own == dflt; DefaultWasRuntimes() != want {
				t.Errorf("GOMAXPROCS seen as the runtime's default: %v, want %v", !want, want)
			}
			Release(tc.n)
			if got := runtime.GOMAXPROCS(0); got != before {
				t.Errorf("GOMAXPROCS %d after Release, want %d", got, before)
			}
		})
	}
}

// A poller reports a registered descriptor's events with the caller's id
// and data, ends a wait on Wake, and hands a socket over to the netpoller.
func TestPoller(t *testing.T) {
	p, err := NewPoller(8)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fds[1])
	if err := p.Add(fds[0], syscall.EPOLLIN|syscall.EPOLLRDHUP, 7, 3); err != nil {
		t.Fatal(err)
	}
	for _, hot := range []bool{false, true} {
		evs, err := p.Wait(time.Now(), hot) // nothing yet, and a deadline passed
		if err != nil || len(evs) != 0 {
			t.Fatalf("hot %v: %v %v, want no events", hot, evs, err)
		}
		go p.Wake()
		if evs = waitFor(t, p, hot); evs[0].Pad != Woken {
			t.Fatalf("hot %v: %+v, want the wake-up", hot, evs[0])
		}
		p.ClearWake()
	}
	if _, err := syscall.Write(fds[1], []byte("ping")); err != nil {
		t.Fatal(err)
	}
	if evs := waitFor(t, p, true); evs[0].Fd != 7 || evs[0].Pad != 3 || evs[0].Events&syscall.EPOLLIN == 0 {
		t.Fatalf("%+v, want id 7, data 3, EPOLLIN", evs[0])
	}
	// WriteSome fills the socket and returns what it did not take.
	big := bytes.Repeat([]byte("x"), 1<<22)
	rest, err := WriteSome(fds[1], big)
	if err != nil || len(rest) == 0 {
		t.Fatalf("WriteSome: %d left, %v; want some left and no error", len(rest), err)
	}
	c, err := p.ToConn(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("read %q %v through the net.Conn", got, err)
	}
	if _, err := p.Wait(time.Now(), false); err != nil {
		t.Fatal(err)
	}
}

// waitFor waits until p has events (a signal may end a wait with none).
func waitFor(t *testing.T, p *Poller, hot bool) []syscall.EpollEvent {
	t.Helper()
	for {
		evs, err := p.Wait(time.Time{}, hot)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) > 0 {
			return evs
		}
	}
}
