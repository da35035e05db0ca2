package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"attache/sidecar/breaker"
	"attache/sidecar/proxy/h1"
	"attache/sidecar/proxy/h2"
)

// Router decides where each request of a gateway listener goes (package
// sidecar/gateway implements it over a route table). Route must not keep
// the Head or its strings: they may point into the connection's buffer.
type Router interface {
	Route(h *Head) Decision
}

// Head is what a Router sees of a request: its method, host (the Host
// header or the absolute-form authority, port included as sent), target
// (path and query, origin-form), the client's address and whether it came
// over TLS; Now is the time the listener read it (an event loop's clock
// of its batch: a Router need not read the clock again).
type Head struct {
	Method   string
	Host     string
	Path     string
	RemoteIP string
	TLS      bool
	Now      time.Time
	hdr      headerSource
}

// Header returns the value of the named request header ("" when absent).
func (h *Head) Header(name string) string {
	if h.hdr == nil {
		return ""
	}
	return h.hdr.header(name)
}

type headerSource interface{ header(name string) string }

// Decision is a Router's answer for one request: a service to forward to
// (with the path to send, when the route rewrites it, and the route's
// forwarding settings), or an answer of the gateway's own (no route: 404;
// over a rate limit: 429).
type Decision struct {
	Service string  // where the request goes; "" with Answer set
	Path    string  // the target sent to the instance; "" keeps the request's
	Policy  *Policy // per-route settings; nil: the proxy's
	Answer  *Answer // answer this instead of forwarding
	// Target, when set, is where the proxy keeps its state for Service
	// once looked up, so that the next decision naming it finds it without
	// the proxy's lock and map: one slot per route destination, kept as
	// long as the route (a new slot costs one lookup).
	Target *TargetSlot
}

// TargetSlot holds the proxy's state for one service, for a Router to hand
// back with its decisions (Decision.Target). Its zero value is empty.
type TargetSlot struct{ t atomic.Pointer[target] }

// Answer is a response the gateway writes itself.
type Answer struct {
	Status int
	Header [][2]string
	Body   []byte
}

// Policy overrides the proxy's forwarding settings for one route (and
// destination). Zero fields keep the proxy's. A Policy is shared by every
// request of its route: build it once, never change it.
type Policy struct {
	TryTimeout     time.Duration
	RequestTimeout time.Duration
	Retries        int      // extra tries after the first; 0 keeps the next layer's (the service's, then the proxy's)
	NoRetries      bool     // no retry at all, whatever the other layers say
	Balancer       Balancer // "" keeps the service's
	// Tag narrows the instances to those carrying this tag (compared
	// without case, as Consul's DNS does); none carrying it is "no healthy
	// instance". "" is every instance.
	Tag string
	// Breaker is the route's own breaker for this service
	// (breaker.Registry.Custom), asked instead of the service's; instances
	// are still judged (ejection, panic) by the service's state. nil: the
	// service's.
	Breaker *breaker.Service
}

// GatewayListener is a listener whose requests a Router sends on. Without
// TLS it is served as every HTTP listener of the proxy is (event loops,
// fast path, h2c); with TLS by net/http (HTTP/2 by ALPN, HTTP/1.1).
type GatewayListener struct {
	Addr   string
	Router Router
	TLS    *tls.Config // nil: plain HTTP
}

// routing is how one listener finds each request's target — the one seam
// every engine (event loop, goroutine fast path, fasthttp, net/http) calls:
// a fixed service (upstream listener), the service its host names (HTTP
// proxy listener, both fields nil), or a Router (gateway listener).
type routing struct {
	fixed  *target
	router Router
	proto  string // gateway listeners: X-Forwarded-Proto ("http" or "https")
}

// decide asks the router about h and finds the decision's target without
// waiting (nil when the proxy has no state for the service yet: the
// caller that can wait then calls p.lookupTarget).
func (p *Proxy) decide(rt *routing, h *Head) (Decision, *target) {
	d := rt.router.Route(h)
	if d.Answer != nil || d.Service == "" {
		if d.Answer == nil {
			d.Answer = noRouteAnswer
		}
		return d, nil
	}
	// A slot's target is the one of d.Service: targets are never dropped
	// nor replaced, and a slot only ever holds the one found for its
	// destination's service (by this proxy: another's is looked up again).
	if d.Target != nil {
		if t := d.Target.t.Load(); t != nil && t.p == p {
			return d, t
		}
	}
	p.mu.Lock()
	t := p.targets[d.Service]
	p.mu.Unlock()
	if t != nil && d.Target != nil {
		d.Target.t.Store(t)
	}
	return d, t
}

// noRouteAnswer is a Router's empty decision.
var noRouteAnswer = &Answer{Status: http.StatusNotFound, Header: [][2]string{{"Content-Type", "application/json"}},
	Body: []byte(`{"error":"no route"}` + "\n")}

// routeTarget is decide for callers that may wait for the catalog: ok
// false means c is the answer.
func (p *Proxy) routeTarget(ctx context.Context, rt *routing, h *Head) (d Decision, t *target, c canned, ok bool) {
	d, t = p.decide(rt, h)
	if d.Answer != nil {
		return d, nil, answerCanned(d.Answer), false
	}
	if t == nil {
		var err error
		if t, err = p.lookupDecided(ctx, &d); err != nil {
			return d, nil, cannedJSON(http.StatusServiceUnavailable, err.Error(), d.Service), false
		}
	}
	return d, t, canned{}, true
}

// lookupDecided is lookupTarget for a decision's service, filling its slot.
func (p *Proxy) lookupDecided(ctx context.Context, d *Decision) (*target, error) {
	t, err := p.lookupTarget(ctx, d.Service)
	if err == nil && d.Target != nil {
		d.Target.t.Store(t)
	}
	return t, err
}

func answerCanned(a *Answer) canned {
	return canned{status: a.Status, hdr: a.Header, body: a.Body}
}

// ---------------------------------------------------------------- policy

// A request's settings come from its route's Policy (f.pol), else its
// service's own (f.own, Config.Policies), else the proxy's Config.

func (f *fwd) tryTimeout(p *Proxy) time.Duration {
	if f.pol != nil && f.pol.TryTimeout > 0 {
		return f.pol.TryTimeout
	}
	if f.own != nil && f.own.TryTimeout > 0 {
		return f.own.TryTimeout
	}
	return p.live.Load().tryTimeout
}

func (f *fwd) maxRetries(p *Proxy) int {
	for _, pol := range [2]*Policy{f.pol, f.own} {
		switch {
		case pol == nil:
		case pol.NoRetries:
			return 0
		case pol.Retries > 0:
			return min(pol.Retries, maxTries-1)
		}
	}
	return p.live.Load().maxRetries
}

// with gives f a route's policy and the service's own settings (nil
// both: the proxy's), once admitted.
func (f *fwd) with(p *Proxy, pol, own *Policy) {
	if pol == nil && own == nil {
		return
	}
	f.pol, f.own = pol, own
	f.deadline = f.start.Add(requestTimeout(p, pol, own))
}

// requestTimeout is the request timeout of a route's pol, else of the
// service's own settings, else the proxy's.
func requestTimeout(p *Proxy, pol, own *Policy) time.Duration {
	if pol != nil && pol.RequestTimeout > 0 {
		return pol.RequestTimeout
	}
	if own != nil && own.RequestTimeout > 0 {
		return own.RequestTimeout
	}
	return p.live.Load().requestTimeout
}

// ---------------------------------------------------------------- raw heads

// rawHead is a request parsed in place, as a Router's header source.
type rawHead struct {
	b []byte
	r *h1.Request
}

func (h *rawHead) header(name string) string {
	for k := 0; k < h.r.NumHeaders; k++ {
		if bytes.EqualFold(h.b[h.r.Names[k].Start:h.r.Names[k].End], []byte(name)) {
			return bstr(h.b[h.r.Vals[k].Start:h.r.Vals[k].End])
		}
	}
	return ""
}

// bstr views b as a string without copying; valid while b is unchanged.
func bstr(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// rawRouteHead fills h (and src) for the request parsed into r from b.
func rawRouteHead(h *Head, src *rawHead, b []byte, r *h1.Request, host, path h1.Span, ip []byte, tls bool, now time.Time) {
	if host.End == 0 {
		host = r.Host
	}
	*src = rawHead{b: b, r: r}
	pb := b[path.Start:path.End]
	*h = Head{Method: bstr(b[r.Method.Start:r.Method.End]), Host: bstr(b[host.Start:host.End]), Path: bstr(pb),
		RemoteIP: bstr(ip), TLS: tls, Now: now, hdr: src}
	if len(pb) == 0 || pb[0] == '?' {
		h.Path = "/" + h.Path
	}
}

// appendGatewayRequest is appendRequest for a gateway listener: the
// decision's path when it rewrites, X-Real-IP the client's address and
// X-Forwarded-Proto the listener's scheme (whatever the client sent in
// either), X-Forwarded-For appended to.
// An absolute-form target's authority (host) replaces Host, as on the
// other listeners (RFC 9112 §3.2.2).
func appendGatewayRequest(out, b []byte, r *h1.Request, host, path h1.Span, newPath string, end int, ip []byte, proto string) []byte {
	out = append(out, b[r.Method.Start:r.Method.End]...)
	out = append(out, ' ')
	if newPath != "" {
		out = append(out, newPath...)
	} else {
		out = h1.AppendPath(out, b, path)
	}
	out = append(out, " HTTP/1.1\r\n"...)
	for k := 0; k < r.NumHeaders; k++ {
		if r.Drop[k] {
			continue
		}
		name := b[r.Names[k].Start:r.Names[k].End]
		if len(name) == 9 && bytes.EqualFold(name, []byte("X-Real-IP")) ||
			len(name) == 17 && bytes.EqualFold(name, []byte("X-Forwarded-Proto")) {
			continue
		}
		if host.End > host.Start && r.Vals[k] == r.Host {
			out = append(out, name...)
			out = append(out, ": "...)
			out = append(out, b[host.Start:host.End]...)
		} else {
			out = append(out, b[r.Names[k].Start:r.Vals[k].End]...)
		}
		out = append(out, '\r', '\n')
	}
	out = append(out, "X-Forwarded-For: "...)
	for i := 0; i < r.NumXFF; i++ {
		out = append(out, b[r.XFF[i].Start:r.XFF[i].End]...)
		out = append(out, ", "...)
	}
	out = append(out, ip...)
	out = append(out, "\r\nX-Real-IP: "...)
	out = append(out, ip...)
	out = append(out, "\r\nX-Forwarded-Proto: "...)
	out = append(out, proto...)
	out = append(out, "\r\n\r\n"...)
	return append(out, b[r.HeadEnd:end]...)
}

// h2Parking is the parker's view of a gateway listener's HTTP/2 server.
type h2Parking struct{ closing atomic.Bool }

func (o *h2Parking) resume(pc *parkedConn) { pc.h2.Resume() }
func (o *h2Parking) draining() bool        { return o.closing.Load() }

// newH2Server is an HTTP/2 server of a listener (TLS gateway, or h2c on
// a plain one): the router and
// the policy behind net/http's interfaces (stdHandler), the proxy's
// timeouts, idle connections to the parker.
func (p *Proxy) newH2Server(rt *routing) (*h2.Server, *h2Parking) {
	o := &h2Parking{}
	s := &h2.Server{
		Handler:        p.stdHandler(rt),
		MaxHeaderBytes: 64 << 10,
		IdleTimeout:    p.cfg.IdleTimeout,
		FrameTimeout:   p.cfg.HeaderTimeout,
		ParkAfter:      p.parkAfter,
	}
	if k := p.parker; k != nil {
		s.Park = func(c *h2.Conn) bool {
			return k.park(&parkedConn{s: o, c: c.NetConn(), h2: c, expires: c.IdleDeadline()})
		}
	}
	return s, o
}

// stopH2 drains an HTTP/2 server: no more parking, the parked
// connections closed with GOAWAY, the others drained (h2.Server.Shutdown)
// until ctx ends.
func (p *Proxy) stopH2(ctx context.Context, s *h2.Server, o *h2Parking) {
	o.closing.Store(true)
	if p.parker != nil {
		p.parker.closeServer(o)
	}
	_ = s.Shutdown(ctx)
}

// stdHead is a net/http request as a Router's header source.
type stdHead struct{ r *http.Request }

func (h stdHead) header(name string) string { return h.r.Header.Get(name) }

func stdRouteHead(r *http.Request, ip string) *Head {
	return &Head{Method: r.Method, Host: r.Host, Path: r.URL.RequestURI(), RemoteIP: ip, TLS: r.TLS != nil, hdr: stdHead{r}}
}

// serveGatewayTLS serves a gateway listener with TLS. At most
// MaxClientConns connections are open (the others closed as accepted);
// each connection's handshake runs on a goroutine of its own (at most
// TLSHandshakeTimeout);
// then HTTP/1.1 goes to the goroutine fast path (the event loops need a
// plain socket) with fasthttp behind it, as on plain listeners (fasthttp
// alone with Engines.NoFastPath), and HTTP/2
// (by ALPN) to net/http; both ask the router and forward through the
// policy.
func (p *Proxy) serveGatewayTLS(ctx context.Context, wg *sync.WaitGroup, errc chan<- error, ln net.Listener, g *GatewayListener) {
	tc := g.TLS.Clone()
	if tc.MinVersion < tls.VersionTLS12 {
		tc.MinVersion = tls.VersionTLS12
	}
	if len(tc.NextProtos) == 0 {
		tc.NextProtos = []string{"h2", "http/1.1"}
	}
	rt := &routing{router: g.Router, proto: "https"}
	h := p.newHTTPListener(ctx, ln, rt) // its fasthttp and fast-path servers take HTTP/1.1
	// HTTP/2: our server, whose idle connections are parked as HTTP/1.1's
	// are; with Engines.NoFastPath (no hand-written protocol code),
	// net/http's.
	var h2s *h2.Server
	var h2p *h2Parking
	var h2l *chanListener
	var hs *http.Server
	if h.raw != nil {
		h2s, h2p = p.newH2Server(rt)
	} else {
		h2l = newChanListener(ln.Addr())
		hs = &http.Server{
			Handler:           p.stdHandler(rt),
			TLSConfig:         tc,
			ReadHeaderTimeout: p.cfg.HeaderTimeout,
			IdleTimeout:       p.cfg.IdleTimeout,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          log.New(io.Discard, "", 0), // a scanner's broken handshakes are not news
			ConnState:         p.h2State,
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.Serve(h2l); err != nil && err != http.ErrServerClosed && ctx.Err() == nil {
				errc <- fmt.Errorf("proxy: gateway tls on %s: %w", ln.Addr(), err)
			}
		}()
	}
	// Without the fast path, fasthttp serves HTTP/1.1 from a listener of
	// its own (not ServeConn), so that its shutdown closes the idle
	// keep-alive connections and waits for the busy ones.
	var h1 *chanListener
	if h.raw == nil {
		h1 = newChanListener(ln.Addr())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h.fs.Serve(h1); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("proxy: gateway tls on %s: %w", ln.Addr(), err)
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		acceptEach(ctx, ln, func(c net.Conn) {
			// MaxClientConns: one more is closed at once, unread (a TLS
			// client cannot read a plain-text 503), and counted.
			if !h.cap.admit() {
				refuseConn(c, nil)
				return
			}
			c = &capConn{Conn: c, cap: h.cap}
			stop := context.AfterFunc(ctx, func() { c.Close() })
			conn := tls.Server(c, tc)
			_ = conn.SetDeadline(time.Now().Add(p.cfg.TLSHandshakeTimeout))
			err := conn.HandshakeContext(ctx)
			_ = conn.SetDeadline(time.Time{})
			stop()
			switch {
			case err != nil || ctx.Err() != nil:
				c.Close()
			case conn.ConnectionState().NegotiatedProtocol == "h2" && h2s != nil:
				h2s.ServeConn(conn)
			case conn.ConnectionState().NegotiatedProtocol == "h2":
				if !h2l.put(ctx, conn) {
					c.Close()
				}
			case h.raw != nil:
				h.raw.start(&rawConn{s: h.raw, c: conn}, true)
			default:
				if !h1.put(ctx, conn) {
					c.Close()
				}
			}
		})
	}()
	go func() {
		defer wg.Done()
		<-ctx.Done()
		ln.Close()
		if h2l != nil {
			h2l.Close()
		}
		if h1 != nil {
			h1.Close()
		}
		sctx, cancel := context.WithTimeout(context.Background(), p.cfg.ShutdownGraceTime)
		defer cancel()
		var sw sync.WaitGroup
		sw.Add(2)
		go func() {
			defer sw.Done()
			if hs != nil {
				_ = hs.Shutdown(sctx)
				return
			}
			p.stopH2(sctx, h2s, h2p)
		}()
		go func() { defer sw.Done(); _ = h.fs.ShutdownWithContext(sctx) }()
		if h.raw != nil {
			h.raw.shutdown(p.cfg.ShutdownGraceTime)
		}
		sw.Wait()
	}()
}
