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
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"

	"attache/dns"
	"attache/internal/sdnotify"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/gateway"
	"attache/sidecar/proxy"
)

// Sidecar is one node's attache process.
type Sidecar struct {
	cfg        Config
	log        hclog.Logger
	metrics    *prometheus.Registry
	registrar  *catalog.Registrar
	watcher    *catalog.Watcher
	breakers   *breaker.Registry
	proxy      *proxy.Proxy     // nil without -upstream, -http-proxy or -gateway
	gateway    *gateway.Gateway // nil without -gateway or -gateway-tls
	dns        *dns.Server      // nil without -dns
	notifier   *sdnotify.Notifier
	accessFile *os.File               // the -access-log file, closed when Run returns
	stopping   atomic.Bool            // set as the graceful stop begins: /readyz answers 503 from then on
	reloadMu   sync.Mutex             // one Reload at a time
	applied    atomic.Pointer[Config] // the configuration in force after a reload; nil: cfg
	stats      statsRing              // the last minute's samples of the counters (stats.go)
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
	m := prometheus.NewRegistry()
	m.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Sidecar{cfg: cfg, log: log, metrics: m}

	wc := catalog.DefaultConfig()
	wc.Addresses, wc.Token, wc.TokenFile, wc.TLS, wc.SSL = cfg.Consul, cfg.Token, cfg.TokenFile, cfg.TLS, cfg.SSL
	wc.Mode = catalog.Mode(cfg.Watch)
	wc.Services = cfg.WatchList
	wc.Stale, wc.MaxStale, wc.IncludeWarning = cfg.Stale, cfg.MaxStale, cfg.Warning
	wc.IdleTimeout, wc.Streaming = cfg.WatchIdle, cfg.Streaming
	wc.DataDir, wc.Node = cfg.DataDir, cfg.Node
	wc.Logger, wc.Registerer = log, m
	if s.watcher, err = catalog.NewWatcher(wc); err != nil {
		return nil, err
	}
	// Registration goes to the node's own agent: the first -consul address.
	client, err := s.watcher.Client(0)
	if err != nil {
		return nil, err
	}
	regs = append([]*api.AgentServiceRegistration{self}, regs...)
	if s.breakers, err = breaker.New(breakerConfig(cfg), log, m); err != nil {
		return nil, err
	}
	if cfg.Gateway != "" || cfg.GatewayTLS != "" {
		gc := gateway.DefaultConfig()
		gc.Addr, gc.TLSAddr, gc.Prefix, gc.Node, gc.DataDir = cfg.Gateway, cfg.GatewayTLS, cfg.RoutesPrefix, cfg.Node, cfg.DataDir
		gc.Logger, gc.Registerer, gc.Breakers = log, m, s.breakers
		if s.gateway, err = gateway.New(gc, client, s.watcher); err != nil {
			return nil, err
		}
		reg, err := s.gateway.Registration()
		if err != nil {
			return nil, err
		}
		regs = append(regs, reg)
	}
	s.registrar = catalog.NewRegistrar(client, regs, 0, log)

	var ejections dns.Ejections // DNS leaves out what the proxy ejected, when there is a proxy
	if len(cfg.Upstreams) > 0 || cfg.HTTPProxy != "" || s.gateway != nil {
		pc := proxy.Config{HTTPProxyAddr: cfg.HTTPProxy, Node: cfg.Node, Fallbacks: cfg.Fallbacks, Logger: log, Registerer: m}
		if s.gateway != nil {
			pc.Gateways = s.gateway.Listeners()
		}
		pc.Balancer, _ = proxy.ParseBalancer(cfg.Balancer) // checked by Validate
		pc.IdleTimeout, pc.HeaderTimeout, pc.BodyTimeout, pc.MaxClientConns = cfg.ClientIdle, cfg.HeaderTimeout, cfg.BodyTimeout, cfg.MaxClients
		pc.ShutdownGraceTime = cfg.DrainTimeout
		if cfg.AccessLog != "off" && (s.gateway != nil || cfg.AccessLogAll) {
			switch cfg.AccessLog {
			case "stdout":
				pc.AccessLog = os.Stdout
			default:
				f, err := os.OpenFile(cfg.AccessLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
				if err != nil {
					return nil, fmt.Errorf("-access-log: %w", err)
				}
				s.accessFile, pc.AccessLog = f, f
			}
			pc.AccessLogAll, pc.AccessLogSample = cfg.AccessLogAll, cfg.AccessSample
		}
		if err := proxyReloadable(&pc, cfg); err != nil {
			return nil, err
		}
		if err := applyUpstreams(cfg.UpstreamSettings, s.breakers, &pc); err != nil {
			return nil, err
		}
		if s.proxy, err = proxy.New(pc, s.watcher, s.breakers); err != nil {
			return nil, err
		}
		ejections = s.breakers
	}
	if cfg.DNS != "" {
		dc := dnsConfig(cfg)
		dc.RateLimit, dc.RateBurst = cfg.DNSRateLimit, cfg.DNSRateBurst
		dc.Logger, dc.Registerer = log, m
		if s.dns, err = dns.New(dc, s.watcher, ejections); err != nil {
			return nil, err
		}
	}
	nc := sdnotify.DefaultConfig()
	nc.Ready, nc.Logger = func() bool { return len(s.notReady()) == 0 }, log
	if s.notifier, err = sdnotify.New(nc); err != nil {
		return nil, err
	}
	return s, nil
}

// selfRegistration is the sidecar's own entry in Consul: service "attache",
// checked through its admin /healthz.
func selfRegistration(cfg Config) (*api.AgentServiceRegistration, error) {
	host, portStr, err := net.SplitHostPort(cfg.Admin)
	if err != nil {
		return nil, fmt.Errorf("-admin %q: %w", cfg.Admin, err)
	}
	checkHost := host
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		// Listening on every address: Consul takes the node's address for
		// the service, and the agent checks us over loopback.
		host, checkHost = "", "127.0.0.1"
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("-admin %q: port: %w", cfg.Admin, err)
	}
	meta := map[string]string{}
	for k, v := range map[string]string{"dns": cfg.DNS, "http_proxy": cfg.HTTPProxy} {
		if v != "" {
			meta[k] = v
		}
	}
	return &api.AgentServiceRegistration{
		ID: "attache", Name: "attache", Address: host, Port: port, Meta: meta,
		Check: &api.AgentServiceCheck{
			HTTP:     "http://" + net.JoinHostPort(checkHost, portStr) + "/healthz",
			Interval: "5s",
			Timeout:  "2s",
			Status:   api.HealthPassing,
		},
	}, nil
}

// Run binds every listener (an address in use fails at once, naming it) and
// runs every component until ctx ends or one fails. Then it stops
// gracefully, in stages: /readyz answers 503 at once; the node's services
// and the sidecar are deregistered from the agent, so every other view drops
// them; the listeners stop accepting, close idle connections and let the
// requests under way finish (up to -drain-timeout); last the catalog
// watcher, the breakers, the gateway's route watch and the admin server stop.
func (s *Sidecar) Run(ctx context.Context) error {
	adminLn, err := net.Listen("tcp", s.cfg.Admin)
	if err != nil {
		return fmt.Errorf("admin: listen on %s: %w", s.cfg.Admin, err)
	}
	admin := &http.Server{Handler: adminAuth(s.cfg.AdminToken, s.adminHandler()), ReadHeaderTimeout: 10 * time.Second}

	// Each stage runs under its own context, cancelled in order once gctx
	// ends (ctx ended, or a component failed).
	g, gctx := errgroup.WithContext(ctx)
	regCtx, stopReg := context.WithCancel(context.Background())
	srvCtx, stopSrv := context.WithCancel(context.Background())
	baseCtx, stopBase := context.WithCancel(context.Background())
	defer stopReg()
	defer stopSrv()
	defer stopBase()
	regDone, srvDone := make(chan struct{}), make(chan struct{})
	var srv errgroup.Group // the serving listeners: proxy and DNS

	g.Go(func() error { return s.watcher.Run(baseCtx) })
	g.Go(func() error { return s.breakers.Run(baseCtx) })
	g.Go(func() error { return s.runStats(baseCtx) })
	g.Go(func() error { defer close(regDone); return s.registrar.Run(regCtx) })
	if s.dns != nil {
		srv.Go(func() error { return s.dns.Run(srvCtx) })
	}
	if s.proxy != nil {
		srv.Go(func() error { return s.proxy.Run(srvCtx) })
	}
	g.Go(func() error { defer close(srvDone); return srv.Wait() })
	if s.gateway != nil {
		g.Go(func() error { return s.gateway.Run(baseCtx) })
	}
	g.Go(func() error {
		if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("admin: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		s.stop(stopReg, regDone, stopSrv, srvDone)
		stopBase()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return admin.Shutdown(sctx)
	})
	s.warnExposed(s.log)
	s.log.Info("sidecar running", "admin", s.cfg.Admin, "consul", s.cfg.Consul, "pid", os.Getpid())
	// The main loop: under systemd, READY=1 when /readyz would answer 200,
	// watchdog pings, STOPPING=1 as the shutdown starts.
	s.notifier.Run(gctx)
	err = g.Wait()
	if s.accessFile != nil {
		s.accessFile.Close()
	}
	s.log.Info("sidecar stopped")
	return err
}

// stop runs the first two stages of the graceful stop: not ready, then
// deregistered, then the listeners drained.
func (s *Sidecar) stop(stopReg func(), regDone <-chan struct{}, stopSrv func(), srvDone <-chan struct{}) {
	s.stopping.Store(true)
	s.log.Info("stopping: deregistering from the agent, then draining the listeners", "drain_timeout", s.cfg.DrainTimeout)
	stopReg()
	select {
	case <-regDone:
	case <-time.After(s.cfg.DrainTimeout): // an agent that does not answer delays the stop no longer than this
		s.log.Warn("stopping: deregistration did not finish in time; draining anyway")
	}
	stopSrv()
	<-srvDone
}
