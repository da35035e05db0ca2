package routes

import (
	"math"
	"sort"

	"github.com/hashicorp/hcl/v2/hclwrite"
	"github.com/zclconf/go-cty/cty"
)

// Encode returns the canonical HCL form of a document: fixed field order,
// defaults written out, durations in Go's form ("1m30s"), methods sorted,
// header names canonical, one line per field. Parse(Encode(d)) gives d back
// (but for Line and Origin), and documents that mean the same encode to the
// same bytes, so stored versions compare by their bytes.
func Encode(d *Document) []byte {
	f := hclwrite.NewEmptyFile()
	body := f.Body()
	if g := d.Gateway; len(g.TLS) > 0 || g.RateLimit != nil || g.Fallback != nil {
		gb := body.AppendNewBlock("gateway", nil).Body()
		for _, c := range g.TLS {
			tb := gb.AppendNewBlock("tls", nil).Body()
			tb.SetAttributeValue("cert", cty.StringVal(c.Cert))
			tb.SetAttributeValue("key", cty.StringVal(c.Key))
		}
		if g.RateLimit != nil {
			encodeRateLimit(gb, g.RateLimit)
		}
		if fb := g.Fallback; fb != nil {
			b := gb.AppendNewBlock("fallback", nil).Body()
			b.SetAttributeValue("status", cty.NumberIntVal(int64(fb.Status)))
			b.SetAttributeValue("body", cty.StringVal(fb.Body))
			b.SetAttributeValue("content_type", cty.StringVal(fb.ContentType))
		}
		body.AppendNewline()
	}
	for i := range d.Routes {
		if i > 0 {
			body.AppendNewline()
		}
		encodeRoute(body, &d.Routes[i])
	}
	return hclwrite.Format(f.Bytes())
}

// encodeRoute appends one route block.
func encodeRoute(body *hclwrite.Body, r *Route) {
	b := body.AppendNewBlock("route", []string{r.Name}).Body()
	b.SetAttributeValue("prefix", cty.StringVal(r.Prefix))
	if r.Host != "" {
		b.SetAttributeValue("host", cty.StringVal(r.Host))
	}
	if len(r.Methods) > 0 {
		ms := make([]cty.Value, len(r.Methods))
		for i, m := range r.Methods {
			ms[i] = cty.StringVal(m)
		}
		b.SetAttributeValue("methods", cty.ListVal(ms))
	}
	if len(r.Headers) > 0 {
		hs := map[string]cty.Value{}
		for k, v := range r.Headers {
			hs[k] = cty.StringVal(v)
		}
		b.SetAttributeValue("headers", cty.MapVal(hs))
	}
	if len(r.Destinations) == 1 && r.Destinations[0].Tag == "" && r.Destinations[0].Weight == 100 {
		b.SetAttributeValue("service", cty.StringVal(r.Destinations[0].Service))
	} else {
		for _, d := range r.Destinations {
			sb := b.AppendNewBlock("split", nil).Body()
			sb.SetAttributeValue("service", cty.StringVal(d.Service))
			if d.Tag != "" {
				sb.SetAttributeValue("tag", cty.StringVal(d.Tag))
			}
			sb.SetAttributeValue("weight", cty.NumberIntVal(int64(d.Weight)))
		}
	}
	if r.StripPrefix {
		b.SetAttributeValue("strip_prefix", cty.True)
	}
	if r.Rewrite != "" {
		b.SetAttributeValue("rewrite", cty.StringVal(r.Rewrite))
	}
	setDuration(b, "request_timeout", r.RequestTimeout)
	setDuration(b, "try_timeout", r.TryTimeout)
	setInt(b, "retries", r.Retries)
	if r.Balancer != "" {
		b.SetAttributeValue("lb", cty.StringVal(r.Balancer))
	}
	if br := r.Breaker; br != nil {
		bb := b.AppendNewBlock("breaker", nil).Body()
		setInt(bb, "eject_after", br.EjectAfter)
		setDuration(bb, "eject_time", br.EjectTime)
		setDuration(bb, "window", br.Window)
		setInt(bb, "minimum_calls", br.MinimumCalls)
		setFloat(bb, "failure_rate", br.FailureRate)
		setDuration(bb, "slow_call", br.SlowCall)
		setFloat(bb, "slow_rate", br.SlowRate)
		setDuration(bb, "open_time", br.OpenTime)
		setInt(bb, "half_open_calls", br.HalfOpenCalls)
		if br.Disabled {
			bb.SetAttributeValue("disabled", cty.True)
		}
	}
	if r.RateLimit != nil {
		encodeRateLimit(b, r.RateLimit)
	}
}

func encodeRateLimit(parent *hclwrite.Body, rl *RateLimit) {
	b := parent.AppendNewBlock("rate_limit", nil).Body()
	if rl.Disabled {
		b.SetAttributeValue("disabled", cty.True)
		return
	}
	b.SetAttributeValue("rps", number(rl.RPS))
	b.SetAttributeValue("burst", cty.NumberIntVal(int64(rl.Burst)))
	b.SetAttributeValue("key", cty.StringVal(rl.Key))
	b.SetAttributeValue("scope", cty.StringVal(rl.Scope))
}

func number(f float64) cty.Value {
	if f == math.Trunc(f) && math.Abs(f) < 1<<53 {
		return cty.NumberIntVal(int64(f))
	}
	return cty.NumberFloatVal(f)
}

func setDuration(b *hclwrite.Body, name string, d interface{ String() string }) {
	if s := d.String(); s != "0s" {
		b.SetAttributeValue(name, cty.StringVal(s))
	}
}

func setInt(b *hclwrite.Body, name string, v *int) {
	if v != nil {
		b.SetAttributeValue(name, cty.NumberIntVal(int64(*v)))
	}
}

func setFloat(b *hclwrite.Body, name string, v *float64) {
	if v != nil {
		b.SetAttributeValue(name, number(*v))
	}
}

// Equal reports whether two documents mean the same: their canonical
// encodings are equal.
func Equal(a, b *Document) bool { return string(Encode(a)) == string(Encode(b)) }

// sortedKeys returns a map's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
