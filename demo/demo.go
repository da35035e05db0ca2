// Package demo is the demo backend used by scripts/up, the tests and the
// benchmarks: a small HTTP service that answers with its service name,
// instance id and the request's path, has a /health endpoint for Consul's
// HTTP check, and can be told to fail, be slow or hang, for fault tests.
package demo

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Fault modes set with POST /fault?mode=...
const (
	ModeOK         = "ok"          // answer normally
	ModeFail       = "fail"        // answer 500 to every request but /health and /fault
	ModeSlow       = "slow"        // wait delay, then answer normally
	ModeHang       = "hang"        // never answer until the client goes away
	ModeHealthFail = "health-fail" // answer normally, but /health returns 503
)

// Server is the demo backend's handler.
type Server struct {
	service, instance string

	mu    sync.Mutex
	mode  string
	delay time.Duration
	count uint64
}

// New returns a demo backend for one instance of service.
func New(service, instance string) *Server {
	return &Server{service: service, instance: instance, mode: ModeOK}
}

// Response is the JSON body the demo backend answers with.
type Response struct {
	Service  string `json:"service"`
	Instance string `json:"instance"`
	Path     string `json:"path"`
	Method   string `json:"method"`
	Count    uint64 `json:"count"`
}

// SetFault switches the fault mode; delay applies to ModeSlow.
func (s *Server) SetFault(mode string, delay time.Duration) error {
	switch mode {
	case ModeOK, ModeFail, ModeSlow, ModeHang, ModeHealthFail:
	default:
		return fmt.Errorf("demo: unknown fault mode %q (want ok, fail, slow, hang or health-fail)", mode)
	}
	s.mu.Lock()
	s.mode, s.delay = mode, delay
	s.mu.Unlock()
	return nil
}

// Count is how many requests (other than /health and /fault) it has served.
func (s *Server) Count() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/health":
		s.mu.Lock()
		mode := s.mode
		s.mu.Unlock()
		if mode == ModeHealthFail || mode == ModeFail {
			http.Error(w, "unhealthy", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
		return
	case "/fault":
		if r.Method != http.MethodPost {
			http.Error(w, "POST /fault?mode=ok|fail|slow|hang|health-fail&delay=200ms", http.StatusMethodNotAllowed)
			return
		}
		var delay time.Duration
		if d := r.URL.Query().Get("delay"); d != "" {
			var err error
			if delay, err = time.ParseDuration(d); err != nil {
				http.Error(w, "demo: bad delay: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		if err := s.SetFault(r.URL.Query().Get("mode"), delay); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintln(w, "ok")
		return
	}
	s.mu.Lock()
	s.count++
	mode, delay, count := s.mode, s.delay, s.count
	s.mu.Unlock()
	switch mode {
	case ModeFail:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusInternalServerError)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": "fault injected", "instance": s.instance})
		return
	case ModeHang:
		<-r.Context().Done()
		return
	case ModeSlow:
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Instance", s.instance)
	_ = json.NewEncoder(w).Encode(Response{
		Service: s.service, Instance: s.instance, Path: r.URL.Path, Method: r.Method, Count: count,
	})
}
