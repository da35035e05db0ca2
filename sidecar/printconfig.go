package sidecar

import (
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclwrite"
	"github.com/zclconf/go-cty/cty"

	"attache/sidecar/proxy"
)

// redacted stands for a secret in the printed configuration.
const redacted = "<redacted>"

// HCL returns the configuration as a config file (the -config attribute
// names, from the bindings), every setting written out, secrets replaced
// by "<redacted>": the Consul and admin tokens and any password in a
// Consul address. What the file format cannot say (Consul TLS files,
// token file, SSL, all from the environment) is left out.
func (c Config) HCL() []byte {
	f := hclwrite.NewEmptyFile()
	body := f.Body()
	strs := func(l []string) cty.Value {
		if len(l) == 0 {
			return cty.ListValEmpty(cty.String)
		}
		vs := make([]cty.Value, len(l))
		for i, s := range l {
			vs[i] = cty.StringVal(s)
		}
		return cty.ListVal(vs)
	}
	for _, b := range bindings {
		if b.flagOnly {
			continue
		}
		var v cty.Value
		switch p := b.ptr(&c).(type) {
		case *string:
			s := *p
			if b.secret && s != "" {
				s = redacted
			}
			v = cty.StringVal(s)
		case *[]string:
			l := *p
			if b.name == "consul" {
				l = make([]string, len(*p))
				for i, a := range *p {
					l[i] = redactURL(a)
				}
			}
			v = strs(l)
		case *[]proxy.Upstream:
			v = strs(upstreamStrings(*p))
		case *bool:
			v = cty.BoolVal(*p)
		case *int:
			v = cty.NumberIntVal(int64(*p))
			if b.off != nil && *b.off(&c) {
				v = cty.NumberIntVal(-1) // the spelling of "none" the flag's usage gives
			}
		case *float64:
			v = cty.NumberFloatVal(*p)
		case *time.Duration:
			v = cty.StringVal(p.String())
		case *map[string]time.Duration:
			m := map[string]cty.Value{}
			for k, d := range *p {
				m[k] = cty.StringVal(d.String())
			}
			v = cty.MapValEmpty(cty.String)
			if len(m) > 0 {
				v = cty.MapVal(m)
			}
		default: // the blocks, below
			continue
		}
		body.SetAttributeValue(b.attr(), v)
	}
	names := make([]string, 0, len(c.Proxy.Fallbacks))
	for n := range c.Proxy.Fallbacks {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fb := c.Proxy.Fallbacks[n]
		b := fallbackBlock{Service: n, Status: &fb.Status, Body: &fb.Body, ContentType: &fb.ContentType, On: list(fb.On)}
		if fb.Service != "" {
			b = fallbackBlock{Service: n, To: &fb.Service, On: list(fb.On)}
		}
		body.AppendNewline()
		body.AppendBlock(gohcl.EncodeAsBlock(&b, "fallback"))
	}
	names = names[:0]
	for n := range c.UpstreamSettings {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		b := c.UpstreamSettings[n].block(n)
		body.AppendNewline()
		body.AppendBlock(gohcl.EncodeAsBlock(&b, "upstream"))
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
