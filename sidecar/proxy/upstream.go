package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Protocol of an upstream listener.
const (
	ProtoHTTP  = "http"  // HTTP/1.1 and h2c (prior knowledge) from apps; HTTP/1.1 to instances
	ProtoHTTP2 = "http2" // as http, but h2c requests go to instances over h2c (gRPC)
	ProtoTCP   = "tcp"   // raw TCP, one instance per connection
)

// Balancer chooses an instance for each request.
type Balancer string

// Balancers.
const (
	LeastRequest Balancer = "least-request" // power of two random choices, fewer requests in flight wins (default)
	RoundRobin   Balancer = "round-robin"
	Weighted     Balancer = "weighted" // random, proportional to Consul's Weights.Passing
	Nearest      Balancer = "nearest"  // lowest round-trip time from serf coordinates, least-request among equals
)

// ParseBalancer accepts a balancer name or its short alias (lr, p2c, rr,
// weighted, nearest). An empty name gives "" (use the proxy default).
func ParseBalancer(s string) (Balancer, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "":
		return "", nil
	case "least-request", "least_request", "lr", "p2c":
		return LeastRequest, nil
	case "round-robin", "round_robin", "rr":
		return RoundRobin, nil
	case "weighted", "weight", "weights":
		return Weighted, nil
	case "nearest", "rtt":
		return Nearest, nil
	}
	return "", fmt.Errorf("proxy: unknown balancer %q (want least-request, round-robin, weighted or nearest)", s)
}

// Upstream is one listener that forwards to one service.
type Upstream struct {
	Name     string   // the Consul service name, lower-cased
	Addr     string   // listen address, host:port
	Protocol string   // ProtoHTTP (default), ProtoHTTP2 or ProtoTCP
	Balancer Balancer // "" uses Config.Balancer
}

func (u Upstream) String() string {
	s := u.Name + "=" + u.Addr
	if u.Protocol != "" && u.Protocol != ProtoHTTP {
		s += "/" + u.Protocol
	}
	if u.Balancer != "" {
		s += ",lb=" + string(u.Balancer)
	}
	return s
}

// ParseUpstream parses the -upstream flag:
//
//	NAME=HOST:PORT[/PROTOCOL][,lb=BALANCER]
//
// for example "inventory=127.0.0.1:9191", "db=127.0.0.1:5432/tcp",
// "users=127.0.0.1:9191,lb=round-robin". HOST is an IP address or localhost.
func ParseUpstream(s string) (Upstream, error) {
	var u Upstream
	orig := s
	bad := func(format string, args ...any) (Upstream, error) {
		return Upstream{}, fmt.Errorf("proxy: bad upstream %q: %s (want NAME=HOST:PORT[/http|/http2|/tcp][,lb=BALANCER], e.g. inventory=127.0.0.1:9191)",
			orig, fmt.Sprintf(format, args...))
	}
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return bad("missing '='")
	}
	name = strings.ToLower(strings.TrimSpace(name))
	if err := checkServiceName(name); err != nil {
		return bad("%v", err)
	}
	u.Name = name
	rest, opts, _ := strings.Cut(rest, ",")
	addr, proto, hasProto := strings.Cut(strings.TrimSpace(rest), "/")
	if hasProto {
		switch p := strings.ToLower(proto); p {
		case ProtoHTTP, ProtoHTTP2, ProtoTCP:
			u.Protocol = p
		case "h2c", "grpc":
			u.Protocol = ProtoHTTP2
		default:
			return bad("unknown protocol %q", proto)
		}
	} else {
		u.Protocol = ProtoHTTP
	}
	if err := checkListenAddr(addr); err != nil {
		return bad("%v", err)
	}
	u.Addr = addr
	if opts != "" {
		for _, o := range strings.Split(opts, ",") {
			k, v, ok := strings.Cut(o, "=")
			k = strings.ToLower(strings.TrimSpace(k))
			if !ok || (k != "lb" && k != "balancer") {
				return bad("unknown option %q (only lb=BALANCER)", o)
			}
			b, err := ParseBalancer(v)
			if err != nil {
				return bad("%v", err)
			}
			u.Balancer = b
		}
	}
	return u, nil
}

// checkServiceName accepts what Consul accepts in DNS-compatible service
// names: letters, digits, '-', '_' and '.', at most 253 characters.
func checkServiceName(name string) error {
	if name == "" {
		return fmt.Errorf("empty service name")
	}
	if len(name) > 253 {
		return fmt.Errorf("service name longer than 253 characters")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("service name %q has character %q", name, c)
		}
	}
	return nil
}

// checkListenAddr accepts HOST:PORT where HOST is an IP address or
// localhost and PORT is 0–65535.
func checkListenAddr(addr string) error {
	if addr == "" {
		return fmt.Errorf("empty address")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %v", addr, err)
	}
	if host == "" {
		return fmt.Errorf("address %q has no host (use 127.0.0.1:PORT)", addr)
	}
	if host != "localhost" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("address %q: host must be an IP address or localhost", addr)
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 || port == "" || port[0] == '+' {
		return fmt.Errorf("address %q: port must be a number 0-65535", addr)
	}
	return nil
}

// serviceFromHost maps a request's host to a service name:
// "inventory", "inventory:80", "inventory.service.consul",
// "inventory.service.dc1.consul" → "inventory". ok is false for hosts
// that are not services (IP addresses, other domains).
func serviceFromHost(host, domain string) (string, bool) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "" {
		return "", false
	}
	if _, err := netip.ParseAddr(host); err != nil && !strings.Contains(host, ".") {
		if checkServiceName(host) != nil {
			return "", false
		}
		return host, true
	}
	suffix := "." + domain
	if !strings.HasSuffix(host, suffix) {
		return "", false
	}
	labels := strings.Split(strings.TrimSuffix(host, suffix), ".")
	// name.service or name.service.dc
	switch {
	case len(labels) == 2 && labels[1] == "service":
	case len(labels) == 3 && labels[1] == "service":
	default:
		return "", false
	}
	if checkServiceName(labels[0]) != nil {
		return "", false
	}
	return labels[0], true
}
