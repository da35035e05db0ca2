package sidecar

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/hashicorp/hcl/v2/hclsyntax"

	"attache/sidecar/catalog"
	"attache/sidecar/proxy"
)

// Config is the sidecar's configuration. Flags and an HCL file (-config) set
// the same fields; a flag given on the command line wins over the file, the
// file over CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN, those over the defaults.
type Config struct {
	Node          string                    // this node's Consul name; default: asked of the local agent
	Consul        []string                  // Consul HTTP addresses, tried in order; default CONSUL_HTTP_ADDR or 127.0.0.1:8500
	Token         string                    // ACL token; default CONSUL_HTTP_TOKEN
	TokenFile     string                    // file holding the ACL token; default CONSUL_HTTP_TOKEN_FILE
	TLS           api.TLSConfig             // HTTPS to Consul; defaults from CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY...
	SSL           bool                      // https for addresses without a scheme; default CONSUL_HTTP_SSL
	DataDir       string                    // last-known-good snapshot; empty: none
	DNS           string                    // DNS listen address (UDP and TCP); empty: off
	DNSDomain     string                    // default "consul."
	Recursors     []string                  // default: the nameservers of /etc/resolv.conf
	Admin         string                    // admin HTTP address; default 127.0.0.1:19001
	AdminToken    string                    // required (Bearer) on the admin API but /healthz and /readyz; needed off loopback; default ATTACHE_ADMIN_TOKEN
	Upstreams     []string                  // NAME=ADDR[/tcp]
	HTTPProxy     string                    // HTTP proxy listen address; empty: off
	Gateway       string                    // API gateway HTTP listen address; empty: off
	GatewayTLS    string                    // API gateway HTTPS listen address (HTTP/2 by ALPN); empty: off
	RoutesPrefix  string                    // KV prefix of the gateway's routes (default "attache/")
	ServiceFiles  []string                  // HCL files of local services to register
	Watch         string                    // which services to watch: on-demand (default), all, or list
	WatchList     []string                  // the services to watch with Watch = list (and always, with on-demand)
	WatchIdle     time.Duration             // an on-demand watch nobody used for this long stops (default 10m)
	Streaming     bool                      // let the agent answer health queries from its streaming cache (~a heartbeat later, fewer server queries)
	Stale         bool                      // allow stale blocking queries answered by any server
	MaxStale      time.Duration             // with Stale, how stale an answer may be before the leader is asked
	Warning       bool                      // include instances whose checks warn
	DNSTTL        time.Duration             // TTL of service answers (default 0, as Consul)
	DNSNodeTTL    time.Duration             // TTL of node answers (default 0)
	DNSNegTTL     time.Duration             // SOA minimum: how long resolvers may cache NXDOMAIN (default 0)
	DNSNearest    bool                      // order DNS answers nearest first by network coordinates
	DNSEjections  bool                      // leave instances the proxy ejected out of DNS answers (default true)
	DNSServiceTTL map[string]time.Duration  // per-service TTLs (HCL only), "prefix*" keys allowed
	DNSRateLimit  float64                   // DNS queries per second per client address, REFUSED beyond (default 0: no limit)
	DNSRateBurst  int                       // queries a client may send at once above DNSRateLimit (default 0: the rate)
	Balancer      string                    // default load balancer of upstreams: least-request, round-robin, weighted, nearest
	TryTimeout    time.Duration             // proxy: per try (default 5s)
	ReqTimeout    time.Duration             // proxy: whole request, retries included (default 15s)
	Retries       int                       // proxy: extra tries after the first (default 2; -1 none)
	ClientIdle    time.Duration             // proxy: idle keep-alive client connections close after this (0: the proxy's 75s)
	HeaderTimeout time.Duration             // proxy: a request head must arrive whole within this (0: the proxy's 10s)
	BodyTimeout   time.Duration             // proxy: a request body may pause this long between reads (0: the proxy's 30s)
	MaxClients    int                       // proxy: open client connections per HTTP listener (0: the proxy's 16384)
	DrainTimeout  time.Duration             // stop: in-flight requests may finish for this long after deregistration (default 10s)
	AccessLog     string                    // access log destination: "stdout" (default), a file path, or "off"
	AccessLogAll  bool                      // log the upstream and HTTP-proxy listeners too, not only the gateway's
	AccessSample  float64                   // share of requests logged (default 1)
	EjectAfter    int                       // outlier ejection after this many consecutive failures (default 5)
	EjectTime     time.Duration             // base ejection time, times the number of ejections (default 30s)
	SlowCall      time.Duration             // breaker: a call this long is slow, in flight or done (default 2s)
	MaxRequests   int                       // breaker: calls in flight per service (default 1024; -1 no limit)
	Fallbacks     map[string]proxy.Fallback // per-service answer for refused and failed calls (HCL only)
	// UpstreamSettings are services' own settings, by lower-case name
	// (HCL only: upstream "NAME" { ... } blocks).
	UpstreamSettings map[string]UpstreamSettings
	LogLevel         string // trace, debug, info, warn, error
	LogJSON          bool
	PrintConfig      bool // -print-config (command line only): print the effective configuration and exit
}

// DefaultConfig returns the defaults, with CONSUL_HTTP_ADDR and
// CONSUL_HTTP_TOKEN taken from env (pass os.Getenv).
func DefaultConfig(env func(string) string) Config {
	c := Config{
		Consul:       []string{"127.0.0.1:8500"},
		DNSDomain:    "consul.",
		Admin:        "127.0.0.1:19001",
		Watch:        "on-demand",
		WatchIdle:    10 * time.Minute,
		LogLevel:     "info",
		DNSEjections: true,
		Balancer:     string(proxy.LeastRequest),
		RoutesPrefix: "attache/",
		TryTimeout:   5 * time.Second,
		ReqTimeout:   15 * time.Second,
		Retries:      2,
		EjectAfter:   5,
		EjectTime:    30 * time.Second,
		SlowCall:     2 * time.Second,
		MaxRequests:  1024,
		DrainTimeout: 10 * time.Second,
		AccessLog:    "stdout",
		AccessSample: 1,
	}
	if h, err := os.Hostname(); err == nil {
		c.Node = h // Consul's default node name
	}
	c.AdminToken = env("ATTACHE_ADMIN_TOKEN")
	w := catalog.ConfigFromEnv(env) // CONSUL_* as the consul CLI reads them
	c.Consul, c.Token, c.TokenFile, c.TLS, c.SSL = w.Addresses, w.Token, w.TokenFile, w.TLS, w.SSL
	return c
}

// listFlag is a repeatable flag. The first use on the command line replaces
// what the file or defaults set; later uses append.
type listFlag struct {
	dst *[]string
	set bool
}

func (l *listFlag) String() string {
	if l.dst == nil {
		return ""
	}
	return strings.Join(*l.dst, ",")
}

func (l *listFlag) Set(v string) error {
	if !l.set {
		*l.dst, l.set = nil, true
	}
	*l.dst = append(*l.dst, v)
	return nil
}

func (c *Config) flags(name string, configFile *string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(configFile, "config", "", "HCL `file` setting any of these options (flags win)")
	fs.StringVar(&c.Node, "node", c.Node, "this node's Consul `name` (the origin of network-coordinate distances)")
	fs.Var(&listFlag{dst: &c.Consul}, "consul", "Consul HTTP `address`, repeatable for failover; $CONSUL_HTTP_ADDR sets the default")
	fs.StringVar(&c.Token, "token", c.Token, "Consul ACL `token`; $CONSUL_HTTP_TOKEN sets the default")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "`dir` for the last-known-good catalog snapshot")
	fs.StringVar(&c.DNS, "dns", c.DNS, "DNS listen `address` (UDP and TCP), e.g. 127.0.0.1:8653")
	fs.StringVar(&c.DNSDomain, "dns-domain", c.DNSDomain, "DNS `domain` served")
	fs.Var(&listFlag{dst: &c.Recursors}, "recursor", "DNS recursor `address` for names outside the domain, repeatable (default: /etc/resolv.conf)")
	fs.StringVar(&c.Admin, "admin", c.Admin, "admin HTTP `address` (/healthz, /readyz, /metrics, /v1/...)")
	fs.StringVar(&c.AdminToken, "admin-token", c.AdminToken, "`token` the admin API requires (Authorization: Bearer) but on /healthz and /readyz; needed off loopback; $ATTACHE_ADMIN_TOKEN sets the default")
	fs.Var(&listFlag{dst: &c.Upstreams}, "upstream", "upstream listener `NAME=ADDR[/tcp]`, repeatable")
	fs.StringVar(&c.HTTPProxy, "http-proxy", c.HTTPProxy, "HTTP proxy listen `address`")
	fs.StringVar(&c.Gateway, "gateway", c.Gateway, "API gateway HTTP listen `address` (routes from Consul KV)")
	fs.StringVar(&c.GatewayTLS, "gateway-tls", c.GatewayTLS, "API gateway HTTPS listen `address` (HTTP/2 by ALPN; certificates from the route document)")
	fs.StringVar(&c.RoutesPrefix, "routes-prefix", c.RoutesPrefix, "Consul KV `prefix` of the gateway's routes (PREFIX/routes/current...)")
	fs.Var(&listFlag{dst: &c.ServiceFiles}, "service", "HCL `file` of local services to register, repeatable")
	fs.StringVar(&c.Watch, "watch", c.Watch, "which services to watch: on-demand, all or list")
	fs.Var(&listFlag{dst: &c.WatchList}, "watch-service", "`service` to watch from start, repeatable")
	fs.DurationVar(&c.WatchIdle, "watch-idle", c.WatchIdle, "stop an on-demand watch unused for this long")
	fs.BoolVar(&c.Streaming, "watch-streaming", c.Streaming, "let the agent answer from its streaming cache: fewer server queries, ~100 ms staler")
	fs.BoolVar(&c.Stale, "stale", c.Stale, "let any server answer blocking queries (fresher load spread, ~100 ms later)")
	fs.DurationVar(&c.MaxStale, "max-stale", c.MaxStale, "with -stale, the oldest answer accepted before asking the leader")
	fs.BoolVar(&c.Warning, "warning", c.Warning, "include instances whose checks warn")
	fs.DurationVar(&c.DNSTTL, "dns-ttl", c.DNSTTL, "TTL of DNS service answers")
	fs.DurationVar(&c.DNSNodeTTL, "dns-node-ttl", c.DNSNodeTTL, "TTL of DNS node answers")
	fs.DurationVar(&c.DNSNegTTL, "dns-negative-ttl", c.DNSNegTTL, "SOA minimum TTL: how long resolvers may cache NXDOMAIN")
	fs.BoolVar(&c.DNSNearest, "dns-nearest", c.DNSNearest, "order DNS answers nearest first (network coordinates) instead of shuffled")
	fs.BoolVar(&c.DNSEjections, "dns-ejections", c.DNSEjections, "leave instances the proxy has ejected out of DNS answers")
	fs.Float64Var(&c.DNSRateLimit, "dns-rate-limit", c.DNSRateLimit, "DNS `queries` per second per client address, REFUSED beyond it (0: no limit)")
	fs.IntVar(&c.DNSRateBurst, "dns-rate-burst", c.DNSRateBurst, "DNS `queries` a client may send at once above -dns-rate-limit (0: the rate)")
	fs.StringVar(&c.Balancer, "lb", c.Balancer, "default load `balancer` of upstreams: least-request, round-robin, weighted or nearest")
	fs.DurationVar(&c.TryTimeout, "try-timeout", c.TryTimeout, "proxy: timeout of one try")
	fs.DurationVar(&c.ReqTimeout, "request-timeout", c.ReqTimeout, "proxy: timeout of a whole request, retries included")
	fs.IntVar(&c.Retries, "retries", c.Retries, "proxy: extra tries after the first, for idempotent requests (-1: none)")
	fs.DurationVar(&c.ClientIdle, "client-idle-timeout", c.ClientIdle, "proxy: close idle keep-alive client connections after this (0: 75s)")
	fs.DurationVar(&c.HeaderTimeout, "header-timeout", c.HeaderTimeout, "proxy: a request head must arrive whole within this (0: 10s)")
	fs.DurationVar(&c.BodyTimeout, "body-timeout", c.BodyTimeout, "proxy: a request body may pause this long between two reads (0: 30s)")
	fs.StringVar(&c.AccessLog, "access-log", c.AccessLog, "access log `destination`: stdout, a file path (appended to) or off; the gateway's requests are logged, see -access-log-all")
	fs.BoolVar(&c.AccessLogAll, "access-log-all", c.AccessLogAll, "access log: the upstream and HTTP-proxy listeners' requests too")
	fs.Float64Var(&c.AccessSample, "access-log-sample", c.AccessSample, "access log: the `fraction` of requests logged (0 < f <= 1)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "on SIGTERM, after deregistering: how long requests under way may finish")
	fs.IntVar(&c.MaxClients, "max-client-conns", c.MaxClients, "proxy: open client connections per HTTP listener; more get a 503 (0: 16384)")
	fs.IntVar(&c.EjectAfter, "eject-after", c.EjectAfter, "eject an instance after this many consecutive failures (-1: never)")
	fs.DurationVar(&c.EjectTime, "eject-time", c.EjectTime, "base ejection time, multiplied by the times ejected")
	fs.DurationVar(&c.SlowCall, "slow-call", c.SlowCall, "breaker: a call this long is slow (counted while still in flight)")
	fs.IntVar(&c.MaxRequests, "max-requests", c.MaxRequests, "breaker: calls in flight per service; more are refused at once (-1: no limit)")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log `level`: trace, debug, info, warn, error")
	fs.BoolVar(&c.LogJSON, "log-json", c.LogJSON, "log as JSON")
	fs.BoolVar(&c.PrintConfig, "print-config", c.PrintConfig, "print the effective configuration (defaults, environment, file, flags) as a config file, secrets redacted, and exit")
	return fs
}

// ParseArgs builds the configuration from the command line (and the file it
// names with -config) over the given defaults. Errors say what to fix;
// flag.ErrHelp means -h was asked for and the usage has been written to out.
func ParseArgs(args []string, defaults Config, out io.Writer) (Config, error) {
	cfg := defaults
	var file string
	fs := cfg.flags("attache sidecar", &file)
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(out, "Usage: attache sidecar [flags]\n\nFlags:")
			fs.SetOutput(out)
			fs.PrintDefaults()
		} else {
			err = fmt.Errorf("%w (run 'attache sidecar -h' for the flags)", err)
		}
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected argument %q: every option is a -flag", fs.Arg(0))
	}
	if file != "" {
		src, err := os.ReadFile(file)
		if err != nil {
			return Config{}, fmt.Errorf("config file: %w", err)
		}
		cfg = defaults
		if err := cfg.decodeHCL(file, src); err != nil {
			return Config{}, err
		}
		fs = cfg.flags("attache sidecar", &file)
		fs.SetOutput(io.Discard)
		if err := fs.Parse(args); err != nil {
			return Config{}, err
		}
	}
	return cfg, cfg.Validate()
}

// fileConfig is the HCL form: attribute names are the flag names with
// underscores; lists are HCL lists.
type fileConfig struct {
	Node          *string            `hcl:"node,optional"`
	Consul        *[]string          `hcl:"consul,optional"`
	Token         *string            `hcl:"token,optional"`
	DataDir       *string            `hcl:"data_dir,optional"`
	DNS           *string            `hcl:"dns,optional"`
	DNSDomain     *string            `hcl:"dns_domain,optional"`
	Recursors     *[]string          `hcl:"recursor,optional"`
	Admin         *string            `hcl:"admin,optional"`
	AdminToken    *string            `hcl:"admin_token,optional"`
	Upstreams     *[]string          `hcl:"upstream,optional"`
	HTTPProxy     *string            `hcl:"http_proxy,optional"`
	Gateway       *string            `hcl:"gateway,optional"`
	GatewayTLS    *string            `hcl:"gateway_tls,optional"`
	RoutesPrefix  *string            `hcl:"routes_prefix,optional"`
	ServiceFiles  *[]string          `hcl:"service,optional"`
	Watch         *string            `hcl:"watch,optional"`
	WatchList     *[]string          `hcl:"watch_service,optional"`
	WatchIdle     *string            `hcl:"watch_idle,optional"`
	Streaming     *bool              `hcl:"watch_streaming,optional"`
	Stale         *bool              `hcl:"stale,optional"`
	MaxStale      *string            `hcl:"max_stale,optional"`
	Warning       *bool              `hcl:"warning,optional"`
	DNSTTL        *string            `hcl:"dns_ttl,optional"`
	DNSNodeTTL    *string            `hcl:"dns_node_ttl,optional"`
	DNSNegTTL     *string            `hcl:"dns_negative_ttl,optional"`
	DNSNearest    *bool              `hcl:"dns_nearest,optional"`
	DNSEjections  *bool              `hcl:"dns_ejections,optional"`
	DNSServiceTTL *map[string]string `hcl:"dns_service_ttl,optional"`
	DNSRateLimit  *float64           `hcl:"dns_rate_limit,optional"`
	DNSRateBurst  *int               `hcl:"dns_rate_burst,optional"`
	Balancer      *string            `hcl:"lb,optional"`
	TryTimeout    *string            `hcl:"try_timeout,optional"`
	ReqTimeout    *string            `hcl:"request_timeout,optional"`
	Retries       *int               `hcl:"retries,optional"`
	ClientIdle    *string            `hcl:"client_idle_timeout,optional"`
	HeaderTimeout *string            `hcl:"header_timeout,optional"`
	BodyTimeout   *string            `hcl:"body_timeout,optional"`
	MaxClients    *int               `hcl:"max_client_conns,optional"`
	DrainTimeout  *string            `hcl:"drain_timeout,optional"`
	AccessLog     *string            `hcl:"access_log,optional"`
	AccessLogAll  *bool              `hcl:"access_log_all,optional"`
	AccessSample  *float64           `hcl:"access_log_sample,optional"`
	EjectAfter    *int               `hcl:"eject_after,optional"`
	EjectTime     *string            `hcl:"eject_time,optional"`
	SlowCall      *string            `hcl:"slow_call,optional"`
	MaxRequests   *int               `hcl:"max_requests,optional"`
	Fallbacks     []fallbackBlock    `hcl:"fallback,block"`
	// Rest holds the upstream "NAME" blocks (fileBlocks): gohcl's encoder,
	// which -print-config uses, cannot have a block and an attribute of
	// one name in one struct.
	Rest     hcl.Body `hcl:",remain"`
	LogLevel *string  `hcl:"log_level,optional"`
	LogJSON  *bool    `hcl:"log_json,optional"`
}

// fileBlocks is what fileConfig leaves: the upstream "NAME" blocks.
type fileBlocks struct {
	Upstreams []upstreamBlock `hcl:"upstream,block"`
}

// fallbackBlock is `fallback "inventory" { status = 200 body = "Stock status unavailable" }`
// or `fallback "inventory" { to_service = "inventory-cache" }`, with
// `on = ["breaker-open", "max-requests"]` to answer only for refused calls.
type fallbackBlock struct {
	Service     string    `hcl:"service,label"`
	Status      *int      `hcl:"status,optional"`
	Body        *string   `hcl:"body,optional"`
	ContentType *string   `hcl:"content_type,optional"`
	To          *string   `hcl:"to_service,optional"`
	On          *[]string `hcl:"on,optional"` // causes it answers for (default all: proxy.FallbackCauses)
}

// decodeHCL applies an HCL config file over c. Errors carry file:line.
func (c *Config) decodeHCL(name string, src []byte) error {
	f, diags := hclparse.NewParser().ParseHCL(src, name)
	if diags.HasErrors() {
		return diagError(diags)
	}
	var fc fileConfig
	if diags := gohcl.DecodeBody(f.Body, nil, &fc); diags.HasErrors() {
		return diagError(diags)
	}
	var fb fileBlocks
	if diags := gohcl.DecodeBody(fc.Rest, nil, &fb); diags.HasErrors() {
		return diagError(diags)
	}
	// at is where attr is set, as file:line,column, for errors found
	// after decoding.
	at := func(attr string) string {
		if b, ok := f.Body.(*hclsyntax.Body); ok {
			if a := b.Attributes[attr]; a != nil {
				return fmt.Sprintf("%s:%d,%d", name, a.SrcRange.Start.Line, a.SrcRange.Start.Column)
			}
		}
		return name
	}
	set(&c.Node, fc.Node)
	set(&c.Consul, fc.Consul)
	set(&c.Token, fc.Token)
	set(&c.DataDir, fc.DataDir)
	set(&c.DNS, fc.DNS)
	set(&c.DNSDomain, fc.DNSDomain)
	set(&c.Recursors, fc.Recursors)
	set(&c.Admin, fc.Admin)
	set(&c.AdminToken, fc.AdminToken)
	set(&c.Upstreams, fc.Upstreams)
	if len(fb.Upstreams) > 0 {
		us, err := upstreamSettings(name, f.Body, fb.Upstreams)
		if err != nil {
			return err
		}
		c.UpstreamSettings = us
		for _, b := range fb.Upstreams {
			u := us[strings.ToLower(b.Name)]
			if u.Listen == "" {
				continue
			}
			for _, l := range c.Upstreams {
				if n, _, _ := strings.Cut(l, "="); strings.EqualFold(n, b.Name) {
					return fmt.Errorf("%s: upstream %q: listen is set, and the upstream list has a listener for it too (%s): keep one", name, b.Name, l)
				}
			}
			c.Upstreams = append(c.Upstreams, b.Name+"="+u.Listen)
		}
	}
	set(&c.HTTPProxy, fc.HTTPProxy)
	set(&c.Gateway, fc.Gateway)
	set(&c.GatewayTLS, fc.GatewayTLS)
	set(&c.RoutesPrefix, fc.RoutesPrefix)
	set(&c.ServiceFiles, fc.ServiceFiles)
	set(&c.Watch, fc.Watch)
	set(&c.WatchList, fc.WatchList)
	set(&c.Stale, fc.Stale)
	set(&c.Warning, fc.Warning)
	set(&c.LogLevel, fc.LogLevel)
	set(&c.LogJSON, fc.LogJSON)
	set(&c.Streaming, fc.Streaming)
	set(&c.Balancer, fc.Balancer)
	set(&c.Retries, fc.Retries)
	set(&c.MaxClients, fc.MaxClients)
	set(&c.EjectAfter, fc.EjectAfter)
	set(&c.MaxRequests, fc.MaxRequests)
	if len(fc.Fallbacks) > 0 {
		c.Fallbacks = map[string]proxy.Fallback{}
		for _, f := range fc.Fallbacks {
			fb := proxy.Fallback{Status: 200}
			set(&fb.Status, f.Status)
			set(&fb.Body, f.Body)
			set(&fb.ContentType, f.ContentType)
			set(&fb.Service, f.To)
			set(&fb.On, f.On)
			for _, c := range fb.On {
				if !slices.Contains(proxy.FallbackCauses, c) {
					return fmt.Errorf("%s: fallback %q: unknown cause %q (want some of %s)", name, f.Service, c, strings.Join(proxy.FallbackCauses, ", "))
				}
			}
			if fb.Status < 100 || fb.Status > 599 {
				return fmt.Errorf("%s: fallback %q: status %d is not an HTTP status", name, f.Service, fb.Status)
			}
			c.Fallbacks[strings.ToLower(f.Service)] = fb
		}
	}
	set(&c.DNSNearest, fc.DNSNearest)
	set(&c.DNSEjections, fc.DNSEjections)
	set(&c.DNSRateLimit, fc.DNSRateLimit)
	set(&c.DNSRateBurst, fc.DNSRateBurst)
	set(&c.AccessLog, fc.AccessLog)
	set(&c.AccessLogAll, fc.AccessLogAll)
	set(&c.AccessSample, fc.AccessSample)
	for _, d := range []struct {
		attr string
		v    *string
		dst  *time.Duration
	}{
		{"max_stale", fc.MaxStale, &c.MaxStale},
		{"dns_ttl", fc.DNSTTL, &c.DNSTTL},
		{"dns_node_ttl", fc.DNSNodeTTL, &c.DNSNodeTTL},
		{"dns_negative_ttl", fc.DNSNegTTL, &c.DNSNegTTL},
		{"try_timeout", fc.TryTimeout, &c.TryTimeout},
		{"watch_idle", fc.WatchIdle, &c.WatchIdle},
		{"request_timeout", fc.ReqTimeout, &c.ReqTimeout},
		{"eject_time", fc.EjectTime, &c.EjectTime},
		{"slow_call", fc.SlowCall, &c.SlowCall},
		{"client_idle_timeout", fc.ClientIdle, &c.ClientIdle},
		{"header_timeout", fc.HeaderTimeout, &c.HeaderTimeout},
		{"body_timeout", fc.BodyTimeout, &c.BodyTimeout},
		{"drain_timeout", fc.DrainTimeout, &c.DrainTimeout},
	} {
		if d.v == nil {
			continue
		}
		v, err := time.ParseDuration(*d.v)
		if err != nil {
			return fmt.Errorf("%s: %s: %w (use a duration such as \"2s\")", at(d.attr), d.attr, err)
		}
		*d.dst = v
	}
	if fc.DNSServiceTTL != nil {
		c.DNSServiceTTL = map[string]time.Duration{}
		for svc, v := range *fc.DNSServiceTTL {
			d, err := time.ParseDuration(v)
			if err != nil {
				return fmt.Errorf("%s: dns_service_ttl[%q]: %w (use a duration such as \"5s\")", at("dns_service_ttl"), svc, err)
			}
			c.DNSServiceTTL[strings.ToLower(svc)] = d
		}
	}
	return nil
}

func set[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}

// diagError turns HCL diagnostics into one error of "file:line,col: summary; detail" lines.
func diagError(diags hcl.Diagnostics) error {
	var msgs []string
	for _, d := range diags {
		if d.Severity != hcl.DiagError {
			continue
		}
		m := d.Summary
		if d.Detail != "" {
			m += ": " + d.Detail
		}
		if d.Subject != nil {
			m = fmt.Sprintf("%s:%d,%d: %s", d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column, m)
		}
		msgs = append(msgs, m)
	}
	return errors.New(strings.Join(msgs, "\n"))
}

// Validate checks the configuration and says what to fix.
func (c *Config) Validate() error {
	var errs []error
	addr := func(flag, v string) {
		if v == "" {
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("-%s %q: want HOST:PORT, e.g. 127.0.0.1:8653 (%v)", flag, v, err))
		}
	}
	if len(c.Consul) == 0 {
		errs = append(errs, errors.New("-consul: at least one Consul address is needed"))
	}
	addr("dns", c.DNS)
	if c.DNSTTL < 0 || c.DNSNodeTTL < 0 || c.DNSNegTTL < 0 {
		errs = append(errs, errors.New("-dns-ttl, -dns-node-ttl and -dns-negative-ttl must not be negative"))
	}
	for svc, ttl := range c.DNSServiceTTL {
		if ttl < 0 {
			errs = append(errs, fmt.Errorf("dns_service_ttl[%q] must not be negative", svc))
		}
	}
	if c.DNSRateLimit < 0 || c.DNSRateBurst < 0 {
		errs = append(errs, errors.New("-dns-rate-limit and -dns-rate-burst must not be negative (0: no limit)"))
	}
	if c.AccessSample <= 0 || c.AccessSample > 1 {
		errs = append(errs, fmt.Errorf("-access-log-sample %v: want a fraction above 0 and at most 1", c.AccessSample))
	}
	if c.AccessLog == "" {
		errs = append(errs, errors.New("-access-log: want stdout, a file path or off"))
	}
	if c.DrainTimeout <= 0 {
		errs = append(errs, errors.New("-drain-timeout must be positive, e.g. 10s"))
	}
	addr("admin", c.Admin)
	addr("http-proxy", c.HTTPProxy)
	addr("gateway", c.Gateway)
	addr("gateway-tls", c.GatewayTLS)
	if (c.Gateway != "" || c.GatewayTLS != "") && c.RoutesPrefix == "" {
		errs = append(errs, errors.New("-routes-prefix: the gateway needs a KV prefix, e.g. attache/"))
	}
	if _, err := proxy.ParseBalancer(c.Balancer); err != nil {
		errs = append(errs, fmt.Errorf("-lb: %w", err))
	}
	for _, u := range c.Upstreams {
		if _, err := proxy.ParseUpstream(u); err != nil {
			errs = append(errs, fmt.Errorf("-upstream: %w", err))
		}
	}
	for _, r := range c.Recursors {
		addr("recursor", r)
	}

	switch c.Watch {
	case "on-demand", "all", "list":
	default:
		errs = append(errs, fmt.Errorf("-watch %q: want on-demand, all or list", c.Watch))
	}
	if c.Watch == "list" && len(c.WatchList) == 0 {
		errs = append(errs, errors.New("-watch list needs at least one -watch-service NAME"))
	}
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", c.LogLevel))
	}
	if c.Admin == "" {
		errs = append(errs, errors.New("-admin: an admin address is needed for /healthz and /readyz"))
	} else if _, _, err := net.SplitHostPort(c.Admin); err == nil && c.AdminToken == "" && !loopback(c.Admin) {
		errs = append(errs, fmt.Errorf("-admin %s is off loopback: anyone who reaches it could read the view and the breakers; set -admin-token (or $ATTACHE_ADMIN_TOKEN), or listen on 127.0.0.1", c.Admin))
	}
	return errors.Join(errs...)
}
