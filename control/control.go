// Package control is the control service: it will keep the versions of the
// gateway's route documents in the Consul KV store and serve the routes API.
// Today it serves its health endpoint, so that scripts/up and the Nomad and
// Compose files can run and check it.
package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config configures the control service.
type Config struct {
	Addr string // HTTP listen address, default 127.0.0.1:9500
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config { return Config{Addr: "127.0.0.1:9500"} }

// Server is the control service.
type Server struct {
	cfg Config
	log hclog.Logger
}

// New returns a control service.
func New(cfg Config, log hclog.Logger) *Server { return &Server{cfg: cfg, log: log.Named("control")} }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("control: listen on %s: %w", s.cfg.Addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	s.log.Info("control service running", "addr", s.cfg.Addr)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("control: %w", err)
	}
	return nil
}
