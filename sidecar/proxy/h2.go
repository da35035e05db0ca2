package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strings"
	"time"
)

// stdHandler serves HTTP/2 requests (h2c, and over TLS on a gateway
// listener) behind net/http's interfaces: the h2 server's, or net/http's
// with Engines.NoFastPath.
func (p *Proxy) stdHandler(rt *routing) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var t *target
		var pol *Policy
		gw := rt != nil && rt.router != nil
		ip, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			ip = r.RemoteAddr
		}
		uri := r.URL.RequestURI()
		if gw {
			d, t2, c, ok := p.routeTarget(r.Context(), rt, stdRouteHead(r, ip))
			if !ok {
				p.stdCanned(w, c)
				return
			}
			t, pol = t2, d.Policy
			if d.Path != "" {
				uri = d.Path
			}
		} else if rt != nil {
			t = rt.fixed
		}
		if t == nil {
			name, ok := serviceFromHost(r.Host, p.cfg.Domain)
			if !ok {
				p.stdCanned(w, cannedJSON(http.StatusNotFound, "host is not a Consul service", "", "host", r.Host))
				return
			}
			var err error
			if t, err = p.lookupTarget(r.Context(), name); err != nil {
				p.stdCanned(w, cannedJSON(http.StatusServiceUnavailable, err.Error(), name))
				return
			}
		}
		if r.Method == http.MethodConnect {
			p.stdCanned(w, cannedJSON(http.StatusMethodNotAllowed, "CONNECT is not supported", t.name))
			return
		}
		out := r.Header.Clone()
		stripHopStd(out)
		if te := r.Header.Get("Te"); strings.Contains(strings.ToLower(te), "trailers") {
			out.Set("Te", "trailers") // gRPC needs it end to end
		}
		if prior := out.Get("X-Forwarded-For"); prior != "" {
			out.Set("X-Forwarded-For", prior+", "+ip)
		} else {
			out.Set("X-Forwarded-For", ip)
		}
		if gw {
			out.Set("X-Real-IP", ip)
			out.Set("X-Forwarded-Proto", rt.proto)
		} else if out.Get("X-Forwarded-Proto") == "" {
			out.Set("X-Forwarded-Proto", "http")
		}
		x := &stdExchange{p: p, t: t, r: r, hdr: out, uri: uri}
		replayable := idempotent([]byte(r.Method)) || r.Header.Get("Idempotency-Key") != ""
		switch {
		case r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0:
		case r.ContentLength > 0 && r.ContentLength <= int64(p.cfg.MaxReplayBody):
			b, err := io.ReadAll(io.LimitReader(r.Body, r.ContentLength))
			if err != nil {
				p.stdCanned(w, cannedJSON(http.StatusBadRequest, "reading the request body: "+err.Error(), t.name))
				return
			}
			x.body = b
		case r.ContentLength < 0:
			b, err := io.ReadAll(io.LimitReader(r.Body, int64(p.cfg.MaxReplayBody)+1))
			if err != nil {
				p.stdCanned(w, cannedJSON(http.StatusBadRequest, "reading the request body: "+err.Error(), t.name))
				return
			}
			if len(b) <= p.cfg.MaxReplayBody {
				x.body = b
			} else {
				x.stream = io.MultiReader(bytes.NewReader(b), r.Body)
				replayable = false
			}
		default:
			x.stream = r.Body
			replayable = false
		}
		res := t.forwardWith(r.Context(), x, replayable, pol, newAccReq(p, rt, r.Method, r.Host, r.URL.Path))
		ct := t // whose answer res is
		if fb, cause := t.fallbackFor(res); fb != nil && fb.Service != "" {
			if t2, err := p.lookupTarget(r.Context(), fb.Service); err == nil {
				x.discard()
				t.met.fallback(cause)
				w.Header().Set("X-Attache-Fallback", cause)
				w.Header().Set("X-Attache-Fallback-Service", t2.name)
				x.t, ct = t2, t2
				res = t2.forward(r.Context(), x, replayable)
			}
		}
		defer x.discard()
		if fb, _ := ct.fallbackFor(res); res.kind != outAnswered || ct == t && fb != nil && fb.Service == "" {
			p.stdCanned(w, p.cannedFor(ct, res, ct == t))
			return
		}
		x.writeTo(w)
	})
}

func (p *Proxy) stdCanned(w http.ResponseWriter, c canned) {
	for _, kv := range c.hdr {
		w.Header().Set(kv[0], kv[1])
	}
	w.WriteHeader(c.status)
	_, _ = w.Write(c.body)
}

func stripHopStd(h http.Header) {
	for _, v := range h["Connection"] {
		for _, tok := range strings.Split(v, ",") {
			if tok = textproto.TrimString(tok); tok != "" {
				h.Del(tok)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
}

// stdExchange sends a request through net/http's Transport.
type stdExchange struct {
	p      *Proxy
	t      *target
	r      *http.Request
	hdr    http.Header
	uri    string    // the target sent to the instance
	body   []byte    // buffered body, replayable
	stream io.Reader // unbuffered body, one try only
	resp   *http.Response
	cancel context.CancelFunc
}

func (x *stdExchange) transport() *http.Transport {
	t := x.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h2up && x.r.ProtoMajor == 2 {
		if t.h2tr == nil {
			t.h2tr = x.p.newTransport(true)
		}
		return t.h2tr
	}
	if t.h1tr == nil {
		t.h1tr = x.p.newTransport(false)
	}
	return t.h1tr
}

func (p *Proxy) newTransport(h2c bool) *http.Transport {
	tr := &http.Transport{
		DialContext:           p.dialer.DialContext,
		MaxConnsPerHost:       p.cfg.MaxConnsPerHost,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       p.cfg.MaxIdleConnTime,
		DisableCompression:    true,
		ResponseHeaderTimeout: 0,
	}
	tr.Protocols = new(http.Protocols)
	if h2c {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	return tr
}

func (x *stdExchange) try(ep *endpoint, deadline time.Time) (int, error) {
	x.discard()
	ctx, cancel := context.WithDeadline(x.r.Context(), deadline)
	var body io.Reader
	switch {
	case x.body != nil:
		body = bytes.NewReader(x.body)
	case x.stream != nil:
		body = x.stream
		x.stream = nil
	}
	req, err := http.NewRequestWithContext(ctx, x.r.Method, "http://"+ep.addr+x.uri, body)
	if err != nil {
		cancel()
		return 0, err
	}
	req.Header = x.hdr
	req.Host = x.r.Host
	if x.body != nil {
		req.ContentLength = int64(len(x.body))
	} else if body != nil {
		req.ContentLength = x.r.ContentLength
	}
	if len(x.r.Trailer) > 0 {
		req.Trailer = x.r.Trailer
	}
	resp, err := x.transport().RoundTrip(req)
	if err != nil {
		cancel()
		return 0, err
	}
	x.resp, x.cancel = resp, cancel
	return resp.StatusCode, nil
}

func (x *stdExchange) discard() {
	if x.resp != nil {
		x.resp.Body.Close()
		x.resp = nil
	}
	if x.cancel != nil {
		x.cancel()
		x.cancel = nil
	}
}

// writeTo streams the answer to the client, flushing as data arrives, with
// trailers.
func (x *stdExchange) writeTo(w http.ResponseWriter) {
	resp := x.resp
	h := w.Header()
	for k, v := range resp.Header {
		h[k] = v
	}
	stripHopStd(h)
	for k := range resp.Trailer {
		h.Add("Trailer", k)
	}
	w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(w)
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			_ = rc.Flush()
		}
		if err != nil {
			break
		}
	}
	for k, v := range resp.Trailer {
		h[http.TrailerPrefix+k] = v
	}
}
