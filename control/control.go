// Package control is the control service: it keeps the versions of the
// gateway's route documents in the Consul KV store (Store) and serves the
// routes API over HTTP/JSON (Server) that the `attache routes` CLI (Client)
// and anyone with curl use. It holds no state of its own.
package control

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"attache/control/routes"
)

// Config configures the control service.
type Config struct {
	// Addr is the HTTP listen address. Default 127.0.0.1:9500.
	Addr string
	// Consul is the Consul agent's HTTP address. Default 127.0.0.1:8500.
	Consul string
	// ConsulToken is the Consul ACL token. Default none.
	ConsulToken string
	// ConsulTLS configures HTTPS to Consul (an https:// address): CA,
	// client certificate and key, server name. Default none (the system's
	// roots).
	ConsulTLS api.TLSConfig
	// APIToken, when set, is required as "Authorization: Bearer TOKEN" on
	// every /v1/ request. Required when Addr is not a loopback address.
	APIToken string
	// KVPrefix is where the routes live in the KV store. Default "attache/".
	KVPrefix string
	// Keep is how many versions are kept. Default 50.
	Keep int
	// MaxBody bounds a request body. Default 512 KiB (a document is at most
	// routes.MaxDocumentBytes, 256 KiB; JSON escaping may double it).
	MaxBody int64
	// Timeout bounds one request's work, Consul calls included. Default 10s.
	Timeout time.Duration
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Addr:     "127.0.0.1:9500",
		Consul:   "127.0.0.1:8500",
		KVPrefix: routes.DefaultKVPrefix,
		Keep:     50,
		MaxBody:  512 << 10,
		Timeout:  10 * time.Second,
	}
}

// Server is the control service.
type Server struct {
	cfg   Config
	log   hclog.Logger
	store *Store
}

// New checks the configuration and returns a control service; it binds and
// connects to nothing.
func New(cfg Config, log hclog.Logger) (*Server, error) {
	d := DefaultConfig()
	if cfg.Addr == "" {
		cfg.Addr = d.Addr
	}
	if cfg.Consul == "" {
		cfg.Consul = d.Consul
	}
	if cfg.KVPrefix == "" {
		cfg.KVPrefix = d.KVPrefix
	}
	if cfg.Keep <= 0 {
		cfg.Keep = d.Keep
	}
	if cfg.MaxBody <= 0 {
		cfg.MaxBody = d.MaxBody
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = d.Timeout
	}
	host, _, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("control: listen address %q: %w", cfg.Addr, err)
	}
	if ip := net.ParseIP(host); cfg.APIToken == "" && (host != "localhost" && (ip == nil || !ip.IsLoopback())) {
		return nil, fmt.Errorf("control: listening on %s, off loopback, needs an API token (-api-token or $ATTACHE_CONTROL_TOKEN)", cfg.Addr)
	}
	c, err := api.NewClient(&api.Config{Address: cfg.Consul, Token: cfg.ConsulToken, TLSConfig: cfg.ConsulTLS})
	if err != nil {
		return nil, fmt.Errorf("control: consul client: %w", err)
	}
	return &Server{cfg: cfg, log: log.Named("control"), store: newStore(c, cfg.KVPrefix, cfg.Keep)}, nil
}

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("control: listen on %s: %w", s.cfg.Addr, err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      s.cfg.Timeout + 10*time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	s.log.Info("control service running", "addr", ln.Addr().String(), "consul", s.cfg.Consul, "kv_prefix", s.cfg.KVPrefix, "keep", s.cfg.Keep, "token_required", s.cfg.APIToken != "")
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("control: %w", err)
	}
	return nil
}

// Handler returns the HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("POST /v1/routes/validate", s.auth(s.validate))
	mux.HandleFunc("POST /v1/routes/diff", s.auth(s.diff))
	mux.HandleFunc("POST /v1/routes/apply", s.auth(s.apply))
	mux.HandleFunc("POST /v1/routes/rollback", s.auth(s.rollback))
	mux.HandleFunc("GET /v1/routes/current", s.auth(s.get))
	mux.HandleFunc("GET /v1/routes/versions/{n}", s.auth(s.get))
	mux.HandleFunc("GET /v1/routes/history", s.auth(s.history))
	mux.HandleFunc("GET /v1/routes/status", s.auth(s.status))
	return mux
}

// APIError is the body of every refusal.
type APIError struct {
	Error    string           `json:"error"`
	Problems []routes.Problem `json:"problems,omitempty"`
}

func (s *Server) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.APIToken != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(s.cfg.APIToken)) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="attache control"`)
				writeJSON(w, http.StatusUnauthorized, APIError{Error: "control: a valid bearer token is required (-api-token or $ATTACHE_CONTROL_TOKEN)"})
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.Timeout)
		defer cancel()
		h(w, r.WithContext(ctx))
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// fail answers an error with its status: 422 invalid document, 409
// conflict, 404 not found, 502 Consul trouble.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var perr *routes.Error
	switch {
	case errors.As(err, &perr):
		writeJSON(w, http.StatusUnprocessableEntity, APIError{Error: "invalid document", Problems: perr.Problems})
	case errors.Is(err, ErrConflict):
		writeJSON(w, http.StatusConflict, APIError{Error: err.Error()})
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, APIError{Error: err.Error()})
	case errors.Is(err, errCorrupt):
		s.log.Error("request failed", "path", r.URL.Path, "error", err)
		writeJSON(w, http.StatusInternalServerError, APIError{Error: err.Error() + " (an apply replaces a corrupt current version)"})
	default:
		s.log.Warn("request failed", "path", r.URL.Path, "error", err)
		writeJSON(w, http.StatusBadGateway, APIError{Error: err.Error()})
	}
}

// document reads and parses the body; ?name= names the file in errors
// (default "routes.hcl"; a name ending in .json, or a body starting with
// "{", is read as JSON).
func (s *Server) document(w http.ResponseWriter, r *http.Request) (*routes.Document, bool) {
	name := r.URL.Query().Get("name")
	if name == "" {
		name = "routes.hcl"
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBody))
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			writeJSON(w, http.StatusRequestEntityTooLarge, APIError{Error: fmt.Sprintf("control: body larger than %d bytes", s.cfg.MaxBody)})
		} else {
			writeJSON(w, http.StatusBadRequest, APIError{Error: "control: reading the body: " + err.Error()})
		}
		return nil, false
	}
	doc, err := routes.Parse(name, body)
	if err != nil {
		s.fail(w, r, err)
		return nil, false
	}
	return doc, true
}

// expect reads ?expect=N, the version the caller based its change on.
func expect(w http.ResponseWriter, r *http.Request) (*uint64, bool) {
	v := r.URL.Query().Get("expect")
	if v == "" {
		return nil, true
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, APIError{Error: fmt.Sprintf("control: expect=%q is not a version number", v)})
		return nil, false
	}
	return &n, true
}

// ValidateResult answers validate.
type ValidateResult struct {
	Valid    bool     `json:"valid"`
	Routes   int      `json:"routes"`
	Warnings []string `json:"warnings,omitempty"`
}

func (s *Server) validate(w http.ResponseWriter, r *http.Request) {
	doc, ok := s.document(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, ValidateResult{Valid: true, Routes: len(doc.Routes), Warnings: s.store.Warnings(r.Context(), doc)})
}

// DiffResult answers diff.
type DiffResult struct {
	Current  uint64   `json:"current"` // the version compared with (0: none)
	Changed  bool     `json:"changed"`
	Diff     string   `json:"diff"`
	Warnings []string `json:"warnings,omitempty"`
}

func (s *Server) diff(w http.ResponseWriter, r *http.Request) {
	doc, ok := s.document(w, r)
	if !ok {
		return
	}
	var cur uint64
	var old *routes.Document
	v, d, err := s.store.Get(r.Context(), 0)
	switch {
	case err == nil:
		cur, old = v.Number, d
	case !errors.Is(err, ErrNotFound):
		s.fail(w, r, err)
		return
	}
	diff := routes.Diff(old, doc)
	writeJSON(w, http.StatusOK, DiffResult{Current: cur, Changed: diff != "", Diff: diff, Warnings: s.store.Warnings(r.Context(), doc)})
}

func (s *Server) apply(w http.ResponseWriter, r *http.Request) {
	doc, ok := s.document(w, r)
	if !ok {
		return
	}
	exp, ok := expect(w, r)
	if !ok {
		return
	}
	res, err := s.store.Apply(r.Context(), doc, "apply", exp)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	res.Warnings = s.store.Warnings(r.Context(), doc)
	if res.Changed {
		s.log.Info("routes applied", "version", res.Version, "previous", res.Previous, "routes", len(doc.Routes), "pruned", len(res.Pruned))
	}
	writeJSON(w, http.StatusOK, res)
}

// RollbackRequest is the body of a rollback.
type RollbackRequest struct {
	Version uint64 `json:"version"`
}

func (s *Server) rollback(w http.ResponseWriter, r *http.Request) {
	var req RollbackRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil || req.Version == 0 {
		writeJSON(w, http.StatusBadRequest, APIError{Error: `control: want a body {"version": N} with N > 0`})
		return
	}
	exp, ok := expect(w, r)
	if !ok {
		return
	}
	res, err := s.store.Rollback(r.Context(), req.Version, exp)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if res.Changed {
		s.log.Info("routes rolled back", "to", req.Version, "version", res.Version, "previous", res.Previous)
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	var n uint64
	if v := r.PathValue("n"); v != "" {
		var err error
		if n, err = strconv.ParseUint(v, 10, 64); err != nil || n == 0 {
			writeJSON(w, http.StatusBadRequest, APIError{Error: fmt.Sprintf("control: %q is not a version number", v)})
			return
		}
	}
	v, _, err := s.store.Get(r.Context(), n)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// HistoryResult answers history.
type HistoryResult struct {
	Current  uint64         `json:"current"`
	Versions []HistoryEntry `json:"versions"`
}

func (s *Server) history(w http.ResponseWriter, r *http.Request) {
	cur, hs, err := s.store.History(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, HistoryResult{Current: cur, Versions: hs})
}

// StatusResult answers status.
type StatusResult struct {
	Current  uint64          `json:"current"`
	Gateways []GatewayStatus `json:"gateways"`
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	cur, gs, err := s.store.Status(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, StatusResult{Current: cur, Gateways: gs})
}
