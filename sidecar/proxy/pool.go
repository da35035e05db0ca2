package proxy

import (
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
)

// bconn is one keepalive connection to an instance, with its read buffer.
type bconn struct {
	c      net.Conn
	buf    []byte
	dl     time.Time // deadline now set on c
	idleAt time.Time
	reused bool
	raw    syscall.RawConn  // c's descriptor, to look at it while idle; nil when c has none
	peek   func(fd uintptr) // idleDirty's look, built once per connection
	dirty  bool             // what peek found
}

// newBconn wraps a freshly dialled connection.
func newBconn(c net.Conn) *bconn {
	b := &bconn{buf: make([]byte, 16<<10)}
	b.setConn(c)
	return b
}

func (b *bconn) setConn(c net.Conn) {
	b.c, b.dl, b.reused, b.raw = c, time.Time{}, false, nil
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			b.raw = raw
			if b.peek == nil {
				b.peek = func(fd uintptr) { b.dirty = peekDirty(fd, b.buf[:1]) }
			}
		}
	}
}

// idleDirty says whether an idle connection has something to read (bytes
// the instance sent after its answer, or its close): such a connection
// must not carry another request, whose answer it would get wrong. One
// non-blocking peek, only when an idle connection is taken for reuse.
func (b *bconn) idleDirty() bool {
	if b.raw == nil {
		return false
	}
	b.dirty = false
	if err := b.raw.Control(b.peek); err != nil {
		return true
	}
	return b.dirty
}

// setDeadline makes c's deadline fall in [d, d+slack], calling into the
// runtime only when the current one does not: consecutive requests on a
// busy connection share one deadline, a timeout fires at most slack late.
func (b *bconn) setDeadline(d time.Time, slack time.Duration) error {
	if !b.dl.Before(d) && !b.dl.After(d.Add(slack)) {
		return nil
	}
	b.dl = d.Add(slack)
	return b.c.SetDeadline(b.dl)
}

// bpool is the raw fast path's keepalive pool for one instance: at most max
// connections, idle ones kept for maxIdle.
type bpool struct {
	addr    string
	sem     chan struct{} // one token per open connection
	idle    chan *bconn
	maxIdle time.Duration
	dial    func(addr string, timeout time.Duration) (net.Conn, error)
	closed  atomic.Bool
	waiters atomic.Int32 // gets waiting for a connection (event loops give theirs)
}

func newBPool(addr string, max int, maxIdle time.Duration, dial func(string, time.Duration) (net.Conn, error)) *bpool {
	return &bpool{addr: addr, sem: make(chan struct{}, max), idle: make(chan *bconn, max), maxIdle: maxIdle, dial: dial}
}

// get returns an idle connection or a new one, waiting for a free slot at
// most until wait; fasthttp.ErrNoFreeConns when none freed up.
func (p *bpool) get(now time.Time, wait time.Duration, dialTimeout time.Duration) (*bconn, error) {
	for {
		select {
		case b := <-p.idle:
			if now.Sub(b.idleAt) >= p.maxIdle || b.idleDirty() {
				p.discard(b)
				continue
			}
			b.reused = true
			return b, nil
		default:
		}
		break
	}
	select {
	case p.sem <- struct{}{}:
		return p.fresh(dialTimeout)
	default:
	}
	p.waiters.Add(1)
	defer p.waiters.Add(-1)
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case p.sem <- struct{}{}:
			return p.fresh(dialTimeout)
		case b := <-p.idle:
			if b.idleDirty() {
				p.discard(b) // its slot is free now: the next round takes it
				continue
			}
			b.reused = true
			return b, nil
		case <-t.C:
			return nil, fasthttp.ErrNoFreeConns
		}
	}
}

// fresh dials a connection for a slot already taken.
func (p *bpool) fresh(timeout time.Duration) (*bconn, error) {
	c, err := p.dial(p.addr, timeout)
	if err != nil {
		<-p.sem
		return nil, err
	}
	return newBconn(c), nil
}

// redial replaces a stale connection, keeping its slot.
func (p *bpool) redial(b *bconn, timeout time.Duration) (*bconn, error) {
	b.c.Close()
	c, err := p.dial(p.addr, timeout)
	if err != nil {
		<-p.sem
		return nil, err
	}
	b.setConn(c)
	return b, nil
}

// put returns a connection whose last answer was read completely.
func (p *bpool) put(b *bconn, now time.Time) {
	if p.closed.Load() {
		p.discard(b)
		return
	}
	b.idleAt = now
	select {
	case p.idle <- b:
	default: // cannot happen: idle has room for every slot
		p.discard(b)
	}
	if p.closed.Load() {
		p.closeIdle(time.Time{})
	}
}

// discard closes a connection and frees its slot.
func (p *bpool) discard(b *bconn) {
	b.c.Close()
	<-p.sem
}

// closeIdle closes idle connections idle since before (all when before is
// zero).
func (p *bpool) closeIdle(before time.Time) {
	for n := len(p.idle); n > 0; n-- {
		select {
		case b := <-p.idle:
			if before.IsZero() || b.idleAt.Before(before) {
				p.discard(b)
			} else {
				p.idle <- b
			}
		default:
			return
		}
	}
}

// close closes the idle connections now and the busy ones when they come
// back.
func (p *bpool) close() {
	p.closed.Store(true)
	p.closeIdle(time.Time{})
}
