package routes

import (
	"fmt"
	"net/textproto"
	"sort"
	"strings"
)

// Validate checks a document built in code (Parse has already done so for a
// parsed one): every rule that Parse applies beyond syntax and types.
func (d *Document) Validate() error { return d.validate("document") }

func (d *Document) validate(file string) error {
	v := &validator{file: file}
	if len(d.Routes) > MaxRoutes {
		v.add(0, "more than %d routes", MaxRoutes)
	}
	if len(d.Gateway.TLS) > MaxTLSCerts {
		v.add(0, "more than %d tls blocks", MaxTLSCerts)
	}
	seenTLS := map[TLSCert]bool{}
	for _, c := range d.Gateway.TLS {
		if c.Cert == "" || c.Key == "" {
			v.add(0, "gateway tls: cert and key must both name a file")
		}
		if seenTLS[c] {
			v.add(0, "gateway tls: cert %q and key %q are listed twice", c.Cert, c.Key)
		}
		seenTLS[c] = true
	}
	if rl := d.Gateway.RateLimit; rl != nil {
		if rl.Disabled {
			v.add(0, "gateway rate_limit: disabled is for routes; leave the gateway's block out instead")
		}
		v.rateLimit(0, "gateway rate_limit", rl)
	}
	if f := d.Gateway.Fallback; f != nil && (f.Status < 100 || f.Status > 599) {
		v.add(0, "gateway fallback: status %d is not an HTTP status (100-599)", f.Status)
	}
	names := map[string]int{}
	matches := map[string]int{}
	for i := range d.Routes {
		r := &d.Routes[i]
		v.route(r)
		if j, dup := names[r.Name]; dup {
			v.add(r.Line, "route %q is defined twice (first at line %d)", r.Name, d.Routes[j].Line)
		} else {
			names[r.Name] = i
		}
		key := r.matchKey()
		if j, dup := matches[key]; dup {
			v.add(r.Line, "route %q has the same match as route %q (line %d): it could never be chosen", r.Name, d.Routes[j].Name, d.Routes[j].Line)
		} else {
			matches[key] = i
		}
	}
	if len(v.problems) > 0 {
		return &Error{v.problems}
	}
	return nil
}

type validator struct {
	file     string
	problems []Problem
}

func (v *validator) add(line int, format string, args ...any) {
	v.problems = append(v.problems, Problem{File: v.file, Line: line, Message: fmt.Sprintf(format, args...)})
}

// matchKey identifies what a route matches: two routes with the same key
// are duplicates.
func (r *Route) matchKey() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%q %q %q", r.Host, r.Prefix, r.Methods)
	keys := make([]string, 0, len(r.Headers))
	for k := range r.Headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %q=%q", k, r.Headers[k])
	}
	return b.String()
}

func (v *validator) route(r *Route) {
	l := r.Line
	if !validName(r.Name) {
		v.add(l, "route name %q: use 1 to 128 printable characters without spaces or quotes", r.Name)
	}
	switch {
	case !strings.HasPrefix(r.Prefix, "/"):
		v.add(l, "route %q: prefix %q must start with \"/\"", r.Name, r.Prefix)
	case len(r.Prefix) > MaxPrefixBytes:
		v.add(l, "route %q: prefix is longer than %d bytes", r.Name, MaxPrefixBytes)
	case strings.ContainsFunc(r.Prefix, func(c rune) bool { return c <= ' ' || c == 0x7f || c == '?' || c == '#' }):
		v.add(l, "route %q: prefix %q holds a space, a control character, '?' or '#'", r.Name, r.Prefix)
	}
	if r.Host != "" && !validHost(r.Host) {
		v.add(l, "route %q: host %q: want a lower-case name such as \"api.example.com\" or \"*.example.com\" (no port)", r.Name, r.Host)
	}
	if len(r.Methods) > MaxMethods {
		v.add(l, "route %q: more than %d methods", r.Name, MaxMethods)
	}
	for i, m := range r.Methods {
		if !validToken(m) || m != strings.ToUpper(m) {
			v.add(l, "route %q: method %q is not an upper-case HTTP method", r.Name, m)
		}
		if i > 0 && r.Methods[i-1] >= m {
			v.add(l, "route %q: methods must be sorted without duplicates", r.Name)
		}
	}
	if len(r.Headers) > MaxHeaders {
		v.add(l, "route %q: more than %d headers", r.Name, MaxHeaders)
	}
	for k, val := range r.Headers {
		if !validToken(k) || k != textproto.CanonicalMIMEHeaderKey(k) {
			v.add(l, "route %q: header %q is not a canonical header name", r.Name, k)
		}
		if val == "" || strings.ContainsFunc(val, func(c rune) bool { return c < ' ' && c != '\t' || c == 0x7f }) {
			v.add(l, "route %q: header %q: the value must be non-empty, without control characters", r.Name, k)
		}
	}
	v.destinations(r)
	if r.StripPrefix && r.Rewrite != "" {
		v.add(l, "route %q: strip_prefix and rewrite exclude each other (strip_prefix is rewrite = \"/\")", r.Name)
	}
	if r.Rewrite != "" && (!strings.HasPrefix(r.Rewrite, "/") || strings.ContainsFunc(r.Rewrite, func(c rune) bool { return c <= ' ' || c == 0x7f })) {
		v.add(l, "route %q: rewrite %q must start with \"/\" and hold no spaces or control characters", r.Name, r.Rewrite)
	}
	if r.RequestTimeout < 0 || r.TryTimeout < 0 {
		v.add(l, "route %q: timeouts must be more than zero", r.Name)
	}
	if r.RequestTimeout > 0 && r.TryTimeout > r.RequestTimeout {
		v.add(l, "route %q: try_timeout %v is longer than request_timeout %v", r.Name, r.TryTimeout, r.RequestTimeout)
	}
	if r.Retries != nil && (*r.Retries < 0 || *r.Retries > 10) {
		v.add(l, "route %q: retries %d: want 0 to 10", r.Name, *r.Retries)
	}
	switch r.Balancer {
	case "", "least-request", "round-robin", "weighted", "nearest":
	default:
		v.add(l, "route %q: lb %q: want least-request, round-robin, weighted or nearest", r.Name, r.Balancer)
	}
	if b := r.Breaker; b != nil {
		if b.EjectAfter != nil || b.EjectTime != 0 {
			v.add(l, "route %q: breaker: eject_after and eject_time cannot be set per route: outlier ejection judges a service's instances for every caller (set the sidecar's -eject-after and -eject-time)", r.Name)
		}
		for _, d := range []struct {
			name string
			ok   bool
		}{
			{"eject_after", b.EjectAfter == nil || *b.EjectAfter >= 0},
			{"minimum_calls", b.MinimumCalls == nil || *b.MinimumCalls >= 0},
			{"half_open_calls", b.HalfOpenCalls == nil || *b.HalfOpenCalls >= 0},
			{"failure_rate", b.FailureRate == nil || *b.FailureRate >= 0 && *b.FailureRate <= 100},
			{"slow_rate", b.SlowRate == nil || *b.SlowRate >= 0 && *b.SlowRate <= 100},
			{"durations", b.EjectTime >= 0 && b.Window >= 0 && b.SlowCall >= 0 && b.OpenTime >= 0},
		} {
			if !d.ok {
				v.add(l, "route %q: breaker: %s out of range", r.Name, d.name)
			}
		}
	}
	if r.RateLimit != nil {
		v.rateLimit(l, fmt.Sprintf("route %q: rate_limit", r.Name), r.RateLimit)
	}
}

func (v *validator) destinations(r *Route) {
	l := r.Line
	if len(r.Destinations) == 0 {
		v.add(l, "route %q: no destination: set service = \"NAME\" or split blocks", r.Name)
		return
	}
	if len(r.Destinations) > MaxSplits {
		v.add(l, "route %q: more than %d split blocks", r.Name, MaxSplits)
	}
	sum := 0
	seen := map[Destination]bool{}
	for _, d := range r.Destinations {
		if !validServiceName(d.Service) {
			v.add(l, "route %q: service %q: want a Consul service name (letters, digits, '-', '_', '.')", r.Name, d.Service)
		}
		if d.Tag != "" && !validServiceName(d.Tag) {
			v.add(l, "route %q: tag %q: want letters, digits, '-', '_', '.'", r.Name, d.Tag)
		}
		if d.Weight < 0 || d.Weight > 100 {
			v.add(l, "route %q: weight %d of %s is not a percentage (0-100)", r.Name, d.Weight, d.Service)
		}
		key := Destination{Service: d.Service, Tag: d.Tag}
		if seen[key] {
			v.add(l, "route %q: split lists service %q tag %q twice", r.Name, d.Service, d.Tag)
		}
		seen[key] = true
		sum += d.Weight
	}
	if sum != 100 {
		v.add(l, "route %q: split weights add up to %d, not 100", r.Name, sum)
	}
}

func (v *validator) rateLimit(l int, what string, rl *RateLimit) {
	if rl.Disabled {
		if rl.RPS != 0 || rl.Burst != 0 || rl.Key != "" || rl.Scope != "" || rl.Header != "" {
			v.add(l, "%s: disabled = true takes no other field", what)
		}
		return
	}
	if !(rl.RPS > 0) || rl.RPS > 1e9 {
		v.add(l, "%s: rps must be more than 0 (and at most 1e9)", what)
	}
	if rl.Burst < 1 || rl.Burst > 1e9 {
		v.add(l, "%s: burst must be at least 1", what)
	}
	if rl.Key != KeyClient && (rl.Header == "" || rl.Key != "header:"+rl.Header || rl.Header != textproto.CanonicalMIMEHeaderKey(rl.Header) || !validToken(rl.Header)) {
		v.add(l, "%s: key %q: want \"client\" or \"header:NAME\"", what, rl.Key)
	}
	if rl.Key == KeyClient && rl.Header != "" {
		v.add(l, "%s: header %q set with key \"client\"", what, rl.Header)
	}
	if rl.Scope != ScopeLocal && rl.Scope != ScopeCluster {
		v.add(l, "%s: scope %q: want \"local\" or \"cluster\"", what, rl.Scope)
	}
}

func validName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	return !strings.ContainsFunc(s, func(c rune) bool { return c <= ' ' || c == 0x7f || c == '"' || c == '\\' || c == '\'' || c > 0x7e })
}

func validServiceName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// validHost accepts lower-case DNS names (letters, digits, '-', '.', '_')
// and "*." followed by one.
func validHost(h string) bool {
	if rest, ok := strings.CutPrefix(h, "*."); ok {
		h = rest
	}
	if h == "" || len(h) > 253 || h[0] == '.' || h[len(h)-1] == '.' || strings.Contains(h, "..") {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}
