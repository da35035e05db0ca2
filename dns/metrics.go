package dns

import (
	"errors"
	"time"

	miekg "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// Query types and response codes that get their own label value; the
// counters are looked up once in New so the hot path only adds.
var (
	metricTypes  = []uint16{miekg.TypeA, miekg.TypeAAAA, miekg.TypeSRV, miekg.TypeTXT, miekg.TypeANY, miekg.TypeSOA, miekg.TypeNS, miekg.TypePTR, miekg.TypeCNAME, miekg.TypeMX}
	metricRcodes = []int{miekg.RcodeSuccess, miekg.RcodeFormatError, miekg.RcodeServerFailure, miekg.RcodeNameError, miekg.RcodeNotImplemented, miekg.RcodeRefused}
)

type metrics struct {
	queries   [][]prometheus.Counter // [type index][rcode index], last of each is "other"
	latency   prometheus.Histogram
	malformed prometheus.Counter
	limited   prometheus.Counter // refused by the per-client rate limit
	dropped   prometheus.Counter // UDP queries dropped: the slow path was full
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	qv := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "attache_dns_queries_total",
		Help: "DNS queries answered, by query type and response code.",
	}, []string{"type", "rcode"})
	lat := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "attache_dns_query_duration_seconds",
		Help:    "Time from a DNS query's arrival to its answer being written.",
		Buckets: []float64{.00002, .00005, .0001, .00025, .0005, .001, .0025, .01, .05, .25, 1, 2.5},
	})
	bad := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "attache_dns_malformed_total",
		Help: "DNS messages that could not be parsed (answered FORMERR or dropped).",
	})
	limited := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "attache_dns_rate_limited_total",
		Help: "DNS queries refused because their client was over its rate limit.",
	})
	dropped := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "attache_dns_dropped_total",
		Help: "UDP DNS queries dropped unanswered because too many were waiting on the slow path.",
	})
	if reg != nil {
		for _, c := range []prometheus.Collector{qv, lat, bad, limited, dropped} {
			if err := reg.Register(c); err != nil {
				var are prometheus.AlreadyRegisteredError
				if !errors.As(err, &are) {
					return nil, err
				}
			}
		}
	}
	m := &metrics{latency: lat, malformed: bad, limited: limited, dropped: dropped}
	types := make([]string, 0, len(metricTypes)+1)
	for _, t := range metricTypes {
		types = append(types, miekg.TypeToString[t])
	}
	types = append(types, "other")
	rcodes := make([]string, 0, len(metricRcodes)+1)
	for _, r := range metricRcodes {
		rcodes = append(rcodes, miekg.RcodeToString[r])
	}
	rcodes = append(rcodes, "other")
	for _, t := range types {
		row := make([]prometheus.Counter, 0, len(rcodes))
		for _, r := range rcodes {
			row = append(row, qv.WithLabelValues(t, r))
		}
		m.queries = append(m.queries, row)
	}
	return m, nil
}

func (m *metrics) observe(qtype uint16, rcode int, d time.Duration) {
	ti := len(metricTypes)
	for i, t := range metricTypes {
		if t == qtype {
			ti = i
			break
		}
	}
	ri := len(metricRcodes)
	for i, r := range metricRcodes {
		if r == rcode {
			ri = i
			break
		}
	}
	m.queries[ti][ri].Inc()
	m.latency.Observe(d.Seconds())
}
