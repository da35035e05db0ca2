package routes

import (
	"fmt"
	"sort"
	"strings"
)

// MetaKey is the service-meta key through which a service publishes its own
// routes, the way Fabio's urlprefix- tags do: `attache-route = "/users/"`,
// or with a host `"api.example.com/users/"`, several separated by commas.
const MetaKey = "attache-route"

// ServiceRoutes returns the routes a service publishes in its meta (none
// when it has no MetaKey). Each sends everything under its prefix to the
// service, with the gateway's defaults; its Origin names the service.
func ServiceRoutes(service string, meta map[string]string) ([]Route, error) {
	v, ok := meta[MetaKey]
	if !ok {
		return nil, nil
	}
	var out []Route
	for _, item := range strings.Split(v, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		i := strings.IndexByte(item, '/')
		if i < 0 {
			return nil, fmt.Errorf("routes: service %s: %s %q: want \"/prefix/\" or \"host/prefix/\"", service, MetaKey, item)
		}
		r := Route{
			Name:         "service:" + service + ":" + item,
			Origin:       Origin{Kind: OriginService, Service: service},
			Host:         strings.ToLower(item[:i]),
			Prefix:       item[i:],
			Destinations: []Destination{{Service: service, Weight: 100}},
		}
		v := &validator{file: "service " + service + " meta " + MetaKey}
		v.route(&r)
		if len(v.problems) > 0 {
			return nil, fmt.Errorf("routes: %w", &Error{v.problems})
		}
		out = append(out, r)
	}
	if len(out) > MaxSplits {
		return nil, fmt.Errorf("routes: service %s: more than %d routes in %s", service, MaxSplits, MetaKey)
	}
	return out, nil
}

// Dropped is a service route left out of a merge, and why.
type Dropped struct {
	Service string `json:"service"`
	Route   string `json:"route"` // "host/prefix" as published
	Reason  string `json:"reason"`
}

// Merge returns a document holding doc's routes followed by the routes the
// services publish in their meta (service name -> meta), in service-name
// order. A service route whose host and prefix a document route already
// uses is dropped (the document wins, whatever its methods or headers); of
// two services publishing the same host and prefix, the first by name keeps
// it. Malformed meta drops that service's routes. doc is not changed; the
// result is meant for Compile, not for storing.
func Merge(doc *Document, services map[string]map[string]string) (*Document, []Dropped) {
	out := &Document{Gateway: doc.Gateway, Routes: append([]Route(nil), doc.Routes...)}
	type owner struct{ name, service string }
	taken := map[string]owner{}
	for _, r := range doc.Routes {
		k := r.Host + r.Prefix
		if _, ok := taken[k]; !ok {
			taken[k] = owner{name: r.Name}
		}
	}
	names := make([]string, 0, len(services))
	for s := range services {
		names = append(names, s)
	}
	sort.Strings(names)
	var dropped []Dropped
	for _, s := range names {
		rs, err := ServiceRoutes(s, services[s])
		if err != nil {
			dropped = append(dropped, Dropped{Service: s, Route: services[s][MetaKey], Reason: err.Error()})
			continue
		}
		for _, r := range rs {
			k := r.Host + r.Prefix
			if o, ok := taken[k]; ok {
				reason := fmt.Sprintf("the document's route %q has this host and prefix", o.name)
				if o.service != "" {
					reason = fmt.Sprintf("service %s publishes it too and comes first by name", o.service)
				}
				dropped = append(dropped, Dropped{Service: s, Route: k, Reason: reason})
				continue
			}
			if len(out.Routes) >= MaxRoutes {
				dropped = append(dropped, Dropped{Service: s, Route: k, Reason: fmt.Sprintf("the table holds %d routes already", MaxRoutes)})
				continue
			}
			taken[k] = owner{name: r.Name, service: s}
			out.Routes = append(out.Routes, r)
		}
	}
	return out, dropped
}
