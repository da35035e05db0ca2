// Package routes owns the gateway's route documents: their HCL (or JSON) form,
// validation with file:line errors, a canonical encoding, a readable diff,
// routes that services publish in their Consul meta, and the compiled lookup
// table that the gateway consults per request. It is a leaf package: it
// imports nothing of attache's, so that both the control service and the
// gateway can use it.
package routes

import "time"

// Limits on a document. Parse refuses anything larger.
const (
	MaxDocumentBytes = 256 << 10 // source and canonical form; a Consul KV value holds 512 KiB
	MaxRoutes        = 1000
	MaxSplits        = 20 // destinations of one route
	MaxMethods       = 16
	MaxHeaders       = 16
	MaxTLSCerts      = 64
	MaxPrefixBytes   = 1024
	MaxFallbackBody  = 64 << 10
)

// Document is a parsed and validated route document. Build one with Parse;
// a Document built in code is checked by Validate (Compile calls it).
type Document struct {
	Gateway Gateway
	Routes  []Route // in document order
}

// Gateway holds the gateway-wide settings.
type Gateway struct {
	// TLS lists certificate and key file pairs; the gateway picks one per
	// connection by SNI among the names in the certificates.
	TLS []TLSCert
	// RateLimit applies to every route without its own rate_limit block.
	// Nil: no default limit.
	RateLimit *RateLimit
	// Fallback is the answer when a route's service has no healthy
	// instance. Nil: the proxy's own 503 with a JSON body.
	Fallback *Fallback
}

// TLSCert is a PEM certificate (chain) file and its key file.
type TLSCert struct {
	Cert string
	Key  string
}

// Fallback is a fixed answer.
type Fallback struct {
	Status      int    // default 503
	Body        string // default empty
	ContentType string // default "text/plain; charset=utf-8"
}

// Route is one route: a match and where it sends requests.
type Route struct {
	Name   string // the block label; unique within a document
	Origin Origin // where the route came from (not part of the encoding)
	Line   int    // line of its definition in its source, 0 when unknown (not encoded)

	// Match.
	Prefix  string            // path prefix, starts with "/"; plain string prefix as nginx's location
	Host    string            // "" any host; "api.example.com" exact; "*.example.com" any name below example.com
	Methods []string          // upper case, sorted, no duplicates; empty: any method
	Headers map[string]string // canonical header name -> exact value; empty: no condition

	// Destinations: one with weight 100 (`service = "users"`) or a weighted
	// split whose weights add up to 100.
	Destinations []Destination

	// Path change before forwarding (at most one of the two).
	StripPrefix bool   // remove Prefix (the path keeps a leading "/")
	Rewrite     string // replace Prefix with this ("" leaves the path alone)

	// Per-route overrides of the proxy's settings; zero values leave the
	// gateway's defaults.
	RequestTimeout time.Duration // whole request, retries included
	TryTimeout     time.Duration // one try
	Retries        *int          // extra tries for idempotent requests; nil: default, 0: none
	Balancer       string        // least-request, round-robin, weighted or nearest; "": default
	Breaker        *Breaker      // nil: the gateway's defaults
	RateLimit      *RateLimit    // nil: Gateway.RateLimit
}

// Destination is a service, optionally narrowed to instances with a tag, and
// its share of the route's requests in percent.
type Destination struct {
	Service string
	Tag     string
	Weight  int
}

// Breaker overrides outlier-ejection and breaker settings for a route's
// services. Nil pointers and zero durations leave the defaults.
type Breaker struct {
	EjectAfter    *int          // consecutive failures that eject an instance; 0: never
	EjectTime     time.Duration // base ejection time
	Window        time.Duration // sliding window of the breaker
	MinimumCalls  *int          // calls in the window before rates count
	FailureRate   *float64      // percent of failed calls that opens the breaker
	SlowCall      time.Duration // a call at least this long is slow
	SlowRate      *float64      // percent of slow calls that opens the breaker
	OpenTime      time.Duration // how long an open breaker fails fast
	HalfOpenCalls *int          // trial calls when half-open
	Disabled      bool          // no per-service breaker (ejection stays)
}

// Rate-limit keys and scopes.
const (
	KeyClient    = "client" // the client's address
	ScopeLocal   = "local"  // the limit holds per gateway
	ScopeCluster = "cluster"
)

// RateLimit is a token bucket per key.
type RateLimit struct {
	Disabled bool    // explicitly no limit (a route opting out of the default)
	RPS      float64 // requests per second, > 0
	Burst    int     // bucket size; default ceil(RPS), at least 1
	// Key is KeyClient (default) or "header:NAME": requests are counted per
	// value of that header (an API key); requests without it share one
	// bucket per client address.
	Key string
	// Header is the canonical header name when Key is "header:NAME".
	Header string
	// Scope is ScopeLocal (default) or ScopeCluster: the limit holds for
	// the whole fleet, each gateway taking its share.
	Scope string
}

// Origin says where a route came from.
type Origin struct {
	Kind    string // OriginDocument or OriginService
	Service string // the publishing service when Kind is OriginService
}

// Origins.
const (
	OriginDocument = "document"
	OriginService  = "service"
)

// String is "document" or "service users".
func (o Origin) String() string {
	if o.Kind == OriginService {
		return "service " + o.Service
	}
	return OriginDocument
}

// Services returns the distinct services the document routes to, in order
// of first use.
func (d *Document) Services() []string {
	seen := map[string]bool{}
	var out []string
	for _, r := range d.Routes {
		for _, dst := range r.Destinations {
			if !seen[dst.Service] {
				seen[dst.Service] = true
				out = append(out, dst.Service)
			}
		}
	}
	return out
}

// Pick returns the destination for n, a number in [0, 100) drawn per
// request: destinations take consecutive ranges as wide as their weights.
func (r *Route) Pick(n int) Destination {
	for _, d := range r.Destinations {
		if n < d.Weight {
			return d
		}
		n -= d.Weight
	}
	return r.Destinations[len(r.Destinations)-1]
}

// RewritePath returns the path to forward for a request path that matched r.
func (r *Route) RewritePath(path string) string {
	switch {
	case r.StripPrefix:
		rest := path[len(r.Prefix):]
		if len(rest) == 0 || rest[0] != '/' {
			return "/" + rest
		}
		return rest
	case r.Rewrite != "":
		return r.Rewrite + path[len(r.Prefix):]
	}
	return path
}
