package gateway

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

func TestLimiterBucket(t *testing.T) {
	l := newLimiter(10, 3, false, 1000)
	now := time.Unix(1000, 0)
	for i := 0; i < 3; i++ {
		if v := l.allow("a", now); !v.ok || v.remaining != 2-i {
			t.Fatalf("request %d: %+v", i, v)
		}
	}
	v := l.allow("a", now)
	if v.ok || v.retry != 100*time.Millisecond || v.reset != 300*time.Millisecond {
		t.Fatalf("fourth request at once: %+v", v)
	}
	if v := l.allow("b", now); !v.ok {
		t.Fatal("another key shares the bucket")
	}
	if v := l.allow("a", now.Add(100*time.Millisecond)); !v.ok {
		t.Fatalf("a token after 100ms: %+v", v)
	}
	// 10/s for 10 s of constant demand: 100 + the burst.
	l = newLimiter(10, 3, false, 1000)
	ok := 0
	for i := 0; i < 10000; i++ {
		if l.allow("a", now.Add(time.Duration(i)*time.Millisecond)).ok {
			ok++
		}
	}
	if ok < 100 || ok > 103 {
		t.Errorf("10 s at 10/s passed %d", ok)
	}
	// Cluster share: two gateways halve the rate and the burst.
	l = newLimiter(10, 4, true, 1000)
	l.setShare(2)
	if r, b := l.rate(); r != 5 || b != 2 {
		t.Errorf("share of 2: rate %v burst %d", r, b)
	}
	l.setShare(1)
	if r, b := l.rate(); r != 10 || b != 4 {
		t.Errorf("share of 1: rate %v burst %d", r, b)
	}
}

func TestLimiterBounded(t *testing.T) {
	l := newLimiter(1, 1, false, 320)
	now := time.Unix(1000, 0)
	for i := 0; i < 10000; i++ {
		l.allow(fmt.Sprint("client-", i), now)
	}
	if k := l.keys(); k > 400 {
		t.Errorf("%d keys held, cap 320 (+25 %%)", k)
	}
	l.sweep(now.Add(2 * time.Second))
	if k := l.keys(); k != 0 {
		t.Errorf("%d keys held after their buckets filled again", k)
	}
}

// TestLimiterMemory states the memory held by one route's limit with
// 100,000 distinct clients (IPv4 addresses as keys).
func TestLimiterMemory(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := newLimiter(10, 10, false, 100_000)
	now := time.Unix(1000, 0)
	for i := 0; i < 100_000; i++ {
		l.allow(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255), now)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if l.keys() != 100_000 {
		t.Fatalf("%d keys", l.keys())
	}
	mb := float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
	t.Logf("100,000 clients: %.1f MiB (%.0f bytes a client)", mb, float64(after.HeapAlloc-before.HeapAlloc)/100_000)
	if mb > 32 {
		t.Errorf("%.1f MiB for 100,000 clients", mb)
	}
	runtime.KeepAlive(l)
}
