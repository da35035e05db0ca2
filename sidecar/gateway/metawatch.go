package gateway

import (
	"context"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/control/routes"
	"attache/sidecar/watch"
)

// metaFilter selects the services with an instance that publishes a route
// (Consul's filter language; `ServiceMeta["k"] != ""` would also take the
// services without the key).
var metaFilter = strconv.Quote(routes.MetaKey) + " in ServiceMeta"

// watchServiceRoutes follows, with a blocking query on the catalog's
// service list filtered to those carrying routes.MetaKey in their meta,
// which services publish a route, and has the catalog watch them (through
// watchCatalog): so their routes join the table in the catalog's default
// on-demand mode too, not only with -watch all.
func (g *Gateway) watchServiceRoutes(ctx context.Context) {
	cat := g.kv.Catalog()
	loop := &watch.Loop[[]string]{
		Config: watch.Config{Wait: g.cfg.Wait, MinInterval: 100 * time.Millisecond},
		Fetch: func(ctx context.Context, q watch.Query) ([]string, watch.Meta, error) {
			opts := (&api.QueryOptions{WaitIndex: q.Index, WaitTime: q.Wait, AllowStale: q.Stale, Filter: metaFilter}).WithContext(ctx)
			svcs, meta, err := cat.Services(opts)
			if err != nil {
				return nil, watch.Meta{}, err
			}
			names := make([]string, 0, len(svcs))
			for n := range svcs {
				names = append(names, n)
			}
			sort.Strings(names)
			return names, watch.Meta{Index: meta.LastIndex, LastContact: meta.LastContact}, nil
		},
		Equal: slices.Equal[[]string],
		Changed: func(names []string, _ watch.Meta) {
			g.metaServices.Store(&names)
			g.log.Debug("services publishing routes", "services", names)
			select { // watchCatalog asks the catalog for them
			case g.swapped <- struct{}{}:
			default:
			}
		},
		Observe: func(_ time.Duration, err error) {
			if err != nil {
				g.met.kvErrors.Inc()
				g.log.Debug("service-route query failed", "error", err)
			}
		},
	}
	loop.Run(ctx)
}
