// Package sidecar is the per-node attache process: it loads the
// configuration, builds the components (catalog watcher, registration, DNS,
// proxy, gateway), runs them until its context ends, and serves the admin
// endpoints (/healthz, /readyz, /metrics, /v1/...).
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"

	"attache/sidecar/catalog"
)

// Sidecar is one node's attache process.
type Sidecar struct {
	cfg       Config
	log       hclog.Logger
	metrics   *prometheus.Registry
	registrar *catalog.Registrar
}

// New builds the sidecar from cfg. It binds nothing and contacts nobody: Run does.
func New(cfg Config, log hclog.Logger) (*Sidecar, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	regs, err := LoadServiceFiles(cfg.ServiceFiles)
	if err != nil {
		return nil, err
	}
	self, err := selfRegistration(cfg)
	if err != nil {
		return nil, err
	}
	client, err := consulClient(cfg, cfg.Consul[0])
	if err != nil {
		return nil, err
	}
	m := prometheus.NewRegistry()
	m.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Sidecar{
		cfg:       cfg,
		log:       log,
		metrics:   m,
		registrar: catalog.NewRegistrar(client, append([]*api.AgentServiceRegistration{self}, regs...), 0, log),
	}, nil
}

// consulClient returns a consul/api client for one address, with the token
// and the TLS settings of the CONSUL_* environment variables.
func consulClient(cfg Config, addr string) (*api.Client, error) {
	c := api.DefaultConfig() // reads CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY, CONSUL_HTTP_SSL...
	c.Address = addr
	c.Token = cfg.Token
	client, err := api.NewClient(c)
	if err != nil {
		return nil, fmt.Errorf("consul client for %s: %w", addr, err)
	}
	return client, nil
}

// selfRegistration is the sidecar's own entry in Consul: service "attache",
// checked through its admin /healthz.
func selfRegistration(cfg Config) (*api.AgentServiceRegistration, error) {
	host, portStr, err := net.SplitHostPort(cfg.Admin)
	if err != nil {
		return nil, fmt.Errorf("-admin %q: %w", cfg.Admin, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("-admin %q: port: %w", cfg.Admin, err)
	}
	meta := map[string]string{}
	for k, v := range map[string]string{"dns": cfg.DNS, "http_proxy": cfg.HTTPProxy, "gateway": cfg.Gateway} {
		if v != "" {
			meta[k] = v
		}
	}
	return &api.AgentServiceRegistration{
		ID: "attache", Name: "attache", Address: host, Port: port, Meta: meta,
		Check: &api.AgentServiceCheck{
			HTTP:     "http://" + cfg.Admin + "/healthz",
			Interval: "5s",
			Timeout:  "2s",
			Status:   api.HealthPassing,
		},
	}, nil
}

// Run binds every listener (an address in use fails at once, naming it),
// runs every component until ctx ends or one fails, then stops them all and
// deregisters from the agent.
func (s *Sidecar) Run(ctx context.Context) error {
	adminLn, err := net.Listen("tcp", s.cfg.Admin)
	if err != nil {
		return fmt.Errorf("admin: listen on %s: %w", s.cfg.Admin, err)
	}
	admin := &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.registrar.Run(gctx) })
	g.Go(func() error {
		if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("admin: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return admin.Shutdown(sctx)
	})
	s.log.Info("sidecar running", "admin", s.cfg.Admin, "consul", s.cfg.Consul, "pid", os.Getpid())
	err = g.Wait()
	s.log.Info("sidecar stopped")
	return err
}
