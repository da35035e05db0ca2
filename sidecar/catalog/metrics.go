package catalog

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	updates  prometheus.Counter
	errors   *prometheus.CounterVec
	duration *prometheus.HistogramVec
	cols     []prometheus.Collector
}

func newMetrics(w *Watcher) *metrics {
	m := &metrics{
		updates: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "attache", Subsystem: "catalog", Name: "updates_total",
			Help: "Snapshots published (each one is a change of the view).",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "attache", Subsystem: "catalog", Name: "errors_total",
			Help: "Failed Consul queries, by loop (services, health, service, probe, nodes, coordinates, disk).",
		}, []string{"loop"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "attache", Subsystem: "catalog", Name: "query_duration_seconds",
			Help:    "Duration of Consul (blocking) queries, by loop.",
			Buckets: []float64{.001, .005, .02, .1, .5, 2, 10, 60, 300, 600},
		}, []string{"loop"}),
	}
	age := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "attache", Subsystem: "catalog", Name: "data_age_seconds",
		Help: "0 while connected to Consul, else seconds since Consul last answered (data loaded from disk counts from when it was saved).",
	}, func() float64 { return w.dataAge().Seconds() })
	watched := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "attache", Subsystem: "catalog", Name: "services_watched",
		Help: "Services watched (they share the watcher's few blocking queries).",
	}, func() float64 {
		return float64(len(*w.watchIdx.Load()))
	})
	version := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "attache", Subsystem: "catalog", Name: "snapshot_version",
		Help: "Version of the current snapshot.",
	}, func() float64 { return float64(w.view.Load().Version) })
	conns := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "attache", Subsystem: "catalog", Name: "consul_connections",
		Help: "Open connections to Consul (at most max_conns per Consul address).",
	}, func() float64 { return float64(w.conns.open.Load()) })
	read := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: "attache", Subsystem: "catalog", Name: "consul_read_bytes_total",
		Help: "Bytes read from Consul (all queries, registration included).",
	}, func() float64 { return float64(w.conns.read.Load()) })
	m.cols = []prometheus.Collector{m.updates, m.errors, m.duration, age, watched, version, conns, read}
	return m
}

func (m *metrics) register(r prometheus.Registerer) error {
	if r == nil {
		return nil
	}
	for _, c := range m.cols {
		if err := r.Register(c); err != nil {
			return fmt.Errorf("catalog: registering metrics: %w", err)
		}
	}
	return nil
}
