package proxy

import (
	"crypto/tls"
	"net"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"attache/internal/evloop"
	"attache/sidecar/proxy/h2"
)

// parker holds the idle keep-alive client connections of the goroutine
// path (connections handed over by an event loop, all of them with
// Engines.NoEventLoops, and the TLS gateway listener's) without a goroutine or
// a buffer, as an nginx worker holds its idle connections: each parked
// connection's socket is in the parker's own epoll set, and when it has
// bytes (or is closed) a goroutine takes it up again with a pooled
// rawConn. One goroutine waits for all of them (a plain blocking
// epoll_wait: the runtime takes its P back meanwhile) and closes those
// idle for IdleTimeout, looked at every IdleTimeout/8 (at least 10 ms, at
// most a second).
//
// Safety case. The socket stays registered in the Go netpoller too; no
// goroutine waits on it there, so that registration only marks it ready,
// and the next Read reads at once. A parked connection is owned by the
// parker alone: only the parker closes it (idle timeout, the server's
// drain, the proxy's end), and always after removing it from its epoll
// set and its map, both under mu, so no event names a closed descriptor
// that a new connection got again — except one already returned by
// epoll_wait before the removal: it may name a new connection parked
// under the same number since, which is then taken up for nothing, and
// reads, waits and parks again. The socket is registered EPOLLONESHOT and
// removed at its first event, so a connection is taken up once. A
// connection is parked only when a read of it timed out with nothing read
// (crypto/tls keeps the part of a record it has, a timeout is not sticky
// there, and bytes it holds whole would have been returned instead): the
// rest of its next request can only come through the socket.
//
// Settling. A burst of new connections (each a TLS handshake, its first
// request) leaves the heap grown to the garbage collector's goal, about
// twice what the parked connections hold, and with no more allocation no
// collection comes to shrink it until the runtime's own forced one two
// minutes later; meanwhile the process keeps that memory. So when at
// least settleAfter connections have parked since the last time, none for
// settleQuiet, and the last time is settleEvery ago, the parker starts
// one collection that gives the freed pages back (debug.FreeOSMemory) on
// a goroutine of its own. Safety case: it is one ordinary concurrent
// collection (stop-the-world phases as short as any cycle's), the same
// work the runtime's two-minute forced collection does, at most one every
// settleEvery and only after a burst has ended, so its CPU is bounded
// under any container limit; the pages given back are those no live
// object holds, which later allocation takes back with page faults, once;
// with GOGC=off (the operator wants no collections but the memory
// limit's) it does nothing; GOMEMLIMIT and GODEBUG's settings apply to it
// as to any collection; close waits for a collection in progress.
type parker struct {
	poll  *evloop.Poller // woken: a first connection parked, or stop
	mu    sync.Mutex
	conns map[int32]*parkedConn
	stop  bool
	done  chan struct{}
	sweep time.Duration // how often idle timeouts are looked at

	settleAfter int           // parks since the last settling that make a burst
	settleQuiet time.Duration // with no park for this long: the burst ended
	settleEvery time.Duration // at least this long between two settlings
	sinceSettle int           // parks since the last settling; mu
	lastPark    time.Time     // mu
	lastSettle  time.Time     // run's goroutine only
	settling    sync.WaitGroup
	settles     atomic.Int64 // settlings done
}

// Settling's defaults: a burst is a thousand connections; a quarter of a
// second without a park ends it; ten seconds at least between two.
const (
	settleAfter = 1024
	settleQuiet = 250 * time.Millisecond
	settleEvery = 10 * time.Second
)

// parkOwner is a server whose idle connections the parker holds: the
// goroutine path's rawServer, or a TLS gateway listener's HTTP/2 server.
type parkOwner interface {
	resume(pc *parkedConn) // the socket has bytes (or is closed)
	draining() bool        // no more parking
}

// parkedConn is what an idle connection keeps: a few words and its
// net.Conn (crypto/tls's state with it), and an HTTP/2 connection's own
// state (its client's header table).
type parkedConn struct {
	s       parkOwner
	c       net.Conn
	h2      *h2.Conn // an HTTP/2 connection: closed with GOAWAY
	fd      int32
	ip      []byte
	last    lastHost
	expires time.Time
}

func newParker(sweep time.Duration) (*parker, error) {
	poll, err := evloop.NewPoller(128)
	if err != nil {
		return nil, err
	}
	return &parker{poll: poll, conns: map[int32]*parkedConn{}, done: make(chan struct{}), sweep: sweep,
		settleAfter: settleAfter, settleQuiet: settleQuiet, settleEvery: settleEvery}, nil
}

// socketFD finds the socket under c (through TLS and our wrappers).
func socketFD(c net.Conn) (int32, bool) {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			c = x.NetConn()
		case *capConn:
			c = x.Conn
		case *prefixConn:
			if len(x.prefix) > 0 {
				return 0, false
			}
			c = x.Conn
		case syscall.Conn:
			rc, err := x.SyscallConn()
			if err != nil {
				return 0, false
			}
			fd := int32(-1)
			if rc.Control(func(f uintptr) { fd = int32(f) }) != nil || fd < 0 {
				return 0, false
			}
			return fd, true
		default:
			return 0, false
		}
	}
}

// park takes pc; false: it did not (the server is draining, the parker
// stopped, or the socket could not be watched), and the caller closes it.
func (k *parker) park(pc *parkedConn) bool {
	fd, ok := socketFD(pc.c)
	if !ok {
		return false
	}
	pc.fd = fd
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stop || pc.s.draining() {
		return false
	}
	if k.poll.Add(int(fd), unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLONESHOT, fd, 0) != nil {
		return false
	}
	k.conns[fd] = pc
	k.countIdle()
	// The loop may wait with no timeout, or a long one: it has idle
	// timeouts to look at now.
	if len(k.conns) == 1 {
		k.poke()
	}
	return true
}

// wentIdle counts a connection that went idle without being parked (an
// HTTP/2 connection, served by net/http, with no stream left) in the
// burst that settling looks for: a burst of such connections leaves the
// same garbage, and their idle goroutines' stacks shrink at a collection.
func (k *parker) wentIdle() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.stop {
		k.countIdle()
	}
}

// countIdle counts one more connection gone idle since the last settling;
// mu held. At a burst's size it wakes the loop, which may wait with no
// timeout or a long one, to see the burst's end.
func (k *parker) countIdle() {
	k.sinceSettle++
	k.lastPark = time.Now()
	if k.sinceSettle == k.settleAfter {
		k.poke()
	}
}

func (k *parker) poke() { k.poll.Wake() }

// take removes fd's connection from the set; mu held.
func (k *parker) take(fd int32) *parkedConn {
	pc := k.conns[fd]
	if pc != nil {
		delete(k.conns, fd)
		_ = k.poll.Del(int(fd))
	}
	return pc
}

// run waits for parked connections' bytes until stopped; then it closes
// what it still holds.
func (k *parker) run() {
	defer close(k.done)
	var ready, expired []*parkedConn
	lastSweep := time.Now()
	for {
		k.mu.Lock()
		stop, until := k.stop, time.Time{}
		if len(k.conns) > 0 {
			until = time.Now().Add(k.sweep)
		}
		if k.sinceSettle >= k.settleAfter { // a burst: look again when it may have ended
			if q := time.Now().Add(k.settleQuiet); until.IsZero() || until.After(q) {
				until = q
			}
		}
		k.mu.Unlock()
		if stop {
			break
		}
		events, err := k.poll.Wait(until, false)
		if err != nil {
			break
		}
		ready, expired = ready[:0], expired[:0]
		now := time.Now()
		k.mu.Lock()
		for _, ev := range events {
			if ev.Pad == evloop.Woken {
				k.poll.ClearWake()
				continue
			}
			if pc := k.take(ev.Fd); pc != nil {
				ready = append(ready, pc)
			}
		}
		settle := k.sinceSettle >= k.settleAfter && now.Sub(k.lastPark) >= k.settleQuiet &&
			(k.lastSettle.IsZero() || now.Sub(k.lastSettle) >= k.settleEvery)
		if settle {
			k.sinceSettle = 0
			k.lastSettle = now
		}
		if now.Sub(lastSweep) >= k.sweep {
			lastSweep = now
			for fd, pc := range k.conns {
				if now.After(pc.expires) {
					expired = append(expired, k.take(fd))
				}
			}
		}
		k.mu.Unlock()
		if settle && gcOn() {
			k.settling.Add(1)
			go func() {
				defer k.settling.Done()
				debug.FreeOSMemory()
				k.settles.Add(1)
			}()
		}
		for _, pc := range ready {
			pc.s.resume(pc)
		}
		for _, pc := range expired {
			pc.close()
		}
		clear(ready)
		clear(expired)
	}
	k.mu.Lock()
	k.stop = true
	for fd := range k.conns {
		expired = append(expired, k.take(fd))
	}
	k.mu.Unlock()
	for _, pc := range expired {
		pc.close()
	}
	k.poll.Close()
	k.settling.Wait()
}

// gcOn reports whether the garbage collector runs on its own (GOGC is not
// off).
func gcOn() bool {
	s := []rtmetrics.Sample{{Name: "/gc/gogc:percent"}}
	rtmetrics.Read(s)
	return s[0].Value.Kind() != rtmetrics.KindUint64 || int64(s[0].Value.Uint64()) >= 0 // off reads as -1
}

// closeServer closes the connections s parked: it is draining, and they
// are idle.
func (k *parker) closeServer(s parkOwner) {
	var out []*parkedConn
	k.mu.Lock()
	for fd, pc := range k.conns {
		if pc.s == s {
			out = append(out, k.take(fd))
		}
	}
	k.mu.Unlock()
	for _, pc := range out {
		pc.close()
	}
}

// close closes an idle connection (an HTTP/2 one with GOAWAY first).
func (pc *parkedConn) close() {
	if pc.h2 != nil {
		pc.h2.Close()
		return
	}
	pc.c.Close()
}

// parkedOf reports how many connections of s the parker holds.
func (k *parker) parkedOf(s parkOwner) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, pc := range k.conns {
		if pc.s == s {
			n++
		}
	}
	return n
}

// close stops the parker, closing what it holds, and returns when it has.
func (k *parker) close() {
	k.mu.Lock()
	k.stop = true
	k.poke()
	k.mu.Unlock()
	<-k.done
}

// parked reports how many connections the parker holds.
func (k *parker) parked() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.conns)
}
