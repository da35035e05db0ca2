package gateway

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	version   prometheus.Gauge
	applies   prometheus.Counter
	refused   prometheus.Counter
	kvErrors  prometheus.Counter
	limited   *prometheus.CounterVec
	gateways  prometheus.Gauge
	limitKeys prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		version: prometheus.NewGauge(prometheus.GaugeOpts{Name: "attache_gateway_routes_version",
			Help: "The route document version the gateway serves (0: none)."}),
		applies: prometheus.NewCounter(prometheus.CounterOpts{Name: "attache_gateway_applies_total",
			Help: "Route document versions applied."}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "attache_gateway_refused_total",
			Help: "Route document versions refused (invalid); the previous table kept serving."}),
		kvErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "attache_gateway_kv_errors_total",
			Help: "Failed Consul queries of the routes (KV) and of the services publishing routes in their meta."}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "attache_gateway_rate_limited_total",
			Help: "Requests answered 429 by a route's rate limit."}, []string{"route"}),
		gateways: prometheus.NewGauge(prometheus.GaugeOpts{Name: "attache_gateway_healthy_gateways",
			Help: "Healthy attache-gateway instances in the catalog view (cluster-scope limits divide by it)."}),
		limitKeys: prometheus.NewGauge(prometheus.GaugeOpts{Name: "attache_gateway_rate_limit_keys",
			Help: "Keys (clients, API keys) the rate limits hold state for."}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.version, m.applies, m.refused, m.kvErrors, m.limited, m.gateways, m.limitKeys} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("gateway: metrics: %w", err)
		}
	}
	return m, nil
}
