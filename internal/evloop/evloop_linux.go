// Package evloop is the Linux machinery of the proxy's event loops, with
// nothing of HTTP or of the proxy's policy: an epoll set with an eventfd
// to wake its waiter (Poller), the hot wait that holds the goroutine's P
// (RawSyscall, as an nginx worker sleeps in epoll_wait), the GOMAXPROCS
// raise that gives each such loop a P of its own — within the container's
// CPU limit and never under GODEBUG=asyncpreemptoff=1 (HoldP, Release) —,
// nonblocking writes (WriteSome) and the hand-over of a descriptor to Go's
// netpoller (ToConn). Package proxy runs its exchanges on it
// (sidecar/proxy/evloop_linux.go), and parks idle connections of its
// goroutine path in a Poller of their own (park_linux.go).
package evloop

import (
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// The safety case for raising GOMAXPROCS: a loop in a hot wait holds its
// P, so without a P of its own it would take one from the rest of the
// program for up to HotWait at a time. With GOMAXPROCS raised by one per
// hot loop, the others keep the processors they had. Raising it must
// never pass the container's CPU limit (the cgroup's quota, rounded up):
// past it the extra threads only get throttled, and since Go 1.25 the
// runtime's own default already follows that limit. So the loops raise
// it only when base+loops stays within the limit (or there is none);
// otherwise they wait the plain way (the runtime takes the P back during
// the system call, as for any blocking call) and GOMAXPROCS is left
// alone. When the last hot loop stops, the runtime gets its default back
// (SetDefaultGOMAXPROCS: it follows the cgroup limit again), or the value
// the program had set itself. While the loops run, a change of the
// container's limit is not followed.

// procs counts the loops that hold a P while they wait (GOMAXPROCS is
// the process's, so this is too: one count per process).
var procs procCount

type procCount struct {
	mu        sync.Mutex
	hot       int  // loops holding a P while they wait: GOMAXPROCS is raised by as many
	base      int  // GOMAXPROCS before it was raised
	byRuntime bool // base was the runtime's default
}

// others returns the processors the rest of the program has: GOMAXPROCS
// less the hot loops.
func (pc *procCount) others() int {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return runtime.GOMAXPROCS(0) - pc.hot
}

// raise makes room for n loops that hold a P while they wait: GOMAXPROCS
// goes up by n unless that would pass limit (the CPU limit; 0: none).
// false: it did not, and those loops must wait the plain way.
func (pc *procCount) raise(n, limit int) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	cur := runtime.GOMAXPROCS(0)
	if limit > 0 && cur+n > limit {
		return false
	}
	if pc.hot == 0 {
		pc.base = cur
		runtime.SetDefaultGOMAXPROCS() // is cur the runtime's default, or the program's own?
		pc.byRuntime = runtime.GOMAXPROCS(0) == cur
	}
	pc.hot += n
	runtime.GOMAXPROCS(cur + n)
	return true
}

// lower undoes raise(n). With the last hot loop gone, the runtime has its
// default back (or the program its own setting).
func (pc *procCount) lower(n int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.hot -= n
	switch {
	case pc.hot > 0:
		runtime.GOMAXPROCS(max(1, runtime.GOMAXPROCS(0)-n))
	case pc.byRuntime:
		runtime.SetDefaultGOMAXPROCS()
	default:
		runtime.GOMAXPROCS(pc.base)
	}
}

// AsyncPreemptOff says whether GODEBUG turns asynchronous preemption off:
// then no signal ends a hot wait, and a stop of the world would wait up to
// HotWait for every busy loop, so the loops wait the plain way.
func AsyncPreemptOff(godebug string) bool {
	off := false
	for _, kv := range strings.Split(godebug, ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(kv), "="); ok && k == "asyncpreemptoff" {
			off = v == "1" // the last setting wins, as in the runtime
		}
	}
	return off
}

// MaxLoops bounds the number of loops: no more than processors the
// process may use (limit, the CPU limit; or the machine's).
func MaxLoops(limit int) int {
	n := runtime.NumCPU()
	if limit > 0 && limit < n {
		n = limit
	}
	return max(1, n)
}

// Others returns the processors the rest of the program has: GOMAXPROCS
// less the loops holding a P.
func Others() int { return procs.others() }

// HoldP says whether n loops may hold their P while they wait, and if so
// raises GOMAXPROCS by n for them (limit: the CPU limit, 0 none): not
// under GODEBUG=asyncpreemptoff=1, nor past the limit. Release(n) undoes
// it when those loops stop.
func HoldP(n, limit int) bool {
	return !AsyncPreemptOff(os.Getenv("GODEBUG")) && procs.raise(n, limit)
}

// Release undoes HoldP(n) (a true one).
func Release(n int) { procs.lower(n) }

// DefaultWasRuntimes says whether GOMAXPROCS, before the first HoldP
// raised it, was the runtime's default (then Release gives the runtime
// its default back).
func DefaultWasRuntimes() bool {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	return procs.byRuntime
}

// HotWait is how long a loop waits for events the nginx way before it
// waits the runtime's way, giving its P back: shorter than the 10 ms after
// which sysmon preempts a goroutine that has held its P since it was last
// scheduled, so a quiet loop is seldom woken by signals (a quiet sidecar
// wakes about 12 times a second, not 250). It also bounds how long the
// runtime can wait for a loop to stop for the GC when no signal comes
// (GODEBUG=asyncpreemptoff=1).
const HotWait = 5 // ms

// Woken is the epoll data (EpollEvent.Pad) of the poller's own wake-up
// event; callers use any other value for their registrations.
const Woken int32 = -2

// A Poller is an epoll set (edge triggered or not, as the caller
// registers) with an eventfd that Wake uses to end a wait from another
// goroutine. One goroutine waits on it.
type Poller struct {
	ep   int // epoll descriptor
	wake int // eventfd
	evs  []syscall.EpollEvent
}

// NewPoller makes an epoll set that returns up to events events a wait.
func NewPoller(events int) (*Poller, error) {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	p := &Poller{ep: ep, wake: -1, evs: make([]syscall.EpollEvent, events)}
	wfd, _, errno := syscall.Syscall(syscall.SYS_EVENTFD2, 0, syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if errno != 0 {
		p.Close()
		return nil, os.NewSyscallError("eventfd2", errno)
	}
	p.wake = int(wfd)
	if err := syscall.EpollCtl(ep, syscall.EPOLL_CTL_ADD, p.wake, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(p.wake), Pad: Woken}); err != nil {
		p.Close()
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return p, nil
}

// Add registers fd for events, with id and data as the event's Fd and
// Pad.
func (p *Poller) Add(fd int, events uint32, id, data int32) error {
	return syscall.EpollCtl(p.ep, syscall.EPOLL_CTL_ADD, fd, &syscall.EpollEvent{Events: events, Fd: id, Pad: data})
}

// Mod changes fd's registration.
func (p *Poller) Mod(fd int, events uint32, id, data int32) error {
	return syscall.EpollCtl(p.ep, syscall.EPOLL_CTL_MOD, fd, &syscall.EpollEvent{Events: events, Fd: id, Pad: data})
}

// Del takes fd out of the set.
func (p *Poller) Del(fd int) error {
	return syscall.EpollCtl(p.ep, syscall.EPOLL_CTL_DEL, fd, nil)
}

// Close closes the epoll set and the eventfd.
func (p *Poller) Close() {
	syscall.Close(p.ep)
	if p.wake >= 0 {
		syscall.Close(p.wake)
	}
}

// Wake ends the wait under way, or the next one, with a Woken event.
func (p *Poller) Wake() {
	one := uint64(1)
	_, _ = syscall.Write(p.wake, (*[8]byte)(unsafe.Pointer(&one))[:])
}

// ClearWake consumes the wake-ups, after a Woken event.
func (p *Poller) ClearWake() {
	var b [8]byte
	_, _ = syscall.Read(p.wake, b[:])
}

// Wait blocks until there are events or dl has passed (zero: no end),
// and returns them (valid until the next Wait). hot (a HoldP that said
// true) waits the nginx way for up to HotWait first, holding the P, then
// the runtime's way. A signal ends a wait with no events, after the
// goroutine yields: the runtime wanted the P (a preemption, a stop of
// the world).
func (p *Poller) Wait(dl time.Time, hot bool) ([]syscall.EpollEvent, error) {
	ms := -1
	if !dl.IsZero() {
		ms = max(0, int((time.Until(dl)+time.Millisecond-1)/time.Millisecond))
	}
	if !hot {
		return p.waited(p.epollWait(ms, false))
	}
	w := ms
	if w < 0 || w > HotWait {
		w = HotWait
	}
	n, errno := p.epollWait(w, true)
	if errno == 0 && n == 0 && w != ms {
		if ms > 0 {
			ms -= w
		}
		n, errno = p.epollWait(ms, false)
	}
	return p.waited(n, errno)
}

func (p *Poller) waited(n int, errno syscall.Errno) ([]syscall.EpollEvent, error) {
	switch errno {
	case 0:
		return p.evs[:n], nil
	case syscall.EINTR:
		runtime.Gosched() // the runtime wants the P: a preemption or a stop of the world
		return nil, nil
	default:
		return nil, os.NewSyscallError("epoll_pwait", errno)
	}
}

// epollWait waits up to ms milliseconds (-1: with no end) for events. raw
// keeps it from the runtime: the thread sleeps in the kernel holding its
// P, and the kernel wakes it straight away.
func (p *Poller) epollWait(ms int, raw bool) (int, syscall.Errno) {
	// epoll_pwait with no signal mask is epoll_wait, which arm64 lacks.
	var n uintptr
	var errno syscall.Errno
	if raw {
		n, _, errno = syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(p.ep), uintptr(unsafe.Pointer(&p.evs[0])), uintptr(len(p.evs)), uintptr(ms), 0, 0)
	} else {
		n, _, errno = syscall.Syscall6(syscall.SYS_EPOLL_PWAIT, uintptr(p.ep), uintptr(unsafe.Pointer(&p.evs[0])), uintptr(len(p.evs)), uintptr(ms), 0, 0)
	}
	return int(n), errno
}

// ToConn takes fd out of the set and gives it to Go's netpoller as a
// net.Conn (fd itself is closed: the conn has a duplicate, in
// non-blocking mode).
func (p *Poller) ToConn(fd int) (net.Conn, error) {
	_ = p.Del(fd)
	f := os.NewFile(uintptr(fd), "")
	nc, err := net.FileConn(f)
	f.Close()
	return nc, err
}

// WriteSome writes data to a nonblocking socket until it is all sent, the
// socket is full (the rest is returned, err nil) or writing fails.
func WriteSome(fd int, data []byte) (rest []byte, err error) {
	for len(data) > 0 {
		m, err := syscall.Write(fd, data)
		switch {
		case m > 0:
			data = data[m:]
		case err == syscall.EINTR:
		case err == syscall.EAGAIN:
			return data, nil
		default:
			return data, err
		}
	}
	return nil, nil
}
