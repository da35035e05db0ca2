package proxy

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

const (
	class1xx = iota
	class2xx
	class3xx
	class4xx
	class5xx
	classError
	classOpen
	classNoHealthy
	classUnknown
	classOverflow
	numClasses
)

var classNames = [numClasses]string{"1xx", "2xx", "3xx", "4xx", "5xx", "error", "breaker_open", "no_healthy_instance", "unknown_service", "max_requests"}

func statusClass(s int) int {
	switch {
	case s < 200:
		return class1xx
	case s < 300:
		return class2xx
	case s < 400:
		return class3xx
	case s < 500:
		return class4xx
	}
	return class5xx
}

type metrics struct {
	requests        *prometheus.CounterVec
	latency         *prometheus.HistogramVec
	tryLatency      *prometheus.HistogramVec
	tryFailures     *prometheus.CounterVec
	retries         *prometheus.CounterVec
	budgetExhausted *prometheus.CounterVec
	fallbacks       *prometheus.CounterVec
	clientConns     *prometheus.GaugeVec
	clientsRefused  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	buckets := []float64{.0002, .0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "requests_total",
			Help: "Requests per upstream service and result class."}, []string{"upstream", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "attache", Subsystem: "proxy", Name: "request_duration_seconds",
			Help: "Time to the answer's headers per upstream, retries included.", Buckets: buckets}, []string{"upstream"}),
		tryLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "attache", Subsystem: "proxy", Name: "try_duration_seconds",
			Help: "Time to the answer's headers per instance and try.", Buckets: buckets}, []string{"upstream", "instance"}),
		tryFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "try_failures_total",
			Help: "Failed tries (connect error, reset, timeout, 5xx) per instance."}, []string{"upstream", "instance"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "retries_total",
			Help: "Retries per upstream."}, []string{"upstream"}),
		budgetExhausted: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "retry_budget_exhausted_total",
			Help: "Retries not made because the retry budget was spent."}, []string{"upstream"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "fallbacks_total",
			Help: "Requests answered by the service's fallback, per cause."}, []string{"upstream", "cause"}),
		clientConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "attache", Subsystem: "proxy", Name: "client_connections",
			Help: "Open client connections per HTTP listener (upstream name, or http-proxy)."}, []string{"listener"}),
		clientsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "attache", Subsystem: "proxy", Name: "client_connections_refused_total",
			Help: "Client connections refused because the listener had MaxClientConns open: answered with a 503 and closed, over TLS closed at once."}, []string{"listener"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.latency, m.tryLatency, m.tryFailures, m.retries, m.budgetExhausted, m.fallbacks, m.clientConns, m.clientsRefused} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("proxy: register metrics: %w", err)
			}
		}
	}
	return m, nil
}

// targetMetrics holds one service's resolved metric children, so that the
// request path never hashes label values.
type targetMetrics struct {
	m               *metrics
	name            string
	classes         [numClasses]prometheus.Counter
	latency         prometheus.Observer
	retries         prometheus.Counter
	budgetExhausted prometheus.Counter
	departed        map[string]time.Time // instances that left the view: when (guarded by the target's mu)
}

func (m *metrics) forTarget(name string) *targetMetrics {
	t := &targetMetrics{m: m, name: name, departed: map[string]time.Time{},
		latency:         m.latency.WithLabelValues(name),
		retries:         m.retries.WithLabelValues(name),
		budgetExhausted: m.budgetExhausted.WithLabelValues(name),
	}
	for i := range t.classes {
		t.classes[i] = m.requests.WithLabelValues(name, classNames[i])
	}
	return t
}

func (t *targetMetrics) count(class int) { t.classes[class].Inc() }

type endpointMetrics struct {
	latency  prometheus.Observer
	failures prometheus.Counter
}

func (t *targetMetrics) forEndpoint(id string) *endpointMetrics {
	return &endpointMetrics{
		latency:  t.m.tryLatency.WithLabelValues(t.name, id),
		failures: t.m.tryFailures.WithLabelValues(t.name, id),
	}
}

// fallback counts an answer given by the fallback.
func (t *targetMetrics) fallback(cause string) {
	t.m.fallbacks.WithLabelValues(t.name, cause).Inc()
}

// departedRetention is how long the series of an instance that left the
// view are kept, so that one coming back goes on counting from where it was.
const departedRetention = 10 * time.Minute

// drop notes that an instance left the view.
func (t *targetMetrics) drop(id string, now time.Time) {
	if _, ok := t.departed[id]; !ok {
		t.departed[id] = now
	}
}

// retain forgets the departure of the instances in the view (live) and
// deletes the series of those gone for longer than departedRetention.
func (t *targetMetrics) retain(live map[string]bool, now time.Time) {
	for id, at := range t.departed {
		switch {
		case live[id]:
			delete(t.departed, id)
		case now.Sub(at) > departedRetention:
			delete(t.departed, id)
			t.m.tryLatency.DeleteLabelValues(t.name, id)
			t.m.tryFailures.DeleteLabelValues(t.name, id)
		}
	}
}

func (e *endpointMetrics) observe(d time.Duration, failed bool) {
	e.latency.Observe(d.Seconds())
	if failed {
		e.failures.Inc()
	}
}
