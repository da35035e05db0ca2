package sidecar

import (
	"encoding/json"
	"net/http"
	"time"

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
	mux.HandleFunc("GET /v1/breakers", s.breakersJSON)
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

// breakerJSON is the JSON form of one service's breaker in /v1/breakers.
type breakerJSON struct {
	Service    string         `json:"service"`
	State      string         `json:"state"`
	Panic      bool           `json:"panic"`
	OpenUntil  *time.Time     `json:"open_until,omitempty"`
	Reason     string         `json:"reason,omitempty"`
	InFlight   int            `json:"in_flight"`
	Calls      int            `json:"window_calls"`
	Failures   int            `json:"window_failures"`
	SlowCalls  int            `json:"window_slow_calls"`
	Instances  []instanceJSON `json:"instances"`
	TrialsLeft int            `json:"trials_left,omitempty"`
}

// instanceJSON is the JSON form of one instance's outlier state.
type instanceJSON struct {
	ID                  string     `json:"id"`
	Ejected             bool       `json:"ejected"`
	EjectedUntil        *time.Time `json:"ejected_until,omitempty"`
	ProbeReady          bool       `json:"probe_ready,omitempty"`
	Probing             bool       `json:"probing,omitempty"`
	Failing             bool       `json:"failing,omitempty"`
	ConsecutiveFailures int        `json:"consecutive_failures"`
	TimesEjected        int        `json:"times_ejected"`
}

// breakersJSON serves /v1/breakers: every service's breaker state
// (breaker.Registry.State), field names as documented in the README.
func (s *Sidecar) breakersJSON(w http.ResponseWriter, r *http.Request) {
	states := s.breakers.State()
	out := make([]breakerJSON, len(states))
	for i, st := range states {
		b := breakerJSON{Service: st.Service, State: st.State, Panic: st.Panic, OpenUntil: st.OpenUntil,
			Reason: st.Reason, InFlight: st.InFlight, Calls: st.Calls, Failures: st.Failures,
			SlowCalls: st.SlowCalls, TrialsLeft: st.TrialsLeft, Instances: make([]instanceJSON, len(st.Instances))}
		for j, in := range st.Instances {
			b.Instances[j] = instanceJSON(in)
		}
		out[i] = b
	}
	writeJSON(w, map[string]any{"services": out}, http.StatusOK)
}
