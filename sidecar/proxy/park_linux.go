package proxy

import (
	"crypto/tls"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"attache/internal/evloop"
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
type parker struct {
	poll  *evloop.Poller // woken: a first connection parked, or stop
	mu    sync.Mutex
	conns map[int32]*parkedConn
	stop  bool
	done  chan struct{}
	sweep time.Duration // how often idle timeouts are looked at
}

// parkedConn is what an idle connection keeps: a few words and its
// net.Conn (crypto/tls's state with it).
type parkedConn struct {
	s       *rawServer
	c       net.Conn
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
	return &parker{poll: poll, conns: map[int32]*parkedConn{}, done: make(chan struct{}), sweep: sweep}, nil
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
	if k.stop || pc.s.closing.Load() {
		return false
	}
	if k.poll.Add(int(fd), unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLONESHOT, fd, 0) != nil {
		return false
	}
	k.conns[fd] = pc
	if len(k.conns) == 1 { // the loop may wait with no timeout: it has idle timeouts to look at now
		k.poke()
	}
	return true
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
		if now.Sub(lastSweep) >= k.sweep {
			lastSweep = now
			for fd, pc := range k.conns {
				if now.After(pc.expires) {
					expired = append(expired, k.take(fd))
				}
			}
		}
		k.mu.Unlock()
		for _, pc := range ready {
			pc.s.resume(pc)
		}
		for _, pc := range expired {
			pc.c.Close()
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
		pc.c.Close()
	}
	k.poll.Close()
}

// closeServer closes the connections s parked: it is draining, and they
// are idle.
func (k *parker) closeServer(s *rawServer) {
	var out []*parkedConn
	k.mu.Lock()
	for fd, pc := range k.conns {
		if pc.s == s {
			out = append(out, k.take(fd))
		}
	}
	k.mu.Unlock()
	for _, pc := range out {
		pc.c.Close()
	}
}

// parkedOf reports how many connections of s the parker holds.
func (k *parker) parkedOf(s *rawServer) int {
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
