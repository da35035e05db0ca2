// Package watch keeps values fresh from Consul blocking queries and publishes
// them whole: Loop runs one blocking query over any fetch function (it knows
// nothing of what it fetches), and View holds the latest immutable value for
// readers that never wait. The catalog watcher and the gateway's route table
// both build on it.
package watch

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"golang.org/x/time/rate"
)

// Query is what one fetch asks of Consul.
type Query struct {
	// Index is the X-Consul-Index to wait past; 0 asks for an answer at once.
	Index uint64
	// Wait is the blocking wait (only with Index > 0).
	Wait time.Duration
	// Stale lets any server answer instead of the leader.
	Stale bool
}

// Meta is Consul's metadata of an answer.
type Meta struct {
	Index       uint64        // X-Consul-Index
	LastContact time.Duration // X-Consul-LastContact (stale answers)
}

// Config holds a Loop's timing and consistency rules. DefaultConfig returns
// the defaults; every zero field is read as its default, except MinInterval
// (0: no rate limit) and MaxStale (0: any staleness accepted).
type Config struct {
	// Wait is the blocking wait sent to Consul (default 5m; Consul adds up
	// to Wait/16 of jitter and caps it at 10m).
	Wait time.Duration
	// MinInterval rate-limits the loop: after Burst queries in a row, one
	// query per MinInterval plus up to a fifth of it as jitter (default
	// 100ms). A loop woken rarely always finds a token, so a change is
	// never delayed by it; a flapping one is held to ~1/MinInterval queries.
	MinInterval time.Duration
	// Burst is how many queries may go in a row before MinInterval spaces
	// them (default 4).
	Burst int
	// RetryBase and RetryMax bound the exponential backoff after errors
	// (defaults 250ms and 30s; each wait is jittered between half and all of it).
	RetryBase, RetryMax time.Duration
	// RequestTimeout is how long beyond Wait + Wait/16 a blocking query may
	// take before it is abandoned as hung; a query with index 0 gets
	// RequestTimeout alone (default 10s). The fetch function must give up
	// when its context ends.
	RequestTimeout time.Duration
	// Stale lets any server answer (Consul's "stale" consistency mode).
	Stale bool
	// MaxStale, with Stale, is the largest LastContact accepted: a staler
	// answer is asked again of the leader at once (default 0: any).
	MaxStale time.Duration
}

// DefaultConfig returns the defaults documented on Config.
func DefaultConfig() Config {
	return Config{
		Wait:           5 * time.Minute,
		MinInterval:    100 * time.Millisecond,
		Burst:          4,
		RetryBase:      250 * time.Millisecond,
		RetryMax:       30 * time.Second,
		RequestTimeout: 10 * time.Second,
	}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Wait <= 0 {
		c.Wait = d.Wait
	}
	if c.MinInterval < 0 {
		c.MinInterval = 0
	}
	if c.Burst <= 0 {
		c.Burst = d.Burst
	}
	if c.RetryBase <= 0 {
		c.RetryBase = d.RetryBase
	}
	if c.RetryMax < c.RetryBase {
		c.RetryMax = max(d.RetryMax, c.RetryBase)
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = d.RequestTimeout
	}
	return c
}

// ErrZeroIndex is Consul answering with index 0, which its documentation
// calls a bug to be treated as an error (waiting on it would spin).
var ErrZeroIndex = errors.New("watch: Consul answered with index 0")

// Loop runs one blocking query again and again, following Consul's rules
// (as consul-template's watch/view.go): pass the last index; reset it to 0
// when it goes backwards; skip an answer whose index did not move (the wait
// ended) or whose value is equal to the last one; treat index 0 as an error;
// rate-limit with jitter; back off (capped, jittered) after errors; abandon
// a query that outlives its wait; and stop at once when the context ends.
type Loop[T any] struct {
	Config
	// Fetch runs one query. It must return when ctx ends (the loop sets a
	// deadline on it to abandon hung queries) and must not keep ctx.
	Fetch func(ctx context.Context, q Query) (T, Meta, error)
	// Changed receives each answer at a new index whose value differs from
	// the last one delivered (always the first). It runs on the loop's
	// goroutine: the next query waits for it.
	Changed func(v T, m Meta)
	// Equal, when set, tells values apart; nil delivers every new index.
	Equal func(a, b T) bool
	// Observe, when set, is told of every query: how long it took and its
	// error (nil on success). For metrics, logs and failover.
	Observe func(took time.Duration, err error)
	// Waker, when set, ends the loop's backoff after an error at once when
	// woken (Consul found answering again).
	Waker *Waker
}

// Run runs the loop until ctx ends.
func (l *Loop[T]) Run(ctx context.Context) {
	cfg := l.Config.withDefaults()
	var (
		index   uint64
		last    T
		have    bool
		retries int
		lim     *rate.Limiter
	)
	stale := cfg.Stale
	if cfg.MinInterval > 0 {
		lim = rate.NewLimiter(rate.Every(cfg.MinInterval), cfg.Burst)
	}
	for ctx.Err() == nil {
		if lim != nil {
			if d := lim.Reserve().Delay(); d > 0 && !Sleep(ctx, d+Jitter(cfg.MinInterval/5)) {
				return
			}
		}
		timeout := cfg.RequestTimeout
		if index > 0 {
			timeout += cfg.Wait + cfg.Wait/16
		}
		start := time.Now()
		qctx, cancel := context.WithTimeout(ctx, timeout)
		v, meta, err := l.Fetch(qctx, Query{Index: index, Wait: cfg.Wait, Stale: stale})
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil && meta.Index == 0 {
			err = ErrZeroIndex
		}
		if l.Observe != nil {
			l.Observe(time.Since(start), err)
		}
		if err != nil {
			index = 0
			d := Backoff(cfg.RetryBase, cfg.RetryMax, retries)
			retries++
			if !l.Waker.Sleep(ctx, d) {
				return
			}
			continue
		}
		retries = 0
		if stale && cfg.MaxStale > 0 && meta.LastContact > cfg.MaxStale {
			stale = false // too stale: ask the leader at once
			continue
		}
		stale = cfg.Stale
		switch {
		case meta.Index < index:
			index = 0 // went backwards (a new leader, a restored snapshot): start over
			continue
		case meta.Index == index:
			continue // the wait ended with no change
		}
		index = meta.Index
		if have && l.Equal != nil && l.Equal(last, v) {
			continue
		}
		last, have = v, true
		l.Changed(v, meta)
	}
}

// Backoff is the wait before retry number retries (from 0): base doubled
// per retry up to maxD, then jittered between half and all of it.
func Backoff(base, maxD time.Duration, retries int) time.Duration {
	d := base
	for i := 0; i < retries && d < maxD; i++ {
		d *= 2
	}
	d = min(d, maxD)
	return d/2 + Jitter(d/2)
}

// Jitter returns a random duration in [0, d).
func Jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

// Sleep waits d or until ctx ends; it reports whether ctx is still live.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
