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
	"path/filepath"
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
	"attache/internal/handover"
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
	sockets    *handover.Sockets      // every listening socket: SO_REUSEPORT, passed to a successor
	accessFile *os.File               // the -access-log file, closed when Run returns
	stopping   atomic.Bool            // set as the graceful stop begins: /readyz answers 503 from then on
	reloadMu   sync.Mutex             // one Reload at a time
	applied    atomic.Pointer[Config] // the configuration in force after a reload; nil: cfg
	stats      statsRing              // the last minute's samples of the counters (stats.go)
}

// New builds the sidecar from cfg. It binds nothing and contacts nobody: Run does.
func New(cfg Config, log hclog.Logger) (*Sidecar, error) {
	cfg.settle()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	regs, err := loadServiceFiles(cfg.ServiceFiles)
	if err != nil {
		return nil, err
	}
	self, err := selfRegistration(cfg)
	if err != nil {
		return nil, err
	}
	m := prometheus.NewRegistry()
	m.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Sidecar{cfg: cfg, log: log, metrics: m, sockets: handover.New(log)}

	wc := cfg.Catalog
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
	if s.breakers, err = breaker.New(cfg.Breaker, log, m); err != nil {
		return nil, err
	}
	if cfg.Gateway.Addr != "" || cfg.Gateway.TLSAddr != "" {
		gc := cfg.Gateway
		gc.Node, gc.DataDir = cfg.Node, cfg.DataDir
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
	if len(cfg.Proxy.Upstreams) > 0 || cfg.Proxy.HTTPProxyAddr != "" || s.gateway != nil {
		pc := cfg.Proxy
		pc.Node, pc.Logger, pc.Registerer, pc.Binder = cfg.Node, log, m, s.sockets
		if s.gateway != nil {
			pc.Gateways = s.gateway.Listeners()
		}
		if cfg.AccessLog != "off" && (s.gateway != nil || cfg.Proxy.AccessLogAll) {
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
		}
		if err := applyUpstreams(cfg.UpstreamSettings, s.breakers, &pc); err != nil {
			return nil, err
		}
		if s.proxy, err = proxy.New(pc, s.watcher, s.breakers); err != nil {
			return nil, err
		}
		ejections = s.breakers
	}
	if cfg.DNS.Addr != "" {
		dc := cfg.DNS
		dc.Node, dc.Logger, dc.Registerer, dc.Binder = cfg.Node, log, m, s.sockets
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
	for k, v := range map[string]string{"dns": cfg.DNS.Addr, "http_proxy": cfg.Proxy.HTTPProxyAddr} {
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
//
// With a data dir, Run first takes the listening sockets of a sidecar
// already running on it (see internal/handover), serves them once it has a
// catalog view, and tells that one, which then hands over: it stops as
// above but leaves the registration and /readyz to its successor. Every
// socket is bound with SO_REUSEPORT, so a successor can bind beside it too.
func (s *Sidecar) Run(ctx context.Context) error {
	start := time.Now()
	hpath := ""
	if s.cfg.DataDir != "" {
		hpath = filepath.Join(s.cfg.DataDir, handover.SocketFile)
		if len(hpath) >= handover.MaxPath {
			s.log.Warn("data dir path too long for the handover socket: restarts bind beside the running sidecar instead of taking its sockets", "path", hpath)
			hpath = ""
		}
	}
	if hpath != "" {
		// A sidecar that is there but does not hand over stops this one:
		// serving beside it, neither would know of the other.
		if _, err := s.sockets.Take(ctx, hpath); err != nil {
			return err
		}
	}
	inherited := s.sockets.Inherited()
	adminLn, err := s.sockets.Listen(ctx, "tcp", s.cfg.Admin)
	if err != nil {
		s.sockets.CloseUnused()
		return fmt.Errorf("admin: listen on %s: %w", s.cfg.Admin, err)
	}
	admin := &http.Server{Handler: adminAuth(s.cfg.AdminToken, s.adminHandler()), ReadHeaderTimeout: 10 * time.Second}

	// Each stage runs under its own context, cancelled in order once gctx
	// ends (ctx ended, a component failed, or a successor took over).
	runCtx, handOver := context.WithCancel(ctx)
	defer handOver()
	g, gctx := errgroup.WithContext(runCtx)
	regCtx, stopReg := context.WithCancel(context.Background())
	srvCtx, stopSrv := context.WithCancel(context.Background())
	baseCtx, stopBase := context.WithCancel(context.Background())
	defer stopReg()
	defer stopSrv()
	defer stopBase()
	regDone, srvDone, adminDone, serving := make(chan struct{}), make(chan struct{}), make(chan struct{}), make(chan struct{})
	var successor atomic.Pointer[handover.Successor]

	g.Go(func() error { return s.watcher.Run(baseCtx) })
	g.Go(func() error { return s.breakers.Run(baseCtx) })
	g.Go(func() error { return s.runStats(baseCtx) })
	g.Go(func() error { defer close(regDone); return s.registrar.Run(regCtx) })
	g.Go(func() error {
		defer close(srvDone)
		// Sockets taken from a running sidecar are served once this one
		// has Consul's view (a saved snapshot may be older than the
		// running one's view; it is served after handoverWait if Consul
		// does not answer): until then the other one reads them, and what
		// it leaves waits in their queues.
		for inherited && !s.watcher.Status().Synced && !(s.watcher.Ready() && time.Since(start) > handoverWait) {
			select {
			case <-gctx.Done():
				adminLn.Close()
				close(adminDone)
				return nil
			case <-time.After(20 * time.Millisecond):
			}
		}
		g.Go(func() error {
			defer close(adminDone)
			defer adminLn.Close()
			if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("admin: %w", err)
			}
			return nil
		})
		close(serving)
		// The serving listeners, proxy and DNS: one failing (an address in
		// use) stops the other, so that Run returns its error at once —
		// gently if another sidecar shares the sockets.
		sctx, stopBoth := context.WithCancel(srvCtx)
		defer stopBoth()
		failed := func(err error) error {
			if err != nil {
				if s.sockets.Shared() {
					s.lingerOnStop()
				}
				stopBoth()
			}
			return err
		}
		var srv errgroup.Group
		if s.dns != nil {
			srv.Go(func() error { return failed(s.dns.Run(sctx)) })
		}
		if s.proxy != nil {
			srv.Go(func() error { return failed(s.proxy.Run(sctx)) })
		}
		return srv.Wait()
	})
	if s.gateway != nil {
		g.Go(func() error { return s.gateway.Run(baseCtx) })
	}
	hctx, stopOffer := context.WithCancel(context.Background())
	defer stopOffer()
	if hpath != "" {
		// Offered to a successor only once this one serves: until then
		// the path stays the predecessor's (if this one fails, a later
		// successor still finds the sidecar that serves).
		g.Go(func() error {
			if !s.tellPredecessor(gctx, serving) {
				return nil
			}
			if err := s.sockets.Serve(hctx, hpath); err != nil { // not fatal: this one serves all the same
				s.log.Warn("no handover socket: a successor will bind beside this sidecar instead of taking its sockets", "error", err)
			}
			return nil
		})
		g.Go(func() error {
			select {
			case succ := <-s.sockets.Ready():
				successor.Store(&succ)
				// Before the stop begins: the notifier's STOPPING=1 must
				// not reach systemd, MAINPID= must.
				s.notifier.HandOver(succ.PID)
				handOver()
			case <-gctx.Done():
			}
			return nil
		})
	}
	g.Go(func() error {
		<-gctx.Done()
		stopOffer()
		s.stop(successor.Load(), admin, adminDone, stopReg, regDone, stopSrv, srvDone)
		stopBase()
		return nil
	})
	s.warnExposed(s.log)
	s.log.Info("sidecar running", "admin", s.cfg.Admin, "consul", s.cfg.Catalog.Addresses, "pid", os.Getpid(), "took_sockets", inherited)
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

// handoverWait is how long a sidecar that took a running one's sockets
// waits for Consul's view before it serves its saved snapshot instead.
const handoverWait = 10 * time.Second

// tellPredecessor waits until this sidecar serves (what /readyz says), then
// tells the sidecar whose sockets it took, if any, which then stops. false:
// ctx ended first.
func (s *Sidecar) tellPredecessor(ctx context.Context, serving <-chan struct{}) bool {
	for !closed(serving) || len(s.notReady()) > 0 {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.sockets.CloseUnused()
	if err := s.sockets.SayReady(s.registrar.IDs()); err != nil {
		s.log.Warn("cannot tell the sidecar being replaced that this one serves; stop it with SIGTERM", "error", err)
	}
	return true
}

// stop runs the graceful stop. Alone, in stages: not ready, then
// deregistered, then the listeners drained, then the admin server closed.
// With another sidecar of the same data dir alive (a successor that took
// the sockets, or the predecessor still serving), it hands over instead:
// its registrations stay (the successor's, at least), /readyz never turns
// 503 (the admin socket is shared: the other sidecar answers there), and
// the listeners drain; under systemd, MAINPID= names the successor.
func (s *Sidecar) stop(succ *handover.Successor, admin *http.Server, adminDone <-chan struct{}, stopReg func(), regDone <-chan struct{}, stopSrv func(), srvDone <-chan struct{}) {
	shared := succ != nil || s.sockets.Shared()
	s.sockets.Leave()
	if shared {
		keep := func(string) bool { return true } // a successor not ready yet: its IDs are not known
		pid := 0
		if succ != nil {
			ids := map[string]bool{}
			for _, id := range succ.Services {
				ids[id] = true
			}
			keep = func(id string) bool { return ids[id] }
			pid = succ.PID
		}
		s.registrar.Keep(keep)
		s.lingerOnStop()
		s.log.Info("handing over to the other sidecar: leaving the registration to it, draining the listeners", "pid", pid, "drain_timeout", s.cfg.Proxy.ShutdownGraceTime)
		// The admin socket goes first: from now on the other sidecar
		// answers /readyz there, and tells the truth for the node.
		shutdown(admin, adminDone)
	} else {
		s.stopping.Store(true)
		s.log.Info("stopping: deregistering from the agent, then draining the listeners", "drain_timeout", s.cfg.Proxy.ShutdownGraceTime)
	}
	stopReg()
	select {
	case <-regDone:
	case <-time.After(s.cfg.Proxy.ShutdownGraceTime): // an agent that does not answer delays the stop no longer than this
		s.log.Warn("stopping: deregistration did not finish in time; draining anyway")
	}
	stopSrv()
	<-srvDone
	shutdown(admin, adminDone)
}

// lingerOnStop makes the listeners' coming stop leave nothing behind for
// the other sidecar serving the same sockets (see Proxy.HandOver and
// dns.Server.HandOver).
func (s *Sidecar) lingerOnStop() {
	if s.proxy != nil {
		s.proxy.HandOver()
	}
	if s.dns != nil {
		s.dns.HandOver()
	}
}

// shutdown stops the admin server (at most 5s for the requests under way).
func shutdown(admin *http.Server, done <-chan struct{}) {
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = admin.Shutdown(sctx)
	select {
	case <-done:
	case <-sctx.Done():
	}
}
