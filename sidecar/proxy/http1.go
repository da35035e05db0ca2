package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"attache/sidecar/proxy/h1"
	"attache/sidecar/proxy/h2"
)

// httpListener is one HTTP listener and what serves it: HTTP/1.1 on the
// fast path (fasthttp behind it), h2c on net/http. rt says where requests
// go: the upstream's service, a gateway's router, or (nil) the service the
// request's host names (the HTTP proxy listener).
type httpListener struct {
	ln  net.Listener
	rt  *routing // nil: the HTTP proxy listener
	fs  *fasthttp.Server
	raw *rawServer    // nil with Engines.NoFastPath
	h2  *chanListener // nil with DisableHTTP2
	cap *connCap      // MaxClientConns
	h1  net.Listener  // what the accept loop takes HTTP/1.x connections from (set by startHTTP)

	removed atomic.Bool // a reload removed it: its accept loop ending is no error
}

func (p *Proxy) newHTTPListener(ctx context.Context, ln net.Listener, rt *routing) *httpListener {
	h := &httpListener{ln: ln, rt: rt}
	name := "http-proxy"
	switch {
	case rt != nil && rt.router != nil:
		name = "gateway-" + rt.proto
	case rt != nil && rt.fixed != nil:
		name = rt.fixed.name
	}
	h.cap = newConnCap(p.cfg.MaxClientConns, p.met, name)
	h.fs = &fasthttp.Server{
		Handler:                      func(c *fasthttp.RequestCtx) { p.handleFast(c, rt) },
		NoDefaultServerHeader:        true,
		NoDefaultDate:                true,
		NoDefaultContentType:         true,
		DisablePreParseMultipartForm: true,
		StreamRequestBody:            true,
		MaxRequestBodySize:           p.cfg.MaxReplayBody,
		ReadBufferSize:               8 << 10,
		WriteBufferSize:              4 << 10,
		IdleTimeout:                  p.cfg.IdleTimeout,
		// A head within HeaderTimeout of its first byte; then the body
		// (up to MaxReplayBody read here, a longer one streamed to the
		// instance, where the try timeout bounds it too) within BodyTimeout.
		ReadTimeout: p.cfg.HeaderTimeout,
		HeaderReceived: func(*fasthttp.RequestHeader) fasthttp.RequestConfig {
			return fasthttp.RequestConfig{ReadTimeout: p.cfg.BodyTimeout}
		},
		WriteTimeout:      p.maxRequestTimeout, // a client that does not read holds no instance connection for long
		CloseOnShutdown:   true,
		KeepHijackedConns: true, // tunnels own their connections (closed on shutdown)
		Logger:            fastLogger{p},
	}
	if !p.cfg.DisableHTTP2 {
		h.h2 = newChanListener(ln.Addr())
	}
	if !p.eng.NoFastPath {
		h.raw = newRawServer(ctx, p, rt, h.fs)
	}
	return h
}

// serveHTTP serves the HTTP listeners until ctx ends, on one set of event
// loops where it can, each on goroutines otherwise. The caller holds
// p.lnMu; listeners a reload adds later join them (Proxy.Update).
func (p *Proxy) serveHTTP(ctx context.Context, wg *sync.WaitGroup, errc chan<- error, hls []*httpListener) {
	var ev *evServer
	if !p.eng.NoFastPath && !p.eng.NoEventLoops && len(hls) > 0 {
		var err error
		if ev, err = newEvServer(ctx, p, hls); err != nil {
			p.log.Debug("no event loops; goroutines serve", "reason", err)
			ev = nil
		}
	}
	p.ev = ev
	for _, h := range hls {
		p.startHTTP(ctx, wg, errc, h, ev != nil)
	}
	evDone := make(chan struct{})
	if ev != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(evDone)
			ev.serve()
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		if ev != nil {
			ev.stopAccepting(p.cfg.ShutdownGraceTime) // the loops let go of the listeners before they close
		}
		// Every listener served, those a reload removed too: their
		// connections may still be open.
		p.lnMu.Lock()
		p.stopped = true
		hls := slices.Clone(p.hls)
		p.lnMu.Unlock()
		for _, h := range hls {
			h.ln.Close()
			if h.h1 != nil {
				h.h1.Close()
			}
		}
		sctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownGraceTime)
		defer cancel()
		var fsWG sync.WaitGroup
		for _, h := range hls {
			fsWG.Add(1)
			go func() {
				defer fsWG.Done()
				_ = h.fs.ShutdownWithContext(sctx)
			}()
		}
		if ev != nil {
			<-evDone // what the loops hand over while they drain is raw's
		}
		for _, h := range hls {
			if h.raw != nil {
				fsWG.Add(1)
				go func() {
					defer fsWG.Done()
					h.raw.shutdown(p.cfg.ShutdownGraceTime)
				}()
			}
		}
		fsWG.Wait()
	}()
}

// startHTTP serves h until ctx ends (or a reload removes it): its h2c
// server, and its accept loop unless the event loops accept for it. The
// caller holds p.lnMu.
func (p *Proxy) startHTTP(ctx context.Context, wg *sync.WaitGroup, errc chan<- error, h *httpListener, onLoops bool) {
	p.hls = append(p.hls, h)
	fail := func(what string, err error) {
		if err != nil && ctx.Err() == nil && !h.removed.Load() {
			select {
			case errc <- fmt.Errorf("proxy: %s on %s: %w", what, h.ln.Addr(), err):
			default: // one error stops the proxy; the first is enough
			}
		}
	}
	var h1 net.Listener = h.ln
	if !onLoops { // the loops count their own
		h1 = &capListener{Listener: h.ln, cap: h.cap}
	}
	h2l := h.h2
	// Without event loops, a sniffing accept loop splits h2c from HTTP/1.x.
	if !onLoops && h2l != nil {
		sl := newSniffListener(h1, p.cfg.IdleTimeout, p.cfg.HeaderTimeout)
		h1, h2l = sl.h1, sl.h2
		wg.Add(1)
		go func() {
			defer wg.Done()
			sl.run(ctx)
		}()
	}
	h.h1 = h1
	if h2l != nil {
		// h2c: our HTTP/2 server, idle connections parked; net/http's
		// with Engines.NoFastPath.
		var h2s *h2.Server
		var h2p *h2Parking
		var hs *http.Server
		wg.Add(2)
		if h.raw != nil {
			h2s, h2p = p.newH2Server(h.rt)
			go func() {
				defer wg.Done()
				for {
					c, err := h2l.Accept()
					if err != nil {
						return
					}
					go h2s.ServeConn(c)
				}
			}()
		} else {
			hs = &http.Server{
				Handler:           p.stdHandler(h.rt),
				ReadHeaderTimeout: p.cfg.HeaderTimeout,
				IdleTimeout:       p.cfg.IdleTimeout,
				ErrorLog:          p.log.StandardLogger(nil),
				ConnState:         p.h2State,
			}
			hs.Protocols = new(http.Protocols)
			hs.Protocols.SetUnencryptedHTTP2(true)
			go func() {
				defer wg.Done()
				if err := hs.Serve(h2l); err != http.ErrServerClosed {
					fail("h2c", err)
				}
			}()
		}
		go func() {
			defer wg.Done()
			<-ctx.Done()
			h2l.Close()
			sctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownGraceTime)
			defer cancel()
			if hs != nil {
				_ = hs.Shutdown(sctx)
			} else {
				p.stopH2(sctx, h2s, h2p)
			}
		}()
	}
	if !onLoops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if h.raw != nil {
				fail("serve", h.raw.serve(h1))
			} else {
				fail("serve", h.fs.Serve(h1))
			}
		}()
	}
}

type fastLogger struct{ p *Proxy }

func (l fastLogger) Printf(format string, args ...any) {
	l.p.log.Debug(fmt.Sprintf(format, args...))
}

// hopHeaders are removed when forwarding (RFC 9110 §7.6.1), with every
// header named in Connection.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// handleFast forwards one HTTP/1.x request.
func (p *Proxy) handleFast(ctx *fasthttp.RequestCtx, rt *routing) {
	var t *target
	var pol *Policy
	gw := rt != nil && rt.router != nil
	if gw {
		h := fastRouteHead(ctx)
		d, t2, c, ok := p.routeTarget(ctx, rt, h)
		if !ok {
			p.fastCanned(ctx, c)
			return
		}
		t, pol = t2, d.Policy
		if d.Path != "" {
			ctx.Request.SetRequestURI(d.Path)
		}
	} else if rt != nil {
		t = rt.fixed
	}
	if t == nil {
		name, ok := serviceFromHost(string(ctx.Host()), p.cfg.Domain)
		if !ok {
			p.fastCanned(ctx, cannedJSON(http.StatusNotFound, "host is not a Consul service", "", "host", string(ctx.Host())))
			return
		}
		var err error
		if t, err = p.lookupTarget(ctx, name); err != nil {
			p.fastCanned(ctx, cannedJSON(http.StatusServiceUnavailable, err.Error(), name))
			return
		}
	}
	req := &ctx.Request
	if !h1.TargetForm(req.Header.RequestURI(), req.Header.IsOptions()) && !req.Header.IsConnect() {
		p.fastCanned(ctx, cannedJSON(http.StatusBadRequest, "request target is neither a path nor an absolute http:// URI", t.name))
		ctx.SetConnectionClose()
		return
	}
	// Host goes on as the client sent it, or as the absolute-form target's
	// authority names it (RFC 9112 §3.2.2), never lower-cased or rebuilt
	// by fasthttp, and no Authorization is made of the target's userinfo.
	if auth := h1.AbsAuthority(req.Header.RequestURI()); len(auth) > 0 {
		req.Header.SetHostBytes(auth)
	}
	req.UseHostHeader = true
	req.Header.SetNoDefaultContentType(true) // no Content-Type the client did not send
	u := req.URI()
	if len(u.Username()) > 0 || len(u.Password()) > 0 {
		u.SetUsernameBytes(nil)
		u.SetPasswordBytes(nil)
	}
	// A request read from a TLS connection (the TLS gateway's HTTP/1.1)
	// parses as https; the hop to the instance is plain HTTP, and the
	// instance's client refuses a request of another scheme.
	if ctx.IsTLS() {
		u.SetSchemeBytes(httpScheme)
	}
	if req.Header.IsConnect() {
		p.fastCanned(ctx, cannedJSON(http.StatusMethodNotAllowed, "CONNECT is not supported; call http://SERVICE/ through the proxy", t.name))
		return
	}
	h := &req.Header
	if gw {
		h.Set("X-Real-IP", fastRemoteIP(ctx))
		h.Set("X-Forwarded-Proto", rt.proto)
	}
	if conn := h.Peek("Connection"); len(conn) > 0 && hasToken(conn, "upgrade") && len(h.Peek("Upgrade")) > 0 {
		p.tunnelFast(ctx, t, pol)
		return
	}
	clientClose := h.ConnectionClose()
	stripHopFast(h)
	if clientClose {
		h.ResetConnectionClose()
	}
	setForwardedFast(ctx)

	replayable := replaySafe(req)
	if req.IsBodyStream() {
		cl, limit := h.ContentLength(), p.cfg.MaxReplayBody
		switch {
		case cl >= 0 && cl <= limit:
			body := make([]byte, cl)
			if _, err := io.ReadFull(ctx.RequestBodyStream(), body); err != nil {
				p.fastCanned(ctx, cannedJSON(http.StatusBadRequest, "reading the request body: "+err.Error(), t.name))
				ctx.SetConnectionClose()
				return
			}
			req.SetBody(body)
		case cl == -1 && replayable:
			// A chunked body of a request that may be retried is buffered
			// (and sent on with a Content-Length) when it ends within the
			// limit; a longer one streams on, not retried.
			stream := ctx.RequestBodyStream()
			body, err := io.ReadAll(io.LimitReader(stream, int64(limit)+1))
			if err != nil {
				p.fastCanned(ctx, cannedJSON(http.StatusBadRequest, "reading the request body: "+err.Error(), t.name))
				ctx.SetConnectionClose()
				return
			}
			if len(body) <= limit {
				req.SetBody(body)
			} else {
				req.SetBodyStream(io.MultiReader(bytes.NewReader(body), stream), -1)
				replayable = false
			}
		default:
			replayable = false
		}
	}
	x := &fastExchange{req: req, resp: &ctx.Response, replayable: replayable}
	res := t.forwardWith(ctx, x, replayable, pol, fastAccReq(p, rt, ctx))
	p.fastFinish(ctx, t, x, res, true)
	if clientClose {
		ctx.SetConnectionClose()
	}
}

var httpScheme = []byte("http")

// fastFinish writes the answer for res.
func (p *Proxy) fastFinish(ctx *fasthttp.RequestCtx, t *target, x *fastExchange, res result, mayFallback bool) {
	fb, cause := t.fallbackFor(res)
	if !mayFallback {
		fb = nil
	}
	if fb != nil && fb.Service != "" {
		if t2, err := p.lookupTarget(ctx, fb.Service); err == nil {
			x.discard()
			ctx.Response.Reset()
			t.met.fallback(cause)
			res2 := t2.forward(ctx, x, x.replayable)
			p.fastFinish(ctx, t2, x, res2, false)
			ctx.Response.Header.Set("X-Attache-Fallback", cause)
			ctx.Response.Header.Set("X-Attache-Fallback-Service", t2.name)
			return
		}
	}
	if fb != nil && fb.Service != "" {
		fb = nil // the other service is not in the catalog: our own answer
	}
	if res.kind == outAnswered && fb == nil {
		stripHopResp(&ctx.Response.Header)
		return
	}
	x.discard()
	ctx.Response.Reset()
	p.fastCanned(ctx, p.cannedFor(t, res, mayFallback))
}

func (p *Proxy) fastCanned(ctx *fasthttp.RequestCtx, c canned) {
	ctx.Response.Reset()
	ctx.SetStatusCode(c.status)
	for _, kv := range c.hdr {
		ctx.Response.Header.Set(kv[0], kv[1])
	}
	ctx.SetBody(c.body)
}

// fastExchange sends the server's own request object through an
// instance's HostClient, filling the server's response object.
type fastExchange struct {
	req        *fasthttp.Request
	resp       *fasthttp.Response
	replayable bool
}

func (x *fastExchange) try(ep *endpoint, deadline time.Time) (int, error) {
	if err := ep.hc.DoDeadline(x.req, x.resp, deadline); err != nil {
		return 0, err
	}
	return x.resp.StatusCode(), nil
}

func (x *fastExchange) discard() {
	_ = x.resp.CloseBodyStream()
}

// isHop reports whether name is a hop-by-hop header (or Expect, which the
// server has answered already).
func isHop(name []byte) bool {
	switch len(name) {
	case 2:
		return bytes.EqualFold(name, []byte("Te"))
	case 6:
		return bytes.EqualFold(name, []byte("Expect"))
	case 7:
		return bytes.EqualFold(name, []byte("Trailer")) || bytes.EqualFold(name, []byte("Upgrade"))
	case 10:
		return bytes.EqualFold(name, []byte("Connection")) || bytes.EqualFold(name, []byte("Keep-Alive"))
	case 16:
		return bytes.EqualFold(name, []byte("Proxy-Connection"))
	case 17:
		return bytes.EqualFold(name, []byte("Transfer-Encoding"))
	case 18:
		return bytes.EqualFold(name, []byte("Proxy-Authenticate"))
	case 19:
		return bytes.EqualFold(name, []byte("Proxy-Authorization"))
	}
	return false
}

// rawHasHop scans a request's raw header block for a hop-by-hop header, so
// that the common request without one costs a single pass.
func rawHasHop(raw []byte) bool {
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		if i := bytes.IndexByte(line, ':'); i > 0 && isHop(bytes.TrimSpace(line[:i])) {
			return true
		}
	}
	return false
}

func stripHopFast(h *fasthttp.RequestHeader) {
	if raw := h.RawHeaders(); len(raw) > 0 && !rawHasHop(raw) {
		return
	}
	if conn := h.Peek("Connection"); len(conn) > 0 {
		for _, tok := range bytes.Split(conn, []byte(",")) {
			tok = bytes.TrimSpace(tok)
			if len(tok) > 0 && !bytes.EqualFold(tok, []byte("close")) && !bytes.EqualFold(tok, []byte("keep-alive")) && !h1.FramingHeader(tok) {
				h.DelBytes(tok)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
	h.Del("Expect") // the server has answered 100-continue already
}

func stripHopResp(h *fasthttp.ResponseHeader) {
	found := h.ConnectionClose()
	for k := range h.All() {
		if isHop(k) && !bytes.EqualFold(k, []byte("Transfer-Encoding")) && !bytes.EqualFold(k, []byte("Trailer")) {
			found = true
			break
		}
	}
	if !found {
		return
	}
	if conn := h.Peek("Connection"); len(conn) > 0 {
		for _, tok := range bytes.Split(conn, []byte(",")) {
			tok = bytes.TrimSpace(tok)
			if len(tok) > 0 && !bytes.EqualFold(tok, []byte("close")) && !bytes.EqualFold(tok, []byte("keep-alive")) && !h1.FramingHeader(tok) {
				h.DelBytes(tok)
			}
		}
	}
	h.ResetConnectionClose()
	for _, k := range hopHeaders {
		if k != "Transfer-Encoding" && k != "Trailer" {
			h.Del(k)
		}
	}
}

func setForwardedFast(ctx *fasthttp.RequestCtx) {
	h := &ctx.Request.Header
	var ipb [64]byte
	ip := ipb[:0]
	if a, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		ip = a.AddrPort().Addr().Unmap().AppendTo(ip)
	} else {
		ip = append(ip, ctx.RemoteIP().String()...)
	}
	if prior := h.Peek("X-Forwarded-For"); len(prior) > 0 {
		v := make([]byte, 0, len(prior)+2+len(ip))
		v = append(append(append(v, prior...), ", "...), ip...)
		h.SetBytesV("X-Forwarded-For", v)
	} else {
		h.SetBytesV("X-Forwarded-For", ip)
	}
	if len(h.Peek("X-Forwarded-Proto")) == 0 {
		h.Set("X-Forwarded-Proto", "http")
	}
}

func hasToken(v []byte, tok string) bool {
	for _, t := range bytes.Split(v, []byte(",")) {
		if bytes.EqualFold(bytes.TrimSpace(t), []byte(tok)) {
			return true
		}
	}
	return false
}

// tunnelFast forwards an Upgrade request (WebSocket and the like): it sends
// the request head to an instance and then copies bytes both ways. The
// connect goes through the same policy as any request (forward: breaker,
// balancer, retries, outlier reports), as a raw TCP upstream's does.
func (p *Proxy) tunnelFast(ctx *fasthttp.RequestCtx, t *target, pol *Policy) {
	x := &tcpConnect{ctx: ctx, d: &p.dialer}
	res := t.forwardWith(ctx, x, true, pol, nil)
	if res.kind != outAnswered || x.up == nil {
		p.fastCanned(ctx, p.cannedFor(t, res, false))
		return
	}
	conn, ep := x.up, res.ep
	setForwardedFast(ctx)
	head := ctx.Request.Header.Header()
	if _, err := conn.Write(head); err != nil {
		conn.Close()
		p.fastCanned(ctx, p.cannedFor(t, result{kind: outError, err: err, ep: ep}, false))
		return
	}
	if body := ctx.Request.Body(); len(body) > 0 {
		_, _ = conn.Write(body)
	}
	ctx.HijackSetNoResponse(true)
	ctx.Hijack(func(c net.Conn) {
		_ = c.SetDeadline(time.Time{}) // the server's write timeout: tunnels have none
		p.splice(c, conn)
	})
}

// splice copies both ways until both directions end, half-closing where
// the connections allow it. Both are closed when it returns, or when the
// proxy shuts down.
func (p *Proxy) splice(a, b net.Conn) {
	if !p.track(a, b) {
		a.Close()
		b.Close()
		return
	}
	defer p.untrack(a, b)
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		closeWrite(dst)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
	a.Close()
	b.Close()
}

// closeWrite half-closes c when it (or the connection under a hijacked
// one) can, and closes it otherwise.
func closeWrite(c net.Conn) {
	type cw interface{ CloseWrite() error }
	if w, ok := c.(cw); ok {
		_ = w.CloseWrite()
		return
	}
	if u, ok := c.(interface{ UnsafeConn() net.Conn }); ok {
		if w, ok := u.UnsafeConn().(cw); ok {
			_ = w.CloseWrite()
			return
		}
	}
	c.Close()
}

// ---------------------------------------------------------------- canned answers

type canned struct {
	status int
	hdr    [][2]string
	body   []byte
}

func cannedJSON(status int, msg, service string, kv ...string) canned {
	m := map[string]any{"error": msg}
	if service != "" {
		m["service"] = service
	}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	b, _ := json.Marshal(m)
	return canned{status: status, hdr: [][2]string{{"Content-Type", "application/json"}}, body: append(b, '\n')}
}

func openResult(err error) result {
	res := result{kind: outOpen}
	errors.As(err, &res.open)
	return res
}

// cannedFor is the proxy's own answer for a request no instance answered.
func (p *Proxy) cannedFor(t *target, res result, mayFallback bool) canned {
	if fb, cause := t.fallbackFor(res); mayFallback && fb != nil && fb.Service == "" {
		t.met.fallback(cause)
		c := canned{status: fb.Status, body: []byte(fb.Body)}
		if c.status == 0 {
			c.status = http.StatusOK
		}
		ct := fb.ContentType
		if ct == "" {
			ct = "application/json"
		}
		c.hdr = [][2]string{{"Content-Type", ct}, {"X-Attache-Fallback", cause}}
		if res.kind == outOpen && res.open != nil {
			c.hdr = append(c.hdr, [2]string{"X-Attache-Breaker", res.open.State})
		}
		return c
	}
	switch res.kind {
	case outOpen:
		state, after := "open", time.Second
		if res.open != nil {
			state, after = res.open.State, res.open.RetryAfter
		}
		secs := int(math.Ceil(after.Seconds()))
		if secs < 1 {
			secs = 1
		}
		b, _ := json.Marshal(map[string]any{"error": "circuit breaker open", "service": t.name, "state": state, "retry_after_seconds": secs})
		return canned{status: http.StatusServiceUnavailable, body: append(b, '\n'), hdr: [][2]string{
			{"Content-Type", "application/json"}, {"Retry-After", strconv.Itoa(secs)}, {"X-Attache-Breaker", state}}}
	case outNoHealthy:
		return cannedJSON(http.StatusServiceUnavailable, "no healthy instance", t.name)
	case outUnknown:
		return cannedJSON(http.StatusServiceUnavailable, "service not in the catalog", t.name)
	case outError:
		inst := ""
		if res.ep != nil {
			inst = res.ep.id
		}
		if isTimeout(res.err) {
			return cannedJSON(http.StatusGatewayTimeout, "upstream timeout", t.name, "instance", inst)
		}
		detail := "upstream error"
		if res.err != nil {
			detail = res.err.Error()
		}
		return cannedJSON(http.StatusBadGateway, "upstream connect error or reset", t.name, "instance", inst, "detail", detail)
	}
	return cannedJSON(http.StatusBadGateway, "proxy error", t.name)
}

// fastHead is a fasthttp request as a Router's header source.
type fastHead struct{ h *fasthttp.RequestHeader }

func (h fastHead) header(name string) string { return bstr(h.h.Peek(name)) }

func fastRouteHead(ctx *fasthttp.RequestCtx) *Head {
	return &Head{Method: bstr(ctx.Method()), Host: bstr(ctx.Host()), Path: bstr(ctx.URI().RequestURI()),
		RemoteIP: fastRemoteIP(ctx), TLS: ctx.IsTLS(), hdr: fastHead{&ctx.Request.Header}}
}

func fastRemoteIP(ctx *fasthttp.RequestCtx) string {
	if a, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort().Addr().Unmap().String()
	}
	return ctx.RemoteIP().String()
}

// h2State is the HTTP/2 servers' ConnState: a connection with no stream
// left counts toward the parker's settling (see parker.wentIdle).
func (p *Proxy) h2State(_ net.Conn, st http.ConnState) {
	if st == http.StateIdle && p.parker != nil {
		p.parker.wentIdle()
	}
}
