package routes

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
)

// precedenceDoc exercises every rule of the precedence, in document order
// chosen against it where it can be.
const precedenceDoc = `
route "any-root" {
  prefix  = "/"
  service = "root"
}
route "any-users" {
  prefix  = "/users/"
  service = "users"
}
route "any-users-long" {
  prefix  = "/users/admin/"
  service = "admin"
}
route "any-users-get" {
  prefix  = "/users/"
  methods = ["GET"]
  service = "users-read"
}
route "any-users-canary" {
  prefix  = "/users/"
  methods = ["GET"]
  headers = { "X-Canary" = "1" }
  service = "users-canary"
}
route "any-users-noslash" {
  prefix  = "/users"
  service = "users-noslash"
}
route "wild" {
  prefix  = "/"
  host    = "*.example.com"
  service = "wild"
}
route "wild-deeper" {
  prefix  = "/"
  host    = "*.eu.example.com"
  service = "wild-eu"
}
route "exact" {
  prefix  = "/"
  host    = "api.example.com"
  service = "exact"
}
route "exact-users" {
  prefix  = "/users/"
  host    = "api.example.com"
  service = "exact-users"
}
route "order-a" {
  prefix  = "/o/"
  headers = { "X-A" = "1" }
  service = "a"
}
route "order-b" {
  prefix  = "/o/"
  headers = { "X-B" = "1" }
  service = "b"
}
route "api-only" {
  prefix  = "/only/"
  host    = "only.example.org"
  service = "only"
}
`

func TestMatchPrecedence(t *testing.T) {
	d, err := Parse("precedence.hcl", []byte(precedenceDoc))
	if err != nil {
		t.Fatal(err)
	}
	tab, err := Compile(d)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name               string
		host, path, method string
		headers            map[string]string
		want               string // route name, "" for no match
	}{
		{"root catches all", "x.org", "/nothing", "GET", nil, "any-root"},
		{"longest prefix", "x.org", "/users/admin/1", "POST", nil, "any-users-long"},
		{"prefix over shorter", "x.org", "/users/1", "POST", nil, "any-users"},
		{"method condition first", "x.org", "/users/1", "GET", nil, "any-users-get"},
		{"more conditions first", "x.org", "/users/1", "GET", map[string]string{"X-Canary": "1"}, "any-users-canary"},
		{"header value must equal", "x.org", "/users/1", "GET", map[string]string{"X-Canary": "2"}, "any-users-get"},
		{"methods are case-sensitive", "x.org", "/users/1", "get", nil, "any-users"},
		{"plain string prefix", "x.org", "/usersfoo", "GET", nil, "any-users-noslash"},
		{"prefix without the slash", "x.org", "/users", "GET", nil, "any-users-noslash"},
		{"paths are case-sensitive", "x.org", "/Users/1", "GET", nil, "any-root"},
		{"exact host beats wildcard", "api.example.com", "/x", "GET", nil, "exact"},
		{"exact host beats longer prefix elsewhere", "api.example.com", "/users/admin/1", "GET", nil, "exact-users"},
		{"host case and port ignored", "API.Example.COM:8443", "/users/1", "GET", nil, "exact-users"},
		{"trailing dot ignored", "api.example.com.", "/x", "GET", nil, "exact"},
		{"wildcard", "www.example.com", "/users/1", "GET", nil, "wild"},
		{"wildcard several labels", "a.b.example.com", "/", "GET", nil, "wild"},
		{"longer wildcard first", "x.eu.example.com", "/", "GET", nil, "wild-deeper"},
		{"wildcard not the apex", "example.com", "/users/1", "POST", nil, "any-users"},
		{"wildcard case-insensitive", "WWW.EXAMPLE.COM", "/", "GET", nil, "wild"},
		{"host group falls through when its paths miss", "only.example.org", "/users/1", "POST", nil, "any-users"},
		{"host route", "only.example.org", "/only/1", "GET", nil, "api-only"},
		{"document order breaks ties", "x.org", "/o/1", "GET", map[string]string{"X-A": "1", "X-B": "1"}, "order-a"},
		{"second by its header", "x.org", "/o/1", "GET", map[string]string{"X-B": "1"}, "order-b"},
		{"ipv6 host", "[::1]:80", "/users/1", "PUT", nil, "any-users"},
		{"no leading slash", "x.org", "*", "OPTIONS", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := func(name string) string { return tt.headers[name] }
			got := tab.Match(tt.host, tt.path, tt.method, h)
			name := ""
			if got != nil {
				name = got.Name
			}
			if name != tt.want {
				t.Errorf("Match(%q, %q, %q, %v) = %q, want %q", tt.host, tt.path, tt.method, tt.headers, name, tt.want)
			}
			if ref := bruteMatch(d, tt.host, tt.path, tt.method, h); ref != got {
				t.Errorf("reference disagrees: %v", ref)
			}
		})
	}
	var names []string
	for _, r := range tab.Routes() {
		names = append(names, r.Name)
	}
	want := "exact-users exact api-only wild-deeper wild any-users-long any-users-canary any-users-get any-users any-users-noslash order-a order-b any-root"
	if strings.Join(names, " ") != want {
		t.Errorf("Routes() order:\n%s\nwant\n%s", strings.Join(names, " "), want)
	}
}

func TestMatchEmptyAndNilHeader(t *testing.T) {
	tab, err := Compile(&Document{})
	if err != nil {
		t.Fatal(err)
	}
	if r := tab.Match("a", "/", "GET", nil); r != nil {
		t.Errorf("empty table matched %v", r)
	}
	d, _ := Parse("p.hcl", []byte(precedenceDoc))
	tab, _ = Compile(d)
	if r := tab.Match("x", "/o/1", "GET", nil); r == nil || r.Name != "any-root" {
		t.Errorf("nil header func: %v", r)
	}
	if _, err := Compile(&Document{Routes: []Route{{Name: "a", Prefix: "no-slash", Destinations: []Destination{{Service: "a", Weight: 100}}}}}); err == nil {
		t.Error("Compile took an invalid document")
	}
}

// bruteMatch is the reference: every route that matches, the best by the
// written precedence.
func bruteMatch(d *Document, host, path, method string, header func(string) string) *Route {
	h := strings.ToLower(hostOnly(host))
	var best *Route
	var bestKey [5]int
	for i := range d.Routes {
		r := &d.Routes[i]
		class, wlen := 2, 0
		switch {
		case r.Host == "":
		case strings.HasPrefix(r.Host, "*."):
			if !(len(h) > len(r.Host)-1 && strings.HasSuffix(h, r.Host[1:])) {
				continue
			}
			class, wlen = 1, len(r.Host)
		default:
			if h != r.Host {
				continue
			}
			class = 0
		}
		if !strings.HasPrefix(path, r.Prefix) {
			continue
		}
		conds := len(r.Headers)
		if len(r.Methods) > 0 {
			conds++
			ok := false
			for _, m := range r.Methods {
				ok = ok || m == method
			}
			if !ok {
				continue
			}
		}
		ok := true
		for k, v := range r.Headers {
			ok = ok && header != nil && header(k) == v
		}
		if !ok {
			continue
		}
		key := [5]int{class, -wlen, -len(r.Prefix), -conds, i}
		if best == nil || less(key, bestKey) {
			best, bestKey = r, key
		}
	}
	return best
}

func less(a, b [5]int) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}

// randomDoc builds a valid document from a small alphabet, so that routes
// overlap often.
func randomDoc(rng *rand.Rand, n int) *Document {
	hosts := []string{"", "", "a.com", "b.a.com", "*.a.com", "*.b.a.com", "c.org"}
	// Up to 12 first segments: groups above maxSegList look their
	// buckets up by map, the others by list.
	segs := []string{"", "u", "us", "users", "x", "a", "b", "c", "d", "e", "f", "g"}
	methods := []string{"GET", "POST", "PUT"}
	d := &Document{}
	seen := map[string]bool{}
	for i := 0; len(d.Routes) < n && i < n*4; i++ {
		var p strings.Builder
		p.WriteString("/")
		for k := rng.IntN(3); k > 0; k-- {
			p.WriteString(segs[rng.IntN(len(segs))])
			if rng.IntN(3) > 0 {
				p.WriteString("/")
			}
		}
		r := Route{Name: fmt.Sprintf("r%d", i), Prefix: p.String(), Host: hosts[rng.IntN(len(hosts))],
			Destinations: []Destination{{Service: "s", Weight: 100}}}
		if rng.IntN(3) == 0 {
			r.Methods = []string{methods[rng.IntN(len(methods))]}
		}
		if rng.IntN(3) == 0 {
			r.Headers = map[string]string{"X-H": fmt.Sprint(rng.IntN(2))}
		}
		if rng.IntN(5) == 0 {
			r.Headers = map[string]string{"X-H": "1", "X-K": "1"}
		}
		if seen[r.matchKey()] {
			continue
		}
		seen[r.matchKey()] = true
		d.Routes = append(d.Routes, r)
	}
	return d
}

func randomRequest(rng *rand.Rand) (host, path, method string, hdr http.Header) {
	hosts := []string{"a.com", "A.com:80", "b.a.com", "x.b.a.com", "z.a.com", "c.org", "other", "", "[::1]:8080", "a.com."}
	segs := []string{"", "u", "us", "users", "x", "usersx", "a", "b", "c", "d", "e", "f", "g"}
	var p strings.Builder
	p.WriteString("/")
	for k := rng.IntN(4); k > 0; k-- {
		p.WriteString(segs[rng.IntN(len(segs))])
		if rng.IntN(3) > 0 {
			p.WriteString("/")
		}
	}
	hdr = http.Header{}
	if rng.IntN(2) == 0 {
		hdr.Set("X-H", fmt.Sprint(rng.IntN(2)))
	}
	if rng.IntN(2) == 0 {
		hdr.Set("X-K", "1")
	}
	return hosts[rng.IntN(len(hosts))], p.String(), []string{"GET", "POST", "PUT", "DELETE"}[rng.IntN(4)], hdr
}

// TestMatchAgainstReference compares Table.Match with the brute-force
// reference over random tables and requests.
func TestMatchAgainstReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var listed, hashed int
	for round := 0; round < 300; round++ {
		l, h := checkAgainstReference(t, rng, 1+rng.IntN(40), 50)
		listed, hashed = listed+b2i(l), hashed+b2i(h)
	}
	if listed == 0 || hashed == 0 {
		t.Errorf("tables looked up by list %d times, by map %d: want both", listed, hashed)
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func checkAgainstReference(t *testing.T, rng *rand.Rand, routes, requests int) (listed, hashed bool) {
	t.Helper()
	d := randomDoc(rng, routes)
	tab, err := Compile(d)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	if g := tab.any; g != nil {
		listed, hashed = len(g.bySeg) <= maxSegList, len(g.bySeg) > maxSegList
	}
	for i := 0; i < requests; i++ {
		host, path, method, hdr := randomRequest(rng)
		got := tab.Match(host, path, method, hdr.Get)
		want := bruteMatch(d, host, path, method, hdr.Get)
		if got != want {
			t.Fatalf("Match(%q, %q, %q, %v) = %v, reference %v\ntable:\n%s", host, path, method, hdr, name(got), name(want), Encode(d))
		}
		if i := tab.MatchIndex(host, path, method, hdr.Get); i < 0 && got != nil || i >= 0 && &d.Routes[i] != got {
			t.Fatalf("MatchIndex(%q, %q, %q, %v) = %d, Match %v", host, path, method, hdr, i, name(got))
		}
	}
	return listed, hashed
}

func name(r *Route) string {
	if r == nil {
		return "<nil>"
	}
	return r.Name
}

func TestMatchAllocatesNothing(t *testing.T) {
	d, _ := Parse("p.hcl", []byte(precedenceDoc))
	tab, _ := Compile(d)
	hdr := func(string) string { return "" }
	allocs := testing.AllocsPerRun(1000, func() {
		tab.Match("API.example.com:443", "/users/42", "GET", hdr)
		tab.Match("www.example.com", "/users/admin/1", "POST", hdr)
		tab.Match("x.org", "/o/1", "GET", hdr)
	})
	if allocs != 0 {
		t.Errorf("Match allocates %v times per run", allocs)
	}
}

// benchTable is a table of 1,000 routes (999 under 100 first segments with
// exact and wildcard hosts, some methods and headers, and a catch-all) and
// 256 requests spread over them.
func benchTable(b *testing.B) (*Document, *Table, []benchReq) {
	d := &Document{}
	for i := 0; i < 999; i++ {
		r := Route{Name: fmt.Sprintf("r%d", i), Prefix: fmt.Sprintf("/svc%d/v%d/", i%100, i/100),
			Destinations: []Destination{{Service: fmt.Sprintf("s%d", i), Weight: 100}}}
		switch i % 10 {
		case 1:
			r.Host = fmt.Sprintf("h%d.example.com", i%7)
		case 2:
			r.Host = "*.example.com"
		case 3:
			r.Methods = []string{"GET"}
		case 4:
			r.Headers = map[string]string{"X-Canary": "1"}
		}
		d.Routes = append(d.Routes, r)
	}
	d.Routes = append(d.Routes, Route{Name: "root", Prefix: "/", Destinations: []Destination{{Service: "root", Weight: 100}}})
	tab, err := Compile(d)
	if err != nil {
		b.Fatal(err)
	}
	reqs := make([]benchReq, 256)
	for i := range reqs {
		reqs[i] = benchReq{fmt.Sprintf("h%d.example.com", i%9), fmt.Sprintf("/svc%d/v%d/items/%d", i%100, i%10, i)}
	}
	return d, tab, reqs
}

type benchReq struct{ host, path string }

// BenchmarkMatch: Table.Match over benchTable.
func BenchmarkMatch(b *testing.B) {
	_, tab, reqs := benchTable(b)
	hdr := http.Header{"X-Canary": {"1"}}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r := reqs[i&255]
		if tab.Match(r.host, r.path, "GET", hdr.Get) == nil {
			b.Fatal("no match")
		}
	}
}

// BenchmarkMatchLinear: the brute-force reference over the same table, for
// the ratio.
func BenchmarkMatchLinear(b *testing.B) {
	d, _, reqs := benchTable(b)
	hdr := http.Header{"X-Canary": {"1"}}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r := reqs[i&255]
		if bruteMatch(d, r.host, r.path, "GET", hdr.Get) == nil {
			b.Fatal("no match")
		}
	}
}
