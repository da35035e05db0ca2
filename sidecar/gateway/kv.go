package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/control/routes"
	"attache/internal/consulacl"
	"attache/sidecar/catalog"
	"attache/sidecar/watch"
)

// version is what routes/current names: a version number and its source.
type version struct {
	n   uint64
	src string
	got time.Time     // when the pointer's answer came
	rd  time.Duration // reading the version it names
}

// watchKV follows routes/current with a blocking query (the rules of
// package sidecar/watch) and applies each version it names.
func (g *Gateway) watchKV(ctx context.Context) {
	kv := g.kv.KV()
	cur := g.keys.Current()
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
			n, err := g.keys.VersionNumber(string(p.Value))
			if err != nil {
				return version{}, m, fmt.Errorf("gateway: %s holds %q, not a version number", cur, p.Value)
			}
			key := g.keys.Version(n)
			got := time.Now()
			vp, _, err := kv.Get(key, (&api.QueryOptions{}).WithContext(ctx))
			if err != nil {
				return version{}, m, err
			}
			if vp == nil {
				return version{}, m, fmt.Errorf("gateway: %s names version %d, but %s is missing", cur, n, key)
			}
			return version{n: n, src: string(vp.Value), got: got, rd: time.Since(got)}, m, nil
		},
		Equal: func(a, b version) bool { return a.n == b.n && a.src == b.src },
		Changed: func(v version, _ watch.Meta) {
			g.setStatus(func(s *Status) { s.LastError = "" })
			g.apply(ctx, v)
		},
		Observe: func(_ time.Duration, err error) {
			if err != nil {
				g.met.kvErrors.Inc()
				msg := g.explain(err)
				g.setStatus(func(s *Status) { s.LastError = msg })
				g.log.Debug("routes query failed", "error", msg)
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
		g.setStatus(func(s *Status) { s.FromDisk, s.Refused, s.RefusedWhy = false, 0, "" })
		g.writeApplied(ctx)
		return
	}
	a := &applied{Version: v.n, Source: v.src}
	if err := g.install(a, false); err != nil {
		g.met.refused.Inc()
		g.setStatus(func(s *Status) { s.Refused, s.RefusedWhy = v.n, oneLine(err) })
		g.log.Error("route version refused; the previous table keeps serving", "version", v.n, "error", oneLine(err))
		g.writeApplied(ctx)
		return
	}
	g.setStatus(func(s *Status) { s.Refused, s.RefusedWhy = 0, "" })
	g.met.applies.Inc()
	installed := time.Now()
	// Consul first: `routes status` (and an operator waiting on it) need
	// not wait for the fsync, which saveLoop does off the watch loop (the
	// next version is not held up by a slow disk either). A crash in
	// between restarts on the version before, until Consul answers.
	g.writeApplied(ctx)
	g.queueSave(a)
	g.log.Info("routes applied", "version", v.n, "routes", len(a.doc.Routes),
		"read", v.rd, "install", installed.Sub(v.got.Add(v.rd)), "write", time.Since(installed))
}

// queueSave hands a to saveLoop, replacing a version not saved yet.
func (g *Gateway) queueSave(a *applied) {
	for {
		select {
		case g.toSave <- a:
			return
		default:
		}
		select {
		case <-g.toSave:
		default:
		}
	}
}

// saveLoop saves each applied version handed to it in the data dir (the
// newest when several came meanwhile) until ctx ends, then the one still
// waiting.
func (g *Gateway) saveLoop(ctx context.Context) {
	save := func(a *applied) {
		if err := g.saveDisk(a); err != nil {
			g.log.Warn("cannot save the applied routes", "error", err)
		}
	}
	for {
		select {
		case a := <-g.toSave:
			save(a)
		case <-ctx.Done():
			select {
			case a := <-g.toSave:
				save(a)
			default:
			}
			return
		}
	}
}

// explain returns err's message, or for an ACL refusal the message of
// package consulacl naming the missing rule (never Consul's own text, which
// holds the token's accessor ID): a refused read of the routes names the
// README's key_prefix rule on the routes prefix rather than the one key.
func (g *Gateway) explain(err error) string {
	d := consulacl.Explain(err)
	if d == nil {
		return err.Error()
	}
	if routes := g.keys.Prefix + "routes/"; d.Permission == "key:read" && strings.HasPrefix(d.Resource, routes) {
		d = d.Under(routes)
	}
	return d.Error()
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// writeApplied records what the gateway serves at routes/applied/<node>
// (`attache routes status` reads these): the version, its table with each
// route's origin, and the last version refused, if the newest was. It
// retries a few times while the agent does not answer.
func (g *Gateway) writeApplied(ctx context.Context) {
	st, t := g.Status(), g.cur.Load()
	rec := routes.Applied{Node: g.cfg.Node, Version: st.Version, Time: st.AppliedAt.UTC(), Error: st.RefusedWhy, Refused: st.Refused}
	if t.tbl != nil {
		rec.Routes = routes.AppliedRoutes(t.tbl)
	}
	val, err := json.Marshal(rec)
	if err != nil {
		return
	}
	key := g.keys.Applied(g.cfg.Node)
	for i := 0; i < 5; i++ {
		_, err := g.kv.KV().Put(&api.KVPair{Key: key, Value: val}, (&api.WriteOptions{}).WithContext(ctx))
		if err == nil {
			return
		}
		g.log.Debug("cannot write the applied version", "key", key, "error", g.explain(err))
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

// mergeServiceRoutes returns doc with the routes that services in snap
// publish in their meta (routes.MetaKey) after the document's own
// (routes.Merge: the document wins a clash), and what was left out.
func mergeServiceRoutes(doc *routes.Document, snap *catalog.Snapshot) (*routes.Document, []string) {
	metas := serviceMetas(snap)
	if len(metas) == 0 {
		return doc, nil
	}
	merged, dropped := routes.Merge(doc, metas)
	var errs []string
	for _, d := range dropped {
		errs = append(errs, fmt.Sprintf("service %s: %s: %s", d.Service, d.Route, d.Reason))
	}
	return merged, errs
}

// serviceMetas is the route meta of each service in snap that publishes
// one: that of its first instance by ID that carries the key.
func serviceMetas(snap *catalog.Snapshot) map[string]map[string]string {
	var out map[string]map[string]string
	for name, svc := range snap.Services {
		id := ""
		var meta map[string]string
		for _, in := range svc.Instances {
			if _, ok := in.Meta[routes.MetaKey]; ok && (id == "" || in.ID < id) {
				id, meta = in.ID, in.Meta
			}
		}
		if meta != nil {
			if out == nil {
				out = map[string]map[string]string{}
			}
			out[name] = map[string]string{routes.MetaKey: meta[routes.MetaKey]}
		}
	}
	return out
}

// serviceRouteKey sums up the service routes of snap, to tell when they change.
func serviceRouteKey(snap *catalog.Snapshot) string {
	metas := serviceMetas(snap)
	names := make([]string, 0, len(metas))
	for n := range metas {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		b.WriteString(n + "=" + metas[n][routes.MetaKey] + "\n")
	}
	return b.String()
}
