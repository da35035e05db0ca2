// Package h2 is an HTTP/2 server (RFC 9113) for the gateway's TLS
// listeners whose idle connections hold no goroutine and no buffer, as an
// nginx worker holds its idle HTTP/2 connections.
//
// Why our own: net/http's HTTP/2 server keeps two goroutines per
// connection for its whole life (a reader and a serve loop) with their
// stacks, its framer, a write scheduler and per-stream state: an idle
// HTTP/2 client cost the gateway 1.65x what it costs nginx. Here a
// connection with no stream open and nothing to write gives back its
// reader, framer and write buffer and is offered to Server.Park (the
// proxy's epoll parker); what it keeps is crypto/tls's state, the client's
// HPACK table and this package's Conn. The wire format itself is
// golang.org/x/net/http2's Framer and hpack (frames, padding, header
// blocks with their CONTINUATIONs, field validation, the header list
// limit); this package is the connection's state machine: streams, flow
// control, settings, errors, and the handler's http.Request and
// http.ResponseWriter. It is checked against net/http's server by a
// differential fuzzer and by h2spec (the package's tests).
//
// Goroutines. One goroutine at a time reads a connection's frames and acts
// on them (the serving goroutine; none while parked); each request's
// handler runs on a goroutine of its own. Writes go to the socket under
// the connection's write lock, from the handler that has something to
// send, or from the serving goroutine for control frames (a SETTINGS or
// PING acknowledgement, a WINDOW_UPDATE, RST_STREAM, GOAWAY). A client
// that does not read its answers therefore stalls its own connection's
// reading (no queue grows) until WriteTimeout closes it.
//
// Limits (hostile clients): MaxConcurrentStreams handlers at once per
// connection (a stream the client reset keeps counting until its handler
// returns, so rapid resets cannot start unbounded work, and a client
// whose streams keep being refused is sent away); the header list at most
// MaxHeaderBytes (a 431 answer; a header block far over it closes the
// connection before it is decoded); what the client may send unread at
// most 1 MiB per connection, all streams together (flow control); each
// frame, once begun, within FrameTimeout; no stream for IdleTimeout:
// GOAWAY and close.
package h2

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Server serves HTTP/2 connections handed to it (ServeConn). The zero
// value of each field but Handler means its default.
type Server struct {
	Handler http.Handler
	// MaxConcurrentStreams is SETTINGS_MAX_CONCURRENT_STREAMS: handlers
	// at once per connection (default 128).
	MaxConcurrentStreams uint32
	// MaxHeaderBytes bounds a request's header list as HTTP/2 counts it
	// (SETTINGS_MAX_HEADER_LIST_SIZE; default 64 KiB); over it: 431.
	MaxHeaderBytes int
	// IdleTimeout: a connection with no stream for this long gets GOAWAY
	// and is closed (default 75 s, nginx's keepalive_timeout).
	IdleTimeout time.Duration
	// FrameTimeout: the client's preface, and each frame once its first
	// byte came, must arrive whole within it (default 10 s).
	FrameTimeout time.Duration
	// WriteTimeout bounds a write to the client and a wait for its
	// flow-control window (default 30 s).
	WriteTimeout time.Duration
	// ParkAfter: an idle connection waits this long for a frame with its
	// goroutine before Park is offered it (default 50 ms).
	ParkAfter time.Duration
	// Park, when set, takes an idle connection with no goroutine: true
	// means it did, and will call Conn.Resume when the socket has bytes
	// (or is closed) or Conn.Close (its idle timeout, a drain). False: the
	// connection keeps its goroutine.
	Park func(*Conn) bool

	mu      sync.Mutex
	conns   map[*Conn]struct{} // with a goroutine
	gone    sync.Cond          // on mu: conns emptied
	closing bool
}

// Settings the server grants and defaults.
const (
	defaultMaxStreams   = 128
	defaultMaxHeader    = 64 << 10
	defaultIdleTimeout  = 75 * time.Second
	defaultFrameTimeout = 10 * time.Second
	defaultWriteTimeout = 30 * time.Second
	defaultParkAfter    = 50 * time.Millisecond

	streamWindow = 1 << 20  // SETTINGS_INITIAL_WINDOW_SIZE (as net/http: a client may send a 1 MiB body before the answer)
	connWindow   = 1 << 20  // the connection's window, raised at the start
	readFrame    = 16 << 10 // SETTINGS_MAX_FRAME_SIZE: the default, bigger frames are refused
	maxRefused   = 1000     // streams refused (over the limit) before the connection is sent away
	maxWindow    = 1<<31 - 1
)

func (s *Server) maxStreams() uint32 {
	if s.MaxConcurrentStreams == 0 {
		return defaultMaxStreams
	}
	return s.MaxConcurrentStreams
}

func (s *Server) maxHeader() uint32 {
	if s.MaxHeaderBytes <= 0 {
		return defaultMaxHeader
	}
	return uint32(s.MaxHeaderBytes)
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Conn is one client connection.
type Conn struct {
	srv    *Server
	nc     net.Conn
	tls    *tls.ConnectionState // nil: not TLS
	remote string
	dec    *hpack.Decoder // the client's header table: kept across parkings

	// The serving goroutine's; nil while parked.
	br *bufio.Reader
	fr *http2.Framer

	mu           sync.Mutex
	cond         sync.Cond // on mu: a window grew, a body got data, something ended
	streams      map[uint32]*stream
	handlers     uint32 // handler goroutines running
	maxID        uint32 // the highest stream the client opened
	refused      int
	resets       [8]uint32 // the streams we reset last: frames on them are ignored (RFC 9113 5.1)
	nreset       int
	peerMaxFrame uint32
	peerWindow   int32 // the client's SETTINGS_INITIAL_WINDOW_SIZE
	sendWin      int32 // the connection's send window
	recvWin      int32 // what the client may still send on the connection
	recvRefund   int32 // read by handlers (or discarded), not yet given back
	goAway       bool  // GOAWAY sent, or received: no new stream; closed once idle
	draining     bool  // drain's first GOAWAY sent
	settingsAck  bool  // the client acknowledged our SETTINGS (we send one)
	closed       bool
	peeking      bool      // the serving goroutine waits for a frame's first byte
	idleEnd      time.Time // while idle: when IdleTimeout ends
	err          error     // why the connection ended
	failed       bool      // a connection error's GOAWAY was sent

	wmu  sync.Mutex // one writer at a time; what follows
	wfr  *http2.Framer
	wbuf []byte
	enc  *hpack.Encoder
	hbuf []byte
}

var (
	errClosed       = errors.New("h2: connection closed")
	errStreamClosed = errors.New("h2: stream closed")
	errWriteTimeout = errors.New("h2: timed out waiting for the client's flow-control window")
)

// ServeConn serves nc, which has been through its TLS handshake (if any,
// with "h2" negotiated) or speaks HTTP/2 with prior knowledge, on the
// calling goroutine until it ends or is parked.
func (s *Server) ServeConn(nc net.Conn) {
	c := &Conn{srv: s, nc: nc, remote: nc.RemoteAddr().String(), peerMaxFrame: readFrame,
		peerWindow: 65535, sendWin: 65535, recvWin: connWindow, streams: map[uint32]*stream{}}
	c.cond.L = &c.mu
	if tc, ok := nc.(*tls.Conn); ok {
		st := tc.ConnectionState()
		c.tls = &st
	}
	c.dec = hpack.NewDecoder(4096, nil)
	if !s.track(c) {
		nc.Close()
		return
	}
	c.serve(true)
}

// Resume serves a parked connection again, on a goroutine of its own.
func (c *Conn) Resume() {
	if !c.srv.track(c) {
		c.Close()
		return
	}
	go c.serve(false)
}

// NetConn is the connection's socket (with TLS).
func (c *Conn) NetConn() net.Conn { return c.nc }

// IdleDeadline is when a parked connection's idle timeout ends.
func (c *Conn) IdleDeadline() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idleEnd
}

// Close sends GOAWAY (no error) and closes the connection; for a parked
// connection (idle timeout, drain). The GOAWAY is a courtesy: a client
// whose socket buffer is full does not hold it up (100 ms).
func (c *Conn) Close() {
	c.mu.Lock()
	c.goAway = true
	last := c.maxID
	c.mu.Unlock()
	c.wmu.Lock()
	if c.writer().WriteGoAway(last, http2.ErrCodeNo, nil) == nil {
		_ = c.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, _ = c.nc.Write(c.wbuf)
	}
	c.wfr, c.wbuf = nil, nil
	c.wmu.Unlock()
	c.close(errClosed)
}

func (s *Server) track(c *Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	if s.conns == nil {
		s.conns = map[*Conn]struct{}{}
		s.gone.L = &s.mu
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c *Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	if len(s.conns) == 0 && s.gone.L != nil {
		s.gone.Broadcast()
	}
	s.mu.Unlock()
}

// Shutdown sends GOAWAY to every connection with a goroutine, lets their
// streams finish and returns when they have closed; at ctx's end it closes
// what is left. Parked connections are Park's to close. New connections
// (ServeConn, Resume) are closed at once from the start.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	if s.gone.L == nil {
		s.gone.L = &s.mu
	}
	conns := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
	done := make(chan struct{})
	go func() {
		s.mu.Lock()
		for len(s.conns) > 0 {
			s.gone.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		c.close(errClosed)
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

// drain shuts the connection down gracefully, in two steps (RFC 9113
// 6.8): a GOAWAY naming the highest stream id possible, and a PING; the
// streams the client opened before it read that are still served. When
// the PING comes back (a round trip later, at most drainWait), a GOAWAY
// naming the last stream opened; the serving goroutine closes the
// connection once those are done. (With one GOAWAY, a request the client
// sent just then is refused, and a client that does not retry loses it.)
func (c *Conn) drain() {
	c.mu.Lock()
	already := c.goAway || c.draining
	c.draining = true
	c.mu.Unlock()
	if already {
		return
	}
	_ = c.writeControl(func(w *http2.Framer) error {
		if err := w.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil); err != nil {
			return err
		}
		return w.WritePing(false, drainPing)
	})
	time.AfterFunc(drainWait, c.drained)
}

// The PING of drain, and how long it is waited for.
var drainPing = [8]byte{'a', 't', 't', 'a', 'c', 'h', 'e', 0}

const drainWait = time.Second

// drained is drain's second step.
func (c *Conn) drained() {
	c.mu.Lock()
	already := c.goAway || c.closed
	c.goAway = true
	c.mu.Unlock()
	if !already {
		c.writeGoAway(http2.ErrCodeNo)
	}
	_ = c.nc.SetReadDeadline(time.Now()) // the serving goroutine looks again
}

// serve is the serving goroutine.
func (c *Conn) serve(first bool) {
	s := c.srv
	parked := false
	defer func() {
		if !parked {
			c.lingerClose()
			s.untrack(c)
		}
	}()
	c.newReader()
	if first && !c.start() {
		return
	}
	for {
		if c.br.Buffered() == 0 {
			ok, park := c.await()
			if park {
				c.br, c.fr = nil, nil
				c.wmu.Lock()
				err := c.flushLocked()
				c.wfr, c.wbuf, c.hbuf = nil, nil, nil
				c.wmu.Unlock()
				if err != nil {
					return
				}
				// Untracked before it is offered: the parker may resume it
				// (tracked again) before Park returns.
				s.untrack(c)
				if s.Park != nil && s.Park(c) {
					parked = true
					return
				}
				if !s.track(c) { // shutting down: GOAWAY and closed, as a parked one
					c.Close()
					parked = true // untracked already
					return
				}
				c.newReader()
				continue
			}
			if !ok {
				return
			}
			if c.br.Buffered() == 0 {
				continue
			}
		}
		_ = c.nc.SetReadDeadline(time.Now().Add(orDefault(s.FrameTimeout, defaultFrameTimeout)))
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !c.readError(err) {
				return
			}
			continue
		}
		if err := c.process(f); err != nil {
			if !c.frameError(err) {
				return
			}
		}
	}
}

// newReader gives the serving goroutine its reader and framer (given back
// at a parking; the client's HPACK table, c.dec, stays).
func (c *Conn) newReader() {
	c.br = bufio.NewReaderSize(c.nc, 4<<10)
	c.fr = http2.NewFramer(nil, c.br)
	c.fr.SetMaxReadFrameSize(readFrame)
	c.fr.MaxHeaderListSize = c.srv.maxHeader()
	c.fr.ReadMetaHeaders = c.dec
	c.fr.SetReuseFrames()
}

// start sends the server's preface and reads the client's: the magic
// string, then a SETTINGS frame.
func (c *Conn) start() bool {
	s := c.srv
	c.wmu.Lock()
	w := c.writer()
	err := w.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: s.maxStreams()},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: s.maxHeader()},
	)
	if err == nil {
		err = w.WriteWindowUpdate(0, connWindow-65535)
	}
	if err == nil {
		err = c.flushLocked()
	}
	c.wmu.Unlock()
	if err != nil {
		c.err = err
		return false
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(orDefault(s.FrameTimeout, defaultFrameTimeout)))
	var magic [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.br, magic[:]); err != nil || string(magic[:]) != http2.ClientPreface {
		c.err = errors.New("h2: bad client preface")
		return false
	}
	f, err := c.fr.ReadFrame()
	if err != nil {
		c.readError(err)
		return false
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		c.fail(http2.ErrCodeProtocol, "h2: the client's preface is not a SETTINGS frame")
		return false
	}
	if err := c.process(f); err != nil {
		return c.frameError(err)
	}
	return true
}

// await waits for the next frame's first byte. ok false: the connection
// ends; park: it is idle and may be parked.
func (c *Conn) await() (ok, park bool) {
	s := c.srv
	for {
		now := time.Now()
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return false, false
		}
		idle := c.idleLocked()
		if idle && c.goAway {
			c.mu.Unlock()
			return false, false
		}
		var d time.Time
		if idle {
			if c.idleEnd.IsZero() {
				c.idleEnd = now.Add(orDefault(s.IdleTimeout, defaultIdleTimeout))
			}
			if !now.Before(c.idleEnd) {
				c.goAway = true
				c.mu.Unlock()
				c.writeGoAway(http2.ErrCodeNo)
				return false, false
			}
			d = c.idleEnd
			if s.Park != nil {
				if p := now.Add(orDefault(s.ParkAfter, defaultParkAfter)); p.Before(d) {
					d = p
				}
			}
		}
		c.peeking = true
		_ = c.nc.SetReadDeadline(d)
		c.mu.Unlock()
		_, err := c.br.Peek(1)
		c.mu.Lock()
		c.peeking = false
		idle = c.idleLocked()
		c.mu.Unlock()
		if err == nil {
			return true, false
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			c.err = err
			return false, false
		}
		if idle && s.Park != nil && c.br.Buffered() == 0 && time.Now().Before(c.IdleDeadline()) {
			c.mu.Lock()
			goAway := c.goAway || c.draining
			c.mu.Unlock()
			if !goAway {
				return true, true
			}
		}
	}
}

// streamIdleLocked: stream id is idle (RFC 9113 5.1), a frame on it other
// than HEADERS or PRIORITY is a connection error: a client's stream it has
// not opened, or any of ours (we push none); mu held.
func (c *Conn) streamIdleLocked(id uint32) bool { return id > c.maxID || id%2 == 0 }

// idleLocked: no stream, no handler; mu held.
func (c *Conn) idleLocked() bool { return len(c.streams) == 0 && c.handlers == 0 }

// becameIdle is called (mu held) when a stream ends: a serving goroutine
// waiting for a frame looks again, so as to park.
func (c *Conn) becameIdleLocked() {
	if c.idleLocked() && c.peeking {
		_ = c.nc.SetReadDeadline(time.Now())
	}
}

// readError handles an error of ReadFrame; false: the connection ends.
func (c *Conn) readError(err error) bool {
	var se http2.StreamError
	switch {
	case errors.As(err, &se):
		return c.frameError(se)
	case errors.Is(err, http2.ErrFrameTooLarge):
		c.fail(http2.ErrCodeFrameSize, "h2: frame too large")
		return false
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.fail(http2.ErrCode(ce), "h2: "+ce.Error())
		return false
	}
	c.err = err // the socket: closed, reset, timed out mid-frame
	return false
}

// frameError acts on an error found acting on a frame: a stream error
// resets that stream, a connection error ends the connection.
func (c *Conn) frameError(err error) bool {
	var se http2.StreamError
	if errors.As(err, &se) {
		c.resetStream(se.StreamID, se.Code)
		return true
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.fail(http2.ErrCode(ce), "h2: "+ce.Error())
		return false
	}
	c.err = err
	return false
}

// fail sends GOAWAY with code and ends the connection.
func (c *Conn) fail(code http2.ErrCode, why string) {
	c.mu.Lock()
	c.goAway = true
	c.mu.Unlock()
	c.writeGoAway(code)
	c.err = errors.New(why)
	c.failed = true
}

// lingerClose closes the connection; after an error's GOAWAY, what the
// client still sends is read and dropped for up to a second first (as
// net/http does): closing a socket with unread bytes sends a TCP reset,
// which can destroy the GOAWAY before the client reads it.
func (c *Conn) lingerClose() {
	if c.failed && c.br != nil {
		_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(c.br, 1<<20))
	}
	c.close(c.err)
}

// close closes the socket and ends every stream; once.
func (c *Conn) close(err error) {
	if err == nil {
		err = errClosed
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	for id, st := range c.streams {
		st.endLocked(errClosed)
		delete(c.streams, id)
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	_ = c.nc.Close()
}

// process acts on one frame from the client.
func (c *Conn) process(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			if f.Data == drainPing {
				c.drained()
			}
			return nil
		}
		return c.writeControl(func(w *http2.Framer) error { return w.WritePing(true, f.Data) })
	case *http2.RSTStreamFrame:
		return c.onReset(f)
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
		}
		return nil
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goAway = true
		c.mu.Unlock()
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil // unknown frame types are ignored
}

func (c *Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		// As net/http: an acknowledgement of SETTINGS we did not send
		// is a connection error.
		c.mu.Lock()
		dup := c.settingsAck
		c.settingsAck = true
		c.mu.Unlock()
		if dup {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	// Repeated settings are applied in order (RFC 9113 6.5.3; net/http
	// refuses them); a frame carries at most 100.
	if f.NumSettings() > 100 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int32(s.Val) - c.peerWindow
			for _, st := range c.streams {
				if int64(st.sendWin)+int64(delta) > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				st.sendWin += delta
			}
			c.peerWindow = int32(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		}
		return nil
	})
	c.cond.Broadcast()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.writeControl(func(w *http2.Framer) error { return w.WriteSettingsAck() })
}

func (c *Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		if int64(c.sendWin)+int64(f.Increment) > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		c.sendWin += int32(f.Increment)
		c.cond.Broadcast()
		return nil
	}
	if c.streamIdleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	st := c.streams[f.StreamID]
	if st == nil {
		return nil
	}
	if int64(st.sendWin)+int64(f.Increment) > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.sendWin += int32(f.Increment)
	c.cond.Broadcast()
	return nil
}

func (c *Conn) onReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.streamIdleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if st := c.streams[f.StreamID]; st != nil {
		st.endLocked(errStreamClosed)
		delete(c.streams, f.StreamID)
		c.refundLocked(st)
		c.cond.Broadcast()
		c.becameIdleLocked()
	}
	return nil
}

func (c *Conn) onData(f *http2.DataFrame) error {
	id, size := f.StreamID, int32(f.Length)
	c.mu.Lock()
	if c.streamIdleLocked(id) {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if size > c.recvWin {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvWin -= size
	st := c.streams[id]
	if st == nil && c.wasResetLocked(id) { // on its way when we reset it
		c.recvRefund += size
		c.mu.Unlock()
		c.refund()
		return nil
	}
	if st == nil || st.remoteDone {
		// A closed stream, or one the client ended (as net/http: the
		// window is the connection's again, and the stream gets
		// STREAM_CLOSED).
		c.recvRefund += size
		c.mu.Unlock()
		c.refund()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if size > st.recvWin {
		c.recvRefund += size
		c.mu.Unlock()
		c.refund()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	st.recvWin -= size
	data := f.Data()
	if pad := size - int32(len(data)); pad > 0 { // padding is given back at once
		c.recvRefund += pad
		st.refund += pad
	}
	st.got += int64(len(data))
	if st.declared >= 0 && (st.got > st.declared || f.StreamEnded() && st.got != st.declared) {
		c.recvRefund += int32(len(data))
		c.mu.Unlock()
		c.refund()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	if st.bodyClosed {
		c.recvRefund += int32(len(data))
		st.refund += int32(len(data))
	} else if len(data) > 0 {
		st.body = append(st.body, data...)
	}
	if f.StreamEnded() {
		st.remoteDone = true
		if st.bodyErr == nil {
			st.bodyErr = io.EOF
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	c.refund()
	return nil
}

// onHeaders opens a stream, or ends one with trailers.
func (c *Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 != 1 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		defer c.mu.Unlock()
		switch {
		case st.remoteDone && st.localDone: // closed, its handler not yet returned
			return http2.ConnectionError(http2.ErrCodeStreamClosed)
		case st.remoteDone:
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		}
		return c.trailersLocked(st, f)
	}
	if id <= c.maxID {
		reset := c.wasResetLocked(id)
		c.mu.Unlock()
		if reset { // on its way when we reset the stream
			return nil
		}
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.maxID = id
	if c.goAway { // after GOAWAY, new streams are ignored
		c.mu.Unlock()
		return nil
	}
	if c.handlers >= c.srv.maxStreams() {
		c.refused++
		refused := c.refused
		c.mu.Unlock()
		if refused > maxRefused {
			return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream}
	}
	c.mu.Unlock()
	if f.HasPriority() && f.Priority.StreamDep == id {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	req, st, err := c.newRequest(f)
	if err != nil {
		return err
	}
	if !f.Truncated && checkHeaders(req.Header) != nil { // malformed (RFC 9113 8.2.2)
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errClosed
	}
	c.streams[id] = st
	c.handlers++
	c.idleEnd = time.Time{}
	c.mu.Unlock()
	h := c.srv.Handler
	if f.Truncated {
		h = http.HandlerFunc(headerTooLarge)
	}
	go c.runHandler(st, h, req)
	return nil
}

// refund gives the client back the window of what was read, discarded or
// padding, a quarter of the window at a time.
func (c *Conn) refund() {
	c.mu.Lock()
	n := c.recvRefund
	if n < connWindow/4 || c.closed {
		c.mu.Unlock()
		return
	}
	c.recvRefund = 0
	c.recvWin += n
	c.mu.Unlock()
	_ = c.writeControl(func(w *http2.Framer) error { return w.WriteWindowUpdate(0, uint32(n)) })
}

// refundLocked gives the connection's window back for what st buffered
// unread: the stream ended. mu held.
func (c *Conn) refundLocked(st *stream) {
	c.recvRefund += int32(len(st.body))
	st.body = nil
}

// noteResetLocked remembers that we reset id: the client may have sent
// frames on it before it learns, which are ignored, not answered
// (RFC 9113 5.1, "closed"). mu held.
func (c *Conn) noteResetLocked(id uint32) {
	c.resets[c.nreset%len(c.resets)] = id
	c.nreset++
}

func (c *Conn) wasResetLocked(id uint32) bool {
	for _, r := range c.resets {
		if r == id && id != 0 {
			return true
		}
	}
	return false
}

// resetStream sends RST_STREAM for id and ends the stream.
func (c *Conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	c.noteResetLocked(id)
	if st := c.streams[id]; st != nil {
		st.endLocked(errStreamClosed)
		delete(c.streams, id)
		c.refundLocked(st)
		c.cond.Broadcast()
		c.becameIdleLocked()
	}
	c.mu.Unlock()
	_ = c.writeControl(func(w *http2.Framer) error { return w.WriteRSTStream(id, code) })
}

// writer is the write framer, made when first needed after a parking;
// wmu held.
func (c *Conn) writer() *http2.Framer {
	if c.wfr == nil {
		c.wfr = http2.NewFramer((*bufWriter)(c), nil)
	}
	return c.wfr
}

// bufWriter gathers the frames written under wmu until flushLocked.
type bufWriter Conn

func (b *bufWriter) Write(p []byte) (int, error) {
	b.wbuf = append(b.wbuf, p...)
	return len(p), nil
}

// flushLocked writes what the frames gathered to the socket; wmu held.
func (c *Conn) flushLocked() error {
	if len(c.wbuf) == 0 {
		return nil
	}
	_ = c.nc.SetWriteDeadline(time.Now().Add(orDefault(c.srv.WriteTimeout, defaultWriteTimeout)))
	_, err := c.nc.Write(c.wbuf)
	if cap(c.wbuf) > 64<<10 {
		c.wbuf = nil
	} else {
		c.wbuf = c.wbuf[:0]
	}
	if err != nil {
		c.close(err)
	}
	return err
}

// writeControl writes one frame (or several) and flushes.
func (c *Conn) writeControl(fn func(*http2.Framer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := fn(c.writer()); err != nil {
		return err
	}
	return c.flushLocked()
}

func (c *Conn) writeGoAway(code http2.ErrCode) {
	c.mu.Lock()
	last := c.maxID
	c.mu.Unlock()
	_ = c.writeControl(func(w *http2.Framer) error { return w.WriteGoAway(last, code, nil) })
}
