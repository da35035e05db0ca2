package sidecar

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"attache/sidecar/catalog"
)

func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /{$}", s.statusPage)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /v1/snapshot", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, struct {
			Status   catalog.Status    `json:"status"`
			Snapshot *catalog.Snapshot `json:"snapshot"`
		}{s.watcher.Status(), s.watcher.Load()}, http.StatusOK)
	})
	mux.Handle("GET /v1/breakers", s.breakers.Handler())
	mux.HandleFunc("GET /v1/stats", s.statsHandler)
	if s.gateway != nil {
		mux.Handle("GET /v1/routes", s.gateway.Handler())
	} else {
		mux.HandleFunc("GET /v1/routes", func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, map[string]string{"error": "this sidecar runs no gateway (-gateway)"}, http.StatusNotFound)
		})
	}
	return mux
}

// readiness is the body of /readyz.
type readiness struct {
	Ready    bool                    `json:"ready"`
	Reasons  []string                `json:"reasons,omitempty"`
	Register catalog.RegistrarStatus `json:"registration"`
	Catalog  catalog.Status          `json:"catalog"`
}

// readyz answers 200 once the sidecar serves: every listener is bound, it
// has registered with its agent, and it has a catalog view to serve (from
// Consul, or from disk while Consul is down). Under systemd, READY=1 is sent
// at the same moment (see New).
func (s *Sidecar) readyz(w http.ResponseWriter, r *http.Request) {
	rd := readiness{Register: s.registrar.Status(), Catalog: s.watcher.Status(), Reasons: s.notReady()}
	rd.Ready = len(rd.Reasons) == 0
	writeJSON(w, rd, map[bool]int{true: http.StatusOK, false: http.StatusServiceUnavailable}[rd.Ready])
}

// notReady returns why the sidecar does not serve yet; nil when it does.
func (s *Sidecar) notReady() []string {
	var reasons []string
	if s.stopping.Load() {
		reasons = append(reasons, "stopping: deregistered, draining the listeners")
	}
	if (s.dns != nil && !closed(s.dns.Ready())) || (s.proxy != nil && !closed(s.proxy.Ready())) {
		reasons = append(reasons, "listeners not bound yet")
	}
	if st := s.registrar.Status(); !st.Registered {
		reasons = append(reasons, "not registered with the local Consul agent yet: "+st.LastError)
	}
	if !s.watcher.Ready() {
		reasons = append(reasons, "no catalog view yet: "+s.watcher.Status().LastError)
	}
	return reasons
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func writeJSON(w http.ResponseWriter, v any, code int) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
