package sidecar

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
)

// The last minute's rates (requests/s, error rate and p99 per upstream
// service, DNS queries/s) come from the counters and the latency histogram
// the proxy and the DNS server keep anyway: a goroutine reads them back
// from the registry once a second into a ring of 61 samples, and a rate is
// the difference between the newest sample and the one a minute older
// (or the oldest there is). The request path does not change at all; the
// p99 is interpolated within the histogram's buckets, as Prometheus's
// histogram_quantile does from /metrics.

const (
	statsEvery  = time.Second
	statsWindow = time.Minute
)

type statsSample struct {
	at  time.Time
	ups map[string]upSample
	dns float64
}

type upSample struct {
	total, errors float64
	bounds        []float64 // the histogram's upper bounds (seconds)
	counts        []uint64  // cumulative counts per bound
	count         uint64    // every observation
}

// statsRing keeps the samples, newest last.
type statsRing struct {
	mu      sync.Mutex
	samples []statsSample
}

func (r *statsRing) add(s statsSample) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples = append(r.samples, s)
	if keep := int(statsWindow/statsEvery) + 1; len(r.samples) > keep {
		r.samples = append(r.samples[:0], r.samples[len(r.samples)-keep:]...)
	}
}

// statsReply is /v1/stats: the last minute (or less, just after start).
type statsReply struct {
	WindowSeconds float64         `json:"window_seconds"`
	Upstreams     []upstreamStats `json:"upstreams"`
	DNSQPS        *float64        `json:"dns_queries_per_second,omitempty"` // nil without DNS
}

// upstreamStats is one upstream service's requests through the proxy
// (every listener that sends to it) over the window.
type upstreamStats struct {
	Name      string   `json:"name"`
	RPS       float64  `json:"requests_per_second"`
	ErrorRate float64  `json:"error_rate"`       // share of the requests that got no answer or a 5xx (attache_proxy_requests_total's error classes)
	P99ms     *float64 `json:"p99_ms,omitempty"` // nil: no request in the window
}

// stats computes the window's figures from the ring.
func (r *statsRing) stats(withDNS bool) statsReply {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := statsReply{Upstreams: []upstreamStats{}}
	if withDNS {
		st.DNSQPS = new(float64)
	}
	if len(r.samples) < 2 {
		return st
	}
	old, cur := r.samples[0], r.samples[len(r.samples)-1]
	dt := cur.at.Sub(old.at).Seconds()
	st.WindowSeconds = math.Round(dt*10) / 10
	if withDNS {
		*st.DNSQPS = round2(math.Max(0, cur.dns-old.dns) / dt)
	}
	for name, c := range cur.ups {
		o := old.ups[name] // zero when it had no series then
		n := math.Max(0, c.total-o.total)
		u := upstreamStats{Name: name, RPS: round2(n / dt)}
		if n > 0 {
			u.ErrorRate = round4(math.Max(0, c.errors-o.errors) / n)
		}
		if q, ok := quantile(0.99, c, o); ok {
			ms := round2(q * 1000)
			u.P99ms = &ms
		}
		st.Upstreams = append(st.Upstreams, u)
	}
	sort.Slice(st.Upstreams, func(i, j int) bool { return st.Upstreams[i].Name < st.Upstreams[j].Name })
	return st
}

// quantile estimates the q-quantile of the observations between o and c
// (cumulative histograms with the same buckets), interpolating linearly
// within the bucket it falls in; one past the last bound reads as that bound.
func quantile(q float64, c, o upSample) (float64, bool) {
	n := float64(c.count) - float64(o.count)
	if n <= 0 || len(c.bounds) == 0 {
		return 0, false
	}
	delta := func(i int) float64 {
		d := float64(c.counts[i])
		if i < len(o.counts) {
			d -= float64(o.counts[i])
		}
		return d
	}
	rank := q * n
	prevBound, prevCount := 0.0, 0.0
	for i, b := range c.bounds {
		cnt := delta(i)
		if cnt >= rank {
			if cnt == prevCount {
				return b, true
			}
			return prevBound + (b-prevBound)*(rank-prevCount)/(cnt-prevCount), true
		}
		prevBound, prevCount = b, cnt
	}
	return c.bounds[len(c.bounds)-1], true
}

func round2(v float64) float64 { return math.Round(v*100) / 100 }
func round4(v float64) float64 { return math.Round(v*10000) / 10000 }

// sampleStats reads the counters and the histogram back from the registry.
func (s *Sidecar) sampleStats(now time.Time) statsSample {
	smp := statsSample{at: now, ups: map[string]upSample{}}
	fams, _ := s.metrics.Gather()
	for _, f := range fams {
		switch f.GetName() {
		case "attache_proxy_requests_total":
			for _, m := range f.GetMetric() {
				name, class := label(m, "upstream"), label(m, "result")
				u := smp.ups[name]
				v := m.GetCounter().GetValue()
				u.total += v
				if isErrorClass(class) {
					u.errors += v
				}
				smp.ups[name] = u
			}
		case "attache_proxy_request_duration_seconds":
			for _, m := range f.GetMetric() {
				name := label(m, "upstream")
				u := smp.ups[name]
				h := m.GetHistogram()
				u.count = h.GetSampleCount()
				u.bounds, u.counts = u.bounds[:0], u.counts[:0]
				for _, b := range h.GetBucket() {
					u.bounds = append(u.bounds, b.GetUpperBound())
					u.counts = append(u.counts, b.GetCumulativeCount())
				}
				smp.ups[name] = u
			}
		case "attache_dns_queries_total":
			for _, m := range f.GetMetric() {
				smp.dns += m.GetCounter().GetValue()
			}
		}
	}
	return smp
}

// isErrorClass says whether a result class of attache_proxy_requests_total
// is an error: no answer from an instance, or a 5xx.
func isErrorClass(class string) bool {
	return !strings.HasPrefix(class, "1") && !strings.HasPrefix(class, "2") && !strings.HasPrefix(class, "3") && !strings.HasPrefix(class, "4")
}

// runStats samples once a second until ctx ends.
func (s *Sidecar) runStats(ctx context.Context) error {
	s.stats.add(s.sampleStats(time.Now()))
	tick := time.NewTicker(statsEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			s.stats.add(s.sampleStats(now))
		}
	}
}

func (s *Sidecar) statsHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(s.stats.stats(s.dns != nil))
}
