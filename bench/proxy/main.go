// Command proxy runs attache's proxy (package sidecar/proxy) in-process over
// a static catalog view, for the benchmarks: the same listeners, balancer,
// breakers and metrics as the sidecar, without Consul in the loop. The
// driver scripts/bench.d/40-proxy.sh runs it beside nginx and haproxy.
//
//	proxy -service users -backends 127.0.4.1:8081,127.0.4.2:8081 \
//	      -upstream 127.0.4.12:8080 -http-proxy 127.0.4.13:8080
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/proxy"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"
)

// runMinimal is the least a fasthttp proxy can do: round robin over
// HostClients, the server's request and response objects passed through.
func runMinimal(backends, listen string) error {
	var hcs []*fasthttp.HostClient
	for _, b := range strings.Split(backends, ",") {
		hcs = append(hcs, &fasthttp.HostClient{Addr: b, MaxConns: 512})
	}
	var n atomic.Uint64
	h := func(ctx *fasthttp.RequestCtx) {
		if err := hcs[n.Add(1)%uint64(len(hcs))].Do(&ctx.Request, &ctx.Response); err != nil {
			ctx.Error(err.Error(), fasthttp.StatusBadGateway)
		}
	}
	return (&fasthttp.Server{Handler: h}).ListenAndServe(listen)
}

type static struct{ v *catalog.View }

func (s static) Load() *catalog.Snapshot                        { return s.v.Load() }
func (s static) Want(context.Context, string) *catalog.Snapshot { return s.v.Load() }

func main() {
	service := flag.String("service", "users", "service name")
	backends := flag.String("backends", "127.0.4.1:8081,127.0.4.2:8081", "comma-separated instance addresses")
	upstream := flag.String("upstream", "127.0.4.12:8080", "upstream listener address (\"\" for none)")
	httpProxy := flag.String("http-proxy", "127.0.4.13:8080", "HTTP proxy listener address (\"\" for none)")
	balancer := flag.String("balancer", "", "balancer (default least-request)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile here until stopped")
	noH2 := flag.Bool("no-h2c", false, "don't recognise h2c (serve HTTP/1.1 listeners straight from the socket)")
	noFast := flag.Bool("fasthttp", false, "serve every HTTP/1.1 request with fasthttp, not the hand-written fast path (for comparison)")
	noLoop := flag.Bool("no-loop", false, "serve the fast path from a goroutine per connection, not event loops (for comparison)")
	loops := flag.Int("loops", 0, "event loops for the listeners (0: the default)")
	accessLog := flag.String("access-log", "", "write the access log of every listener to this file (\"\": none), to measure its cost")
	minimal := flag.Bool("minimal", false, "instead of attache, run a minimal fasthttp reverse proxy on -upstream (a reference for profiling)")
	gw := flag.String("gateway", "", "a plain gateway listener routing every request to -service (\"\" for none)")
	gwTLS := flag.String("gateway-tls", "", "a TLS gateway listener routing every request to -service (\"\" for none; needs -cert and -key)")
	cert := flag.String("cert", "", "certificate (PEM) of -gateway-tls")
	key := flag.String("key", "", "its key (PEM)")
	pprofAddr := flag.String("pprof", "", "serve net/http/pprof on this address (\"\" for none)")
	flag.Parse()
	if *pprofAddr != "" {
		go func() { _ = http.ListenAndServe(*pprofAddr, nil) }()
	}
	if *minimal {
		if *cpuprofile != "" {
			f, err := os.Create(*cpuprofile)
			if err == nil && pprof.StartCPUProfile(f) == nil {
				go func() {
					ch := make(chan os.Signal, 1)
					signal.Notify(ch, os.Interrupt, syscall.SIGTERM)
					<-ch
					pprof.StopCPUProfile()
					f.Close()
					os.Exit(0)
				}()
			}
		}
		if err := runMinimal(*backends, *upstream); err != nil {
			fmt.Fprintln(os.Stderr, "bench/proxy:", err)
			os.Exit(1)
		}
		return
	}
	var gws []proxy.GatewayListener
	if *gw != "" {
		gws = append(gws, proxy.GatewayListener{Addr: *gw, Router: toService(*service)})
	}
	if *gwTLS != "" {
		c, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench/proxy:", err)
			os.Exit(1)
		}
		gws = append(gws, proxy.GatewayListener{Addr: *gwTLS, Router: toService(*service), TLS: &tls.Config{Certificates: []tls.Certificate{c}}})
	}
	if err := run(*service, *backends, *upstream, *httpProxy, *balancer, *cpuprofile, *noH2, *noFast, *noLoop, *loops, *accessLog, gws); err != nil {
		fmt.Fprintln(os.Stderr, "bench/proxy:", err)
		os.Exit(1)
	}
}

// toService is a Router sending every request to one service.
type toService string

func (s toService) Route(*proxy.Head) proxy.Decision { return proxy.Decision{Service: string(s)} }

func run(service, backends, upstream, httpProxy, balancer, cpuprofile string, noH2, noFast, noLoop bool, loops int, accessLog string, gws []proxy.GatewayListener) error {
	snap := &catalog.Snapshot{
		Services: map[string]*catalog.Service{},
		Nodes:    map[string]*catalog.Node{},
		Known:    map[string]bool{service: true},
	}
	svc := &catalog.Service{Name: service}
	for i, b := range strings.Split(backends, ",") {
		host, port, err := net.SplitHostPort(b)
		if err != nil {
			return fmt.Errorf("backend %q: %w", b, err)
		}
		p, _ := strconv.Atoi(port)
		svc.Instances = append(svc.Instances, catalog.Instance{
			ID: fmt.Sprintf("%s-%d", service, i+1), Service: service, Node: "bench",
			Address: host, Port: p, Weight: 1, Status: "passing"})
	}
	snap.Services[service] = svc
	view := catalog.NewView()
	view.Publish(snap)

	bal, err := proxy.ParseBalancer(balancer)
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "bench", Level: hclog.Info})
	reg := prometheus.NewRegistry()
	br, err := breaker.New(breaker.DefaultConfig(), log, reg)
	if err != nil {
		return err
	}
	cfg := proxy.Config{HTTPProxyAddr: httpProxy, Balancer: bal, Logger: log, Registerer: reg, DisableHTTP2: noH2, EventLoops: loops, Gateways: gws}
	if accessLog != "" {
		f, err := os.OpenFile(accessLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		cfg.AccessLog, cfg.AccessLogAll = f, true
	}
	if upstream != "" {
		cfg.Upstreams = []proxy.Upstream{{Name: service, Addr: upstream, Protocol: proxy.ProtoHTTP}}
	}
	p, err := proxy.New(cfg, static{view}, br, proxy.WithEngines(proxy.Engines{NoFastPath: noFast, NoEventLoops: noLoop}))
	if err != nil {
		return err
	}
	if cpuprofile != "" {
		f, err := os.Create(cpuprofile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return p.Run(ctx)
}
