package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"attache/internal/reuseport"
)

// live are the proxy settings a reload may change that requests read:
// one immutable value, replaced whole (Proxy.live), so that a request
// reads them with one atomic load and never sees half of a change. A
// request reads them as it starts and keeps what it read.
type live struct {
	tryTimeout     time.Duration
	requestTimeout time.Duration
	maxRetries     int
}

func newLive(c Config) *live {
	l := &live{tryTimeout: c.TryTimeout, requestTimeout: c.RequestTimeout, maxRetries: c.MaxRetries}
	if c.NoRetries {
		l.maxRetries = 0
	}
	return l
}

// runState is what Run serves with, for listeners a reload adds.
type runState struct {
	ctx  context.Context
	wg   *sync.WaitGroup
	errc chan<- error
}

// served is one upstream or HTTP proxy listener serving.
type served struct {
	up   Upstream // an upstream's; zero for the HTTP proxy
	addr string   // the configured address (Addr may differ: port 0)
	ln   net.Listener
	h    *httpListener // nil: a TCP upstream
}

const httpProxyKey = "\x00http-proxy"

// startUpstream serves u on ln: its target, its accept loop (TCP), and the
// catalog watch asked for at once. It returns u's HTTP listener, if any,
// for the caller to serve (serveHTTP at start, startHTTP on a reload). The
// caller holds p.lnMu.
func (p *Proxy) startUpstream(u Upstream, ln net.Listener) []*httpListener {
	r := p.run
	t := p.target(u.Name, "", "")
	p.log.Info("upstream listening", "service", u.Name, "addr", ln.Addr().String(), "protocol", u.Protocol)
	s := &served{up: u, addr: u.Addr, ln: ln}
	p.served[strings.ToLower(u.Name)] = s
	r.wg.Add(1)
	go func(name string) { // start watching the service at once
		defer r.wg.Done()
		wctx, c := context.WithTimeout(r.ctx, p.cfg.WantTimeout)
		defer c()
		p.src.Want(wctx, name)
	}(u.Name)
	if u.Protocol == ProtoTCP {
		// Closing ln (a reload removing it) ends the accept loop; the
		// connections under way keep r.ctx, so that they are not cut.
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			p.serveTCP(r.ctx, ln, t)
		}()
		return nil
	}
	s.h = p.newHTTPListener(r.ctx, ln, &routing{fixed: t})
	return []*httpListener{s.h}
}

// Update applies a reloaded configuration while everything keeps serving:
// upstream listeners and the HTTP proxy listener added, removed or moved
// to another address, and the try and request timeouts and retries
// (requests under way keep the ones they started with). The other fields
// of cfg are not looked at: they need a restart (the sidecar says which).
//
// New listeners are bound before anything changes: an address that cannot
// be bound is an error and nothing changes. A removed listener stops
// accepting at once; its open connections finish the requests under way
// and stay served until they close or sit idle for IdleTimeout, or the
// proxy stops. An upstream's protocol or load balancer cannot change
// (requests read them without a lock): that is an error too.
func (p *Proxy) Update(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	cfg = cfg.withDefaults()
	want := map[string]*served{}
	for _, u := range cfg.Upstreams {
		if err := checkServiceName(u.Name); err != nil {
			return fmt.Errorf("proxy: upstream: %w", err)
		}
		if err := checkListenAddr(u.Addr); err != nil {
			return fmt.Errorf("proxy: upstream %s: %w", u.Name, err)
		}
		if u.Protocol == "" {
			u.Protocol = ProtoHTTP
		}
		switch u.Protocol {
		case ProtoHTTP, ProtoHTTP2, ProtoTCP:
		default:
			return fmt.Errorf("proxy: upstream %s: unknown protocol %q", u.Name, u.Protocol)
		}
		if u.Balancer == "" {
			u.Balancer = p.cfg.Balancer
		}
		if _, err := ParseBalancer(string(u.Balancer)); err != nil {
			return err
		}
		key := strings.ToLower(u.Name)
		if want[key] != nil {
			return fmt.Errorf("proxy: upstream %s: given twice", u.Name)
		}
		want[key] = &served{up: u, addr: u.Addr}
	}
	if cfg.HTTPProxyAddr != "" {
		if err := checkListenAddr(cfg.HTTPProxyAddr); err != nil {
			return fmt.Errorf("proxy: http proxy: %w", err)
		}
		want[httpProxyKey] = &served{addr: cfg.HTTPProxyAddr}
	}

	p.lnMu.Lock()
	defer p.lnMu.Unlock()
	if p.run == nil || p.stopped {
		return errors.New("proxy: not serving")
	}
	// What changes: listeners to stop (gone, or moved) and to start.
	var stop, start []string
	for key, s := range p.served {
		if w := want[key]; w == nil || w.addr != s.addr || w.up.Protocol != s.up.Protocol || w.up.Balancer != s.up.Balancer {
			stop = append(stop, key)
		}
	}
	for key, w := range want {
		if s := p.served[key]; s == nil || w.addr != s.addr || w.up.Protocol != s.up.Protocol || w.up.Balancer != s.up.Balancer {
			start = append(start, key)
		}
	}
	for _, key := range start {
		if key == httpProxyKey {
			continue
		}
		u := want[key].up
		p.mu.Lock()
		t := p.targets[key]
		p.mu.Unlock()
		if t != nil && (t.bal != u.Balancer || t.h2up != (u.Protocol == ProtoHTTP2)) {
			return fmt.Errorf("proxy: upstream %s: its protocol or load balancer cannot change without a restart", u.Name)
		}
	}
	// Bind first; an address a stopping listener holds is freed first.
	lns := map[string]net.Listener{}
	closeNew := func() {
		for _, ln := range lns {
			ln.Close()
		}
	}
	lc := reuseport.Or(p.cfg.Binder) // SO_REUSEPORT, and known to the handover (a successor gets them too)
	stopped := map[string]bool{}
	for _, key := range start {
		addr := want[key].addr
		ln, err := lc.Listen(p.run.ctx, "tcp", addr)
		if err != nil {
			if old := holder(p.served, stop, addr); old != "" && !stopped[old] {
				p.stopListener(old)
				stopped[old] = true
				ln, err = lc.Listen(p.run.ctx, "tcp", addr)
			}
		}
		if err != nil {
			closeNew()
			if len(stopped) > 0 {
				p.log.Error("reload: a listener was stopped to free its address, which could not be bound again", "addr", addr)
			}
			return fmt.Errorf("proxy: listen on %s: %w", addr, err)
		}
		lns[key] = ln
	}
	for _, key := range stop {
		if !stopped[key] {
			p.stopListener(key)
		}
	}
	p.live.Store(newLive(cfg))
	for _, key := range start {
		ln := lns[key]
		var hls []*httpListener
		if key == httpProxyKey {
			p.log.Info("http proxy listening", "addr", ln.Addr().String())
			h := p.newHTTPListener(p.run.ctx, ln, nil)
			p.served[key] = &served{addr: want[key].addr, ln: ln, h: h}
			hls = []*httpListener{h}
		} else {
			hls = p.startUpstream(want[key].up, ln)
		}
		for _, h := range hls {
			onLoops := p.ev != nil && p.ev.addListener(h)
			p.startHTTP(p.run.ctx, p.run.wg, p.run.errc, h, onLoops)
		}
		p.boundMu.Lock()
		if key == httpProxyKey {
			p.bound[""] = ln.Addr()
		} else {
			p.bound[key] = ln.Addr()
		}
		p.boundMu.Unlock()
	}
	return nil
}

// holder returns the key among keys of the listener configured on addr.
func holder(served map[string]*served, keys []string, addr string) string {
	for _, k := range keys {
		if served[k].addr == addr {
			return k
		}
	}
	return ""
}

// stopListener stops accepting on the listener of key: the event loops
// let go of it, then it is closed. Its connections live on. The caller
// holds p.lnMu.
func (p *Proxy) stopListener(key string) {
	s := p.served[key]
	delete(p.served, key)
	p.boundMu.Lock()
	if key == httpProxyKey {
		delete(p.bound, "")
	} else {
		delete(p.bound, key)
	}
	p.boundMu.Unlock()
	if s.h != nil {
		s.h.removed.Store(true)
		if p.ev != nil {
			p.ev.removeListener(s.h)
		}
		if s.h.h1 != nil {
			s.h.h1.Close()
		}
	}
	s.ln.Close()
	p.log.Info("listener removed", "addr", s.ln.Addr().String(), "service", s.up.Name)
}
