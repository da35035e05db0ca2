package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"attache/sidecar/proxy/h1"
)

// rawServer serves the HTTP/1.x connections of one listener. Each request
// the fast path understands is parsed in place and forwarded with its bytes
// copied through; at the first one it does not, the connection is handed to
// the fasthttp server (with the bytes already read) for the rest of its life.
type rawServer struct {
	p       *Proxy
	rt      *routing // nil: the HTTP proxy listener
	fs      *fasthttp.Server
	ctx     context.Context
	closing atomic.Bool
	mu      sync.Mutex
	conns   map[*rawConn]struct{} // every connection with a goroutine (run)
	gone    sync.Cond             // on mu: broadcast when conns empties
	park    *parker               // nil: idle connections keep their goroutine
}

func newRawServer(ctx context.Context, p *Proxy, rt *routing, fs *fasthttp.Server) *rawServer {
	s := &rawServer{p: p, rt: rt, fs: fs, ctx: ctx, conns: map[*rawConn]struct{}{}}
	s.gone.L = &s.mu
	if p.parker != nil && p.cfg.IdleTimeout > 2*p.parkAfter {
		s.park = p.parker
	}
	return s
}

// defaultParkAfter is how long a goroutine-path connection waits for its
// next request with its goroutine and buffers before it is parked (between
// this and 1.5 times this: the read deadline is moved only when it falls
// out of that range, a few times a second under load, not per request).
const defaultParkAfter = 50 * time.Millisecond

// resume serves a parked connection that has bytes to read again, on a
// goroutine with new buffers. (They are not pooled: a pool would keep
// those of every connection parked since the last two collections.)
func (s *rawServer) resume(pc *parkedConn) {
	// Handing over, a stopping server answers it once more (Proxy.HandOver).
	s.start(&rawConn{s: s, c: pc.c, ip: pc.ip, last: pc.last, idleEnd: pc.expires}, !s.p.linger.Load())
}

func (s *rawServer) draining() bool { return s.closing.Load() }

// serve accepts until ln is closed.
func (s *rawServer) serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !s.closing.Load() {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			if errors.Is(err, net.ErrClosed) || s.closing.Load() {
				return nil
			}
			return err
		}
		s.start(&rawConn{s: s, c: c}, true)
	}
}

// start serves rc on a goroutine of its own; refuse: close it instead if
// the server is shutting down.
func (s *rawServer) start(rc *rawConn, refuse bool) {
	s.mu.Lock()
	if refuse && s.closing.Load() {
		s.mu.Unlock()
		rc.c.Close()
		return
	}
	s.conns[rc] = struct{}{}
	s.mu.Unlock()
	go rc.run()
}

// shutdown stops reading new requests, lets requests under way finish for
// at most grace, then closes every connection; it returns when all are done.
func (s *rawServer) shutdown(grace time.Duration) {
	s.mu.Lock()
	s.closing.Store(true)
	if !s.p.linger.Load() { // handing over, each is answered its next request (see Proxy.HandOver)
		for rc := range s.conns {
			_ = rc.c.SetReadDeadline(time.Now()) // wakes connections waiting for a request
		}
	}
	s.mu.Unlock()
	linger := s.p.linger.Load()
	if s.park != nil && !linger {
		s.park.closeServer(s) // idle: closed at once
	}
	done, giveUp := make(chan struct{}), make(chan struct{})
	go func() {
		s.waitGone()
		// Handing over, a parked connection is answered its next request
		// too (taken up by a goroutine, which conns counts): wait for those
		// until the grace time is up.
		for linger && s.park != nil && s.park.parkedOf(s) > 0 {
			select {
			case <-giveUp:
			case <-time.After(10 * time.Millisecond):
			}
			if isClosed(giveUp) {
				break
			}
			s.waitGone()
		}
		close(done)
	}()
	select {
	case <-done:
		return
	case <-time.After(grace):
	}
	close(giveUp)
	if s.park != nil {
		s.park.closeServer(s)
	}
	s.mu.Lock()
	for rc := range s.conns {
		rc.c.Close()
	}
	s.mu.Unlock()
	<-done
}

// waitGone returns once no connection has a goroutine. (Not a WaitGroup:
// handing over, a parked connection taken up again (resume) adds one while
// shutdown waits, which a WaitGroup forbids once its count has reached zero.)
func (s *rawServer) waitGone() {
	s.mu.Lock()
	for len(s.conns) > 0 {
		s.gone.Wait()
	}
	s.mu.Unlock()
}

// isClosed reports whether ch is closed.
func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// rawConn is one client connection on the fast path.
type rawConn struct {
	s        *rawServer
	c        net.Conn
	buf      []byte // bytes read from the client
	n        int
	out      []byte // the head being written
	rdl      time.Time
	wdl      time.Time // write deadline now set on c
	timedOut bool      // the last read timed out
	idleEnd  time.Time // when the connection, waiting for a request, has been idle for IdleTimeout
	ip       []byte
	req      h1.Request
	x        rawExchange
	extra    []byte // an extra response header line ("Name: value\r\n")

	last lastHost // HTTP proxy

	// gateway listeners
	head    Head
	hsrc    rawHead
	decided *decided // the event loop's decision for the first request, when it handed it over

	first func(rc *rawConn) bool // for a connection an event loop handed over: what is left of its request
}

// adopt serves a connection an event loop handed over: buffered holds the
// bytes read from it and not yet used; first, when not nil, finishes the
// request under way and reports whether the connection stays open.
func (s *rawServer) adopt(c net.Conn, buffered []byte, first func(rc *rawConn) bool) {
	rc := &rawConn{s: s, c: c, buf: make([]byte, rawReadBuffer), first: first}
	rc.n = copy(rc.buf, buffered)
	// A request under way always finishes (its accounting with it); the
	// loops hand over before shutdown starts here.
	s.start(rc, first == nil)
}

const rawReadBuffer = 8 << 10

func (rc *rawConn) run() {
	s := rc.s
	handedOff, parked := false, false
	defer func() {
		if !handedOff && !parked {
			rc.c.Close()
		}
		s.mu.Lock()
		delete(s.conns, rc)
		if len(s.conns) == 0 {
			s.gone.Broadcast()
		}
		s.mu.Unlock()
	}()
	if rc.buf == nil {
		rc.buf = make([]byte, rawReadBuffer)
	}
	if pc, ok := rc.c.(*prefixConn); ok {
		rc.n = copy(rc.buf, pc.prefix)
		rc.c = pc.Conn
	}
	if rc.ip != nil { // taken up again after it was parked
	} else if a, ok := rc.c.RemoteAddr().(*net.TCPAddr); ok {
		rc.ip = a.AddrPort().Addr().Unmap().AppendTo(nil)
	} else if a := rc.c.RemoteAddr(); a != nil {
		h, _, err := net.SplitHostPort(a.String())
		if err != nil {
			h = a.String()
		}
		rc.ip = []byte(h)
	}
	rc.x.p = s.p
	p := s.p
	if rc.first != nil && (!rc.first(rc) || s.closing.Load()) {
		return
	}
	cfg := &p.cfg
	var headAt time.Time // when the head under way began to arrive
	for {
		err := h1.ParseRequest(rc.buf[:rc.n], &rc.req)
		if err == h1.ErrIncomplete && rc.n == 0 && s.park != nil {
			// Waiting for the next request: after parkAfter without a
			// byte, the connection is parked, and this goroutine and its
			// buffers are given back.
			// IdleTimeout counts from the first wait, across parkings
			// (bytes of a TLS record that does not end wake it up, but
			// bring no request).
			now := time.Now()
			if rc.idleEnd.IsZero() {
				rc.idleEnd = now.Add(cfg.IdleTimeout)
			}
			d, slack := now.Add(p.parkAfter), p.parkAfter/2
			if d.Add(slack).After(rc.idleEnd) {
				d, slack = rc.idleEnd, 0
			}
			if !rc.readMore(d, slack) {
				if rc.n == 0 && rc.timedOut && !s.closing.Load() && time.Now().Before(rc.idleEnd) {
					parked = s.park.park(&parkedConn{s: s, c: rc.c, ip: rc.ip, last: rc.last, expires: rc.idleEnd})
				}
				return
			}
			if rc.n > 0 {
				rc.idleEnd = time.Time{}
			}
			continue
		}
		if err == h1.ErrIncomplete && rc.n < len(rc.buf) {
			// Waiting for a request: IdleTimeout; once it has begun, its
			// whole head within HeaderTimeout (a head dribbled a byte at a
			// time is not read for ever).
			now := time.Now()
			d, slack := now.Add(cfg.IdleTimeout), cfg.IdleTimeout/16
			if rc.n > 0 {
				if headAt.IsZero() {
					headAt = now
				}
				d, slack = headAt.Add(cfg.HeaderTimeout), 0
			}
			if !rc.readMore(d, slack) {
				return
			}
			continue
		}
		if err != nil {
			handedOff = true
			rc.handOff()
			return
		}
		r := &rc.req
		end := r.HeadEnd
		if r.ContentLength > 0 {
			if r.ContentLength > int64(p.cfg.MaxReplayBody) || int64(len(rc.buf)-end) < r.ContentLength {
				handedOff = true
				rc.handOff()
				return
			}
			end += int(r.ContentLength)
			for rc.n < end { // the body keeps moving: BodyTimeout between reads
				if !rc.readMore(time.Now().Add(cfg.BodyTimeout), cfg.BodyTimeout/16) {
					return
				}
			}
		}
		keep := rc.serveOne(end)
		rc.n = copy(rc.buf, rc.buf[end:rc.n])
		headAt = time.Time{}
		if rc.n > 0 { // a pipelined request: its head's time starts now
			headAt = time.Now()
		}
		if !keep || s.closing.Load() {
			return
		}
	}
}

// readMore reads from the client with a read deadline in [d, d+slack]
// (calling into the runtime only when the one set is not). false: the
// connection is done.
func (rc *rawConn) readMore(d time.Time, slack time.Duration) bool {
	if rc.rdl.Before(d) || rc.rdl.After(d.Add(slack)) {
		rc.rdl = d.Add(slack)
		if rc.c.SetReadDeadline(rc.rdl) != nil {
			return false
		}
	}
	if rc.s.closing.Load() && !rc.s.p.linger.Load() {
		return false
	}
	m, err := rc.c.Read(rc.buf[rc.n:])
	rc.n += m
	var ne net.Error
	rc.timedOut = err != nil && errors.As(err, &ne) && ne.Timeout()
	return err == nil || m > 0
}

// writeDeadline makes the client connection's write deadline fall in
// [d, d+slack], calling into the runtime only when the current one does
// not (as bconn.setDeadline does): writing an answer to a client that does
// not read it ends by the request deadline, and frees the instance's
// connection.
func (rc *rawConn) writeDeadline(d time.Time) error {
	slack := rc.s.p.slack
	if !rc.wdl.Before(d) && !rc.wdl.After(d.Add(slack)) {
		return nil
	}
	rc.wdl = d.Add(slack)
	return rc.c.SetWriteDeadline(rc.wdl)
}

// handOff gives the connection, with what was read from it, to fasthttp.
func (rc *rawConn) handOff() {
	_ = rc.c.SetDeadline(time.Time{})
	if rc.s.closing.Load() {
		rc.c.Close()
		return
	}
	pc := &prefixConn{Conn: rc.c, prefix: append([]byte(nil), rc.buf[:rc.n]...)}
	_ = rc.s.fs.ServeConn(pc)
}

// serveOne forwards the request parsed into rc.req whose bytes (head and
// body) are rc.buf[:end]. It reports whether the connection stays open.
func (rc *rawConn) serveOne(end int) bool {
	s, p, b, r := rc.s, rc.s.p, rc.buf, &rc.req
	rc.extra = rc.extra[:0]
	if err := rc.writeDeadline(time.Now().Add(p.live.Load().requestTimeout)); err != nil {
		return false
	}
	x := &rc.x
	method := b[r.Method.Start:r.Method.End]
	x.head = string(method) == "HEAD"
	x.replay = idempotent(method) || r.IdemKey
	host, path := r.Authority(b)
	if rt := s.rt; rt != nil && rt.router != nil {
		return rc.serveRouted(end, host, path)
	}
	var t *target
	if s.rt != nil {
		t = s.rt.fixed
	}
	if t == nil {
		var hb []byte
		if hb, t = rc.last.lookup(b, r, host); t == nil {
			name, ok := serviceFromHost(string(hb), p.cfg.Domain)
			if !ok {
				return rc.writeCanned(cannedJSON(http.StatusNotFound, "host is not a Consul service", "", "host", string(hb)))
			}
			var err error
			if t, err = p.lookupTarget(s.ctx, name); err != nil {
				return rc.writeCanned(cannedJSON(http.StatusServiceUnavailable, err.Error(), name))
			}
			rc.last.remember(hb, t)
		}
	}
	if t.pol != nil && t.pol.RequestTimeout > 0 { // the service's own, set above with the proxy's
		if err := rc.writeDeadline(time.Now().Add(t.pol.RequestTimeout)); err != nil {
			return false
		}
	}
	out := appendRequest(rc.out[:0], b, r, host, path, end, rc.ip)
	rc.out = out

	x.req = out
	res := t.forwardWith(s.ctx, x, x.replay, nil, rawAccReq(p, s.rt, b, r, host, path))
	return rc.finish(t, res, true)
}

// decided is a gateway request's decision made by an event loop, and its
// target (nil when the loop had no state for the service).
type decided struct {
	d Decision
	t *target
}

// serveRouted is serveOne on a gateway listener: the router decides.
func (rc *rawConn) serveRouted(end int, host, path h1.Span) bool {
	s, p, b, r := rc.s, rc.s.p, rc.buf, &rc.req
	var d Decision
	var t *target
	if dc := rc.decided; dc != nil {
		rc.decided = nil
		d, t = dc.d, dc.t
	} else {
		rawRouteHead(&rc.head, &rc.hsrc, b, r, host, path, rc.ip, s.rt.proto == "https", time.Time{})
		d, t = p.decide(s.rt, &rc.head)
		rc.head = Head{}
	}
	if d.Answer != nil {
		return rc.writeCanned(answerCanned(d.Answer))
	}
	if t == nil {
		var err error
		if t, err = p.lookupDecided(s.ctx, &d); err != nil {
			return rc.writeCanned(cannedJSON(http.StatusServiceUnavailable, err.Error(), d.Service))
		}
	}
	if err := rc.writeDeadline(time.Now().Add(requestTimeout(p, d.Policy, t.pol))); err != nil {
		return false
	}
	rc.out = appendGatewayRequest(rc.out[:0], b, r, host, path, d.Path, end, rc.ip, s.rt.proto)
	rc.x.req = rc.out
	res := t.forwardWith(s.ctx, &rc.x, rc.x.replay, d.Policy, rawAccReq(p, s.rt, b, r, host, path))
	return rc.finish(t, res, true)
}

// lastHost remembers a client connection's last request host and its
// target: an HTTP proxy client mostly calls one service.
type lastHost struct {
	host []byte
	t    *target
}

// lookup returns the host of the request parsed into r from b (the
// absolute-form target's authority, else the Host header) and the target
// remembered for it, if any.
func (h *lastHost) lookup(b []byte, r *h1.Request, authority h1.Span) ([]byte, *target) {
	if authority.End == 0 {
		authority = r.Host
	}
	hb := b[authority.Start:authority.End]
	if h.t != nil && bytes.Equal(hb, h.host) {
		return hb, h.t
	}
	return hb, nil
}

func (h *lastHost) remember(host []byte, t *target) {
	h.host = append(h.host[:0], host...)
	h.t = t
}

// appendRequest appends the request parsed into r (its bytes b[:end]) as
// it goes to an instance: origin-form target, the authority of an
// absolute-form target (host, when not empty) as Host (RFC 9112 §3.2.2:
// it replaces whatever Host the client sent), hop-by-hop headers dropped,
// X-Forwarded-For and X-Forwarded-Proto set, the body after the head.
func appendRequest(out, b []byte, r *h1.Request, host, path h1.Span, end int, ip []byte) []byte {
	out = append(out, b[r.Method.Start:r.Method.End]...)
	out = append(out, ' ')
	out = h1.AppendPath(out, b, path)
	out = append(out, " HTTP/1.1\r\n"...)
	for k := 0; k < r.NumHeaders; k++ {
		switch {
		case r.Drop[k]:
		case host.End > host.Start && r.Vals[k] == r.Host:
			out = append(out, b[r.Names[k].Start:r.Names[k].End]...)
			out = append(out, ": "...)
			out = append(out, b[host.Start:host.End]...)
			out = append(out, '\r', '\n')
		default:
			out = append(out, b[r.Names[k].Start:r.Vals[k].End]...)
			out = append(out, '\r', '\n')
		}
	}
	out = append(out, "X-Forwarded-For: "...)
	for i := 0; i < r.NumXFF; i++ {
		out = append(out, b[r.XFF[i].Start:r.XFF[i].End]...)
		out = append(out, ", "...)
	}
	out = append(out, ip...)
	out = append(out, '\r', '\n')
	if !r.HasXFP {
		out = append(out, "X-Forwarded-Proto: http\r\n"...)
	}
	out = append(out, '\r', '\n')
	return append(out, b[r.HeadEnd:end]...)
}

// finish writes the answer for res (the instance's, a fallback's or our
// own) and reports whether the client connection stays open.
func (rc *rawConn) finish(t *target, res result, mayFallback bool) bool {
	p, x := rc.s.p, &rc.x
	fb, cause := t.fallbackFor(res)
	if !mayFallback {
		fb = nil
	}
	if fb != nil && fb.Service != "" {
		if t2, err := p.lookupTarget(rc.s.ctx, fb.Service); err == nil {
			x.discard()
			t.met.fallback(cause)
			res2 := t2.forward(rc.s.ctx, x, x.replay)
			rc.extra = append(append(append(rc.extra[:0], "X-Attache-Fallback: "...), cause...), "\r\nX-Attache-Fallback-Service: "...)
			rc.extra = append(append(rc.extra, t2.name...), '\r', '\n')
			return rc.finish(t2, res2, false)
		}
	}
	if fb != nil && fb.Service != "" {
		fb = nil // the other service is not in the catalog: our own answer
	}
	if res.kind == outAnswered && fb == nil {
		if x.bc != nil {
			return rc.writeAnswer()
		}
		// Cannot happen (forward keeps the answer it returns); a 502
		// rather than a crash if it ever does.
		res = result{kind: outError, err: errAnswerGone, ep: res.ep}
	}
	x.discard()
	return rc.writeCanned(p.cannedFor(t, res, mayFallback))
}

var errAnswerGone = errors.New("proxy: the instance's answer was dropped")

func (rc *rawConn) closeAfter() bool { return rc.req.ConnClose || rc.s.closing.Load() }

// writeCanned writes one of the proxy's own answers.
func (rc *rawConn) writeCanned(c canned) bool {
	closeClient := rc.closeAfter()
	out := appendCanned(rc.out[:0], c, closeClient, rc.x.head)
	rc.out = out
	_, err := rc.c.Write(out)
	return err == nil && !closeClient
}

// appendCanned appends one of the proxy's own answers (without its body
// for a HEAD request).
func appendCanned(out []byte, c canned, closeClient, head bool) []byte {
	out = append(out, "HTTP/1.1 "...)
	out = strconv.AppendInt(out, int64(c.status), 10)
	out = append(out, ' ')
	out = append(out, http.StatusText(c.status)...)
	out = append(out, '\r', '\n')
	for _, kv := range c.hdr {
		out = append(append(append(append(out, kv[0]...), ": "...), kv[1]...), '\r', '\n')
	}
	out = append(out, "Content-Length: "...)
	out = strconv.AppendInt(out, int64(len(c.body)), 10)
	out = append(out, '\r', '\n')
	if closeClient {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, '\r', '\n')
	if !head {
		out = append(out, c.body...)
	}
	return out
}

// writeAnswer copies the instance's answer to the client: the head without
// hop-by-hop headers, then the body with its framing kept (chunks are
// passed on as they come). It reports whether the client connection stays
// open, and gives the instance's connection back when it can be reused.
func (rc *rawConn) writeAnswer() bool {
	x := &rc.x
	bc, r := x.bc, &x.resp
	b := bc.buf
	closeClient := rc.closeAfter()
	bodyless := !r.HasBody(x.head)
	untilClose := !bodyless && r.ContentLength < 0 && !r.Chunked
	if untilClose {
		closeClient = true
	}
	out := appendAnswerHead(rc.out[:0], b, r, closeClient, rc.extra)
	avail := b[r.HeadEnd:x.rn]
	reuse := false
	var err error
	switch {
	case bodyless:
		rc.out = out
		_, err = rc.c.Write(out)
		reuse = !r.Close && len(avail) == 0
	case r.ContentLength >= 0:
		if int64(len(avail)) >= r.ContentLength {
			out = append(out, avail[:r.ContentLength]...)
			rc.out = out
			_, err = rc.c.Write(out)
			reuse = !r.Close && int64(len(avail)) == r.ContentLength
			break
		}
		out = append(out, avail...)
		rc.out = out
		if _, err = rc.c.Write(out); err != nil {
			break
		}
		left := r.ContentLength - int64(len(avail))
		for left > 0 && err == nil {
			n := len(b)
			if int64(n) > left {
				n = int(left)
			}
			var m int
			m, err = bc.c.Read(b[:n])
			if m > 0 {
				left -= int64(m)
				if _, werr := rc.c.Write(b[:m]); werr != nil {
					err = werr
				}
			}
			if err == io.EOF && left > 0 {
				err = io.ErrUnexpectedEOF
			}
		}
		reuse = err == nil && !r.Close
	case r.Chunked:
		var cs h1.ChunkScan
		n, done, serr := cs.Scan(avail)
		out = append(out, avail[:n]...)
		rc.out = out
		if _, err = rc.c.Write(out); err == nil {
			err = serr
		}
		extra := n < len(avail)
		for !done && err == nil {
			var m int
			m, err = bc.c.Read(b)
			if m > 0 {
				n, done, serr = cs.Scan(b[:m])
				extra = n < m
				if _, werr := rc.c.Write(b[:n]); werr != nil {
					err = werr
				} else if serr != nil {
					err = serr
				}
			}
			if err == io.EOF && !done {
				err = io.ErrUnexpectedEOF
			}
		}
		reuse = err == nil && done && !extra && !r.Close
	default: // until the instance closes
		out = append(out, avail...)
		rc.out = out
		_, err = rc.c.Write(out)
		for err == nil {
			var m int
			m, err = bc.c.Read(b)
			if m > 0 {
				if _, werr := rc.c.Write(b[:m]); werr != nil {
					err = werr
				}
			}
		}
		if err == io.EOF {
			err = nil
		}
	}
	x.release(reuse)
	return err == nil && !closeClient
}

// appendAnswerHead appends the head of the instance's answer parsed into r
// (its bytes b) as it goes to the client: hop-by-hop headers dropped,
// Connection: close when the client connection ends after it, extra
// header lines added.
func appendAnswerHead(out, b []byte, r *h1.Response, closeClient bool, extra []byte) []byte {
	out = append(out, "HTTP/1.1 "...)
	out = append(out, b[9:12]...)
	out = append(out, b[r.Reason.Start:r.Reason.End]...)
	out = append(out, '\r', '\n')
	if r.NumHeaders > 0 {
		if !r.Hop {
			out = append(out, b[r.LineStart[0]:r.HeadEnd]...)
			out = trimBlankLine(out)
		} else {
			for k := 0; k < r.NumHeaders; k++ {
				if r.Drop[k] {
					continue
				}
				e := r.HeadEnd
				if k+1 < r.NumHeaders {
					e = r.LineStart[k+1]
				}
				out = append(out, b[r.LineStart[k]:e]...)
			}
			out = trimBlankLine(out)
		}
	}
	if closeClient {
		out = append(out, "Connection: close\r\n"...)
	}
	out = append(out, extra...)
	return append(out, '\r', '\n')
}

func trimBlankLine(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	if n := len(b); n == 0 || b[n-1] != '\n' {
		return append(b, '\r', '\n')
	}
	return b
}

// rawExchange sends a request, already serialised, through an instance's
// raw keepalive pool.
type rawExchange struct {
	p      *Proxy
	req    []byte
	head   bool // a HEAD request: the answer has no body
	replay bool // the request may be sent again
	bc     *bconn
	pool   *bpool
	resp   h1.Response
	rn     int // bytes of the answer in bc.buf
}

func (x *rawExchange) try(ep *endpoint, deadline time.Time) (int, error) {
	p := x.p
	now := time.Now()
	wait := deadline.Sub(now)
	if wait > p.cfg.ConnectTimeout {
		wait = p.cfg.ConnectTimeout
	}
	if wait <= 0 {
		return 0, os.ErrDeadlineExceeded
	}
	bc, err := ep.pool.get(now, wait, wait)
	if err != nil {
		return 0, err
	}
	for attempt := 0; ; attempt++ {
		x.rn = 0
		err := bc.setDeadline(deadline, p.slack)
		if err == nil {
			_, err = bc.c.Write(x.req)
		}
		if err == nil {
			err = x.readHead(bc)
		}
		if err == nil {
			err = x.readShortBody(bc)
		}
		if err == nil {
			x.bc, x.pool = bc, ep.pool
			return x.resp.Status, nil
		}
		// A pooled connection the instance closed while it was idle:
		// once more on a new connection, for requests that may be resent.
		if attempt == 0 && bc.reused && x.rn == 0 && x.replay &&
			(errors.Is(err, io.EOF) || isReset(err)) {
			if bc, err = ep.pool.redial(bc, wait); err != nil {
				return 0, err
			}
			continue
		}
		ep.pool.discard(bc)
		return 0, err
	}
}

// readHead reads the answer's head (skipping interim 1xx answers).
func (x *rawExchange) readHead(bc *bconn) error {
	for {
		if x.rn > 0 {
			n, done, err := scanAnswerHead(bc.buf, x.rn, &x.resp)
			x.rn = n
			if done || err != nil {
				return err
			}
		}
		n, err := bc.c.Read(bc.buf[x.rn:])
		x.rn += n
		if err != nil && n == 0 {
			return err
		}
	}
}

// readShortBody reads the rest of a Content-Length body that fits the
// buffer with its head, as the event loops do: nothing is sent to the
// client before it is whole, so an answer cut short or late is a failed
// try (a 502 or 504, or a retry), not a truncated answer.
func (x *rawExchange) readShortBody(bc *bconn) error {
	r := &x.resp
	if !r.HasBody(x.head) || r.ContentLength < 0 || int64(len(bc.buf)-r.HeadEnd) < r.ContentLength {
		return nil
	}
	for need := r.HeadEnd + int(r.ContentLength); x.rn < need; {
		n, err := bc.c.Read(bc.buf[x.rn:need])
		x.rn += n
		if err != nil && x.rn < need {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

var errHeadTooLarge = errors.New("response head from instance too large")

// scanAnswerHead parses the answer whose first n bytes are in buf into r,
// dropping interim 1xx answers (it returns how many bytes are left). done:
// r holds a final answer's head.
func scanAnswerHead(buf []byte, n int, r *h1.Response) (int, bool, error) {
	for n > 0 {
		err := h1.ParseResponse(buf[:n], r)
		if err == h1.ErrIncomplete {
			if n == len(buf) {
				return n, false, errHeadTooLarge
			}
			return n, false, nil
		}
		if err != nil {
			return n, false, err
		}
		if r.Status >= 200 {
			return n, true, nil
		}
		if r.Status == http.StatusSwitchingProtocols {
			return n, false, h1.ErrBadResponse
		}
		n = copy(buf, buf[r.HeadEnd:n])
	}
	return n, false, nil
}

// discard drops an answer that will not be used.
func (x *rawExchange) discard() {
	if x.bc == nil {
		return
	}
	r := &x.resp
	full := !r.HasBody(x.head) && x.rn == r.HeadEnd ||
		r.ContentLength >= 0 && int64(x.rn-r.HeadEnd) == r.ContentLength
	x.release(full && !r.Close)
}

func (x *rawExchange) release(reuse bool) {
	if x.bc == nil {
		return
	}
	if reuse {
		x.pool.put(x.bc, time.Now())
	} else {
		x.pool.discard(x.bc)
	}
	x.bc, x.pool = nil, nil
}
