package routes

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

const seedDoc = `
# The seed's nginx block: /users/ and /inventory/.
route "users" {
  prefix  = "/users/"
  service = "users"
}

route "inventory" {
  prefix  = "/inventory/"
  service = "inventory"
}
`

const fullDoc = `
gateway {
  tls {
    cert = "gw.pem"
    key  = "gw.key"
  }
  tls {
    cert = "api.pem"
    key  = "api.key"
  }
  rate_limit {
    rps = 100
  }
  fallback {
    status       = 503
    body         = "{\"error\":\"no healthy instance\"}"
    content_type = "application/json"
  }
}

route "users" {
  prefix          = "/users/"
  host            = "API.example.com"
  methods         = ["post", "GET", "get"]
  headers         = { "x-canary" = "1" }
  service         = "users"
  strip_prefix    = true
  request_timeout = "90s"
  try_timeout     = "2s"
  retries         = 0
  lb              = "round-robin"
  breaker {
    minimum_calls = 3
    failure_rate  = 25
    open_time     = "5s"
  }
  rate_limit {
    rps   = 2.5
    key   = "header:x-api-key"
    scope = "cluster"
  }
}

route "canary" {
  prefix = "/users/"
  split {
    service = "users"
    weight  = 90
  }
  split {
    service = "users-v2"
    weight  = 10
  }
  rewrite = "/v2/users/"
  rate_limit {
    disabled = true
  }
}
`

func TestParseFull(t *testing.T) {
	d, err := Parse("full.hcl", []byte(fullDoc))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Gateway.TLS) != 2 || d.Gateway.TLS[1].Key != "api.key" {
		t.Errorf("tls = %+v", d.Gateway.TLS)
	}
	if rl := d.Gateway.RateLimit; rl == nil || rl.RPS != 100 || rl.Burst != 100 || rl.Key != KeyClient || rl.Scope != ScopeLocal {
		t.Errorf("gateway rate limit = %+v", rl)
	}
	if f := d.Gateway.Fallback; f == nil || f.Status != 503 || f.ContentType != "application/json" {
		t.Errorf("fallback = %+v", f)
	}
	u := d.Routes[0]
	if u.Name != "users" || u.Host != "api.example.com" || strings.Join(u.Methods, ",") != "GET,POST" ||
		u.Headers["X-Canary"] != "1" || !u.StripPrefix || u.RequestTimeout != 90*time.Second ||
		u.TryTimeout != 2*time.Second || u.Retries == nil || *u.Retries != 0 || u.Balancer != "round-robin" || u.Line != 21 {
		t.Errorf("users = %+v", u)
	}
	if b := u.Breaker; b == nil || *b.MinimumCalls != 3 || *b.FailureRate != 25 || b.OpenTime != 5*time.Second || b.Window != 0 {
		t.Errorf("breaker = %+v", b)
	}
	if rl := u.RateLimit; rl.RPS != 2.5 || rl.Burst != 3 || rl.Header != "X-Api-Key" || rl.Key != "header:X-Api-Key" || rl.Scope != ScopeCluster {
		t.Errorf("rate limit = %+v", rl)
	}
	c := d.Routes[1]
	if len(c.Destinations) != 2 || c.Destinations[1] != (Destination{Service: "users-v2", Weight: 10}) || c.Rewrite != "/v2/users/" || !c.RateLimit.Disabled {
		t.Errorf("canary = %+v", c)
	}
	tab, err := Compile(d)
	if err != nil {
		t.Fatal(err)
	}
	if len(tab.Gateway().TLS) != 2 {
		t.Errorf("table's gateway = %+v", tab.Gateway())
	}
	if rl := tab.RateLimit(&d.Routes[0]); rl != d.Routes[0].RateLimit {
		t.Errorf("own rate limit = %+v", rl)
	}
	if rl := tab.RateLimit(&d.Routes[1]); rl != nil {
		t.Errorf("route that opted out has rate limit %+v", rl)
	}
	if rl := tab.RateLimit(&Route{}); rl != d.Gateway.RateLimit {
		t.Errorf("default rate limit = %+v", rl)
	}
	if got := d.Services(); strings.Join(got, ",") != "users,users-v2" {
		t.Errorf("services = %v", got)
	}
}

func TestParseJSON(t *testing.T) {
	src := `{
  "route": {
    "users": {"prefix": "/users/", "service": "users"},
    "inventory": {"prefix": "/inventory/", "split": [{"service": "inventory", "weight": 60}, {"service": "inventory", "tag": "v2", "weight": 40}]}
  }
}`
	d, err := Parse("routes.json", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	h, _ := Parse("seed.hcl", []byte(seedDoc))
	if d.Routes[0].Name != "users" || d.Routes[1].Destinations[1].Tag != "v2" || d.Routes[1].Line != 4 {
		t.Errorf("json routes = %+v", d.Routes)
	}
	if Equal(d, h) {
		t.Error("different documents are equal")
	}
	if _, err := Parse("bad.json", []byte(`{"route": {"users": {"prefix": "/u/", "service": "u", "colour": "red"}}}`)); err == nil || !strings.Contains(err.Error(), `bad.json:1,`) || !strings.Contains(err.Error(), "colour") {
		t.Errorf("unknown JSON field: %v", err)
	}
}

// TestParseErrors: every refusal names the file, the line and the reason.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string // each "line: substring"
	}{
		{"unknown field", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  colour = \"red\"\n}\n", []string{`x.hcl:4,3: Unsupported argument`}},
		{"unknown block", "listener {\n}\n", []string{`x.hcl:1,1: Unsupported block type`}},
		{"missing prefix", "route \"a\" {\n  service = \"a\"\n}\n", []string{`x.hcl:1,`, `"prefix" is required`}},
		{"no destination", "route \"a\" {\n  prefix = \"/a/\"\n}\n", []string{`x.hcl:1,1: route "a": no destination`}},
		{"service and split", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  split {\n    service = \"b\"\n    weight = 100\n  }\n}\n", []string{`x.hcl:3,3: route "a": service and split`}},
		{"bad duration", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  try_timeout = \"5 parsecs\"\n}\n", []string{`x.hcl:4,3: try_timeout: "5 parsecs" is not a duration`}},
		{"zero duration", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  request_timeout = \"0s\"\n}\n", []string{`x.hcl:4,3: request_timeout: "0s" must be more than zero`}},
		{"weights", "route \"a\" {\n  prefix = \"/a/\"\n  split {\n    service = \"a\"\n    weight = 90\n  }\n  split {\n    service = \"b\"\n    weight = 20\n  }\n}\n", []string{`x.hcl:1: route "a": split weights add up to 110, not 100`}},
		{"weight range", "route \"a\" {\n  prefix = \"/a/\"\n  split {\n    service = \"a\"\n    weight = 101\n  }\n}\n", []string{`x.hcl:5,5: split: weight 101 is not a percentage`}},
		{"duplicate match", seedDoc + "\nroute \"again\" {\n  prefix = \"/users/\"\n  service = \"users-v2\"\n}\n", []string{`x.hcl:13: route "again" has the same match as route "users" (line 3)`}},
		{"duplicate name", seedDoc + "\nroute \"users\" {\n  prefix = \"/u/\"\n  service = \"users\"\n}\n", []string{`x.hcl:13: route "users" is defined twice (first at line 3)`}},
		{"two gateways", "gateway {\n}\ngateway {\n}\n", []string{`x.hcl:3,1: a second gateway block`}},
		{"two breakers", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  breaker {\n  }\n  breaker {\n  }\n}\n", []string{`x.hcl:6,3: a second breaker block`}},
		{"prefix without slash", "route \"a\" {\n  prefix = \"a/\"\n  service = \"a\"\n}\n", []string{`x.hcl:1: route "a": prefix "a/" must start with "/"`}},
		{"bad host", "route \"a\" {\n  prefix = \"/a/\"\n  host = \"api.example.com:443\"\n  service = \"a\"\n}\n", []string{`x.hcl:1: route "a": host "api.example.com:443"`}},
		{"bad wildcard", "route \"a\" {\n  prefix = \"/a/\"\n  host = \"api.*.com\"\n  service = \"a\"\n}\n", []string{`host "api.*.com"`}},
		{"strip and rewrite", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  strip_prefix = true\n  rewrite = \"/b/\"\n}\n", []string{`x.hcl:1: route "a": strip_prefix and rewrite exclude each other`}},
		{"wrong type", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  retries = \"many\"\n}\n", []string{`x.hcl:4,3: retries:`}},
		{"fractional retries", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  retries = 1.5\n}\n", []string{`x.hcl:4,3: retries: want a whole number`}},
		{"bad lb", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  lb = \"random\"\n}\n", []string{`lb "random": want least-request`}},
		{"rate without rps", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  rate_limit {\n    burst = 3\n  }\n}\n", []string{`x.hcl:4,3: rate_limit: rps is required`}},
		{"rate bad key", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  rate_limit {\n    rps = 3\n    key = \"cookie\"\n  }\n}\n", []string{`x.hcl:6,5: rate_limit: key "cookie"`}},
		{"rate bad scope", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  rate_limit {\n    rps = 3\n    scope = \"global\"\n  }\n}\n", []string{`x.hcl:6,5: rate_limit: scope "global"`}},
		{"disabled with rps", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  rate_limit {\n    rps = 3\n    disabled = true\n  }\n}\n", []string{`x.hcl:4,3: rate_limit: disabled = true takes no other field`}},
		{"fallback status", "gateway {\n  fallback {\n    status = 99\n  }\n}\n", []string{`x.hcl:3,5: fallback: status 99`}},
		{"tls without key", "gateway {\n  tls {\n    cert = \"a.pem\"\n  }\n}\n", []string{`x.hcl:2,`, `"key" is required`}},
		{"breaker ejection per route", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  breaker {\n    eject_after = 2\n  }\n}\n", []string{`x.hcl:1: route "a": breaker: eject_after and eject_time cannot be set per route`}},
		{"breaker percent", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  breaker {\n    slow_rate = 120\n  }\n}\n", []string{`x.hcl:5,5: breaker: slow_rate must be a percentage`}},
		{"bad header name", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  headers = { \"x y\" = \"1\" }\n}\n", []string{`x.hcl:4,3: headers: "x y" is not a header name`}},
		{"bad service name", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a b\"\n}\n", []string{`x.hcl:1: route "a": service "a b"`}},
		{"syntax", "route \"a\" {\n  prefix = \n}\n", []string{`x.hcl:2,`}},
		{"null", "route \"a\" {\n  prefix = \"/a/\"\n  service = null\n}\n", []string{`x.hcl:3,3: service: null`}},
		{"two problems at once", "route \"a\" {\n  prefix = \"/a/\"\n  service = \"a\"\n  colour = 1\n  shape = 2\n}\n", []string{`x.hcl:4,3: Unsupported argument`, `x.hcl:5,3: Unsupported argument`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Parse("x.hcl", []byte(tt.src))
			if err == nil {
				t.Fatalf("parsed: %+v", d)
			}
			var perr *Error
			if !errors.As(err, &perr) || len(perr.Problems) == 0 {
				t.Fatalf("error %T %v is not a *Error with problems", err, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n%v\nlacks %q", err, w)
				}
			}
		})
	}
}

func TestParseLimits(t *testing.T) {
	big := make([]byte, MaxDocumentBytes+1)
	if _, err := Parse("big.hcl", big); err == nil || !strings.Contains(err.Error(), "more than the limit") {
		t.Errorf("oversized document: %v", err)
	}
	var b strings.Builder
	for i := 0; i <= MaxRoutes; i++ {
		b.WriteString("route \"r" + strconv.Itoa(i) + "\" {\n  prefix = \"/r" + strconv.Itoa(i) + "/\"\n  service = \"s\"\n}\n")
	}
	if _, err := Parse("many.hcl", []byte(b.String())); err == nil || !strings.Contains(err.Error(), "more than 1000 routes") {
		t.Errorf("too many routes: %v", err)
	}
}

// TestEncodeCanonical: equal documents encode to equal bytes, the encoding
// parses back to the same document, and a change shows in the bytes.
func TestEncodeCanonical(t *testing.T) {
	d, err := Parse("full.hcl", []byte(fullDoc))
	if err != nil {
		t.Fatal(err)
	}
	enc := Encode(d)
	back, err := Parse("canonical.hcl", enc)
	if err != nil {
		t.Fatalf("canonical form does not parse: %v\n%s", err, enc)
	}
	if string(Encode(back)) != string(enc) {
		t.Fatalf("encoding is not stable:\n%s\n---\n%s", enc, Encode(back))
	}
	// The same document written differently: other spacing, method case and
	// order, a duration spelled otherwise, a split of one at 100.
	a := "route \"u\" {\n prefix = \"/u/\"\n methods = [\"get\",\"HEAD\"]\n try_timeout = \"1500ms\"\n split {\n  service = \"u\"\n  weight = 100\n }\n}\n"
	b := "route \"u\" {\n  prefix      = \"/u/\"\n  methods     = [\"HEAD\", \"GET\", \"GET\"]\n  service     = \"u\"\n  try_timeout = \"1.5s\"\n}\n"
	da, err1 := Parse("a.hcl", []byte(a))
	db, err2 := Parse("b.hcl", []byte(b))
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if !Equal(da, db) || Diff(da, db) != "" {
		t.Errorf("same meaning, different encodings:\n%s---\n%s", Encode(da), Encode(db))
	}
	db.Routes[0].Prefix = "/v/"
	if Equal(da, db) {
		t.Error("a changed document encodes as before")
	}
	// JSON and HCL forms of one document encode alike.
	dj, err := Parse("seed.json", []byte(`{"route": {"users": {"prefix": "/users/", "service": "users"}, "inventory": {"prefix": "/inventory/", "service": "inventory"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	dh, _ := Parse("seed.hcl", []byte(seedDoc))
	if string(Encode(dj)) != string(Encode(dh)) {
		t.Errorf("JSON and HCL differ:\n%s---\n%s", Encode(dj), Encode(dh))
	}
}

func TestDiff(t *testing.T) {
	a, _ := Parse("a.hcl", []byte(seedDoc))
	b, err := Parse("b.hcl", []byte(`
gateway {
  rate_limit {
    rps = 50
  }
}
route "inventory" {
  prefix  = "/inventory/"
  service = "inventory"
}
route "users" {
  prefix  = "/users/"
  split {
    service = "users"
    weight  = 90
  }
  split {
    service = "users-v2"
    weight  = 10
  }
}
route "orders" {
  prefix  = "/orders/"
  service = "orders"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	got := Diff(a, b)
	for _, want := range []string{
		"~ gateway\n    + gateway {\n",
		"    +     rps = 50\n",
		"~ route \"users\"\n    - service = \"users\"\n    + split {\n",
		"    +   service = \"users-v2\"\n",
		"+ route \"orders\" (added)\n    + prefix = \"/orders/\"\n",
		"~ order: users, inventory -> inventory, users\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("diff lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, `route "inventory"`) {
		t.Errorf("unchanged route listed:\n%s", got)
	}
	if got := Diff(b, a); !strings.Contains(got, "- route \"orders\" (removed)\n") {
		t.Errorf("removal not shown:\n%s", got)
	}
	if Diff(a, a) != "" || Diff(nil, &Document{}) != "" {
		t.Error("diff of equal documents is not empty")
	}
	if got := Diff(nil, a); !strings.Contains(got, "+ route \"users\" (added)") {
		t.Errorf("diff from nothing: %s", got)
	}
}

func TestRouteHelpers(t *testing.T) {
	r := Route{Prefix: "/users/", Destinations: []Destination{{Service: "a", Weight: 90}, {Service: "b", Weight: 0}, {Service: "c", Weight: 10}}}
	counts := map[string]int{}
	for n := 0; n < 100; n++ {
		counts[r.Pick(n).Service]++
	}
	if counts["a"] != 90 || counts["b"] != 0 || counts["c"] != 10 {
		t.Errorf("pick counts = %v", counts)
	}
	for _, tt := range []struct {
		strip   bool
		rewrite string
		in, out string
	}{
		{false, "", "/users/1", "/users/1"},
		{true, "", "/users/1", "/1"},
		{true, "", "/users/", "/"},
		{false, "/v2/", "/users/1?x", "/v2/1?x"},
	} {
		r.StripPrefix, r.Rewrite = tt.strip, tt.rewrite
		if got := r.RewritePath(tt.in); got != tt.out {
			t.Errorf("strip=%v rewrite=%q %q -> %q, want %q", tt.strip, tt.rewrite, tt.in, got, tt.out)
		}
	}
}
