package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"

	"attache/internal/evloop"
	"attache/sidecar/proxy/h1"
)

// The event loops serve the plain HTTP/1.1 exchanges of the HTTP listeners
// the way nginx does: a few loops, each watching the listeners and its client
// and instance sockets in its own epoll set, reading a socket only when it
// has something to read. Why by hand: Go's netpoller reads every socket
// until EAGAIN before it parks a goroutine, and looks at an idle pooled
// connection with a syscall before reusing it; on a loopback proxy that is
// three extra syscalls per request, 10-15 % of the CPU that decides the
// requests per second (scripts/bench proxy). The libraries that do epoll
// in Go (gnet, nbio) run client and outbound sockets on separate loops, so
// every request would cross goroutines twice.
//
// A loop keeps only the common case: a whole request that fits its buffer,
// one try, a Content-Length (or empty) answer that fits the instance
// connection's buffer. Anything else — a request the parser does not take,
// a retry, a chunked or large answer, a slow client, a service fallback, a
// host not seen before — is handed over, with the bytes and state it has,
// to the goroutine fast path (rawConn), which finishes it and keeps that
// client connection for the rest of its life.
//
// Each loop is a goroutine that, while busy, keeps its thread: it waits
// in epoll_wait through RawSyscall, which the runtime does not see, so the
// thread sleeps in the kernel like an nginx worker and the kernel wakes it
// straight away, with no netpoller, no hand-over of its P (the runtime's
// processor) and no spinning thread in between (parked on the netpoller
// instead, the loops served 0.94-0.96x nginx's requests per second with
// nginx's CPU per request: the backend and wrk spent 10 % more CPU per
// request on the ragged wake-ups; scripts/bench proxy). A busy loop holds its P while it waits,
// so GOMAXPROCS is raised by one per loop and the rest of the program
// keeps the processors it had. Such a wait lasts at most evloop.HotWait; a quiet
// loop then waits with a plain system call, and the runtime takes its P
// back. A signal (the runtime preempting, the GC stopping the world) ends
// either wait with EINTR, and the loop yields; it yields too before it
// waits when it has woken a goroutine (one taking a connection over, a
// waiter for a pool slot), which the runtime queued on the loop's P.
//
// One loop per two processors by default: on the 2-core bench machine one
// loop gave the same requests per second as two with a p99 of 4-5 ms
// instead of 8 (nginx: 5-7), the loop's thread and the app's sharing the
// cores.
//
// The split: package internal/evloop holds the machinery, which knows
// nothing of HTTP or of the policy (the epoll set, the hot wait, the
// GOMAXPROCS raise and its safety case, nonblocking writes, the hand-over
// of a descriptor to the netpoller); this file holds the exchange state
// machine (client, instance connection, answer, hand-over to a goroutine),
// which calls the policy through the same seam as every engine: decide,
// admit/begin, pick, report, done (forward.go).

// evServer runs the connections of a proxy's HTTP listeners on one set
// of event loops.
type evServer struct {
	p       *Proxy
	ctx     context.Context
	mu      sync.Mutex    // serialises listener changes (addListener, removeListener)
	lns     []*evListener // the epoll data of a listener's event is its index; removed: nil, never reused
	loops   []*evLoop
	hot     bool // the loops wait holding their P (GOMAXPROCS raised for them)
	closing atomic.Bool
}

type evListener struct {
	fd            int
	*httpListener // its raw server takes the connections the loops hand over
}

// newEvServer builds the loops for hls; an error means the goroutine fast
// path serves them instead.
func newEvServer(ctx context.Context, p *Proxy, hls []*httpListener) (*evServer, error) {
	s := &evServer{p: p, ctx: ctx}
	for _, h := range hls {
		el, err := newEvListener(h)
		if err != nil {
			return nil, err
		}
		s.lns = append(s.lns, el)
	}
	limit := evloop.CPULimit()
	n := p.cfg.EventLoops
	if n <= 0 {
		n = max(1, evloop.Others()/2)
	}
	n = min(n, evloop.MaxLoops(limit))
	for i := 0; i < n; i++ {
		l, err := newEvLoop(s)
		if err != nil {
			for _, l := range s.loops {
				l.closeFDs()
			}
			return nil, err
		}
		s.loops = append(s.loops, l)
	}
	// until serve returns
	s.hot = evloop.HoldP(len(s.loops), limit)
	return s, nil
}

func newEvListener(h *httpListener) (*evListener, error) {
	tl, ok := h.ln.(*net.TCPListener)
	if !ok {
		return nil, errors.New("not a TCP listener")
	}
	sc, err := tl.SyscallConn()
	if err != nil {
		return nil, err
	}
	el := &evListener{fd: -1, httpListener: h}
	if err := sc.Control(func(fd uintptr) { el.fd = int(fd) }); err != nil {
		return nil, err
	}
	return el, nil
}

// lnChange is a listener added to (ln set) or removed from (ln nil) the
// loops' epoll sets at index idx, which each loop makes itself (it alone
// touches its listener list and its epoll set's listener entries, also
// when it pauses accepting) and then acknowledges.
type lnChange struct {
	idx int
	ln  *evListener
	ack chan struct{}
}

// addListener makes the loops accept h's connections too (a reload).
// false: the loops are stopping (or cannot take h) and serve it no more.
func (s *evServer) addListener(h *httpListener) bool {
	el, err := newEvListener(h)
	if err != nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.lns = append(s.lns, el)
	s.change(lnChange{idx: len(s.lns) - 1, ln: el})
	return true
}

// removeListener makes every loop let go of h's listener, which may be
// closed once this returns; its connections stay on their loops until
// they close (idle, or at shutdown).
func (s *evServer) removeListener(h *httpListener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, el := range s.lns {
		if el != nil && el.httpListener == h {
			s.lns[i] = nil
			s.change(lnChange{idx: i})
		}
	}
}

// change hands ch to every loop and waits until each has made it (or
// has stopped).
func (s *evServer) change(ch lnChange) {
	acks := make([]chan struct{}, len(s.loops))
	for i, l := range s.loops {
		ch.ack = make(chan struct{})
		acks[i] = ch.ack
		select {
		case l.lnc <- ch:
			l.wakeUp()
		case <-l.exited:
		}
	}
	for i, l := range s.loops {
		select {
		case <-acks[i]:
		case <-l.exited:
		}
	}
}

// serve runs the loops until shutdown has let them finish.
func (s *evServer) serve() {
	if s.hot {
		defer evloop.Release(len(s.loops))
	}
	var wg sync.WaitGroup
	for _, l := range s.loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.run()
		}()
	}
	wg.Wait()
	for _, l := range s.loops { // only now: another loop may still wake this one
		l.closeFDs()
	}
}

// stopAccepting makes every loop let go of the listener (which may then
// be closed) and finish the requests under way, closing its connections
// once they are idle and all of them after grace; serve returns when they
// are done (requests handed over meanwhile are the rawServer's, whose
// shutdown must come after).
func (s *evServer) stopAccepting(grace time.Duration) {
	for _, l := range s.loops {
		l.graceEnd.Store(time.Now().Add(grace).UnixNano())
	}
	s.closing.Store(true)
	for _, l := range s.loops {
		l.wakeUp()
	}
	for _, l := range s.loops {
		<-l.released
	}
}

// shed asks the loops other than from to give their idle connections to
// ep to its pool, where goroutines wait for them.
func (s *evServer) shed(from *evLoop, ep *endpoint) {
	for _, l := range s.loops {
		if l == from {
			continue
		}
		select {
		case l.shedc <- ep:
			l.wakeUp()
		default: // that loop has enough to do already
		}
	}
}

// evConn is a client connection on a loop.
type evConn struct {
	ln     *evListener
	fd     int
	gen    int32
	buf    []byte // nil while it would hold nothing (the loop's free list has it)
	n      int
	eof    bool // the client closed its side
	hup    bool // epoll said so: eof once the socket is drained
	more   bool // the socket may hold more than the buffer took
	fresh  bool // nothing served yet (an h2c preface may come)
	busy   bool // a request is under way
	active time.Time
	headAt time.Time // when the bytes of the next request began to come; zero: none yet
	inBody bool      // its head is whole; its body is coming
	ip     []byte

	last lastHost // HTTP proxy

	// the request under way
	t         *target
	f         fwd
	ep        *endpoint
	b         *evBack
	out       []byte // the request as it goes to the instance; nil between requests
	head      bool
	replay    bool
	connClose bool
	redialed  bool
}

// evBack is a connection to an instance on a loop.
type evBack struct {
	fd         int
	gen        int32
	ep         *endpoint
	buf        []byte
	n          int
	c          *evConn // the client whose request it carries; nil when idle
	connecting bool
	wpend      []byte // request bytes not yet written
	reused     bool
	idleAt     time.Time
	headDone   bool
	hup        bool // the instance closed its side
	resp       h1.Response
}

type evLoop struct {
	s        *evServer
	p        *Proxy
	poll     *evloop.Poller // the loop's epoll set
	clients  []*evConn      // by descriptor
	backs    []*evBack      // by descriptor
	nconns   int
	idle     map[*endpoint][]*evBack
	out      []byte
	now      time.Time
	dl       time.Time // when wait stops waiting; zero: never
	swept    time.Time
	busy     int // requests under way
	graceEnd atomic.Int64
	released chan struct{}
	let      bool          // the listener is no longer watched
	lns      []*evListener // the listeners this loop watches, by index (nil: removed)
	lnc      chan lnChange // listener changes to make (evServer.change)
	exited   chan struct{} // closed when run returns
	paused   time.Time
	gen      int32
	yield    bool // a goroutine was woken: let it run before waiting
	rhead    Head // gateway listeners: what the router sees of the request under way
	rhsrc    rawHead
	shedc    chan *endpoint // endpoints whose idle connections to close
	req      h1.Request     // the request head being parsed (one at a time)
	bufs     [][]byte       // free client read buffers
	outs     [][]byte       // free request buffers
}

func newEvLoop(s *evServer) (*evLoop, error) {
	poll, err := evloop.NewPoller(256)
	if err != nil {
		return nil, err
	}
	l := &evLoop{s: s, p: s.p, poll: poll,
		idle: map[*endpoint][]*evBack{}, released: make(chan struct{}), shedc: make(chan *endpoint, 16),
		lns: slices.Clone(s.lns), lnc: make(chan lnChange, 1), exited: make(chan struct{})}
	if err := l.watchListeners(); err != nil {
		l.closeFDs()
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return l, nil
}

// watchListeners adds the listeners to the loop's epoll set: only one
// loop is woken per new connection (EPOLLEXCLUSIVE).
func (l *evLoop) watchListeners() error {
	const epollExclusive = 1 << 28
	for i, ln := range l.lns {
		if ln == nil {
			continue
		}
		if err := l.poll.Add(ln.fd, syscall.EPOLLIN|epollExclusive, int32(i), genListener); err != nil {
			l.unwatchListeners()
			return err
		}
	}
	return nil
}

// unwatchListeners takes the listeners out of the loop's epoll set.
func (l *evLoop) unwatchListeners() {
	for _, ln := range l.lns {
		if ln == nil {
			continue
		}
		_ = l.poll.Del(ln.fd)
	}
}

func (l *evLoop) closeFDs() { l.poll.Close() }

func (l *evLoop) wakeUp() { l.poll.Wake() }

func (l *evLoop) run() {
	defer close(l.exited)
	defer l.release()
	for {
		if l.yield {
			// What the loop woke (a goroutine taking a connection
			// over, a waiter for a pool slot) is queued on the loop's
			// P, which a wait would hold from it for up to evloop.HotWait.
			l.yield = false
			runtime.Gosched()
		}
		evs, err := l.poll.Wait(l.dl, l.s.hot)
		if err != nil {
			l.p.log.Error("event loop stopped", "error", err)
			l.closeAll()
			return
		}
		l.now = time.Now()
		for i := range evs {
			// A descriptor closed earlier in this batch may already be
			// reused: an event counts only for the registration (the
			// generation) it was made for.
			ev := &evs[i]
			fd := int(ev.Fd)
			switch {
			case ev.Pad == genListener:
				if !l.let && int(ev.Fd) < len(l.lns) && l.lns[ev.Fd] != nil {
					l.accept(l.lns[ev.Fd])
				}
			case ev.Pad == evloop.Woken:
				l.poll.ClearWake()
				l.shedIdle()
				l.changeListeners()
			case fd < len(l.clients) && l.clients[fd] != nil && l.clients[fd].gen == ev.Pad:
				l.clientEvent(l.clients[fd], ev.Events)
			case fd < len(l.backs) && l.backs[fd] != nil && l.backs[fd].gen == ev.Pad:
				l.backEvent(l.backs[fd], ev.Events)
			}
		}
		if l.s.closing.Load() && l.drain() {
			l.closeAll()
			return
		}
		l.sweep()
	}
}

// shedIdle closes the idle connections other loops asked for.
func (l *evLoop) shedIdle() {
	for {
		select {
		case ep := <-l.shedc:
			list := l.idle[ep]
			delete(l.idle, ep)
			for _, b := range list {
				l.giveToPool(b)
			}
		default:
			return
		}
	}
}

// changeListeners makes the listener changes asked for (evServer.change).
func (l *evLoop) changeListeners() {
	const epollExclusive = 1 << 28
	for {
		select {
		case ch := <-l.lnc:
			for ch.idx >= len(l.lns) {
				l.lns = append(l.lns, nil)
			}
			if old := l.lns[ch.idx]; old != nil {
				_ = l.poll.Del(old.fd)
			}
			l.lns[ch.idx] = ch.ln
			// Watched now unless the loop let go of its listeners
			// (stopping) or pauses accepting (it watches them all again
			// when the pause ends).
			if ch.ln != nil && !l.let && l.paused.IsZero() {
				if err := l.poll.Add(ch.ln.fd, syscall.EPOLLIN|epollExclusive, int32(ch.idx), genListener); err != nil {
					l.p.log.Warn("event loop: cannot watch a new listener", "addr", ch.ln.ln.Addr().String(), "error", err)
				}
			}
			close(ch.ack)
		default:
			return
		}
	}
}

// release stops watching the listener (once).
func (l *evLoop) release() {
	if l.let {
		return
	}
	l.let = true
	l.unwatchListeners()
	close(l.released)
}

// drain runs while the server shuts down; true: the loop is done.
func (l *evLoop) drain() bool {
	l.release()
	if l.now.UnixNano() >= l.graceEnd.Load() {
		return true
	}
	if l.p.linger.Load() {
		// Handing over (see Proxy.HandOver): an idle client may be
		// sending its next request right now, and closing its connection
		// would fail that request. Each is answered one more request,
		// with Connection: close, or closes first, or the grace ends.
		for _, c := range l.clients {
			if c != nil {
				return false
			}
		}
		return true
	}
	for _, c := range l.clients {
		if c != nil && !c.busy {
			l.closeClient(c)
		}
	}
	return l.busy == 0
}

func (l *evLoop) closeAll() {
	for _, c := range l.clients {
		if c != nil {
			if c.busy && c.b != nil && l.tryEnded(c, errShutdown) {
				c.t.done(&c.f)
			}
			l.closeClient(c)
		}
	}
	for _, b := range l.backs {
		if b != nil {
			l.closeBack(b)
		}
	}
}

var errShutdown = errors.New("proxy: shutting down")

// sweep closes what timed out: tries past their deadline, clients idle for
// IdleTimeout, instance connections idle for MaxIdleConnTime. It runs at
// most every tick and sets when the loop's wait ends for the next one.
func (l *evLoop) sweep() {
	p := l.p
	tick := max(p.slack, 10*time.Millisecond)
	if l.busy == 0 {
		tick = time.Second
	}
	if l.now.Sub(l.swept) >= tick {
		l.swept = l.now
		if !l.paused.IsZero() && !l.now.Before(l.paused) && !l.let {
			l.paused = time.Time{}
			if err := l.watchListeners(); err != nil {
				l.paused = l.now.Add(100 * time.Millisecond) // out of memory: try again
			}
		}
		for _, c := range l.clients {
			switch {
			case c == nil:
			case c.busy:
				// An answer (head or body) that is late: nothing went to
				// the client yet, so the try failed (a 504, or a retry).
				if b := c.b; b != nil {
					d := c.f.tryDeadline(p)
					if b.connecting && c.f.t0.Add(p.cfg.ConnectTimeout).Before(d) {
						d = c.f.t0.Add(p.cfg.ConnectTimeout)
					}
					if l.now.After(d) {
						l.tryFailed(c, os.ErrDeadlineExceeded)
					}
				}
			case !c.headAt.IsZero() && !c.inBody && l.now.Sub(c.headAt) > p.cfg.HeaderTimeout,
				c.inBody && l.now.Sub(c.active) > p.cfg.BodyTimeout,
				l.now.Sub(c.active) > p.cfg.IdleTimeout:
				l.closeClient(c)
			}
		}
		for ep, list := range l.idle {
			keep := list[:0]
			for _, b := range list {
				if l.now.Sub(b.idleAt) >= p.cfg.MaxIdleConnTime || ep.pool.closed.Load() {
					l.closeBack(b)
				} else {
					keep = append(keep, b)
				}
			}
			if len(keep) == 0 {
				delete(l.idle, ep)
			} else {
				l.idle[ep] = keep
			}
		}
	}
	var want time.Time
	if l.nconns > 0 || !l.paused.IsZero() {
		want = l.swept.Add(tick)
	}
	if l.s.closing.Load() {
		want = l.now.Add(50 * time.Millisecond)
	}
	switch {
	case want.IsZero():
		l.dl = time.Time{}
	case l.dl.IsZero() || !l.dl.After(l.now) || l.dl.After(want.Add(tick/4)):
		l.dl = want
	}
}

// accept takes one new connection (as nginx without multi_accept): the
// listener stays ready while more wait, so the loops share them out.
func (l *evLoop) accept(ln *evListener) {
	for i := 0; i < 4; i++ {
		fd, sa, err := syscall.Accept4(ln.fd, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
		switch err {
		case nil:
		case syscall.EAGAIN:
			return
		case syscall.ECONNABORTED, syscall.EINTR:
			continue
		default:
			// Out of descriptors or memory: stop accepting for a moment
			// (the listener would wake us at once, over and over).
			l.p.log.Warn("accept failed; pausing", "error", err)
			l.unwatchListeners()
			l.paused = l.now.Add(100 * time.Millisecond)
			return
		}
		if !ln.cap.admit() { // a 503 on a fresh socket (its buffer takes it), then closed
			_, _ = syscall.Write(fd, ln.cap.full)
			drainNow(uintptr(fd))
			syscall.Close(fd)
			return
		}
		_ = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
		gen := l.nextGen()
		if err := l.poll.Add(fd, syscall.EPOLLIN|syscall.EPOLLRDHUP|epollET, int32(fd), gen); err != nil {
			syscall.Close(fd)
			ln.cap.leave()
			continue
		}
		c := &evConn{ln: ln, fd: fd, gen: gen, fresh: true, active: l.now}
		switch a := sa.(type) {
		case *syscall.SockaddrInet4:
			c.ip = netip.AddrFrom4(a.Addr).AppendTo(nil)
		case *syscall.SockaddrInet6:
			c.ip = netip.AddrFrom16(a.Addr).Unmap().AppendTo(nil)
		}
		for fd >= len(l.clients) {
			l.clients = append(l.clients, nil)
		}
		l.clients[fd] = c
		l.nconns++
		return
	}
}

const epollET = 1 << 31

// Generations tell registrations of one descriptor number apart (epoll
// data beside the descriptor); the listeners have their own, and the
// wake-up evloop's (evloop.Woken).
const genListener int32 = -1

func (l *evLoop) nextGen() int32 {
	l.gen++
	if l.gen <= 0 {
		l.gen = 1
	}
	return l.gen
}

// hangup: the peer closed its side (or the connection failed); with edge
// triggering this is said once, so it is remembered.
const hangup = syscall.EPOLLRDHUP | syscall.EPOLLHUP | syscall.EPOLLERR

func (l *evLoop) clientEvent(c *evConn, events uint32) {
	if events&hangup != 0 {
		c.hup = true
	}
	l.readClient(c)
	if l.clients[c.fd] != c {
		return
	}
	if !c.busy {
		l.serve(c)
	}
}

// readClient reads once into the free part of the buffer (taken from the
// loop's free list when the connection has none).
func (l *evLoop) readClient(c *evConn) {
	if c.buf == nil {
		c.buf = l.takeBuf()
	}
	if c.n == len(c.buf) {
		c.more = true
		return
	}
	m, err := syscall.Read(c.fd, c.buf[c.n:])
	defer l.idleBuf(c)
	switch {
	case m > 0:
		c.n += m
		c.more = c.n == len(c.buf)
		c.active = l.now
		c.eof = c.hup && !c.more
	case err == syscall.EAGAIN:
		c.more = false
		c.eof = c.hup
	case err == syscall.EINTR:
		c.more = true
	default: // end of stream or an error
		c.eof, c.more = true, false
	}
}

// serve starts the next request in c's buffer, if there is a whole one.
func (l *evLoop) serve(c *evConn) {
	p := l.p
	for !c.busy && l.clients[c.fd] == c {
		if l.s.closing.Load() && (!l.p.linger.Load() || c.eof && c.n == 0) {
			l.closeClient(c)
			return
		}
		if c.n > 0 && c.headAt.IsZero() { // the sweep holds the head to HeaderTimeout
			c.headAt = l.now
		}
		if c.fresh && c.ln.h2 != nil {
			if c.n < 3 && !c.eof {
				if l.readOn(c) {
					continue
				}
				return
			}
			if c.n >= 3 && string(c.buf[:3]) == string(h2Preface[:3]) {
				l.handoffH2(c)
				return
			}
		}
		if c.n == 0 {
			c.headAt = time.Time{}
			if l.readOn(c) {
				continue
			}
			l.idleBuf(c)
			return
		}
		c.inBody = false
		err := h1.ParseRequest(c.buf[:c.n], &l.req)
		if err == h1.ErrIncomplete && c.n < len(c.buf) {
			if l.readOn(c) {
				continue
			}
			return
		}
		if err != nil {
			l.handoff(c, nil)
			return
		}
		end := l.req.HeadEnd
		if l.req.ContentLength > 0 {
			if l.req.ContentLength > int64(p.cfg.MaxReplayBody) || int64(len(c.buf)-end) < l.req.ContentLength {
				l.handoff(c, nil)
				return
			}
			end += int(l.req.ContentLength)
			if c.n < end {
				c.inBody = true // the sweep holds it to BodyTimeout between reads
				if l.readOn(c) {
					continue
				}
				return
			}
		}
		c.fresh = false
		l.start(c, end)
	}
}

// readOn is for a client whose buffer holds no whole request: true when
// it read more (look again); false when it must wait for the next event,
// having closed a client that ended its side.
func (l *evLoop) readOn(c *evConn) bool {
	if c.more {
		l.readClient(c)
		return true
	}
	if c.eof {
		l.closeClient(c)
	}
	return false
}

// start forwards the request parsed into l.req whose bytes are c.buf[:end].
func (l *evLoop) start(c *evConn, end int) {
	s, p, b, r := l.s, l.p, c.buf, &l.req
	host, path := r.Authority(b)
	var t *target
	var d Decision
	rt := c.ln.rt
	gw := rt != nil && rt.router != nil
	if gw {
		rawRouteHead(&l.rhead, &l.rhsrc, b, r, host, path, c.ip, false, l.now)
		d, t = p.decide(rt, &l.rhead)
		l.rhead, l.rhsrc = Head{}, rawHead{}
		if d.Answer != nil {
			l.answerOwn(c, r, end, d.Answer)
			return
		}
		if t == nil { // the goroutine path looks the service up
			l.handoffDecided(c, d, nil)
			return
		}
	} else if rt != nil {
		t = rt.fixed
	}
	if t == nil {
		var hb []byte
		if hb, t = c.last.lookup(b, r, host); t == nil {
			name, ok := serviceFromHost(string(hb), p.cfg.Domain)
			if ok {
				p.mu.Lock()
				t = p.targets[name]
				p.mu.Unlock()
			}
			if t == nil { // the goroutine path answers or looks the service up
				l.handoff(c, nil)
				return
			}
			c.last.remember(hb, t)
		}
	}
	set := t.endpoints()
	if !set.found || !set.ips {
		if gw {
			l.handoffDecided(c, d, t)
			return
		}
		l.handoff(c, nil)
		return
	}
	t.keepWanted(s.ctx, l.now, true)
	method := b[r.Method.Start:r.Method.End]
	c.head = string(method) == "HEAD"
	c.replay = idempotent(method) || r.IdemKey
	c.connClose = r.ConnClose
	c.redialed = false
	if c.out == nil {
		c.out = l.takeOut()
	}
	acc := rawAccReq(p, rt, b, r, host, path) // copied before the request's bytes leave b
	if gw {
		c.out = appendGatewayRequest(c.out[:0], b, r, host, path, d.Path, end, c.ip, rt.proto)
	} else {
		c.out = appendRequest(c.out[:0], b, r, host, path, end, c.ip)
	}
	c.n = copy(c.buf, c.buf[end:c.n])
	l.idleBuf(c) // the request's bytes are in c.out now
	c.headAt, c.inBody = time.Time{}, false
	c.t = t
	c.f.acc = acc
	if res, ok := t.admit(&c.f, set, l.now, d.Policy); !ok {
		if c.f.acc != nil {
			t.logAccess(c.f.acc, nil, l.now, l.now, res, 0)
		}
		l.answer(c, res)
		return
	}
	ep := t.pick(set, nil, c.f.pol)
	if ep == nil {
		l.answer(c, t.noHealthy(&c.f))
		return
	}
	c.busy = true
	l.busy++
	c.ep = ep
	ep.inflight.Add(1)
	l.send(c)
}

// send sends c's request to c.ep on an idle connection or a new one.
func (l *evLoop) send(c *evConn) {
	b := l.idleBack(c.ep, !c.replay)
	if b == nil {
		var err error
		if c.ep.pool.waiters.Load() > 0 { // others wait already: join them
			err = fasthttp.ErrNoFreeConns
		} else {
			b, err = l.dial(c.ep, false)
		}
		if err != nil {
			if err == fasthttp.ErrNoFreeConns && !c.redialed {
				// The instance's connections are all taken, some maybe
				// idle on other loops: they give those to the pool, where
				// a goroutine waits for one as long as the pool allows.
				l.s.shed(l, c.ep)
				c.ep.inflight.Add(-1)
				c.f.next = c.ep
				l.handoffRetry(c, 0)
				return
			}
			l.tryFailed(c, err)
			return
		}
	}
	l.attach(c, b)
}

// attach sends c's request on b.
func (l *evLoop) attach(c *evConn, b *evBack) {
	b.c, c.b = c, b
	b.n, b.headDone = 0, false
	if b.connecting {
		b.wpend = c.out
		return
	}
	l.write(b, c.out)
}

// idleBack takes the newest idle connection to ep. An instance's close of
// an idle connection is seen by its event, which may come later in the
// batch under way: for a request that may not be sent twice (which a
// stale connection would fail) it is also looked at with a peek.
func (l *evLoop) idleBack(ep *endpoint, look bool) *evBack {
	list := l.idle[ep]
	for len(list) > 0 {
		b := list[len(list)-1]
		list = list[:len(list)-1]
		l.idle[ep] = list
		if l.now.Sub(b.idleAt) < l.p.cfg.MaxIdleConnTime && !(look && peekDirty(uintptr(b.fd), b.buf[:1])) {
			b.reused = true
			return b
		}
		l.closeBack(b)
	}
	return nil
}

// dial starts a connection to ep, taking a slot of its pool unless held
// says the caller has one (which fails with it).
func (l *evLoop) dial(ep *endpoint, held bool) (*evBack, error) {
	if !held {
		select {
		case ep.pool.sem <- struct{}{}:
		default:
			return nil, fasthttp.ErrNoFreeConns
		}
	}
	var sa syscall.Sockaddr
	family := syscall.AF_INET
	if a := ep.ap.Addr(); a.Is4() {
		sa = &syscall.SockaddrInet4{Port: int(ep.ap.Port()), Addr: a.As4()}
	} else {
		family = syscall.AF_INET6
		sa = &syscall.SockaddrInet6{Port: int(ep.ap.Port()), Addr: a.As16()}
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		l.freeSlot(ep)
		return nil, os.NewSyscallError("socket", err)
	}
	_ = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	err = syscall.Connect(fd, sa)
	if err != nil && err != syscall.EINPROGRESS {
		syscall.Close(fd)
		l.freeSlot(ep)
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(ep.ap), Err: os.NewSyscallError("connect", err)}
	}
	gen := l.nextGen()
	if err := l.poll.Add(fd, syscall.EPOLLIN|syscall.EPOLLOUT|syscall.EPOLLRDHUP|epollET, int32(fd), gen); err != nil {
		syscall.Close(fd)
		l.freeSlot(ep)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	b := &evBack{fd: fd, gen: gen, ep: ep, buf: make([]byte, 16<<10), connecting: err != nil}
	for fd >= len(l.backs) {
		l.backs = append(l.backs, nil)
	}
	l.backs[fd] = b
	l.nconns++
	if !b.connecting {
		l.watchOut(b, false)
	}
	return b, nil
}

// watchOut asks for (or stops asking for) writability events on b.
func (l *evLoop) watchOut(b *evBack, on bool) {
	ev := uint32(syscall.EPOLLIN | syscall.EPOLLRDHUP | epollET)
	if on {
		ev |= syscall.EPOLLOUT
	}
	_ = l.poll.Mod(b.fd, ev, int32(b.fd), b.gen)
}

// write sends data to the instance, keeping what the socket did not take.
func (l *evLoop) write(b *evBack, data []byte) {
	rest, err := evloop.WriteSome(b.fd, data)
	if err != nil {
		l.backFailed(b, os.NewSyscallError("write", err))
		return
	}
	if len(rest) > 0 {
		if len(b.wpend) == 0 {
			l.watchOut(b, true)
		}
		b.wpend = rest
		return
	}
	if len(b.wpend) > 0 {
		b.wpend = nil
		l.watchOut(b, false)
	}
}

func (l *evLoop) backEvent(b *evBack, events uint32) {
	c := b.c
	if c == nil { // idle: the instance closed it or sent bytes nobody asked for
		l.dropIdle(b)
		return
	}
	if b.connecting {
		if events&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) == 0 {
			return
		}
		soerr, err := syscall.GetsockoptInt(b.fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
		if err == nil && soerr != 0 {
			err = syscall.Errno(soerr)
		}
		if err != nil {
			l.tryFailed(c, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(b.ep.ap), Err: os.NewSyscallError("connect", err)})
			return
		}
		b.connecting = false
		data := b.wpend
		b.wpend = nil
		l.watchOut(b, false)
		l.write(b, data)
		if b.c != c {
			return
		}
	} else if len(b.wpend) > 0 && events&syscall.EPOLLOUT != 0 {
		l.write(b, b.wpend)
		if b.c != c {
			return
		}
	}
	if events&hangup != 0 {
		b.hup = true // never reused
	}
	if events&(syscall.EPOLLIN|hangup) != 0 {
		l.readBack(b, b.hup)
	}
}

// readBack reads the instance's answer as far as it has come; after a
// hangup, to the end of the stream (there is no later event).
func (l *evLoop) readBack(b *evBack, hup bool) {
	c := b.c
	for b.c == c {
		if b.n == len(b.buf) { // a full head is handled below; a body never fills it
			return
		}
		m, err := syscall.Read(b.fd, b.buf[b.n:])
		switch {
		case m > 0:
		case err == syscall.EAGAIN:
			return
		case err == syscall.EINTR:
			continue
		case err == nil: // end of stream
			l.backFailed(b, io.EOF)
			return
		default:
			l.backFailed(b, os.NewSyscallError("read", err))
			return
		}
		full := b.n+m == len(b.buf)
		b.n += m
		l.answered(b)
		if !full && !hup {
			return
		}
	}
}

// answered moves an answer along once more of it was read.
func (l *evLoop) answered(b *evBack) {
	c := b.c
	r := &b.resp
	if !b.headDone {
		n, done, err := scanAnswerHead(b.buf, b.n, r)
		b.n = n
		if err != nil {
			l.tryFailed(c, err)
			return
		}
		if !done {
			return
		}
		b.headDone = true
		if !l.simple(b) { // streamed by a goroutine: the try counts now
			if l.counted(c, r.Status) {
				l.handoffAnswer(c)
			}
			return
		}
	}
	need := r.HeadEnd
	if r.HasBody(c.head) {
		need += int(r.ContentLength)
	}
	if b.n < need {
		return
	}
	// Whole: only now is the try a success (an answer cut short or late
	// before this is a failed try, and the client is told so).
	if !l.counted(c, r.Status) {
		return
	}
	closeClient := c.connClose || c.eof && c.n == 0 || l.s.closing.Load() // requests read before the client's close are answered
	out := appendAnswerHead(l.out[:0], b.buf, r, closeClient, nil)
	out = append(out, b.buf[r.HeadEnd:need]...)
	l.out = out
	l.releaseBack(b, !r.Close && b.n == need)
	l.reply(c, out, closeClient)
}

// counted reports the try that got an answer with status; false: it was
// handed over for a retry.
func (l *evLoop) counted(c *evConn, status int) bool {
	t := c.t
	c.ep.inflight.Add(-1)
	if t.report(&c.f, c.ep, status, nil, l.now) {
		if back, ok := t.retryAfter(&c.f, c.replay, status, nil); ok {
			l.handoffRetry(c, back)
			return false
		}
	}
	res := t.done(&c.f)
	if fb, _ := t.fallbackFor(res); fb != nil { // a failed answer the fallback replaces
		l.handoffFinish(c, res)
		return false
	}
	return true
}

// simple says whether the answer whose head is in b can be sent from the
// loop: no body, or a Content-Length one that fits b's buffer.
func (l *evLoop) simple(b *evBack) bool {
	r := &b.resp
	if !r.HasBody(b.c.head) {
		return true
	}
	return r.ContentLength >= 0 && r.ContentLength <= int64(len(b.buf)-r.HeadEnd)
}

// backFailed handles an instance connection that failed before the whole
// answer was read (a loop sends none before): the try failed.
func (l *evLoop) backFailed(b *evBack, err error) {
	l.tryFailed(b.c, err)
}

// tryFailed ends a try that got no answer: once more on a new connection
// when a pooled one turned out closed, else the retry policy decides.
func (l *evLoop) tryFailed(c *evConn, err error) {
	b := c.b
	if b != nil {
		reused, got := b.reused, b.n > 0 || b.headDone
		if reused && !got && c.replay && !c.redialed && (errors.Is(err, io.EOF) || isReset(err)) {
			// a pooled connection the instance had closed: once more on
			// a new one, in the same slot of the pool
			l.closeBackKeepSlot(b)
			c.redialed = true
			nb, err := l.dial(c.ep, true)
			if err != nil {
				l.tryFailed(c, err)
				return
			}
			l.attach(c, nb)
			return
		}
		l.closeBack(b)
		c.b = nil
	}
	if !l.tryEnded(c, err) {
		return
	}
	res := c.t.done(&c.f)
	l.answer(c, res)
}

// tryEnded reports a failed try; false: it was handed over for a retry.
func (l *evLoop) tryEnded(c *evConn, err error) bool {
	t := c.t
	c.ep.inflight.Add(-1)
	t.report(&c.f, c.ep, 0, err, l.now)
	if err == errShutdown {
		return true
	}
	if back, ok := t.retryAfter(&c.f, c.replay, 0, err); ok {
		l.handoffRetry(c, back)
		return false
	}
	return true
}

// answer sends the proxy's own answer for res (a static fallback, or a
// 502/503/504); a service fallback is the goroutine path's.
func (l *evLoop) answer(c *evConn, res result) {
	t := c.t
	if fb, _ := t.fallbackFor(res); fb != nil && fb.Service != "" {
		l.handoffResult(c, res)
		return
	}
	closeClient := c.connClose || c.eof && c.n == 0 || l.s.closing.Load() // requests read before the client's close are answered
	out := appendCanned(l.out[:0], l.p.cannedFor(t, res, true), closeClient, c.head)
	l.out = out
	if !c.busy {
		c.busy = true
		l.busy++
	}
	l.reply(c, out, closeClient)
}

// answerOwn answers the request parsed into r, c.buf[:end], with a
// gateway's own answer (no route, over a rate limit).
func (l *evLoop) answerOwn(c *evConn, r *h1.Request, end int, a *Answer) {
	c.head = string(c.buf[r.Method.Start:r.Method.End]) == "HEAD"
	closeClient := r.ConnClose || c.eof || l.s.closing.Load()
	out := appendCanned(l.out[:0], answerCanned(a), closeClient, c.head)
	l.out = out
	c.n = copy(c.buf, c.buf[end:c.n])
	if !c.busy {
		c.busy = true
		l.busy++
	}
	l.reply(c, out, closeClient)
}

// handoffDecided hands a gateway request over with the router's decision
// (and its target, when the proxy has one), so the router is asked once.
func (l *evLoop) handoffDecided(c *evConn, d Decision, t *target) {
	dc := &decided{d: d, t: t}
	l.handoff(c, func(rc *rawConn) bool {
		rc.decided = dc
		return true
	})
}

// reply writes a whole answer to the client and ends the request.
func (l *evLoop) reply(c *evConn, out []byte, closeClient bool) {
	rest, err := evloop.WriteSome(c.fd, out)
	if err != nil {
		closeClient = true
	} else if len(rest) > 0 { // a client slow to read: a goroutine waits for it
		rest = append([]byte(nil), rest...)
		l.handoff(c, func(rc *rawConn) bool {
			if rc.writeDeadline(time.Now().Add(requestTimeout(rc.s.p, c.f.pol, c.f.own))) != nil {
				return false
			}
			_, err := rc.c.Write(rest)
			return err == nil && !closeClient
		})
		return
	}
	l.endRequest(c)
	c.active = l.now
	if closeClient {
		l.closeClient(c)
		return
	}
	l.serve(c)
}

func (l *evLoop) endRequest(c *evConn) {
	if c.busy {
		c.busy = false
		l.busy--
	}
	c.b, c.ep = nil, nil
	l.freeOut(c)
}

// Buffers belong to requests, not to connections (as nginx's): a client
// connection with nothing to read holds no read buffer, and one with no
// request under way no request buffer; both go back to the loop's free
// lists (a loop is one goroutine: no locks), which keep at most
// maxFreeBufs of each for the next requests and let the rest go.
const maxFreeBufs = 256

func (l *evLoop) takeBuf() []byte {
	if n := len(l.bufs); n > 0 {
		b := l.bufs[n-1]
		l.bufs = l.bufs[:n-1]
		return b
	}
	return make([]byte, rawReadBuffer)
}

// idleBuf gives c's read buffer back when it holds nothing.
func (l *evLoop) idleBuf(c *evConn) {
	if c.buf == nil || c.n > 0 {
		return
	}
	if len(l.bufs) < maxFreeBufs {
		l.bufs = append(l.bufs, c.buf)
	}
	c.buf = nil
}

func (l *evLoop) takeOut() []byte {
	if n := len(l.outs); n > 0 {
		b := l.outs[n-1]
		l.outs = l.outs[:n-1]
		return b
	}
	return make([]byte, 0, 1024)
}

// freeOut gives c's request buffer back (nothing refers to it once the
// request has ended).
func (l *evLoop) freeOut(c *evConn) {
	if c.out == nil {
		return
	}
	if len(l.outs) < maxFreeBufs && cap(c.out) <= 4*rawReadBuffer {
		l.outs = append(l.outs, c.out[:0])
	}
	c.out = nil
}

// releaseBack ends b's exchange: back to the idle list, or closed.
func (l *evLoop) releaseBack(b *evBack, reuse bool) {
	if c := b.c; c != nil && c.b == b {
		c.b = nil
	}
	b.c = nil
	if !reuse || b.hup || len(b.wpend) > 0 || b.ep.pool.closed.Load() || l.s.closing.Load() {
		l.closeBack(b)
		return
	}
	if b.ep.pool.waiters.Load() > 0 {
		l.giveToPool(b)
		return
	}
	b.n, b.headDone, b.idleAt = 0, false, l.now
	l.idle[b.ep] = append(l.idle[b.ep], b)
}

// giveToPool moves an idle connection, with its slot, to its instance's
// pool, for a goroutine waiting there.
func (l *evLoop) giveToPool(b *evBack) {
	if b.ep.pool.waiters.Load() == 0 || l.backs[b.fd] != b {
		l.closeBack(b)
		return
	}
	if bc := l.toBconn(b); bc != nil {
		b.ep.pool.put(bc, l.now)
		l.yield = true
	}
}

// freeSlot gives back a connection slot of ep's pool.
func (l *evLoop) freeSlot(ep *endpoint) {
	<-ep.pool.sem
	if ep.pool.waiters.Load() > 0 {
		l.yield = true
	}
}

// toBconn takes b off the loop as a connection of the goroutine path, with
// its buffer and its slot in the pool; nil (the slot freed) when that fails.
func (l *evLoop) toBconn(b *evBack) *bconn {
	l.backs[b.fd] = nil
	l.nconns--
	nc, err := l.poll.ToConn(b.fd)
	if err != nil {
		l.freeSlot(b.ep)
		return nil
	}
	bc := &bconn{buf: b.buf}
	bc.setConn(nc)
	return bc
}

// dropIdle closes an idle connection and takes it off its list.
func (l *evLoop) dropIdle(b *evBack) {
	list := l.idle[b.ep]
	for i, x := range list {
		if x == b {
			list[i] = list[len(list)-1]
			l.idle[b.ep] = list[:len(list)-1]
			break
		}
	}
	l.closeBack(b)
}

func (l *evLoop) closeBack(b *evBack) {
	if l.backs[b.fd] == b {
		l.freeSlot(b.ep)
	}
	l.closeBackKeepSlot(b)
}

// closeBackKeepSlot closes b; its slot in the pool is the caller's.
func (l *evLoop) closeBackKeepSlot(b *evBack) {
	if l.backs[b.fd] != b {
		return
	}
	l.backs[b.fd] = nil
	l.nconns--
	syscall.Close(b.fd)
	b.wpend = nil
	if c := b.c; c != nil && c.b == b {
		c.b = nil
	}
	b.c = nil
}

func (l *evLoop) closeClient(c *evConn) {
	if l.clients[c.fd] != c {
		return
	}
	if c.busy {
		if b := c.b; b != nil {
			l.closeBack(b)
		}
		l.endRequest(c)
	}
	l.clients[c.fd] = nil
	l.nconns--
	syscall.Close(c.fd)
	c.ln.cap.leave()
	c.n = 0
	l.idleBuf(c)
	l.freeOut(c)
}

// detach takes c off the loop and returns it as a net.Conn.
func (l *evLoop) detach(c *evConn) (net.Conn, error) {
	if c.busy {
		c.busy = false
		l.busy--
	}
	l.clients[c.fd] = nil
	l.nconns--
	nc, err := l.poll.ToConn(c.fd)
	if err != nil {
		c.ln.cap.leave()
		return nil, err
	}
	return &capConn{Conn: nc, cap: c.ln.cap}, nil // its place goes with it
}

// handoff gives the client connection to the goroutine fast path, with
// the bytes not yet used; first finishes the request under way, if any.
func (l *evLoop) handoff(c *evConn, first func(rc *rawConn) bool) {
	nc, err := l.detach(c)
	if err != nil {
		l.p.log.Warn("cannot hand a connection over", "error", err)
		if first == nil {
			return
		}
		// The request under way still ends (its answer released, the
		// breaker told), writing to a connection that is gone.
		nc = deadConn{}
	}
	c.ln.raw.adopt(nc, c.buf[:c.n], first) // copies them
	c.n = 0
	l.idleBuf(c)
	l.freeOut(c) // exchangeState took a copy
	l.yield = true
}

// deadConn stands for a client connection that could not be handed over.
type deadConn struct{}

func (deadConn) Read([]byte) (int, error)         { return 0, net.ErrClosed }
func (deadConn) Write([]byte) (int, error)        { return 0, net.ErrClosed }
func (deadConn) Close() error                     { return nil }
func (deadConn) LocalAddr() net.Addr              { return nil }
func (deadConn) RemoteAddr() net.Addr             { return nil }
func (deadConn) SetDeadline(time.Time) error      { return nil }
func (deadConn) SetReadDeadline(time.Time) error  { return nil }
func (deadConn) SetWriteDeadline(time.Time) error { return nil }

func (l *evLoop) handoffH2(c *evConn) {
	nc, err := l.detach(c)
	if err != nil {
		return
	}
	pc := &prefixConn{Conn: nc, prefix: append([]byte(nil), c.buf[:c.n]...)}
	c.n = 0
	l.idleBuf(c)
	ctx, h2 := l.s.ctx, c.ln.h2
	l.yield = true
	go func() {
		if !h2.put(ctx, pc) {
			nc.Close()
		}
	}()
}

// exchangeState is what the goroutine path needs of the request under way.
func (l *evLoop) exchangeState(c *evConn) func(rc *rawConn) {
	head, replay, connClose := c.head, c.replay, c.connClose
	out := append([]byte(nil), c.out...)
	deadline := c.f.deadline
	return func(rc *rawConn) {
		// as serveOne: a client that does not read its answer holds the
		// instance's connection only until the request's deadline
		_ = rc.writeDeadline(deadline)
		rc.req.ConnClose = connClose
		rc.out = out
		rc.x.req, rc.x.head, rc.x.replay = out, head, replay
	}
}

// takeAnswer moves the answer held on c's instance connection into an
// exchange of the goroutine path (the connection keeps its pool slot).
func (l *evLoop) takeAnswer(c *evConn) func(x *rawExchange) {
	b := c.b
	if b == nil {
		return func(*rawExchange) {}
	}
	c.b, b.c = nil, nil
	bc := l.toBconn(b)
	if bc == nil {
		return func(*rawExchange) {}
	}
	_ = bc.c.SetDeadline(c.f.tryDeadline(l.p))
	pool, n, resp := b.ep.pool, b.n, b.resp
	if len(b.wpend) > 0 { // the instance answered before it had the whole request
		resp.Close = true
	}
	return func(x *rawExchange) {
		x.bc, x.pool, x.rn, x.resp = bc, pool, n, resp
	}
}

// handoffRetry hands over a request whose try failed and is to be retried
// after back (the failed answer, if any, goes along: it is the answer if no
// other instance can be tried).
func (l *evLoop) handoffRetry(c *evConn, back time.Duration) {
	t, f := c.t, c.f
	state, answer := l.exchangeState(c), l.takeAnswer(c)
	l.handoff(c, func(rc *rawConn) bool {
		state(rc)
		answer(&rc.x)
		res := t.forwardFrom(rc.s.ctx, &rc.x, rc.x.replay, &f, back)
		return rc.finish(t, res, true)
	})
}

// handoffAnswer hands over a request whose answer is to be streamed.
func (l *evLoop) handoffAnswer(c *evConn) {
	state, answer := l.exchangeState(c), l.takeAnswer(c)
	l.handoff(c, func(rc *rawConn) bool {
		state(rc)
		answer(&rc.x)
		return rc.writeAnswer()
	})
}

// handoffFinish hands over a request whose answer (on c's instance
// connection) the goroutine path finishes for res (a fallback for it).
func (l *evLoop) handoffFinish(c *evConn, res result) {
	t := c.t
	state, answer := l.exchangeState(c), l.takeAnswer(c)
	l.handoff(c, func(rc *rawConn) bool {
		state(rc)
		answer(&rc.x)
		return rc.finish(t, res, true)
	})
}

// handoffResult hands over a request the goroutine path answers for res
// (a service fallback).
func (l *evLoop) handoffResult(c *evConn, res result) {
	t, state := c.t, l.exchangeState(c)
	l.handoff(c, func(rc *rawConn) bool {
		state(rc)
		return rc.finish(t, res, true)
	})
}
