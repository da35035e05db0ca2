package proxy

import (
	"fmt"
	"strings"

	"attache/sidecar/breaker"
)

// Fallback is the answer given, like Resilience4j's fallback method, for a
// call the breaker refused and (unless On says otherwise) for one that
// failed after its retries: either a static response or the same request
// sent to another service. The answer carries the cause in the
// X-Attache-Fallback header.
type Fallback struct {
	Status      int      // static answer status (default 200)
	Body        string   // static answer body
	ContentType string   // default application/json
	Service     string   // forward to this service instead (takes precedence)
	On          []string // causes it answers for (FallbackCauses); default all
}

// Causes of a fallback answer, as the X-Attache-Fallback header names them.
const (
	CauseBreakerOpen = "breaker-open"   // the breaker refused the call (open, or half-open with its trials out)
	CauseMaxRequests = "max-requests"   // the service had MaxRequests calls in flight
	CauseNoHealthy   = "no-healthy"     // no instance to send to
	Cause5xx         = "upstream-5xx"   // the last try's answer was a failure (FailureStatuses)
	CauseTimeout     = "timeout"        // the last try timed out
	CauseError       = "upstream-error" // the last try got no answer (connect error, reset)
)

// FallbackCauses lists every cause.
var FallbackCauses = []string{CauseBreakerOpen, CauseMaxRequests, CauseNoHealthy, Cause5xx, CauseTimeout, CauseError}

// fallback is a checked Fallback with its causes as a set.
type fallback struct {
	Fallback
	on map[string]bool
}

func newFallback(name string, fb Fallback) (*fallback, error) {
	if fb.Service == "" && (fb.Status < 100 && fb.Status != 0 || fb.Status > 599) {
		return nil, fmt.Errorf("proxy: fallback for %s: bad status %d", name, fb.Status)
	}
	if fb.Service != "" {
		fb.Service = strings.ToLower(fb.Service)
		if err := checkServiceName(fb.Service); err != nil {
			return nil, fmt.Errorf("proxy: fallback for %s: %w", name, err)
		}
	}
	f := &fallback{Fallback: fb, on: map[string]bool{}}
	on := fb.On
	if len(on) == 0 {
		on = FallbackCauses
	}
	for _, c := range on {
		known := false
		for _, k := range FallbackCauses {
			known = known || c == k
		}
		if !known {
			return nil, fmt.Errorf("proxy: fallback for %s: unknown cause %q (want one of %s)", name, c, strings.Join(FallbackCauses, ", "))
		}
		f.on[c] = true
	}
	return f, nil
}

// cause names why res is not an answer to pass on; "" when it is one (or
// one no fallback replaces).
func (p *Proxy) cause(res result) string {
	switch res.kind {
	case outOpen:
		if res.open != nil && res.open.State == breaker.MaxRequests {
			return CauseMaxRequests
		}
		return CauseBreakerOpen
	case outNoHealthy:
		return CauseNoHealthy
	case outError:
		if isTimeout(res.err) {
			return CauseTimeout
		}
		return CauseError
	case outAnswered:
		if p.failureOn[res.status%600] {
			return Cause5xx
		}
	}
	return ""
}

// fallbackFor returns t's fallback and the cause when the fallback answers
// for res; nil otherwise.
func (t *target) fallbackFor(res result) (*fallback, string) {
	fb := t.fallback
	if fb == nil {
		return nil, ""
	}
	c := t.p.cause(res)
	if c == "" || !fb.on[c] {
		return nil, ""
	}
	return fb, c
}
