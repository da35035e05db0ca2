package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/control/routes"
	"attache/sidecar/catalog"
	"attache/sidecar/watch"
)

// version is what routes/current names: a version number and its source.
type version struct {
	n   uint64
	src string
}

// watchKV follows routes/current with a blocking query (the rules of
// package sidecar/watch) and applies each version it names.
func (g *Gateway) watchKV(ctx context.Context) {
	kv := g.kv.KV()
	cur := g.cfg.Prefix + "routes/current"
	loop := &watch.Loop[version]{
		Config: watch.Config{Wait: g.cfg.Wait, MinInterval: 10 * time.Millisecond},
		Fetch: func(ctx context.Context, q watch.Query) (version, watch.Meta, error) {
			opts := (&api.QueryOptions{WaitIndex: q.Index, WaitTime: q.Wait, AllowStale: q.Stale}).WithContext(ctx)
			p, meta, err := kv.Get(cur, opts)
			if err != nil {
				return version{}, watch.Meta{}, err
			}
			m := watch.Meta{Index: meta.LastIndex, LastContact: meta.LastContact}
			if p == nil {
				return version{}, m, nil // no routes applied yet
			}
			n, err := strconv.ParseUint(strings.TrimSpace(string(p.Value)), 10, 64)
			if err != nil || n == 0 {
				return version{}, m, fmt.Errorf("gateway: %s holds %q, not a version number", cur, p.Value)
			}
			key := fmt.Sprintf("%sroutes/versions/%d", g.cfg.Prefix, n)
			vp, _, err := kv.Get(key, (&api.QueryOptions{}).WithContext(ctx))
			if err != nil {
				return version{}, m, err
			}
			if vp == nil {
				return version{}, m, fmt.Errorf("gateway: %s names version %d, but %s is missing", cur, n, key)
			}
			return version{n: n, src: string(vp.Value)}, m, nil
		},
		Equal: func(a, b version) bool { return a == b },
		Changed: func(v version, _ watch.Meta) {
			g.setStatus(func(s *Status) { s.LastError = "" })
			g.apply(ctx, v)
		},
		Observe: func(_ time.Duration, err error) {
			if err != nil {
				g.met.kvErrors.Inc()
				g.setStatus(func(s *Status) { s.LastError = err.Error() })
				g.log.Debug("routes query failed", "error", err)
			}
		},
	}
	loop.Run(ctx)
}

// apply installs version v, or refuses it (one log line, a metric) and
// keeps the table serving.
func (g *Gateway) apply(ctx context.Context, v version) {
	if v.n == 0 {
		return // nothing applied in KV yet: keep what the data dir gave
	}
	if a := g.doc.Load(); a != nil && a.Version == v.n && a.Source == v.src {
		g.setStatus(func(s *Status) { s.FromDisk = false })
		g.writeApplied(ctx, v.n)
		return
	}
	a := &applied{Version: v.n, Source: v.src}
	if err := g.install(a, false); err != nil {
		g.met.refused.Inc()
		g.setStatus(func(s *Status) { s.Refused, s.RefusedWhy = v.n, err.Error() })
		g.log.Error("route version refused; the previous table keeps serving", "version", v.n, "error", oneLine(err))
		return
	}
	g.met.applies.Inc()
	g.log.Info("routes applied", "version", v.n, "routes", len(a.doc.Routes))
	if err := g.saveDisk(a); err != nil {
		g.log.Warn("cannot save the applied routes", "error", err)
	}
	g.writeApplied(ctx, v.n)
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// writeApplied records the version at routes/applied/<node> (`attache
// routes status` reads these), retrying a few times while the agent does
// not answer.
func (g *Gateway) writeApplied(ctx context.Context, n uint64) {
	key := g.cfg.Prefix + "routes/applied/" + g.cfg.Node
	val := []byte(strconv.FormatUint(n, 10))
	for i := 0; i < 5; i++ {
		_, err := g.kv.KV().Put(&api.KVPair{Key: key, Value: val}, (&api.WriteOptions{}).WithContext(ctx))
		if err == nil {
			return
		}
		g.log.Debug("cannot write the applied version", "key", key, "error", err)
		if !watch.Sleep(ctx, watch.Backoff(100*time.Millisecond, 2*time.Second, i)) {
			return
		}
	}
}

// ---------------------------------------------------------------- data dir

const diskFile = "routes.json"

// saveDisk writes the applied version atomically (temp file, fsync, rename).
func (g *Gateway) saveDisk(a *applied) error {
	if g.cfg.DataDir == "" {
		return nil
	}
	if err := os.MkdirAll(g.cfg.DataDir, 0o755); err != nil {
		return err
	}
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(g.cfg.DataDir, diskFile+".tmp*")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(g.cfg.DataDir, diskFile))
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// loadDisk reads the version saved last; nil when there is none.
func (g *Gateway) loadDisk() (*applied, error) {
	if g.cfg.DataDir == "" {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(g.cfg.DataDir, diskFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var a applied
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("gateway: %s: %w", diskFile, err)
	}
	return &a, nil
}

// ---------------------------------------------------------------- service routes

// MetaKey is the service meta key with which a service publishes its own
// route (a path prefix): `meta = { attache-route = "/users/" }`.
const MetaKey = "attache-route"

// mergeServiceRoutes returns doc with the routes that services in snap
// publish in their meta, after the document's own (the document wins a
// clash: a service route with a prefix the document routes already is
// left out). errs says which service routes were left out and why.
func mergeServiceRoutes(doc *routes.Document, snap *catalog.Snapshot) (*routes.Document, []string) {
	svcRoutes := serviceRoutes(snap)
	if len(svcRoutes) == 0 {
		return doc, nil
	}
	out := *doc
	out.Routes = append([]routes.Route(nil), doc.Routes...)
	taken := map[string]bool{}
	names := map[string]bool{}
	for _, r := range doc.Routes {
		if r.Host == "" && len(r.Methods) == 0 && len(r.Headers) == 0 {
			taken[r.Prefix] = true
		}
		names[r.Name] = true
	}
	var errs []string
	for _, sr := range svcRoutes {
		if taken[sr.prefix] {
			errs = append(errs, fmt.Sprintf("service %s: prefix %q is routed by the document", sr.service, sr.prefix))
			continue
		}
		name := "service:" + sr.service
		if names[name] {
			continue
		}
		r := routes.Route{
			Name: name, Origin: routes.Origin{Kind: routes.OriginService, Service: sr.service},
			Prefix: sr.prefix, Destinations: []routes.Destination{{Service: sr.service, Weight: 100}},
		}
		try := out
		try.Routes = append(append([]routes.Route(nil), out.Routes...), r)
		if err := try.Validate(); err != nil {
			errs = append(errs, fmt.Sprintf("service %s: %s", sr.service, oneLine(err)))
			continue
		}
		out = try
		taken[sr.prefix], names[name] = true, true
	}
	return &out, errs
}

type serviceRoute struct{ service, prefix string }

// serviceRoutes lists the routes services publish, by service name; an
// instance disagreeing with another of its service is outvoted by the
// first in ID order.
func serviceRoutes(snap *catalog.Snapshot) []serviceRoute {
	var out []serviceRoute
	for name, svc := range snap.Services {
		prefix, id := "", ""
		for _, in := range svc.Instances {
			if p := in.Meta[MetaKey]; p != "" && (id == "" || in.ID < id) {
				prefix, id = p, in.ID
			}
		}
		if prefix != "" {
			out = append(out, serviceRoute{service: name, prefix: prefix})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].service < out[j].service })
	return out
}

// serviceRouteKey sums up the service routes of snap, to tell when they change.
func serviceRouteKey(snap *catalog.Snapshot) string {
	var b strings.Builder
	for _, sr := range serviceRoutes(snap) {
		b.WriteString(sr.service + "=" + sr.prefix + "\n")
	}
	return b.String()
}
