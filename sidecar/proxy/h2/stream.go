package h2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// stream is one request and its answer. Its fields are the connection's
// mu's.
type stream struct {
	c      *Conn
	id     uint32
	ctx    context.Context
	cancel context.CancelFunc

	sendWin    int32 // what we may still send
	recvWin    int32 // what the client may still send
	refund     int32 // read by the handler, not yet given back
	remoteDone bool  // the client's END_STREAM came
	localDone  bool  // our END_STREAM is written (or being written)
	gone       bool  // reset, or the connection ended: writes fail
	goneErr    error

	// The request's body: received, not yet read.
	body       []byte
	bodyErr    error // after the body: io.EOF, or why it ended
	bodyClosed bool  // the handler closed it: what comes is discarded
	declared   int64 // Content-Length, -1: none
	got        int64
	trailer    http.Header // the request's trailers, as declared
	expect100  bool        // 100 Continue is sent at the body's first read
}

// endLocked ends the stream for its handler: its body reads and its
// writes fail with err. mu held.
func (st *stream) endLocked(err error) {
	if !st.gone {
		st.gone, st.goneErr = true, err
		if st.bodyErr == nil {
			st.bodyErr = err
		}
		st.cancel()
	}
}

// newRequest builds the handler's request from the HEADERS of a new
// stream, as net/http's server does (a malformed one is a stream error).
func (c *Conn) newRequest(f *http2.MetaHeadersFrame) (*http.Request, *stream, error) {
	id := f.StreamID
	bad := http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	var method, scheme, authority, path string
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			method = hf.Value
		case ":scheme":
			scheme = hf.Value
		case ":authority":
			authority = hf.Value
		case ":path":
			path = hf.Value
		case ":protocol": // extended CONNECT is not offered
			return nil, nil, bad
		}
	}
	connect := method == "CONNECT"
	if connect {
		if path != "" || scheme != "" || authority == "" {
			return nil, nil, bad
		}
	} else if method == "" || path == "" || scheme != "https" && scheme != "http" {
		return nil, nil, bad
	}
	hdr := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		k := canonicalKey(hf.Name)
		hdr[k] = append(hdr[k], hf.Value)
	}
	// A Host field may come, once, and must then name what :authority
	// names (RFC 9113 8.3.1); the handler has it as r.Host, not in the
	// header, as net/http gives it.
	if host := hdr["Host"]; len(host) == 1 {
		if authority == "" {
			authority = host[0]
		} else if host[0] != authority {
			return nil, nil, bad
		}
		delete(hdr, "Host")
	} else if len(host) > 1 {
		return nil, nil, bad
	}
	if authority != "" && !httpguts.ValidHostHeader(authority) {
		return nil, nil, bad
	}
	expect100 := httpguts.HeaderValuesContainsToken(hdr["Expect"], "100-continue")
	if expect100 {
		delete(hdr, "Expect")
	}
	if cookies := hdr["Cookie"]; len(cookies) > 1 {
		hdr["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	var trailer http.Header
	for _, v := range hdr["Trailer"] {
		for _, k := range strings.Split(v, ",") {
			switch k = textproto.CanonicalMIMEHeaderKey(textproto.TrimString(k)); k {
			case "Transfer-Encoding", "Trailer", "Content-Length":
			default:
				if trailer == nil {
					trailer = http.Header{}
				}
				trailer[k] = nil
			}
		}
	}
	delete(hdr, "Trailer")
	if strings.IndexByte(authority, '@') >= 0 {
		return nil, nil, bad // RFC 9113 8.3.1: no userinfo
	}
	var u *url.URL
	uri := path
	if connect {
		u, uri = &url.URL{Host: authority}, authority
	} else {
		// :path is an absolute path (and query), or "*" (RFC 9113 8.3.1):
		// not an absolute URI, which url.ParseRequestURI would take.
		if path[0] != '/' && path != "*" {
			return nil, nil, bad
		}
		var err error
		if u, err = url.ParseRequestURI(path); err != nil {
			return nil, nil, bad
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	st := &stream{c: c, id: id, ctx: ctx, cancel: cancel, recvWin: streamWindow, declared: -1, trailer: trailer, expect100: expect100}
	c.mu.Lock()
	st.sendWin = c.peerWindow
	c.mu.Unlock()
	r := &http.Request{Method: method, URL: u, RemoteAddr: c.remote, Header: hdr, RequestURI: uri,
		Proto: "HTTP/2.0", ProtoMajor: 2, Host: authority, Trailer: trailer, Body: http.NoBody}
	if scheme == "https" {
		r.TLS = c.tls
	}
	if f.StreamEnded() {
		st.remoteDone, st.bodyErr = true, io.EOF
	} else {
		r.ContentLength = -1
		if vv, ok := hdr["Content-Length"]; ok {
			if n, err := strconv.ParseUint(vv[0], 10, 63); err == nil {
				r.ContentLength = int64(n)
			} else {
				r.ContentLength = 0
			}
			st.declared = r.ContentLength
		}
		r.Body = &requestBody{st: st}
	}
	return r.WithContext(ctx), st, nil
}

// connHeaders may not be sent in HTTP/2 (RFC 9113 8.2.2).
var connHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"}

func checkHeaders(h http.Header) error {
	for _, k := range connHeaders {
		if _, ok := h[k]; ok {
			return fmt.Errorf("request header %q is not valid in HTTP/2", k)
		}
	}
	if te := h["Te"]; len(te) > 0 && (len(te) > 1 || te[0] != "trailers" && te[0] != "") {
		return errors.New(`request header "TE" may only be "trailers" in HTTP/2`)
	}
	return nil
}

func headerTooLarge(w http.ResponseWriter, r *http.Request) {
	const body = "<h1>HTTP Error 431</h1><p>Request Header Field(s) Too Large</p>"
	w.WriteHeader(http.StatusRequestHeaderFieldsTooLarge)
	_, _ = io.WriteString(w, body)
}

// runHandler is a stream's goroutine: the handler, then the end of its
// answer.
func (c *Conn) runHandler(st *stream, h http.Handler, r *http.Request) {
	w := &responseWriter{st: st, req: r, hdr: http.Header{}}
	defer func() {
		if p := recover(); p != nil {
			// As net/http: a handler's panic resets its stream (and
			// ErrAbortHandler is how a handler asks for that).
			c.resetStream(st.id, http2.ErrCodeInternal)
		} else {
			_ = w.finish()
		}
		c.streamDone(st)
	}()
	h.ServeHTTP(w, r)
}

// streamDone: the handler returned and its answer is out (or the stream
// was reset). A client still sending a body that will not be read is
// told to stop (RST_STREAM NO_ERROR, RFC 9113 8.1, as net/http does). (We
// tried discarding the rest instead, as nginx does: curl 7.88, having the
// whole answer, then stops sending and spins until its own timeout, while
// the reset fails it at once.)
func (c *Conn) streamDone(st *stream) {
	c.mu.Lock()
	stop := false
	if c.streams[st.id] == st {
		stop = !st.remoteDone && !st.gone
		if stop {
			c.noteResetLocked(st.id)
		}
		st.endLocked(errStreamClosed)
		delete(c.streams, st.id)
		c.refundLocked(st)
	}
	st.bodyClosed = true
	st.cancel()
	c.handlers--
	c.cond.Broadcast()
	c.becameIdleLocked()
	closed := c.closed
	c.mu.Unlock()
	if stop && !closed {
		_ = c.writeControl(func(w *http2.Framer) error { return w.WriteRSTStream(st.id, http2.ErrCodeNo) })
	}
	c.refund()
}

// trailersLocked ends st's body with the client's trailers; mu held.
func (c *Conn) trailersLocked(st *stream, f *http2.MetaHeadersFrame) error {
	bad := http2.StreamError{StreamID: st.id, Code: http2.ErrCodeProtocol}
	if !f.StreamEnded() || len(f.PseudoFields()) > 0 || st.declared >= 0 && st.got != st.declared {
		return bad
	}
	// As net/http: with trailers declared, each field must be one that may
	// be a trailer, and only the declared ones reach the handler; with none
	// declared, the trailers are ignored.
	if st.trailer != nil {
		for _, hf := range f.RegularFields() {
			k := canonicalKey(hf.Name)
			if !httpguts.ValidTrailerHeader(k) {
				return bad
			}
			if _, ok := st.trailer[k]; ok {
				st.trailer[k] = append(st.trailer[k], hf.Value)
			}
		}
	}
	st.remoteDone = true
	if st.bodyErr == nil {
		st.bodyErr = io.EOF
	}
	c.cond.Broadcast()
	return nil
}

// requestBody is a stream's request body.
type requestBody struct{ st *stream }

func (b *requestBody) Read(p []byte) (int, error) {
	st := b.st
	c := st.c
	c.mu.Lock()
	if st.expect100 {
		st.expect100 = false
		c.mu.Unlock()
		_ = c.writeHeaders(st, 100, nil, false, nil, true)
		c.mu.Lock()
	}
	for len(st.body) == 0 && st.bodyErr == nil && !st.bodyClosed {
		c.cond.Wait()
	}
	if st.bodyClosed {
		c.mu.Unlock()
		return 0, errors.New("h2: read of a closed body")
	}
	if len(st.body) == 0 {
		err := st.bodyErr
		c.mu.Unlock()
		return 0, err
	}
	n := copy(p, st.body)
	st.body = st.body[n:]
	if len(st.body) == 0 {
		st.body = nil
	}
	st.refund += int32(n)
	c.recvRefund += int32(n)
	var inc int32
	if !st.remoteDone && !st.gone && st.refund >= streamWindow/4 {
		inc, st.refund = st.refund, 0
		st.recvWin += inc
	}
	c.mu.Unlock()
	if inc > 0 {
		_ = c.writeControl(func(w *http2.Framer) error { return w.WriteWindowUpdate(st.id, uint32(inc)) })
	}
	c.refund()
	return n, nil
}

// Close discards the rest of the body (its window is given back as it
// comes).
func (b *requestBody) Close() error {
	st := b.st
	c := st.c
	c.mu.Lock()
	st.bodyClosed = true
	c.recvRefund += int32(len(st.body))
	st.body = nil
	c.cond.Broadcast()
	c.mu.Unlock()
	c.refund()
	return nil
}

// responseWriter is a stream's http.ResponseWriter. The body is gathered
// up to 4 KiB (or a Flush) before it is sent, so that a small answer goes
// out as one HEADERS and one DATA frame.
type responseWriter struct {
	st          *stream
	req         *http.Request
	hdr         http.Header
	snap        http.Header // the header as of WriteHeader
	status      int
	sentHeader  bool
	wroteHeader bool
	buf         []byte
	written     int64
	ended       bool // END_STREAM sent with the header
	done        bool
}

const bodyChunk = 4 << 10

func (w *responseWriter) Header() http.Header { return w.hdr }

func (w *responseWriter) WriteHeader(code int) {
	if w.wroteHeader || w.done {
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code >= 100 && code < 200 && code != http.StatusSwitchingProtocols {
		_ = w.st.c.writeHeaders(w.st, code, w.hdr, false, nil, true) // informational
		return
	}
	w.wroteHeader, w.status = true, code
	w.snap = w.hdr.Clone()
}

func (w *responseWriter) bodyAllowed() bool {
	return w.status != http.StatusNoContent && w.status != http.StatusNotModified
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, errors.New("h2: write after the handler returned")
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.bodyAllowed() {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(len(p))
	if w.req.Method == http.MethodHead { // counted (a Content-Length), not sent, as net/http
		return len(p), nil
	}
	if len(w.buf)+len(p) <= bodyChunk {
		w.buf = append(w.buf, p...)
		return len(p), nil
	}
	if err := w.send(false); err != nil {
		return 0, err
	}
	if len(p) <= bodyChunk {
		w.buf = append(w.buf, p...)
		return len(p), nil
	}
	if err := w.st.c.writeData(w.st, p, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (w *responseWriter) Flush() { _ = w.FlushError() }

func (w *responseWriter) FlushError() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.send(false)
}

// send sends the header, if not yet sent, and what the body gathered;
// end: the answer ends here.
func (w *responseWriter) send(end bool) error {
	c, st := w.st.c, w.st
	if w.ended { // a HEAD answer ends with its header
		return nil
	}
	var trailers []hpack.HeaderField // at the end: those the handler declared or set
	if end {
		trailers = w.trailers()
	}
	if !w.sentHeader {
		w.sentHeader = true
		h := w.snap
		var extra []hpack.HeaderField
		head := w.req.Method == http.MethodHead
		if end && h.Get("Content-Length") == "" && w.bodyAllowed() && (!head || w.written > 0) {
			extra = []hpack.HeaderField{{Name: "content-length", Value: strconv.FormatInt(w.written, 10)}}
		}
		endHere := end && len(w.buf) == 0 && len(trailers) == 0 || head
		if err := c.writeHeaders(st, w.status, h, endHere, extra, endHere || len(w.buf) == 0); err != nil {
			return err
		}
		if endHere {
			w.ended = true
			return nil
		}
	}
	if len(w.buf) > 0 || end && len(trailers) == 0 {
		err := c.writeData(st, w.buf, end && len(trailers) == 0)
		w.buf = w.buf[:0]
		if err != nil {
			return err
		}
	}
	if len(trailers) > 0 {
		return c.writeBlock(st, trailers, true, true)
	}
	return nil
}

// trailers are the answer's trailer fields: those the handler declared
// (the "Trailer" header) or set with http.TrailerPrefix.
func (w *responseWriter) trailers() []hpack.HeaderField {
	var out []hpack.HeaderField
	for k, vv := range w.hdr {
		name, ok := strings.CutPrefix(k, http.TrailerPrefix)
		if !ok {
			if w.snap == nil || !w.declared(k) {
				continue
			}
			name = k
		}
		for _, v := range vv {
			out = appendField(out, name, v)
		}
	}
	return out
}

// declared: k was named in the "Trailer" header as sent.
func (w *responseWriter) declared(k string) bool {
	for _, v := range w.snap["Trailer"] {
		for _, t := range strings.Split(v, ",") {
			if textproto.CanonicalMIMEHeaderKey(textproto.TrimString(t)) == k {
				return true
			}
		}
	}
	return false
}

// finish ends the answer when the handler returns.
func (w *responseWriter) finish() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	err := w.send(true)
	w.done = true
	return err
}

// writeHeaders sends a HEADERS frame (and its CONTINUATIONs) with :status
// and h; end: with END_STREAM.
// flush false: DATA follows at once (one write for both).
func (c *Conn) writeHeaders(st *stream, status int, h http.Header, end bool, extra []hpack.HeaderField, flush bool) error {
	fields := make([]hpack.HeaderField, 0, len(h)+len(extra)+1)
	fields = append(fields, hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	for k, vv := range h {
		if k == "Trailer" || strings.HasPrefix(k, http.TrailerPrefix) {
			if k == "Trailer" {
				for _, v := range vv {
					fields = appendField(fields, "trailer", v)
				}
			}
			continue
		}
		for _, v := range vv {
			fields = appendField(fields, k, v)
		}
	}
	fields = append(fields, extra...)
	return c.writeBlock(st, fields, end, flush)
}

// appendField adds a response field, lowercased; connection-specific and
// invalid ones are left out, as net/http does.
func appendField(out []hpack.HeaderField, k, v string) []hpack.HeaderField {
	name := lowerName(k)
	switch name {
	case "connection", "proxy-connection", "transfer-encoding", "upgrade", "keep-alive":
		return out
	}
	if !httpguts.ValidHeaderFieldName(k) || !httpguts.ValidHeaderFieldValue(v) {
		return out
	}
	return append(out, hpack.HeaderField{Name: name, Value: v})
}

// writeBlock encodes fields (our encoder has no dynamic table: nginx's
// way, so that a parked connection keeps no encoder state) and writes them
// in frames no bigger than the client's maximum.
func (c *Conn) writeBlock(st *stream, fields []hpack.HeaderField, end, flush bool) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	gone, max := st.gone, int(c.peerMaxFrame)
	if end && !gone {
		st.localDone = true
	}
	c.mu.Unlock()
	if gone {
		return st.err()
	}
	if c.enc == nil {
		c.enc = hpack.NewEncoder((*hpackWriter)(c))
		c.enc.SetMaxDynamicTableSizeLimit(0)
	}
	c.hbuf = c.hbuf[:0]
	for _, f := range fields {
		if err := c.enc.WriteField(f); err != nil {
			return err
		}
	}
	block := c.hbuf
	w := c.writer()
	first := true
	for first || len(block) > 0 {
		n := min(len(block), max)
		var err error
		if first {
			err = w.WriteHeaders(http2.HeadersFrameParam{StreamID: st.id, BlockFragment: block[:n], EndStream: end, EndHeaders: n == len(block)})
		} else {
			err = w.WriteContinuation(st.id, n == len(block), block[:n])
		}
		if err != nil {
			return err
		}
		block, first = block[n:], false
	}
	if !flush {
		return nil
	}
	return c.flushLocked()
}

type hpackWriter Conn

func (h *hpackWriter) Write(p []byte) (int, error) {
	h.hbuf = append(h.hbuf, p...)
	return len(p), nil
}

// err is why writes to st fail; mu held or st gone.
func (st *stream) err() error {
	if st.goneErr != nil {
		return st.goneErr
	}
	return errStreamClosed
}

// writeData sends p on st as the flow-control windows allow, waiting at
// most WriteTimeout for them to open; end: with END_STREAM.
func (c *Conn) writeData(st *stream, p []byte, end bool) error {
	var deadline time.Time
	var timer *time.Timer
	flushed := false
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		c.mu.Lock()
		n := 0
		for {
			if st.gone || c.closed {
				err := st.err()
				if c.closed {
					err = errClosed
				}
				c.mu.Unlock()
				return err
			}
			if len(p) == 0 {
				break
			}
			n = min(len(p), int(c.peerMaxFrame), int(max(0, min(c.sendWin, st.sendWin))))
			if n > 0 {
				break
			}
			if deadline.IsZero() {
				deadline = time.Now().Add(orDefault(c.srv.WriteTimeout, defaultWriteTimeout))
				timer = time.AfterFunc(time.Until(deadline), func() {
					c.mu.Lock()
					c.cond.Broadcast()
					c.mu.Unlock()
				})
			} else if !time.Now().Before(deadline) {
				c.mu.Unlock()
				c.resetStream(st.id, http2.ErrCodeCancel)
				return errWriteTimeout
			}
			if !flushed { // what waits to be sent (this stream's HEADERS) goes first
				flushed = true
				c.mu.Unlock()
				c.wmu.Lock()
				_ = c.flushLocked()
				c.wmu.Unlock()
				c.mu.Lock()
				continue
			}
			c.cond.Wait()
		}
		c.sendWin -= int32(n)
		st.sendWin -= int32(n)
		last := end && n == len(p)
		if last {
			st.localDone = true
		}
		c.mu.Unlock()
		c.wmu.Lock()
		err := c.writer().WriteData(st.id, last, p[:n])
		if err == nil {
			err = c.flushLocked()
		}
		c.wmu.Unlock()
		if err != nil {
			return err
		}
		p = p[n:]
		if len(p) == 0 && (last || !end) {
			return nil
		}
	}
}

// canonicalKey is http.CanonicalHeaderKey without an allocation for the
// common names.
func canonicalKey(name string) string {
	if k, ok := commonCanonical[name]; ok {
		return k
	}
	return textproto.CanonicalMIMEHeaderKey(name)
}

func lowerName(k string) string {
	if n, ok := commonLower[k]; ok {
		return n
	}
	return strings.ToLower(k)
}

var commonCanonical, commonLower = func() (map[string]string, map[string]string) {
	names := []string{"Accept", "Accept-Charset", "Accept-Encoding", "Accept-Language", "Accept-Ranges",
		"Age", "Access-Control-Allow-Origin", "Allow", "Authorization", "Cache-Control", "Content-Disposition",
		"Content-Encoding", "Content-Language", "Content-Length", "Content-Location", "Content-Range",
		"Content-Type", "Cookie", "Date", "Etag", "Expect", "Expires", "From", "Host", "If-Match",
		"If-Modified-Since", "If-None-Match", "If-Unmodified-Since", "Last-Modified", "Link", "Location",
		"Max-Forwards", "Origin", "Proxy-Authenticate", "Proxy-Authorization", "Range", "Referer", "Refresh",
		"Retry-After", "Server", "Set-Cookie", "Strict-Transport-Security", "Te", "Trailer", "Transfer-Encoding",
		"User-Agent", "Vary", "Via", "Www-Authenticate", "X-Forwarded-For", "X-Forwarded-Proto", "X-Real-Ip",
		"X-Request-Id", "Grpc-Status", "Grpc-Message", "Grpc-Encoding", "Grpc-Accept-Encoding", "Grpc-Timeout"}
	canon, lower := map[string]string{}, map[string]string{}
	for _, n := range names {
		canon[strings.ToLower(n)] = n
		lower[n] = strings.ToLower(n)
	}
	return canon, lower
}()
