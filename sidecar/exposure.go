package sidecar

import (
	"crypto/subtle"
	"net"
	"net/http"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// Who may reach a listener is who may use it: the HTTP proxy and upstream
// listeners relay into the mesh, DNS reads the catalog, the admin API shows
// the view and the breakers. Every listener defaults to loopback; one bound
// elsewhere is logged once at start, and the admin API off loopback needs a
// token (README, "Who may reach which listener").

// loopback reports whether a listen address accepts only local
// connections: a loopback IP, or "localhost".
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// warnExposed logs, once per listener, each one bound off loopback, saying
// what anyone who reaches it can do.
func (s *Sidecar) warnExposed(log hclog.Logger) {
	warn := func(listener, addr, what string) {
		if addr != "" && !loopback(addr) {
			log.Warn("listener on a routable address: "+what, "listener", listener, "addr", addr)
		}
	}
	warn("http-proxy", s.cfg.Proxy.HTTPProxyAddr, "any host that reaches it can relay requests into the mesh through this sidecar")
	for _, u := range s.cfg.Proxy.Upstreams {
		warn("upstream "+u.Name, u.Addr, "any host that reaches it can call "+u.Name+" through this sidecar")
	}
	warn("dns", s.cfg.DNS.Addr, "any host that reaches it can read the catalog (names outside the domain are forwarded for loopback clients only)")
	warn("admin", s.cfg.Admin, "every endpoint but /healthz and /readyz needs the admin token")
}

// adminAuth requires "Authorization: Bearer TOKEN" on every admin endpoint
// but the read-only health endpoints /healthz and /readyz (which Consul's
// check and orchestrators call without one), when a token is configured.
func adminAuth(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz", "/readyz":
			next.ServeHTTP(w, r)
			return
		}
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="attache admin"`)
			writeJSON(w, map[string]string{"error": "the admin API needs its token: Authorization: Bearer TOKEN (-admin-token)"}, http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}
