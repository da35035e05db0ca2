package sidecar

import (
	"encoding/json"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"attache/sidecar/breaker"
)

// TestBreakersJSON checks /v1/breakers: the services sorted by name, their
// instances and the README's field names.
func TestBreakersJSON(t *testing.T) {
	r, err := breaker.New(breaker.Config{}, nil, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	r.Service("b").Instance("i1")
	r.Service("a")
	s := &Sidecar{breakers: r}
	rec := httptest.NewRecorder()
	s.breakersJSON(rec, httptest.NewRequest("GET", "/v1/breakers", nil))
	var body struct {
		Services []map[string]any `json:"services"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatal(err)
	}
	if len(body.Services) != 2 || body.Services[0]["service"] != "a" || body.Services[1]["state"] != "closed" {
		t.Fatalf("body %s", rec.Body)
	}
	in := body.Services[1]["instances"].([]any)[0].(map[string]any)
	for _, k := range []string{"id", "ejected", "consecutive_failures", "times_ejected"} {
		if _, ok := in[k]; !ok {
			t.Errorf("instance lacks %q: %v", k, in)
		}
	}
	if in["id"] != "i1" {
		t.Errorf("instance %v", in)
	}
}
