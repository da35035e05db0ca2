package routes

import (
	"strings"
	"testing"
)

func TestMerge(t *testing.T) {
	doc, err := Parse("seed.hcl", []byte(seedDoc))
	if err != nil {
		t.Fatal(err)
	}
	services := map[string]map[string]string{
		"users-v2": {MetaKey: "/users/"},                           // clashes with the document
		"orders":   {MetaKey: "/orders/, api.example.com/orders/"}, // two routes
		"payments": {MetaKey: "/orders/"},                          // clashes with orders, which comes first
		"broken":   {MetaKey: "no-slash"},                          // malformed
		"quiet":    {"version": "1"},                               // publishes nothing
	}
	merged, dropped := Merge(doc, services)
	var names []string
	for _, r := range merged.Routes {
		names = append(names, r.Name+"@"+r.Origin.String())
	}
	want := "users@document inventory@document service:orders:/orders/@service orders service:orders:api.example.com/orders/@service orders"
	if strings.Join(names, " ") != want {
		t.Errorf("merged:\n%s\nwant\n%s", strings.Join(names, " "), want)
	}
	if len(doc.Routes) != 2 {
		t.Error("Merge changed its input")
	}
	reasons := map[string]string{}
	for _, d := range dropped {
		reasons[d.Service] = d.Reason
	}
	for svc, want := range map[string]string{
		"users-v2": `the document's route "users"`,
		"payments": "service orders publishes it too",
		"broken":   `want "/prefix/" or "host/prefix/"`,
	} {
		if !strings.Contains(reasons[svc], want) {
			t.Errorf("dropped %s: %q, want %q", svc, reasons[svc], want)
		}
	}
	if len(dropped) != 3 {
		t.Errorf("dropped = %+v", dropped)
	}
	tab, err := Compile(merged)
	if err != nil {
		t.Fatal(err)
	}
	// The document's route keeps /users/; the service route serves its own.
	if r := tab.Match("x", "/users/1", "GET", nil); r.Name != "users" {
		t.Errorf("/users/1 -> %s", r.Name)
	}
	if r := tab.Match("api.example.com", "/orders/1", "GET", nil); r.Name != "service:orders:api.example.com/orders/" || r.Destinations[0].Service != "orders" {
		t.Errorf("/orders/1 on api -> %+v", r)
	}
	applied := AppliedRoutes(tab)
	if len(applied) != 4 || applied[0].Origin != "service orders" || applied[0].Host != "api.example.com" {
		t.Errorf("applied routes = %+v", applied)
	}
}

func TestServiceRoutesErrors(t *testing.T) {
	for _, v := range []string{"nothing", "API.example.com:80/x/", "/a b/"} {
		if _, err := ServiceRoutes("s", map[string]string{MetaKey: v}); err == nil {
			t.Errorf("%q accepted", v)
		}
	}
	rs, err := ServiceRoutes("s", map[string]string{MetaKey: " /a/ ,, Api.Example.com/b/ "})
	if err != nil || len(rs) != 2 || rs[1].Host != "api.example.com" || rs[1].Prefix != "/b/" {
		t.Errorf("routes = %+v, %v", rs, err)
	}
}
