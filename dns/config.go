package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/fielderr"
	"attache/internal/reuseport"
)

// Config configures the DNS server. DefaultConfig returns every default.
type Config struct {
	// Addr is the UDP and TCP address to listen on. Default "127.0.0.1:8653".
	Addr string
	// Domain is the zone answered from the catalog. Default "consul.".
	Domain string
	// AltDomain is an optional second zone answered like Domain (Consul's
	// alt_domain). Default "" (none).
	AltDomain string

	// Recursors answer names outside the domains, tried in order (failover).
	// "host" or "host:port" (port 53 when omitted). When empty, the
	// nameservers of ResolvConf are used.
	Recursors []string
	// ResolvConf is read for default recursors when Recursors is empty.
	// Default "/etc/resolv.conf"; "" means no recursors at all, so names
	// outside the domain are REFUSED.
	ResolvConf string
	// RecursorTimeout bounds one exchange with one recursor. Default 2s, as Consul.
	RecursorTimeout time.Duration
	// AllowRecursion lists the client networks that may use the recursors.
	// Default loopback only (127.0.0.0/8 and ::1/128): never an open resolver.
	AllowRecursion []netip.Prefix

	// ServiceTTL sets the TTL of service answers by exact (lower-case)
	// service name, or by prefix when the key ends with "*", as Consul's
	// dns_config.service_ttl. Default empty.
	ServiceTTL map[string]time.Duration
	// DefaultServiceTTL applies to services ServiceTTL does not name. Default 0, as Consul.
	DefaultServiceTTL time.Duration
	// NodeTTL is the TTL of node answers. Default 0, as Consul.
	NodeTTL time.Duration
	// NegativeTTL is the SOA minimum TTL (and the SOA record's own TTL), which
	// resolvers use to cache NXDOMAIN and empty answers. Default 0, as Consul.
	NegativeTTL time.Duration

	// UDPAnswerLimit caps the number of answers of a UDP query without EDNS0,
	// as Consul's udp_answer_limit. Default 3, as Consul; 0 means no cap.
	UDPAnswerLimit int
	// NodeMetaTXT adds node metadata as TXT records to the additional
	// section of node A/AAAA answers and of SRV answers, as Consul's
	// enable_additional_node_meta_txt. Default true, as Consul.
	NodeMetaTXT bool

	// Nearest orders answers by estimated round-trip time from Node
	// (network coordinates) instead of a random shuffle. Default false.
	Nearest bool
	// Node is this node's name, the origin for Nearest.
	Node string
	// HonourEjections leaves out instances the proxy has ejected, unless
	// that would leave none. Default true.
	HonourEjections bool

	// WantTimeout bounds the wait for Consul's first answer about a service
	// that is not watched yet. Default 2s.
	WantTimeout time.Duration

	// UDPSockets is the number of UDP sockets bound to Addr, with
	// SO_REUSEPORT (Linux), each read by its own goroutine. Default 0: one
	// per GOMAXPROCS (which follows a container's CPU limit).
	UDPSockets int
	// Binder binds the sockets (UDP and TCP alike with SO_REUSEPORT).
	// Default nil: reuseport.Plain; the sidecar passes its
	// handover.Sockets, which hands out a predecessor's sockets first.
	Binder reuseport.Binder

	// RateLimit is the queries per second each client address may send;
	// beyond it (after RateBurst) queries are answered REFUSED. Default 0:
	// no limit.
	RateLimit float64
	// RateBurst is the number of queries a client may send at once above
	// RateLimit. Default 0: RateLimit (at least 1).
	RateBurst int
	// RateLimitClients bounds the clients whose rate is tracked; past it the
	// idle ones are forgotten first. Default 0: 10000.
	RateLimitClients int

	// Logger is named "dns" by New. Default hclog.NewNullLogger().
	Logger hclog.Logger
	// Registerer receives the metrics. Default nil (metrics not registered).
	Registerer prometheus.Registerer
}

// DefaultConfig returns the defaults documented on Config.
func DefaultConfig() Config {
	return Config{
		Addr:            "127.0.0.1:8653",
		Domain:          "consul.",
		ResolvConf:      "/etc/resolv.conf",
		RecursorTimeout: 2 * time.Second,
		AllowRecursion: []netip.Prefix{
			netip.MustParsePrefix("127.0.0.0/8"),
			netip.MustParsePrefix("::1/128"),
		},
		UDPAnswerLimit:  3,
		NodeMetaTXT:     true,
		HonourEjections: true,
		WantTimeout:     2 * time.Second,
	}
}

// Validate says what is wrong with c, each bad field as a *fielderr.Error
// (zero fields are fine: New gives them their defaults). New and SetTuning
// call it.
func (c Config) Validate() error {
	var errs []error
	if c.Addr != "" {
		if _, _, err := net.SplitHostPort(c.Addr); err != nil {
			errs = append(errs, fielderr.New("Addr", "%q: want HOST:PORT, e.g. 127.0.0.1:8653 (%v)", c.Addr, err))
		}
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{{"DefaultServiceTTL", c.DefaultServiceTTL}, {"NodeTTL", c.NodeTTL}, {"NegativeTTL", c.NegativeTTL}} {
		if d.v < 0 {
			errs = append(errs, fielderr.New(d.field, "%v: must not be negative", d.v))
		}
	}
	keys := make([]string, 0, len(c.ServiceTTL))
	for k := range c.ServiceTTL {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if v := c.ServiceTTL[k]; v < 0 {
			errs = append(errs, fielderr.New("ServiceTTL", "[%q] %v: must not be negative", k, v))
		}
	}
	if c.RateLimit < 0 {
		errs = append(errs, fielderr.New("RateLimit", "%v: must not be negative (0: no limit)", c.RateLimit))
	}
	if c.RateBurst < 0 {
		errs = append(errs, fielderr.New("RateBurst", "%d: must not be negative (0: the rate)", c.RateBurst))
	}
	if c.RateLimitClients < 0 {
		errs = append(errs, fielderr.New("RateLimitClients", "%d: must not be negative", c.RateLimitClients))
	}
	if c.UDPAnswerLimit < 0 {
		errs = append(errs, fielderr.New("UDPAnswerLimit", "%d: must not be negative (0: no cap)", c.UDPAnswerLimit))
	}
	return errors.Join(errs...)
}

// parseResolvConf returns the nameservers of a resolv.conf file as
// "host:port" addresses, in file order.
func parseResolvConf(path string) ([]string, error) {
	cc, err := miekg.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("dns: read resolvers from %s: %w", path, err)
	}
	out := make([]string, 0, len(cc.Servers))
	for _, s := range cc.Servers {
		out = append(out, net.JoinHostPort(s, cc.Port))
	}
	return out, nil
}

// recursorAddr adds port 53 to a recursor given without one and checks it
// is an IP address.
func recursorAddr(r string) (string, error) {
	host, port, err := net.SplitHostPort(r)
	if err != nil {
		host, port = strings.Trim(r, "[]"), "53"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return "", fmt.Errorf("recursor %q: want an IP address with an optional port", r)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return "", fmt.Errorf("recursor %q: bad port", r)
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(p)).String(), nil
}

// normalizeDomain lower-cases d and makes it fully qualified.
func normalizeDomain(d string) (string, error) {
	d = strings.ToLower(strings.TrimSpace(d))
	if d == "" || d == "." {
		return "", errors.New("domain must not be empty or the root")
	}
	d = miekg.Fqdn(strings.TrimPrefix(d, "."))
	if _, ok := miekg.IsDomainName(d); !ok {
		return "", fmt.Errorf("domain %q is not a valid DNS name", d)
	}
	return d, nil
}
