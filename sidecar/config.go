package sidecar

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclparse"

	"attache/dns"
	"attache/internal/fielderr"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"
	"attache/sidecar/gateway"
	"attache/sidecar/proxy"
)

// Config is the sidecar's configuration: its own settings, and each
// component's Config, which holds that component's defaults (its
// DefaultConfig) and checks itself in its New. Flags and an HCL file
// (-config) set the same fields through one table (bindings); a flag given
// on the command line wins over the file, the file over the environment
// (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ATTACHE_ADMIN_TOKEN, ...), those
// over the defaults.
type Config struct {
	Node         string   // this node's Consul name, given to every component; default: the host name (Consul's default)
	DataDir      string   // last-known-good snapshot, applied routes, the handover socket; empty: none
	Admin        string   // admin HTTP address; default 127.0.0.1:19001
	AdminToken   string   // required (Bearer) on the admin API but /healthz and /readyz; needed off loopback; default ATTACHE_ADMIN_TOKEN
	ServiceFiles []string // HCL files of local services to register
	AccessLog    string   // access log destination: "stdout" (default), a file path, or "off"
	// UpstreamSettings are services' own settings, by lower-case name
	// (HCL only: upstream "NAME" { ... } blocks).
	UpstreamSettings map[string]UpstreamSettings
	LogLevel         string // trace, debug, info, warn, error; default info
	LogJSON          bool
	PrintConfig      bool // -print-config (command line only): print the effective configuration and exit

	// The components. The sidecar fills in what they share (Node,
	// DataDir, logger, metrics, sockets) when it builds them.
	Catalog catalog.Config // Consul addresses, token and TLS from the environment (catalog.ConfigFromEnv)
	DNS     dns.Config     // Addr "" (the default here): no DNS server
	Proxy   proxy.Config   // no proxy without upstreams, an HTTP proxy listener or a gateway; ShutdownGraceTime (-drain-timeout) 10s here
	Breaker breaker.Config
	Gateway gateway.Config // Addr and TLSAddr "" (the default): no gateway
}

// DefaultConfig returns the defaults: each component's DefaultConfig, with
// the sidecar's own choices over them (listeners off until asked for, a
// 10s drain) and the environment's Consul settings (pass os.Getenv).
func DefaultConfig(env func(string) string) Config {
	c := Config{
		Admin:     "127.0.0.1:19001",
		AccessLog: "stdout",
		LogLevel:  "info",
		Catalog:   catalog.ConfigFromEnv(env), // CONSUL_* as the consul CLI reads them
		DNS:       dns.DefaultConfig(),
		Proxy:     proxy.DefaultConfig(),
		Breaker:   breaker.DefaultConfig(),
		Gateway:   gateway.DefaultConfig(),
	}
	c.DNS.Addr = ""
	c.Proxy.ShutdownGraceTime = 10 * time.Second
	if h, err := os.Hostname(); err == nil {
		c.Node = h // Consul's default node name
	}
	c.AdminToken = env("ATTACHE_ADMIN_TOKEN")
	return c
}

// binding ties a flag and its config file attribute to the field the value
// lands in. Flag parsing, the file, -print-config and the reload all go
// through the one table (bindings).
type binding struct {
	name  string // the flag; the file's attribute is the same with '_' for '-'
	usage string
	// ptr is the field: *string, *[]string, *bool, *int, *float64,
	// *time.Duration, *[]proxy.Upstream; the file-only settings
	// (fileOnly, block) are maps.
	ptr func(c *Config) any
	// off is the explicit switch an int setting turns on when it is given
	// as 0 or -1 (the spellings of "none" the flags have always taken).
	off func(c *Config) *bool
	// shown is the default -h shows when it is not the field's (the
	// usage says what 0 means).
	shown    string
	reload   bool   // a reload (SIGHUP) changes it while serving
	secret   bool   // -print-config redacts it
	flagOnly bool   // no file attribute
	fileOnly bool   // no flag
	block    string // the file's blocks of this type (decodeHCL reads them), no flag, no attribute
}

func (b binding) attr() string { return strings.ReplaceAll(b.name, "-", "_") }

// setting is how the reload names it.
func (b binding) setting() string {
	if b.block != "" {
		return b.block + " blocks"
	}
	return b.attr()
}

// bindings is every setting of the command line and the config file.
var bindings = []binding{
	{name: "node", usage: "this node's Consul `name` (the origin of network-coordinate distances)", ptr: func(c *Config) any { return &c.Node }},
	{name: "consul", usage: "Consul HTTP `address`, repeatable for failover; $CONSUL_HTTP_ADDR sets the default", ptr: func(c *Config) any { return &c.Catalog.Addresses }},
	{name: "token", usage: "Consul ACL `token`; $CONSUL_HTTP_TOKEN sets the default", ptr: func(c *Config) any { return &c.Catalog.Token }, secret: true},
	{name: "data-dir", usage: "`dir` for the last-known-good catalog snapshot", ptr: func(c *Config) any { return &c.DataDir }},
	{name: "dns", usage: "DNS listen `address` (UDP and TCP), e.g. 127.0.0.1:8653", ptr: func(c *Config) any { return &c.DNS.Addr }},
	{name: "dns-domain", usage: "DNS `domain` served", ptr: func(c *Config) any { return &c.DNS.Domain }},
	{name: "recursor", usage: "DNS recursor `address` for names outside the domain, repeatable (default: /etc/resolv.conf)", ptr: func(c *Config) any { return &c.DNS.Recursors }, reload: true},
	{name: "admin", usage: "admin HTTP `address` (/healthz, /readyz, /metrics, /v1/...)", ptr: func(c *Config) any { return &c.Admin }},
	{name: "admin-token", usage: "`token` the admin API requires (Authorization: Bearer) but on /healthz and /readyz; needed off loopback; $ATTACHE_ADMIN_TOKEN sets the default", ptr: func(c *Config) any { return &c.AdminToken }, secret: true},
	{name: "upstream", usage: "upstream listener `NAME=ADDR[/tcp]`, repeatable", ptr: func(c *Config) any { return &c.Proxy.Upstreams }, reload: true},
	{name: "http-proxy", usage: "HTTP proxy listen `address`", ptr: func(c *Config) any { return &c.Proxy.HTTPProxyAddr }, reload: true},
	{name: "gateway", usage: "API gateway HTTP listen `address` (routes from Consul KV)", ptr: func(c *Config) any { return &c.Gateway.Addr }},
	{name: "gateway-tls", usage: "API gateway HTTPS listen `address` (HTTP/2 by ALPN; certificates from the route document)", ptr: func(c *Config) any { return &c.Gateway.TLSAddr }},
	{name: "routes-prefix", usage: "Consul KV `prefix` of the gateway's routes (PREFIX/routes/current...)", ptr: func(c *Config) any { return &c.Gateway.Prefix }},
	{name: "service", usage: "HCL `file` of local services to register, repeatable", ptr: func(c *Config) any { return &c.ServiceFiles }},
	{name: "watch", usage: "which services to watch: on-demand, all or list", ptr: func(c *Config) any { return (*string)(&c.Catalog.Mode) }},
	{name: "watch-service", usage: "`service` to watch from start, repeatable", ptr: func(c *Config) any { return &c.Catalog.Services }},
	{name: "watch-idle", usage: "stop an on-demand watch unused for this long", ptr: func(c *Config) any { return &c.Catalog.IdleTimeout }},
	{name: "watch-streaming", usage: "let the agent answer from its streaming cache: fewer server queries, ~100 ms staler", ptr: func(c *Config) any { return &c.Catalog.Streaming }},
	{name: "stale", usage: "let any server answer blocking queries (fresher load spread, ~100 ms later)", ptr: func(c *Config) any { return &c.Catalog.Stale }},
	{name: "max-stale", usage: "with -stale, the oldest answer accepted before asking the leader", ptr: func(c *Config) any { return &c.Catalog.MaxStale }},
	{name: "warning", usage: "include instances whose checks warn", ptr: func(c *Config) any { return &c.Catalog.IncludeWarning }},
	{name: "dns-ttl", usage: "TTL of DNS service answers", ptr: func(c *Config) any { return &c.DNS.DefaultServiceTTL }, reload: true},
	{name: "dns-node-ttl", usage: "TTL of DNS node answers", ptr: func(c *Config) any { return &c.DNS.NodeTTL }, reload: true},
	{name: "dns-negative-ttl", usage: "SOA minimum TTL: how long resolvers may cache NXDOMAIN", ptr: func(c *Config) any { return &c.DNS.NegativeTTL }, reload: true},
	{name: "dns-nearest", usage: "order DNS answers nearest first (network coordinates) instead of shuffled", ptr: func(c *Config) any { return &c.DNS.Nearest }, reload: true},
	{name: "dns-ejections", usage: "leave instances the proxy has ejected out of DNS answers", ptr: func(c *Config) any { return &c.DNS.HonourEjections }, reload: true},
	{name: "dns-service-ttl", ptr: func(c *Config) any { return &c.DNS.ServiceTTL }, reload: true, fileOnly: true},
	{name: "dns-rate-limit", usage: "DNS `queries` per second per client address, REFUSED beyond it (0: no limit)", ptr: func(c *Config) any { return &c.DNS.RateLimit }},
	{name: "dns-rate-burst", usage: "DNS `queries` a client may send at once above -dns-rate-limit (0: the rate)", ptr: func(c *Config) any { return &c.DNS.RateBurst }},
	{name: "lb", usage: "default load `balancer` of upstreams: least-request, round-robin, weighted or nearest", ptr: func(c *Config) any { return (*string)(&c.Proxy.Balancer) }},
	{name: "try-timeout", usage: "proxy: timeout of one try", ptr: func(c *Config) any { return &c.Proxy.TryTimeout }, reload: true},
	{name: "request-timeout", usage: "proxy: timeout of a whole request, retries included", ptr: func(c *Config) any { return &c.Proxy.RequestTimeout }, reload: true},
	{name: "retries", usage: "proxy: extra tries after the first, for idempotent requests (-1: none)", ptr: func(c *Config) any { return &c.Proxy.MaxRetries },
		off: func(c *Config) *bool { return &c.Proxy.NoRetries }, reload: true},
	{name: "client-idle-timeout", usage: "proxy: close idle keep-alive client connections after this (0: 75s)", ptr: func(c *Config) any { return &c.Proxy.IdleTimeout }, shown: "0s"},
	{name: "header-timeout", usage: "proxy: a request head must arrive whole within this (0: 10s)", ptr: func(c *Config) any { return &c.Proxy.HeaderTimeout }, shown: "0s"},
	{name: "body-timeout", usage: "proxy: a request body may pause this long between two reads (0: 30s)", ptr: func(c *Config) any { return &c.Proxy.BodyTimeout }, shown: "0s"},
	{name: "max-client-conns", usage: "proxy: open client connections per HTTP listener; more get a 503 (0: 16384)", ptr: func(c *Config) any { return &c.Proxy.MaxClientConns }, shown: "0"},
	{name: "drain-timeout", usage: "on SIGTERM, after deregistering: how long requests under way may finish", ptr: func(c *Config) any { return &c.Proxy.ShutdownGraceTime }},
	{name: "access-log", usage: "access log `destination`: stdout, a file path (appended to) or off; the gateway's requests are logged, see -access-log-all", ptr: func(c *Config) any { return &c.AccessLog }},
	{name: "access-log-all", usage: "access log: the upstream and HTTP-proxy listeners' requests too", ptr: func(c *Config) any { return &c.Proxy.AccessLogAll }},
	{name: "access-log-sample", usage: "access log: the `fraction` of requests logged (0 < f <= 1)", ptr: func(c *Config) any { return &c.Proxy.AccessLogSample }},
	{name: "eject-after", usage: "eject an instance after this many consecutive failures (-1: never)", ptr: func(c *Config) any { return &c.Breaker.ConsecutiveFailures },
		off: func(c *Config) *bool { return &c.Breaker.NoEjection }, reload: true},
	{name: "eject-time", usage: "base ejection time, multiplied by the times ejected", ptr: func(c *Config) any { return &c.Breaker.BaseEjectionTime }, reload: true},
	{name: "slow-call", usage: "breaker: a call this long is slow (counted while still in flight)", ptr: func(c *Config) any { return &c.Breaker.SlowCallDuration }, reload: true},
	{name: "max-requests", usage: "breaker: calls in flight per service; more are refused at once (-1: no limit)", ptr: func(c *Config) any { return &c.Breaker.MaxRequests },
		off: func(c *Config) *bool { return &c.Breaker.NoRequestLimit }, reload: true},
	{name: "fallback", ptr: func(c *Config) any { return &c.Proxy.Fallbacks }, block: "fallback"},
	{name: "upstream-settings", ptr: func(c *Config) any { return &c.UpstreamSettings }, block: "upstream"},
	{name: "log-level", usage: "log `level`: trace, debug, info, warn, error", ptr: func(c *Config) any { return &c.LogLevel }, reload: true},
	{name: "log-json", usage: "log as JSON", ptr: func(c *Config) any { return &c.LogJSON }},
	{name: "print-config", usage: "print the effective configuration (defaults, environment, file, flags) as a config file, secrets redacted, and exit",
		ptr: func(c *Config) any { return &c.PrintConfig }, reload: true, flagOnly: true},
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

// upstreamsFlag is -upstream: repeatable as listFlag, each value parsed
// (proxy.ParseUpstream) as it is given.
type upstreamsFlag struct {
	dst *[]proxy.Upstream
	set bool
}

func (l *upstreamsFlag) String() string {
	if l.dst == nil {
		return ""
	}
	return strings.Join(upstreamStrings(*l.dst), ",")
}

func (l *upstreamsFlag) Set(v string) error {
	u, err := proxy.ParseUpstream(v)
	if err != nil {
		return err
	}
	if !l.set {
		*l.dst, l.set = nil, true
	}
	*l.dst = append(*l.dst, u)
	return nil
}

// upstreamString is the -upstream form of u (proxy.ParseUpstream reads it back).
func upstreamString(u proxy.Upstream) string {
	s := u.Name + "=" + u.Addr
	if u.Protocol != "" && u.Protocol != proxy.ProtoHTTP {
		s += "/" + u.Protocol
	}
	if u.Balancer != "" {
		s += ",lb=" + string(u.Balancer)
	}
	return s
}

func upstreamStrings(us []proxy.Upstream) []string {
	out := make([]string, len(us))
	for i, u := range us {
		out[i] = upstreamString(u)
	}
	return out
}

func (c *Config) flags(name string, configFile *string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(configFile, "config", "", "HCL `file` setting any of these options (flags win)")
	for _, b := range bindings {
		if b.fileOnly || b.block != "" {
			continue
		}
		switch p := b.ptr(c).(type) {
		case *string:
			fs.StringVar(p, b.name, *p, b.usage)
		case *[]string:
			fs.Var(&listFlag{dst: p}, b.name, b.usage)
		case *[]proxy.Upstream:
			fs.Var(&upstreamsFlag{dst: p}, b.name, b.usage)
		case *bool:
			fs.BoolVar(p, b.name, *p, b.usage)
		case *int:
			fs.IntVar(p, b.name, *p, b.usage)
		case *float64:
			fs.Float64Var(p, b.name, *p, b.usage)
		case *time.Duration:
			fs.DurationVar(p, b.name, *p, b.usage)
		default:
			panic(fmt.Sprintf("flag -%s: no flag for %T", b.name, p))
		}
		if b.shown != "" {
			fs.Lookup(b.name).DefValue = b.shown
		}
	}
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
	cfg.settle()
	return cfg, cfg.Validate()
}

// settle turns the spellings the flags and the file take into the
// components' explicit settings: 0 or -1 of retries, eject-after and
// max-requests turn them off (binding.off), more retries than the proxy
// makes are the most it makes, and a balancer's alias is its name. It is
// idempotent.
func (c *Config) settle() {
	for _, b := range bindings {
		if b.off == nil {
			continue
		}
		if n := b.ptr(c).(*int); *n <= 0 {
			*n, *b.off(c) = 0, true
		}
	}
	c.Proxy.MaxRetries = min(c.Proxy.MaxRetries, proxy.MostRetries) // more were always taken as the most
	if lb, err := proxy.ParseBalancer(string(c.Proxy.Balancer)); err == nil {
		c.Proxy.Balancer = lb
	}
}

// fileSchema is the config file's: the bindings' attributes and the
// fallback and upstream blocks.
func fileSchema() *hcl.BodySchema {
	s := &hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{
		{Type: "fallback", LabelNames: []string{"service"}},
		{Type: "upstream", LabelNames: []string{"name"}},
	}}
	for _, b := range bindings {
		if !b.flagOnly && b.block == "" {
			s.Attributes = append(s.Attributes, hcl.AttributeSchema{Name: b.attr()})
		}
	}
	return s
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
	content, diags := f.Body.Content(fileSchema())
	if diags.HasErrors() {
		return diagError(diags)
	}
	for _, b := range bindings {
		a := content.Attributes[b.attr()]
		if a == nil || b.flagOnly || b.block != "" {
			continue
		}
		at := fmt.Sprintf("%s:%d,%d: %s", name, a.Range.Start.Line, a.Range.Start.Column, b.attr())
		if err := assign(b.ptr(c), a.Expr); err != nil {
			var located located
			if errors.As(err, &located) {
				return err
			}
			return fmt.Errorf("%s: %w", at, err)
		}
	}
	var fallbacks, upstreams []*hcl.Block
	for _, blk := range content.Blocks {
		if blk.Type == "fallback" {
			fallbacks = append(fallbacks, blk)
		} else {
			upstreams = append(upstreams, blk)
		}
	}
	if len(upstreams) > 0 {
		us, err := upstreamSettings(name, upstreams)
		if err != nil {
			return err
		}
		c.UpstreamSettings = us
		for _, blk := range upstreams {
			u := us[strings.ToLower(blk.Labels[0])]
			if u.Listen == "" {
				continue
			}
			for _, l := range c.Proxy.Upstreams {
				if strings.EqualFold(l.Name, blk.Labels[0]) {
					return fmt.Errorf("%s: upstream %q: listen is set, and the upstream list has a listener for it too (%s): keep one", name, blk.Labels[0], upstreamString(l))
				}
			}
			l, err := proxy.ParseUpstream(blk.Labels[0] + "=" + u.Listen) // checked by upstreamSettings
			if err != nil {
				return err
			}
			c.Proxy.Upstreams = append(c.Proxy.Upstreams, l)
		}
	}
	if len(fallbacks) > 0 {
		c.Proxy.Fallbacks = map[string]proxy.Fallback{}
		for _, blk := range fallbacks {
			var f fallbackBlock
			if diags := gohcl.DecodeBody(blk.Body, nil, &f); diags.HasErrors() {
				return diagError(diags)
			}
			f.Service = blk.Labels[0]
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
			c.Proxy.Fallbacks[strings.ToLower(f.Service)] = fb
		}
	}
	return nil
}

// assign sets the field p to the value of the config file's expression.
// Errors of type carry the file and line already.
func assign(p any, expr hcl.Expression) error {
	decode := func(v any) error {
		if diags := gohcl.DecodeExpression(expr, nil, v); diags.HasErrors() {
			return located{diagError(diags)}
		}
		return nil
	}
	switch p := p.(type) {
	case *time.Duration:
		var s string
		if err := decode(&s); err != nil {
			return err
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("%w (use a duration such as \"2s\")", err)
		}
		*p = d
	case *[]proxy.Upstream:
		var ss []string
		if err := decode(&ss); err != nil {
			return err
		}
		*p = nil
		for _, s := range ss {
			u, err := proxy.ParseUpstream(s)
			if err != nil {
				return err
			}
			*p = append(*p, u)
		}
	case *map[string]time.Duration:
		var m map[string]string
		if err := decode(&m); err != nil {
			return err
		}
		*p = make(map[string]time.Duration, len(m))
		for k, s := range m {
			d, err := time.ParseDuration(s)
			if err != nil {
				return fmt.Errorf("[%q]: %w (use a duration such as \"5s\")", k, err)
			}
			(*p)[strings.ToLower(k)] = d
		}
	default:
		return decode(p)
	}
	return nil
}

// componentErrors are what the components' own checks find wrong with
// their part of c, each bad field named by the flag (or file attribute)
// bound to it.
func (c *Config) componentErrors() []error {
	var errs []error
	for _, part := range []struct {
		name string
		cfg  any // a pointer into c
		err  error
	}{
		{"catalog", &c.Catalog, c.Catalog.Validate()},
		{"dns", &c.DNS, c.DNS.Validate()},
		{"proxy", &c.Proxy, c.Proxy.Validate()},
		{"breaker", &c.Breaker, c.Breaker.Validate()},
		{"gateway", &c.Gateway, c.Gateway.Validate()},
	} {
		fields, others := fielderr.All(part.err)
		for _, fe := range fields {
			errs = append(errs, fmt.Errorf("%s %s", c.nameOf(part.name, part.cfg, fe.Field), fe.Msg))
		}
		for _, o := range others {
			errs = append(errs, fmt.Errorf("%s: %w", part.name, o))
		}
	}
	return errs
}

// nameOf is the flag (-dns-ttl), or the file attribute when no flag sets
// it (dns_service_ttl), of the field of a component's config (a pointer
// into c); "component: Field" when neither sets it.
func (c *Config) nameOf(component string, cfg any, field string) string {
	if f := reflect.ValueOf(cfg).Elem().FieldByName(field); f.IsValid() {
		for _, b := range bindings {
			p := reflect.ValueOf(b.ptr(c))
			// The address alone could be the struct's own (its first
			// field): the kind tells them apart.
			if p.Pointer() == f.Addr().Pointer() && p.Elem().Kind() == f.Kind() {
				if b.fileOnly || b.block != "" {
					return b.attr()
				}
				return "-" + b.name
			}
		}
	}
	return component + ": " + field
}

// located is an error that names its file and line already.
type located struct{ error }

func (l located) Unwrap() error { return l.error }

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

// Validate checks the configuration and says what to fix, naming the flag
// (the file's attribute is the same name with '_'): the sidecar's own
// rules, and each component's (its Config's Validate, which its New calls
// too), the bad fields named by the flags bound to them.
func (c *Config) Validate() error {
	errs := c.componentErrors()
	addr := func(flag, v string) {
		if v == "" {
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("-%s %q: want HOST:PORT, e.g. 127.0.0.1:8653 (%v)", flag, v, err))
		}
	}
	if len(c.Catalog.Addresses) == 0 {
		errs = append(errs, errors.New("-consul: at least one Consul address is needed"))
	}
	if c.Proxy.AccessLogSample <= 0 || c.Proxy.AccessLogSample > 1 {
		errs = append(errs, fmt.Errorf("-access-log-sample %v: want a fraction above 0 and at most 1", c.Proxy.AccessLogSample))
	}
	if c.AccessLog == "" {
		errs = append(errs, errors.New("-access-log: want stdout, a file path or off"))
	}
	if c.Proxy.ShutdownGraceTime <= 0 {
		errs = append(errs, errors.New("-drain-timeout must be positive, e.g. 10s"))
	}
	addr("admin", c.Admin)
	if (c.Gateway.Addr != "" || c.Gateway.TLSAddr != "") && c.Gateway.Prefix == "" {
		errs = append(errs, errors.New("-routes-prefix: the gateway needs a KV prefix, e.g. attache/"))
	}
	for _, r := range c.DNS.Recursors {
		addr("recursor", r)
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
