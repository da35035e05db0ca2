package sidecar

import (
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// TestStatsWindow: rates and the p99 come from the difference between the
// newest sample and the oldest one kept (a minute back), the p99
// interpolated within its bucket.
func TestStatsWindow(t *testing.T) {
	bounds := []float64{.001, .01, .1}
	at := time.Unix(1000, 0)
	sample := func(sec int, total, errs float64, counts []uint64, count uint64, dns float64) statsSample {
		return statsSample{at: at.Add(time.Duration(sec) * time.Second), dns: dns,
			ups: map[string]upSample{"users": {total: total, errors: errs, bounds: bounds, counts: counts, count: count}}}
	}
	tests := []struct {
		name    string
		samples []statsSample
		rps     float64
		errRate float64
		p99     float64 // ms; 0: none
		dnsQPS  float64
		window  float64
	}{
		{name: "one sample: nothing yet", samples: []statsSample{sample(0, 10, 0, []uint64{10, 10, 10}, 10, 5)}},
		{name: "all in the first bucket", samples: []statsSample{sample(0, 0, 0, []uint64{0, 0, 0}, 0, 0), sample(10, 100, 0, []uint64{100, 100, 100}, 100, 50)},
			rps: 10, p99: 0.99, dnsQPS: 5, window: 10},
		{name: "p99 in the second bucket, errors", samples: []statsSample{sample(0, 0, 0, []uint64{0, 0, 0}, 0, 0), sample(20, 200, 20, []uint64{100, 200, 200}, 200, 0)},
			rps: 10, errRate: 0.1, p99: 1 + 9*0.98, window: 20},
		{name: "beyond the last bound reads as it", samples: []statsSample{sample(0, 0, 0, []uint64{0, 0, 0}, 0, 0), sample(1, 10, 10, []uint64{0, 0, 0}, 10, 0)},
			rps: 10, errRate: 1, p99: 100, window: 1},
		{name: "no request in the window", samples: []statsSample{sample(0, 10, 0, []uint64{10, 10, 10}, 10, 0), sample(30, 10, 0, []uint64{10, 10, 10}, 10, 0)},
			window: 30},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r statsRing
			for _, s := range tc.samples {
				r.add(s)
			}
			st := r.stats(true)
			if st.WindowSeconds != tc.window || *st.DNSQPS != tc.dnsQPS {
				t.Errorf("window %v dns %v, want %v %v", st.WindowSeconds, *st.DNSQPS, tc.window, tc.dnsQPS)
			}
			if len(tc.samples) < 2 {
				if len(st.Upstreams) != 0 {
					t.Errorf("rates from one sample: %+v", st.Upstreams)
				}
				return
			}
			u := st.Upstreams[0]
			if u.RPS != tc.rps || u.ErrorRate != tc.errRate {
				t.Errorf("rps %v error rate %v, want %v %v", u.RPS, u.ErrorRate, tc.rps, tc.errRate)
			}
			switch {
			case tc.p99 == 0 && u.P99ms != nil:
				t.Errorf("p99 %v with no request", *u.P99ms)
			case tc.p99 != 0 && (u.P99ms == nil || *u.P99ms != round2(tc.p99)):
				t.Errorf("p99 %v, want %v", u.P99ms, round2(tc.p99))
			}
		})
	}
	// The ring keeps a minute.
	var r statsRing
	for i := 0; i < 200; i++ {
		r.add(statsSample{at: at.Add(time.Duration(i) * time.Second)})
	}
	if n := len(r.samples); n != 61 {
		t.Errorf("ring holds %d samples, want 61", n)
	}
}

// BenchmarkSampleStats: the cost of one sample (taken once a second) with
// 20 upstream services and the Go and process collectors registered.
func BenchmarkSampleStats(b *testing.B) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	req := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "attache_proxy_requests_total"}, []string{"upstream", "result"})
	lat := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "attache_proxy_request_duration_seconds",
		Buckets: []float64{.0002, .0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}, []string{"upstream"})
	reg.MustRegister(req, lat)
	for i := 0; i < 20; i++ {
		name := fmt.Sprintf("svc-%d", i)
		for _, c := range []string{"2xx", "5xx", "error", "breaker_open"} {
			req.WithLabelValues(name, c).Add(100)
		}
		lat.WithLabelValues(name).Observe(0.003)
	}
	s := &Sidecar{metrics: reg}
	b.ReportAllocs()
	for b.Loop() {
		s.sampleStats(time.Now())
	}
}
