package gateway

import (
	"encoding/json"
	"net/http"
	"time"

	"attache/control/routes"
)

// routeView is one route as /v1/routes shows it.
type routeView struct {
	Name         string               `json:"name"`
	Origin       string               `json:"origin"`
	Host         string               `json:"host,omitempty"`
	Prefix       string               `json:"prefix"`
	Methods      []string             `json:"methods,omitempty"`
	Headers      map[string]string    `json:"headers,omitempty"`
	Destinations []routes.Destination `json:"destinations"`
	StripPrefix  bool                 `json:"strip_prefix,omitempty"`
	Rewrite      string               `json:"rewrite,omitempty"`
	RateLimit    *routes.RateLimit    `json:"rate_limit,omitempty"`
	RateShare    float64              `json:"rate_limit_here,omitempty"` // this gateway's share of the limit, requests/s
	Timeouts     map[string]string    `json:"timeouts,omitempty"`
}

// Handler serves /v1/routes: the table in match order, its version, each
// route's origin and the gateway's state.
func (g *Gateway) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := g.cur.Load()
		out := struct {
			Status
			Built  time.Time   `json:"built,omitzero"`
			TLS    []string    `json:"tls_names,omitempty"`
			Routes []routeView `json:"routes"`
		}{Status: g.Status(), Built: t.built, TLS: g.certs.cur.Load().names, Routes: []routeView{}}
		if t.tbl != nil {
			for _, rt := range t.tbl.Routes() {
				v := routeView{Name: rt.Name, Origin: rt.Origin.String(), Host: rt.Host, Prefix: rt.Prefix,
					Methods: rt.Methods, Headers: rt.Headers, Destinations: rt.Destinations,
					StripPrefix: rt.StripPrefix, Rewrite: rt.Rewrite, RateLimit: t.tbl.RateLimit(rt)}
				if rs := t.per[rt]; rs != nil && rs.lim != nil {
					v.RateShare, _ = rs.lim.rate()
				}
				if rt.TryTimeout > 0 || rt.RequestTimeout > 0 {
					v.Timeouts = map[string]string{}
					if rt.TryTimeout > 0 {
						v.Timeouts["try"] = rt.TryTimeout.String()
					}
					if rt.RequestTimeout > 0 {
						v.Timeouts["request"] = rt.RequestTimeout.String()
					}
				}
				out.Routes = append(out.Routes, v)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(out)
	})
}
