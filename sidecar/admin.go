package sidecar

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{}))
	return mux
}

// readiness is the body of /readyz.
type readiness struct {
	Ready    bool   `json:"ready"`
	Reason   string `json:"reason,omitempty"`
	Register any    `json:"registration"`
}

func (s *Sidecar) readyz(w http.ResponseWriter, r *http.Request) {
	reg := s.registrar.Status()
	rd := readiness{Ready: reg.Registered, Register: reg}
	if !reg.Registered {
		rd.Reason = "not registered with the local Consul agent yet: " + reg.LastError
	}
	writeJSON(w, rd, map[bool]int{true: http.StatusOK, false: http.StatusServiceUnavailable}[rd.Ready])
}

func writeJSON(w http.ResponseWriter, v any, code int) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
