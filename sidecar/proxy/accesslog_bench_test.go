package proxy

import (
	"context"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// BenchmarkAccessLogCost: the process's CPU time per request with the log
// off and on, the request's side (recording) and the writer's (encoding,
// writing to io.Discard) together. A request is a fixed amount of work
// (spin) standing for the rest of what the proxy does, so that lines come
// at a rate a proxy sees and the writer runs beside it as it would; the
// difference of the two cpu-ns/op is the log's cost per request.
func BenchmarkAccessLogCost(b *testing.B) {
	for _, on := range []bool{false, true} {
		name := map[bool]string{false: "off", true: "on"}[on]
		b.Run(name, func(b *testing.B) {
			a := newAccessLog(Config{AccessLog: io.Discard, AccessLogSample: 1}.withDefaults(), hclog.NewNullLogger())
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); a.run(ctx) }()
			start := time.Now()
			b.ReportAllocs()
			cpu0 := cpuNanos()
			b.ResetTimer()
			sink := 0
			for i := 0; i < b.N; i++ {
				sink += spin(4000)
				if on {
					e := AccessEntry{Time: start, Listener: "users", Method: "GET", Host: "127.0.4.15:8080", Path: "/users/",
						Service: "users", Instance: "users-127.0.4.1:8081", Status: 200, Duration: 0.123, Tries: 1, Breaker: "closed"}
					a.record(&e)
				}
			}
			b.StopTimer()
			cancel()
			<-done
			b.ReportMetric(float64(cpuNanos()-cpu0)/float64(b.N), "cpu-ns/op")
			b.ReportMetric(testutil.ToFloat64(a.dropped)/float64(b.N), "dropped/op")
			if sink == 42 {
				b.Log(sink)
			}
		})
	}
}

// spin does n steps of work the compiler cannot remove.
func spin(n int) int {
	x := 1
	for i := 0; i < n; i++ {
		x = x*1103515245 + 12345
	}
	return x & 1
}

// cpuNanos is the process's user and system CPU time.
func cpuNanos() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}
