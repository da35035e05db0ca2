package sidecar

import (
	"fmt"
	"io"
	"reflect"
	"strings"

	"github.com/hashicorp/go-hclog"

	"attache/dns"
	"attache/sidecar/breaker"
	"attache/sidecar/proxy"
)

// What a reload (SIGHUP) changes while everything keeps serving; every
// other setting needs a restart and keeps its old value until then.
var reloadable = map[string]bool{
	"Upstreams": true, "HTTPProxy": true, // listeners added, removed, moved (with a proxy running)
	"TryTimeout": true, "ReqTimeout": true, "Retries": true, // proxy policy
	"EjectAfter": true, "EjectTime": true, "SlowCall": true, "MaxRequests": true, // breakers
	"DNSTTL": true, "DNSNodeTTL": true, "DNSNegTTL": true, "DNSServiceTTL": true, // DNS answers
	"DNSNearest": true, "DNSEjections": true, "Recursors": true,
	"LogLevel":    true,
	"PrintConfig": true, // command line only
}

// breakerConfig is the breakers' part of cfg.
func breakerConfig(cfg Config) breaker.Config {
	bc := breaker.DefaultConfig()
	bc.ConsecutiveFailures, bc.BaseEjectionTime = cfg.EjectAfter, cfg.EjectTime
	bc.SlowCallDuration, bc.MaxRequests = cfg.SlowCall, cfg.MaxRequests
	if bc.MaxRequests <= 0 { // -max-requests 0 or -1: no limit
		bc.MaxRequests, bc.NoRequestLimit = 0, true
	}
	if bc.ConsecutiveFailures <= 0 { // -eject-after 0 or -1: never
		bc.ConsecutiveFailures, bc.NoEjection = 0, true
	}
	return bc
}

// dnsConfig is the DNS server's part of cfg (but its rate limits, logger
// and metrics).
func dnsConfig(cfg Config) dns.Config {
	dc := dns.DefaultConfig()
	dc.Addr, dc.Domain, dc.Recursors = cfg.DNS, cfg.DNSDomain, cfg.Recursors
	dc.DefaultServiceTTL, dc.ServiceTTL, dc.NodeTTL, dc.NegativeTTL = cfg.DNSTTL, cfg.DNSServiceTTL, cfg.DNSNodeTTL, cfg.DNSNegTTL
	dc.Nearest, dc.Node, dc.HonourEjections = cfg.DNSNearest, cfg.Node, cfg.DNSEjections
	return dc
}

// proxyReloadable sets the proxy's settings that a reload may change
// (proxy.Update): the listeners, timeouts and retries. pc.Balancer must be
// set.
func proxyReloadable(pc *proxy.Config, cfg Config) error {
	pc.HTTPProxyAddr = cfg.HTTPProxy
	pc.TryTimeout, pc.RequestTimeout, pc.MaxRetries = cfg.TryTimeout, cfg.ReqTimeout, cfg.Retries
	if pc.MaxRetries <= 0 { // -retries 0 or -1: none
		pc.MaxRetries, pc.NoRetries = 0, true
	}
	pc.MaxRetries = min(pc.MaxRetries, proxy.MostRetries) // more were always taken as the most
	pc.Upstreams = nil
	for _, u := range cfg.Upstreams {
		up, err := proxy.ParseUpstream(u)
		if err != nil {
			return fmt.Errorf("-upstream: %w", err)
		}
		if up.Balancer == "" {
			up.Balancer = pc.Balancer
		}
		pc.Upstreams = append(pc.Upstreams, up)
	}
	return nil
}

// Reload applies a new configuration (from ParseArgs: defaults, file,
// flags) while every listener keeps serving: what it can change
// (reloadable) is changed, what needs a restart is named in one log line
// and keeps its old value. An invalid configuration, or one the proxy
// cannot take (an address it cannot bind), is refused whole: the error
// says why and nothing changes. Reloads run one at a time.
func (s *Sidecar) Reload(next Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if err := next.Validate(); err != nil {
		return err
	}
	cur := s.Config()
	applied := cur // next's reloadable settings over the current ones
	var restart []string
	cv, nv, av := reflect.ValueOf(cur), reflect.ValueOf(next), reflect.ValueOf(&applied).Elem()
	for i := 0; i < cv.NumField(); i++ {
		name := cv.Type().Field(i).Name
		if reflect.DeepEqual(cv.Field(i).Interface(), nv.Field(i).Interface()) {
			continue
		}
		if reloadable[name] && !((name == "Upstreams" || name == "HTTPProxy") && s.proxy == nil) {
			av.Field(i).Set(nv.Field(i))
			continue
		}
		restart = append(restart, attrName(name))
	}
	if s.proxy != nil {
		pc := proxy.Config{}
		pc.Balancer, _ = proxy.ParseBalancer(applied.Balancer) // checked by Validate
		if err := proxyReloadable(&pc, applied); err != nil {
			return err
		}
		if err := s.proxy.Update(pc); err != nil {
			return err
		}
	}
	if err := s.breakers.SetConfig(breakerConfig(applied)); err != nil {
		s.log.Error("reload: breakers", "error", err) // only the window can be refused, and it is not configurable
	}
	if s.dns != nil {
		dc := dnsConfig(applied)
		if err := s.dns.SetTuning(dc); err != nil {
			s.log.Error("reload: DNS settings refused; the old ones stay", "error", err)
			applied.DNSTTL, applied.DNSNodeTTL, applied.DNSNegTTL, applied.DNSServiceTTL = cur.DNSTTL, cur.DNSNodeTTL, cur.DNSNegTTL, cur.DNSServiceTTL
			applied.DNSNearest, applied.DNSEjections, applied.Recursors = cur.DNSNearest, cur.DNSEjections, cur.Recursors
		}
	}
	if applied.LogLevel != cur.LogLevel {
		s.log.SetLevel(hclogLevel(applied.LogLevel))
	}
	applied.PrintConfig = false
	s.applied.Store(&applied)
	if len(restart) > 0 {
		s.log.Warn("reload: these settings need a restart and keep their old values until then", "settings", strings.Join(restart, ", "))
	}
	s.log.Info("reloaded", "upstreams", applied.Upstreams, "http_proxy", applied.HTTPProxy,
		"try_timeout", applied.TryTimeout, "request_timeout", applied.ReqTimeout, "retries", applied.Retries)
	return nil
}

// Config returns the configuration in force: the one the sidecar started
// with, with what reloads changed.
func (s *Sidecar) Config() Config {
	if c := s.applied.Load(); c != nil {
		return *c
	}
	return s.cfg
}

// ReloadArgs reads the configuration again from the command line args (and
// the file it names) over defaults, as at start, so flags still win over
// the file, and applies it (Reload). A configuration that does not parse
// or is invalid is refused with one log line naming the file, the line
// and the reason; the old one stays.
func (s *Sidecar) ReloadArgs(args []string, defaults Config) error {
	next, err := ParseArgs(args, defaults, io.Discard)
	if err == nil {
		err = s.Reload(next)
	}
	if err != nil {
		s.log.Error("reload refused; the configuration in force stays", "error", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	return err
}

// attrName is the config file's name of a Config field.
func attrName(field string) string {
	if f, ok := reflect.TypeOf(fileConfig{}).FieldByName(field); ok {
		if tag, _, _ := strings.Cut(f.Tag.Get("hcl"), ","); tag != "" {
			return tag
		}
	}
	return strings.ToLower(field)
}

func hclogLevel(l string) hclog.Level { return hclog.LevelFromString(strings.ToLower(l)) }
