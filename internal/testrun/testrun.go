// Package testrun runs a component's Run(ctx) in a test: it starts it in a
// goroutine, stops it when the test ends, and fails the test when Run
// returns an error or does not return soon after its context ends — the
// lifecycle every component promises (everything it started has stopped
// when Run returns).
package testrun

import (
	"context"
	"testing"
	"time"
)

// Runner is a component with the New/Run(ctx) lifecycle.
type Runner interface {
	Run(ctx context.Context) error
}

// Handle is a running component.
type Handle struct {
	t      testing.TB
	cancel context.CancelFunc
	done   chan error
	err    error
	ended  bool
}

// Start runs r until Stop or the end of the test.
func Start(t testing.TB, r Runner) *Handle {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h := &Handle{t: t, cancel: cancel, done: make(chan error, 1)}
	go func() { h.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		if err := h.Stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return h
}

// WaitReady waits until ready is closed, failing the test if Run returns
// first or 10 seconds pass.
func (h *Handle) WaitReady(ready <-chan struct{}) {
	h.t.Helper()
	select {
	case <-ready:
	case err := <-h.done:
		h.err, h.ended = err, true
		h.t.Fatalf("Run returned before it was ready: %v", err)
	case <-time.After(10 * time.Second):
		h.t.Fatal("not ready within 10s")
	}
}

// Stop cancels Run's context and returns what Run returned, failing the
// test if it has not returned 10 seconds later. Calling it again returns
// the same.
func (h *Handle) Stop() error {
	if h.ended {
		return h.err
	}
	h.cancel()
	select {
	case h.err = <-h.done:
	case <-time.After(10 * time.Second):
		h.t.Error("Run did not return within 10s of its context ending")
	}
	h.ended = true
	return h.err
}
