package catalog

import (
	"context"
	"time"

	"github.com/hashicorp/consul/api"
)

// prober watches for Consul answering again while the watcher's queries
// fail. Their backoff grows to RetryMax (30 s) while the agent is down,
// restarting or cut off from the servers, so without it a change made
// meanwhile would show only when the longest backoff ran out — up to that
// long after the agent answers again. Every ProbeInterval, while the last
// query failed, it asks the agent in use for the Raft leader (forwarded to
// a server, so it answers only when the whole path works, and no ACL guards
// it); the first answer after a failed probe wakes every query backing off.
// A failure the agent does not share (an ACL refusal, a bad answer) never
// fails the probe, so those queries keep their backoff.
func (w *Watcher) prober(ctx context.Context) {
	t := time.NewTicker(w.cfg.ProbeInterval)
	defer t.Stop()
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if w.lastErrAt.Load() <= w.lastContact.Load() && !down {
			continue // the last query succeeded: nothing to probe
		}
		c := w.clients[int(w.cur.Load())%len(w.clients)]
		pctx, cancel := context.WithTimeout(ctx, max(w.cfg.ProbeInterval, time.Second))
		leader, err := leaderOf(pctx, c)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil || leader == "":
			if !down {
				w.log.Debug("Consul does not answer; probing until it does", "error", err)
			}
			down = true
		case down:
			down = false
			w.log.Info("Consul answers again; retrying every query now")
			w.waker.Wake()
		}
	}
}

// leaderOf asks the agent of c for the Raft leader.
func leaderOf(ctx context.Context, c *api.Client) (string, error) {
	return c.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
}
