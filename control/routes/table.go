package routes

import (
	"fmt"
	"sort"
	"strings"
)

// Table is a compiled, immutable route lookup. Build it with Compile off the
// request path; Match is safe for concurrent use and allocates nothing.
//
// Precedence (what Match returns when several routes match):
//  1. host: an exact host beats a wildcard host, a longer wildcard suffix
//     beats a shorter one, and any host route beats a route without host;
//  2. then the longest path prefix;
//  3. then the route with more conditions (methods count one, each
//     header one);
//  4. then document order (service routes come after the document's).
type Table struct {
	gateway Gateway
	routes  []*Route // precedence order (as Routes returns them)
	exact   map[string]*group
	wild    []wildGroup // longest suffix first
	any     *group
}

type wildGroup struct {
	suffix string // ".example.com"
	g      *group
}

// group holds the routes of one host class, indexed by the first path
// segment of their prefix when the prefix holds all of it ("/users/..."),
// the others ("/", "/us", "/users") in rest. Every indexed route that matches
// a path has a longer prefix than any rest route that does, so the bucket is
// tried first. Both lists are in precedence order.
type group struct {
	bySeg map[string][]*entry
	segs  []segEntries // bySeg as a list while it is short: a few compares cost less than a hash
	rest  []*entry
}

type segEntries struct {
	seg string
	es  []*entry
}

// maxSegList is the most first segments a group looks up by list.
const maxSegList = 8

// seal builds the list form of bySeg when it is short.
func (g *group) seal() {
	if len(g.bySeg) > maxSegList {
		return
	}
	for _, seg := range sortedKeys(g.bySeg) {
		g.segs = append(g.segs, segEntries{seg, g.bySeg[seg]})
	}
}

// bucket is bySeg[seg].
func (g *group) bucket(seg string) []*entry {
	if len(g.bySeg) > maxSegList {
		return g.bySeg[seg]
	}
	for i := range g.segs {
		if g.segs[i].seg == seg {
			return g.segs[i].es
		}
	}
	return nil
}

type entry struct {
	r       *Route
	prefix  string
	methods []string
	headers []header
	conds   int
	index   int
}

type header struct{ name, value string }

// Compile validates a document and builds its lookup table.
func Compile(doc *Document) (*Table, error) {
	if doc == nil {
		return nil, fmt.Errorf("routes: compile: no document")
	}
	if err := doc.Validate(); err != nil {
		return nil, err
	}
	t := &Table{gateway: doc.Gateway, exact: map[string]*group{}}
	wild := map[string]*group{}
	var entries []*entry
	for i := range doc.Routes {
		r := &doc.Routes[i]
		e := &entry{r: r, prefix: r.Prefix, methods: r.Methods, index: i}
		for _, k := range sortedKeys(r.Headers) {
			e.headers = append(e.headers, header{k, r.Headers[k]})
		}
		e.conds = len(e.headers)
		if len(e.methods) > 0 {
			e.conds++
		}
		entries = append(entries, e)
	}
	sort.SliceStable(entries, func(i, j int) bool { return entries[i].before(entries[j]) })
	for _, e := range entries {
		var g *group
		switch h := e.r.Host; {
		case h == "":
			if t.any == nil {
				t.any = &group{bySeg: map[string][]*entry{}}
			}
			g = t.any
		case strings.HasPrefix(h, "*."):
			if g = wild[h[1:]]; g == nil {
				g = &group{bySeg: map[string][]*entry{}}
				wild[h[1:]] = g
				t.wild = append(t.wild, wildGroup{suffix: h[1:], g: g})
			}
		default:
			if g = t.exact[h]; g == nil {
				g = &group{bySeg: map[string][]*entry{}}
				t.exact[h] = g
			}
		}
		if i := strings.IndexByte(e.prefix[1:], '/'); i >= 0 {
			seg := e.prefix[1 : 1+i]
			g.bySeg[seg] = append(g.bySeg[seg], e)
		} else {
			g.rest = append(g.rest, e)
		}
	}
	sort.SliceStable(t.wild, func(i, j int) bool { return len(t.wild[i].suffix) > len(t.wild[j].suffix) })
	for _, g := range t.exact {
		g.seal()
	}
	for _, w := range t.wild {
		w.g.seal()
	}
	if t.any != nil {
		t.any.seal()
	}
	// Precedence order for Routes: host class, then the order within it.
	for _, g := range t.exactGroupsSorted() {
		t.routes = append(t.routes, g.all()...)
	}
	for _, w := range t.wild {
		t.routes = append(t.routes, w.g.all()...)
	}
	if t.any != nil {
		t.routes = append(t.routes, t.any.all()...)
	}
	return t, nil
}

// before orders entries within a host class: longest prefix, then more
// conditions, then document order.
func (e *entry) before(o *entry) bool {
	if len(e.prefix) != len(o.prefix) {
		return len(e.prefix) > len(o.prefix)
	}
	if e.conds != o.conds {
		return e.conds > o.conds
	}
	return e.index < o.index
}

func (t *Table) exactGroupsSorted() []*group {
	var gs []*group
	for _, h := range sortedKeys(t.exact) {
		gs = append(gs, t.exact[h])
	}
	return gs
}

func (g *group) all() []*Route {
	var es []*entry
	for _, b := range g.bySeg {
		es = append(es, b...)
	}
	es = append(es, g.rest...)
	sort.SliceStable(es, func(i, j int) bool { return es[i].before(es[j]) })
	out := make([]*Route, len(es))
	for i, e := range es {
		out[i] = e.r
	}
	return out
}

// Routes returns the table's routes: exact hosts (by name), wildcard hosts
// (longest suffix first), then routes without host, each class in match
// order. The caller must not change them.
func (t *Table) Routes() []*Route { return t.routes }

// Gateway returns the document's gateway-wide settings.
func (t *Table) Gateway() Gateway { return t.gateway }

// RateLimit returns the limit that applies to r: its own rate_limit, else
// the gateway's default; nil when there is none or the route opted out.
func (t *Table) RateLimit(r *Route) *RateLimit {
	rl := r.RateLimit
	if rl == nil {
		rl = t.gateway.RateLimit
	}
	if rl == nil || rl.Disabled {
		return nil
	}
	return rl
}

// Match returns the route for a request, or nil when none matches. host is
// the request's Host (a port and a trailing dot are ignored, case is not
// significant); path is the request path as received (matched case-sensitively,
// not cleaned: clean it before if you want to); header returns a request
// header's first value by canonical name and may be nil (then routes with
// header conditions do not match).
func (t *Table) Match(host, path, method string, header func(string) string) *Route {
	if e := t.match(host, path, method, header); e != nil {
		return e.r
	}
	return nil
}

// MatchIndex is Match answering the route's index in the compiled
// document's Routes (-1: none), for callers that keep per-route state in a
// slice.
func (t *Table) MatchIndex(host, path, method string, header func(string) string) int {
	if e := t.match(host, path, method, header); e != nil {
		return e.index
	}
	return -1
}

func (t *Table) match(host, path, method string, header func(string) string) *entry {
	if len(t.exact) > 0 || len(t.wild) > 0 { // the host matters only to host routes
		host = hostOnly(host)
		if len(t.exact) > 0 && len(host) <= 253 {
			var buf [253]byte
			n := copy(buf[:], host)
			lower(buf[:n])
			if g := t.exact[string(buf[:n])]; g != nil {
				if e := g.match(path, method, header); e != nil {
					return e
				}
			}
		}
		for _, w := range t.wild {
			if len(host) > len(w.suffix) && hasSuffixFold(host, w.suffix) {
				if e := w.g.match(path, method, header); e != nil {
					return e
				}
			}
		}
	}
	if t.any != nil {
		return t.any.match(path, method, header)
	}
	return nil
}

func (g *group) match(path, method string, header func(string) string) *entry {
	if len(path) > 1 && path[0] == '/' {
		if i := strings.IndexByte(path[1:], '/'); i >= 0 {
			for _, e := range g.bucket(path[1 : 1+i]) {
				if e.ok(path, method, header) {
					return e
				}
			}
		}
	}
	for _, e := range g.rest {
		if e.ok(path, method, header) {
			return e
		}
	}
	return nil
}

func (e *entry) ok(path, method string, header func(string) string) bool {
	if !strings.HasPrefix(path, e.prefix) {
		return false
	}
	if len(e.methods) > 0 {
		found := false
		for _, m := range e.methods {
			if m == method {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	for _, h := range e.headers {
		if header == nil || header(h.name) != h.value {
			return false
		}
	}
	return true
}

// hostOnly drops a port ("host:80", "[::1]:80") and a trailing dot.
func hostOnly(h string) string {
	if strings.HasPrefix(h, "[") {
		if i := strings.IndexByte(h, ']'); i > 0 {
			return h[1:i]
		}
		return h
	}
	if i := strings.LastIndexByte(h, ':'); i >= 0 && strings.IndexByte(h, ':') == i {
		h = h[:i]
	}
	return strings.TrimSuffix(h, ".")
}

func lower(b []byte) {
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
}

// hasSuffixFold is strings.HasSuffix with ASCII case folding; suffix is lower case.
func hasSuffixFold(s, suffix string) bool {
	if len(s) < len(suffix) {
		return false
	}
	s = s[len(s)-len(suffix):]
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != suffix[i] {
			return false
		}
	}
	return true
}
