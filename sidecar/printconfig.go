package sidecar

import (
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclwrite"
)

// redacted stands for a secret in the printed configuration.
const redacted = "<redacted>"

// HCL returns the configuration as a config file (the -config attribute
// names), every setting written out, secrets replaced by "<redacted>":
// the Consul and admin tokens and any password in a Consul address.
// What the file format cannot say (Consul TLS files, token file, SSL, all
// from the environment) is left out.
func (c Config) HCL() []byte {
	secret := func(s string) *string {
		if s != "" {
			s = redacted
		}
		return &s
	}
	dur := func(d time.Duration) *string { s := d.String(); return &s }
	consul := make([]string, len(c.Consul))
	for i, a := range c.Consul {
		consul[i] = redactURL(a)
	}
	svcTTL := map[string]string{}
	for k, v := range c.DNSServiceTTL {
		svcTTL[k] = v.String()
	}
	fc := fileConfig{
		Node: &c.Node, Consul: &consul, Token: secret(c.Token), DataDir: &c.DataDir,
		DNS: &c.DNS, DNSDomain: &c.DNSDomain, Recursors: list(c.Recursors),
		Admin: &c.Admin, AdminToken: secret(c.AdminToken), Upstreams: list(c.Upstreams),
		HTTPProxy: &c.HTTPProxy, Gateway: &c.Gateway, GatewayTLS: &c.GatewayTLS,
		RoutesPrefix: &c.RoutesPrefix, ServiceFiles: list(c.ServiceFiles),
		Watch: &c.Watch, WatchList: list(c.WatchList), WatchIdle: dur(c.WatchIdle),
		Streaming: &c.Streaming, Stale: &c.Stale, MaxStale: dur(c.MaxStale), Warning: &c.Warning,
		DNSTTL: dur(c.DNSTTL), DNSNodeTTL: dur(c.DNSNodeTTL), DNSNegTTL: dur(c.DNSNegTTL),
		DNSNearest: &c.DNSNearest, DNSEjections: &c.DNSEjections, DNSServiceTTL: &svcTTL,
		DNSRateLimit: &c.DNSRateLimit, DNSRateBurst: &c.DNSRateBurst, Balancer: &c.Balancer,
		TryTimeout: dur(c.TryTimeout), ReqTimeout: dur(c.ReqTimeout), Retries: &c.Retries,
		ClientIdle: dur(c.ClientIdle), HeaderTimeout: dur(c.HeaderTimeout), BodyTimeout: dur(c.BodyTimeout),
		MaxClients: &c.MaxClients, DrainTimeout: dur(c.DrainTimeout), AccessLog: &c.AccessLog,
		AccessLogAll: &c.AccessLogAll, AccessSample: &c.AccessSample, EjectAfter: &c.EjectAfter,
		EjectTime: dur(c.EjectTime), SlowCall: dur(c.SlowCall), MaxRequests: &c.MaxRequests,
		LogLevel: &c.LogLevel, LogJSON: &c.LogJSON,
	}
	names := make([]string, 0, len(c.Fallbacks))
	for n := range c.Fallbacks {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fb := c.Fallbacks[n]
		b := fallbackBlock{Service: n, Status: &fb.Status, Body: &fb.Body, ContentType: &fb.ContentType, On: list(fb.On)}
		if fb.Service != "" {
			b = fallbackBlock{Service: n, To: &fb.Service, On: list(fb.On)}
		}
		fc.Fallbacks = append(fc.Fallbacks, b)
	}
	names = names[:0]
	for n := range c.UpstreamSettings {
		names = append(names, n)
	}
	sort.Strings(names)
	f := hclwrite.NewEmptyFile()
	gohcl.EncodeIntoBody(&fc, f.Body())
	// The blocks share the name "upstream" with the list of listeners,
	// which gohcl's encoder cannot tell apart: they are appended here.
	for _, n := range names {
		b := c.UpstreamSettings[n].block(n)
		f.Body().AppendNewline()
		f.Body().AppendBlock(gohcl.EncodeAsBlock(&b, "upstream"))
	}
	return f.Bytes()
}

// list is l as an HCL list: never null, so that the printed file sets it.
func list(l []string) *[]string {
	if l == nil {
		l = []string{}
	}
	return &l
}

// redactURL hides the password of an address such as https://user:pass@host:8501.
func redactURL(a string) string {
	rest, scheme := a, ""
	if i := strings.Index(a, "://"); i >= 0 {
		scheme, rest = a[:i+3], a[i+3:]
	}
	host := rest
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		host = rest[:i]
	}
	at := strings.LastIndexByte(host, '@')
	if at < 0 {
		return a
	}
	user, _, hasPass := strings.Cut(host[:at], ":")
	if !hasPass {
		return a
	}
	return scheme + user + ":" + redacted + rest[at:]
}
