package routes

import (
	"bytes"
	"fmt"
	"math"
	"net/textproto"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclparse"
)

// Problem is one thing wrong with a document, where it is.
type Problem struct {
	File    string `json:"file"`
	Line    int    `json:"line,omitempty"`
	Column  int    `json:"column,omitempty"`
	Message string `json:"message"`
}

func (p Problem) String() string {
	switch {
	case p.Line > 0 && p.Column > 0:
		return fmt.Sprintf("%s:%d,%d: %s", p.File, p.Line, p.Column, p.Message)
	case p.Line > 0:
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Message)
	}
	return fmt.Sprintf("%s: %s", p.File, p.Message)
}

// Error lists every problem found in a document.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return "routes: " + strings.Join(lines, "\nroutes: ")
}

// Parse reads a route document. JSON (HCL's JSON form) is read when the
// file name ends in ".json" or the source starts with "{"; HCL otherwise.
// Every problem found is returned in one *Error, each naming the file, the
// line and the reason.
func Parse(filename string, src []byte) (*Document, error) {
	if len(src) > MaxDocumentBytes {
		return nil, &Error{[]Problem{{File: filename, Message: fmt.Sprintf("document is %d bytes, more than the limit of %d", len(src), MaxDocumentBytes)}}}
	}
	p := &parser{file: filename}
	var f *hcl.File
	var diags hcl.Diagnostics
	if strings.EqualFold(filepath.Ext(filename), ".json") || bytes.HasPrefix(bytes.TrimSpace(src), []byte("{")) {
		f, diags = hclparse.NewParser().ParseJSON(src, filename)
	} else {
		f, diags = hclparse.NewParser().ParseHCL(src, filename)
	}
	p.diags(diags)
	if f == nil || diags.HasErrors() {
		return nil, p.err()
	}
	doc := p.document(f.Body)
	if len(p.problems) > 0 {
		return nil, p.err()
	}
	if err := doc.validate(filename); err != nil {
		return nil, err
	}
	return doc, nil
}

// parser decodes blocks by hand, so that every value keeps its line.
type parser struct {
	file     string
	problems []Problem
}

func (p *parser) err() error {
	if len(p.problems) == 0 {
		return nil
	}
	return &Error{p.problems}
}

func (p *parser) add(rng hcl.Range, format string, args ...any) {
	p.problems = append(p.problems, Problem{File: p.file, Line: rng.Start.Line, Column: rng.Start.Column, Message: fmt.Sprintf(format, args...)})
}

func (p *parser) diags(ds hcl.Diagnostics) {
	for _, d := range ds {
		if d.Severity != hcl.DiagError {
			continue
		}
		msg := d.Summary
		if d.Detail != "" {
			msg += ": " + d.Detail
		}
		pr := Problem{File: p.file, Message: msg}
		if d.Subject != nil {
			pr.Line, pr.Column = d.Subject.Start.Line, d.Subject.Start.Column
		}
		p.problems = append(p.problems, pr)
	}
}

var (
	topSchema = &hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{
		{Type: "gateway"},
		{Type: "route", LabelNames: []string{"name"}},
	}}
	gatewaySchema = &hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{
		{Type: "tls"}, {Type: "rate_limit"}, {Type: "fallback"},
	}}
	routeSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{
			{Name: "prefix", Required: true}, {Name: "host"}, {Name: "methods"}, {Name: "headers"},
			{Name: "service"}, {Name: "strip_prefix"}, {Name: "rewrite"},
			{Name: "request_timeout"}, {Name: "try_timeout"}, {Name: "retries"}, {Name: "lb"},
		},
		Blocks: []hcl.BlockHeaderSchema{{Type: "split"}, {Type: "breaker"}, {Type: "rate_limit"}},
	}
	tlsSchema      = attrSchema([]string{"cert", "key"}, "cert", "key")
	rateSchema     = attrSchema([]string{"rps", "burst", "key", "scope", "disabled"})
	fallbackSchema = attrSchema([]string{"status", "body", "content_type"})
	splitSchema    = attrSchema([]string{"service", "tag", "weight"}, "service", "weight")
	breakerSchema  = attrSchema([]string{"eject_after", "eject_time", "window", "minimum_calls", "failure_rate",
		"slow_call", "slow_rate", "open_time", "half_open_calls", "disabled"})
)

func attrSchema(names []string, required ...string) *hcl.BodySchema {
	s := &hcl.BodySchema{}
	for _, n := range names {
		req := false
		for _, r := range required {
			req = req || r == n
		}
		s.Attributes = append(s.Attributes, hcl.AttributeSchema{Name: n, Required: req})
	}
	return s
}

// content decodes a body against its schema, reporting unknown fields.
func (p *parser) content(b hcl.Body, s *hcl.BodySchema) *hcl.BodyContent {
	c, diags := b.Content(s)
	p.diags(diags)
	return c
}

// one returns the only block of a type, reporting a second one.
func (p *parser) one(blocks hcl.Blocks, typ string) *hcl.Block {
	bs := blocks.OfType(typ)
	for _, b := range bs[min(1, len(bs)):] {
		p.add(b.DefRange, "a second %s block (only one is allowed; the first is at line %d)", typ, bs[0].DefRange.Start.Line)
	}
	if len(bs) == 0 {
		return nil
	}
	return bs[0]
}

func (p *parser) document(body hcl.Body) *Document {
	doc := &Document{}
	c := p.content(body, topSchema)
	if c == nil {
		return doc
	}
	if g := p.one(c.Blocks, "gateway"); g != nil {
		doc.Gateway = p.gateway(g)
	}
	rs := c.Blocks.OfType("route")
	if len(rs) > MaxRoutes {
		p.add(rs[MaxRoutes].DefRange, "more than %d routes", MaxRoutes)
		return doc
	}
	for _, b := range rs {
		doc.Routes = append(doc.Routes, p.route(b))
	}
	return doc
}

func (p *parser) gateway(b *hcl.Block) Gateway {
	var g Gateway
	c := p.content(b.Body, gatewaySchema)
	if c == nil {
		return g
	}
	tls := c.Blocks.OfType("tls")
	if len(tls) > MaxTLSCerts {
		p.add(tls[MaxTLSCerts].DefRange, "more than %d tls blocks", MaxTLSCerts)
	}
	for _, t := range tls[:min(len(tls), MaxTLSCerts)] {
		a := p.attrs(t, tlsSchema)
		var cert TLSCert
		a.str("cert", &cert.Cert)
		a.str("key", &cert.Key)
		if a.ok && (cert.Cert == "" || cert.Key == "") {
			p.add(t.DefRange, "tls: cert and key must both name a file")
		}
		g.TLS = append(g.TLS, cert)
	}
	if rb := p.one(c.Blocks, "rate_limit"); rb != nil {
		g.RateLimit = p.rateLimit(rb)
		if g.RateLimit != nil && g.RateLimit.Disabled {
			p.add(rb.DefRange, "rate_limit: disabled is for a route opting out of the gateway's default; leave the gateway's block out instead")
		}
	}
	if fb := p.one(c.Blocks, "fallback"); fb != nil {
		a := p.attrs(fb, fallbackSchema)
		f := &Fallback{Status: 503, ContentType: "text/plain; charset=utf-8"}
		if a.int("status", &f.Status) && (f.Status < 100 || f.Status > 599) {
			p.add(a.rng("status"), "fallback: status %d is not an HTTP status (100-599)", f.Status)
		}
		if a.str("body", &f.Body) && len(f.Body) > MaxFallbackBody {
			p.add(a.rng("body"), "fallback: body is longer than %d bytes", MaxFallbackBody)
		}
		if a.str("content_type", &f.ContentType) && (f.ContentType == "" || strings.ContainsAny(f.ContentType, "\r\n")) {
			p.add(a.rng("content_type"), "fallback: content_type must be one non-empty line")
		}
		g.Fallback = f
	}
	return g
}

func (p *parser) rateLimit(b *hcl.Block) *RateLimit {
	a := p.attrs(b, rateSchema)
	rl := &RateLimit{Key: KeyClient, Scope: ScopeLocal}
	if a.bool("disabled", &rl.Disabled) && rl.Disabled {
		if len(a.c.Attributes) > 1 {
			p.add(b.DefRange, "rate_limit: disabled = true takes no other field")
		}
		return &RateLimit{Disabled: true}
	}
	if !a.float("rps", &rl.RPS) {
		if a.ok {
			p.add(b.DefRange, "rate_limit: rps is required (requests per second), or disabled = true")
		}
	} else if !(rl.RPS > 0) || rl.RPS > 1e9 {
		p.add(a.rng("rps"), "rate_limit: rps must be more than 0 (and at most 1e9)")
	}
	if a.int("burst", &rl.Burst) {
		if rl.Burst < 1 || rl.Burst > 1e9 {
			p.add(a.rng("burst"), "rate_limit: burst must be at least 1 (and at most 1e9)")
		}
	} else {
		rl.Burst = max(1, int(math.Ceil(min(rl.RPS, 1e9))))
	}
	if a.str("key", &rl.Key) {
		switch name, ok := strings.CutPrefix(rl.Key, "header:"); {
		case rl.Key == KeyClient:
		case ok && validToken(name):
			rl.Header = textproto.CanonicalMIMEHeaderKey(name)
			rl.Key = "header:" + rl.Header
		default:
			p.add(a.rng("key"), "rate_limit: key %q: want \"client\" or \"header:NAME\"", rl.Key)
		}
	}
	if a.str("scope", &rl.Scope) && rl.Scope != ScopeLocal && rl.Scope != ScopeCluster {
		p.add(a.rng("scope"), "rate_limit: scope %q: want \"local\" or \"cluster\"", rl.Scope)
	}
	return rl
}

func (p *parser) route(b *hcl.Block) Route {
	r := Route{Name: b.Labels[0], Origin: Origin{Kind: OriginDocument}, Line: b.DefRange.Start.Line}
	a := p.attrs(b, routeSchema)
	if a.c == nil {
		return r
	}
	a.str("prefix", &r.Prefix)
	a.str("host", &r.Host)
	r.Host = strings.ToLower(r.Host)
	if a.strs("methods", &r.Methods) {
		for i, m := range r.Methods {
			r.Methods[i] = strings.ToUpper(m)
		}
		sort.Strings(r.Methods)
		r.Methods = dedupe(r.Methods)
	}
	var hdrs map[string]string
	if a.strMap("headers", &hdrs) {
		r.Headers = map[string]string{}
		for k, v := range hdrs {
			if !validToken(k) {
				p.add(a.rng("headers"), "headers: %q is not a header name", k)
				continue
			}
			ck := textproto.CanonicalMIMEHeaderKey(k)
			if _, dup := r.Headers[ck]; dup {
				p.add(a.rng("headers"), "headers: %q given twice", ck)
			}
			r.Headers[ck] = v
		}
	}
	var svc string
	hasSvc := a.str("service", &svc)
	splits := a.c.Blocks.OfType("split")
	switch {
	case hasSvc && len(splits) > 0:
		p.add(a.rng("service"), "route %q: service and split blocks exclude each other: use one service, or split blocks whose weights add up to 100", r.Name)
	case hasSvc:
		r.Destinations = []Destination{{Service: svc, Weight: 100}}
	case len(splits) == 0:
		p.add(b.DefRange, "route %q: no destination: set service = \"NAME\" or split blocks", r.Name)
	}
	if len(splits) > MaxSplits {
		p.add(splits[MaxSplits].DefRange, "route %q: more than %d split blocks", r.Name, MaxSplits)
		splits = splits[:MaxSplits]
	}
	for _, sb := range splits {
		sa := p.attrs(sb, splitSchema)
		var d Destination
		sa.str("service", &d.Service)
		sa.str("tag", &d.Tag)
		if sa.int("weight", &d.Weight) && (d.Weight < 0 || d.Weight > 100) {
			p.add(sa.rng("weight"), "split: weight %d is not a percentage (0-100)", d.Weight)
		}
		r.Destinations = append(r.Destinations, d)
	}
	a.bool("strip_prefix", &r.StripPrefix)
	a.str("rewrite", &r.Rewrite)
	a.duration("request_timeout", &r.RequestTimeout)
	a.duration("try_timeout", &r.TryTimeout)
	var n int
	if a.int("retries", &n) {
		r.Retries = &n
	}
	a.str("lb", &r.Balancer)
	if bb := p.one(a.c.Blocks, "breaker"); bb != nil {
		r.Breaker = p.breaker(bb)
	}
	if rb := p.one(a.c.Blocks, "rate_limit"); rb != nil {
		r.RateLimit = p.rateLimit(rb)
	}
	return r
}

func (p *parser) breaker(b *hcl.Block) *Breaker {
	a := p.attrs(b, breakerSchema)
	br := &Breaker{}
	ptrInt := func(name string, dst **int) {
		var v int
		if a.int(name, &v) {
			if v < 0 {
				p.add(a.rng(name), "breaker: %s must not be negative", name)
			}
			*dst = &v
		}
	}
	ptrPct := func(name string, dst **float64) {
		var v float64
		if a.float(name, &v) {
			if v < 0 || v > 100 {
				p.add(a.rng(name), "breaker: %s must be a percentage (0-100)", name)
			}
			*dst = &v
		}
	}
	ptrInt("eject_after", &br.EjectAfter)
	a.duration("eject_time", &br.EjectTime)
	a.duration("window", &br.Window)
	ptrInt("minimum_calls", &br.MinimumCalls)
	ptrPct("failure_rate", &br.FailureRate)
	a.duration("slow_call", &br.SlowCall)
	ptrPct("slow_rate", &br.SlowRate)
	a.duration("open_time", &br.OpenTime)
	ptrInt("half_open_calls", &br.HalfOpenCalls)
	a.bool("disabled", &br.Disabled)
	return br
}

// attrs is a block's decoded content with typed accessors that report
// problems at the attribute's line. Each accessor returns whether the
// attribute was set and well-typed.
type attrs struct {
	p  *parser
	b  *hcl.Block
	c  *hcl.BodyContent
	ok bool // the block decoded without problems so far
}

func (p *parser) attrs(b *hcl.Block, s *hcl.BodySchema) attrs {
	before := len(p.problems)
	c := p.content(b.Body, s)
	if c == nil {
		c = &hcl.BodyContent{}
	}
	return attrs{p: p, b: b, c: c, ok: len(p.problems) == before}
}

func (a attrs) rng(name string) hcl.Range {
	if at, ok := a.c.Attributes[name]; ok {
		return at.Range
	}
	return a.b.DefRange
}

func (a attrs) decode(name string, dst any) bool {
	at, ok := a.c.Attributes[name]
	if !ok {
		return false
	}
	v, diags := at.Expr.Value(nil)
	if diags.HasErrors() {
		a.p.diags(diags)
		return false
	}
	if v.IsNull() {
		a.p.add(at.Range, "%s: null is not a value here", name)
		return false
	}
	if diags := gohcl.DecodeExpression(at.Expr, nil, dst); diags.HasErrors() {
		a.p.add(at.Range, "%s: %s", name, diags[0].Detail)
		return false
	}
	return true
}

func (a attrs) str(name string, dst *string) bool { return a.decode(name, dst) }
func (a attrs) bool(name string, dst *bool) bool  { return a.decode(name, dst) }
func (a attrs) strs(name string, dst *[]string) bool {
	return a.decode(name, dst)
}
func (a attrs) strMap(name string, dst *map[string]string) bool {
	return a.decode(name, dst)
}

func (a attrs) float(name string, dst *float64) bool {
	if !a.decode(name, dst) {
		return false
	}
	if math.IsNaN(*dst) || math.IsInf(*dst, 0) {
		a.p.add(a.rng(name), "%s: not a finite number", name)
		return false
	}
	return true
}

func (a attrs) int(name string, dst *int) bool {
	var f float64
	if !a.float(name, &f) {
		return false
	}
	if f != math.Trunc(f) || math.Abs(f) > 1e9 {
		a.p.add(a.rng(name), "%s: want a whole number, not %v", name, f)
		return false
	}
	*dst = int(f)
	return true
}

func (a attrs) duration(name string, dst *time.Duration) bool {
	var s string
	if !a.str(name, &s) {
		return false
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		a.p.add(a.rng(name), "%s: %q is not a duration (use one such as \"2s\" or \"500ms\")", name, s)
		return false
	case d <= 0:
		a.p.add(a.rng(name), "%s: %q must be more than zero (leave it out for the default)", name, s)
		return false
	}
	*dst = d
	return true
}

func dedupe(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// validToken reports whether s is an HTTP token (a method or a header name).
func validToken(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}
