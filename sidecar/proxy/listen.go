package proxy

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// h2Preface starts every prior-knowledge HTTP/2 connection (RFC 9113 §3.4).
var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// sniffListener splits the connections of one listener: those that start
// with the HTTP/2 preface go to h2, the rest to h1. The first bytes are
// read in a goroutine per new connection, so a slow client never holds up
// the accept loop.
type sniffListener struct {
	ln      net.Listener
	h1, h2  *chanListener
	timeout time.Duration // for the first byte
	head    time.Duration // for the rest of the first three
}

func newSniffListener(ln net.Listener, timeout, head time.Duration) *sniffListener {
	return &sniffListener{
		ln:      ln,
		h1:      newChanListener(ln.Addr()),
		h2:      newChanListener(ln.Addr()),
		timeout: timeout,
		head:    head,
	}
}

// run accepts until the listener is closed or ctx ends.
func (s *sniffListener) run(ctx context.Context) {
	defer s.h1.Close()
	defer s.h2.Close()
	acceptEach(ctx, s.ln, func(c net.Conn) { s.route(ctx, c) })
}

// acceptEach accepts connections on ln until it is closed, handling each in
// its own goroutine, and returns once every handler has returned. A
// temporary accept error (too many open files) is retried after a pause.
func acceptEach(ctx context.Context, ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(c)
		}()
	}
}

func (s *sniffListener) route(ctx context.Context, c net.Conn) {
	stop := context.AfterFunc(ctx, func() { c.Close() }) // don't wait for a silent client on shutdown
	defer stop()
	var buf [len("PRI * HTTP/2.0")]byte
	_ = c.SetReadDeadline(time.Now().Add(s.timeout))
	n := 0
	for n < 3 {
		m, err := c.Read(buf[n:])
		if n == 0 && m > 0 {
			_ = c.SetReadDeadline(time.Now().Add(s.head))
		}
		n += m
		if err != nil {
			break
		}
	}
	_ = c.SetReadDeadline(time.Time{})
	if n == 0 {
		c.Close()
		return
	}
	pc := &prefixConn{Conn: c, prefix: append([]byte(nil), buf[:n]...)}
	dst := s.h1
	if n >= 3 && bytes.Equal(buf[:3], h2Preface[:3]) && s.h2 != nil {
		dst = s.h2
	}
	if !dst.put(ctx, pc) {
		c.Close()
	}
}

// prefixConn replays bytes already read from the connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// CloseWrite half-closes the underlying TCP connection when it can.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// chanListener is a net.Listener fed by a channel.
type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) put(ctx context.Context, c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	case <-ctx.Done():
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// connCap bounds the open client connections of one HTTP listener: one
// more than max is answered with a 503 and closed, and counted.
type connCap struct {
	max     int64
	n       atomic.Int64
	open    prometheus.Gauge
	refused prometheus.Counter
	full    []byte // the 503 answer
}

func newConnCap(max int, m *metrics, listener string) *connCap {
	c := &connCap{max: int64(max), open: m.clientConns.WithLabelValues(listener), refused: m.clientsRefused.WithLabelValues(listener)}
	c.full = appendCanned(nil, cannedJSON(http.StatusServiceUnavailable, "too many client connections", "", "listener", listener), true, false)
	return c
}

// admit takes a place for a new connection; false: there is none (the
// refusal is counted).
func (c *connCap) admit() bool {
	if c.n.Add(1) > c.max {
		c.n.Add(-1)
		c.refused.Inc()
		return false
	}
	c.open.Inc()
	return true
}

// leave gives a connection's place back.
func (c *connCap) leave() {
	c.n.Add(-1)
	c.open.Dec()
}

// capConn is an admitted client connection: closing it gives its place
// back (once).
type capConn struct {
	net.Conn
	cap  *connCap
	once sync.Once
}

func (c *capConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.cap.leave)
	return err
}

// CloseWrite half-closes the underlying TCP connection when it can.
func (c *capConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// capListener admits the connections of ln within its cap; the others are
// refused where they are accepted.
type capListener struct {
	net.Listener
	cap *connCap
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.cap.admit() {
			return &capConn{Conn: c, cap: l.cap}, nil
		}
		refuseConn(c, l.cap.full)
	}
}

// refuseConn writes the 503 (if any) to a connection just accepted (its socket
// buffer is empty: the write does not wait), reads what the client may
// have sent already (closing over unread bytes would reset the connection
// and could lose the answer) and closes it.
func refuseConn(c net.Conn, answer []byte) {
	_ = c.SetDeadline(time.Now().Add(100 * time.Millisecond))
	if len(answer) > 0 {
		_, _ = c.Write(answer)
	}
	if sc, ok := c.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) { drainNow(fd) })
		}
	}
	c.Close()
}
