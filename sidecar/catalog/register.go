package catalog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"attache/internal/consulacl"
	"attache/sidecar/watch"
)

// Registrar registers local services with the node's Consul agent, keeps
// them registered (an agent restarted without its data loses them: they are
// registered again within ResyncInterval) and deregisters them on shutdown.
type Registrar struct {
	agent  *api.Agent
	regs   []*api.AgentServiceRegistration
	log    hclog.Logger
	resync time.Duration

	mu     sync.Mutex
	status RegistrarStatus
	mine   map[string]bool      // IDs this process has registered (with its definition) since it started
	keep   func(id string) bool // set by Keep: IDs to leave registered on shutdown
}

// RegistrarStatus tells /readyz whether registration has succeeded.
type RegistrarStatus struct {
	Registered bool      `json:"registered"`
	LastError  string    `json:"last_error,omitempty"`
	NextTry    time.Time `json:"next_try,omitzero"`
}

// NewRegistrar returns a Registrar for regs with the agent that client talks to.
// resync is how often it checks that the agent still has them (default 10s).
func NewRegistrar(client *api.Client, regs []*api.AgentServiceRegistration, resync time.Duration, log hclog.Logger) *Registrar {
	if resync <= 0 {
		resync = 10 * time.Second
	}
	return &Registrar{agent: client.Agent(), regs: regs, log: log.Named("register"), resync: resync, mine: map[string]bool{}}
}

// IDs returns the IDs of the services it registers.
func (r *Registrar) IDs() []string {
	ids := make([]string, len(r.regs))
	for i, reg := range r.regs {
		ids[i] = reg.ID
	}
	return ids
}

// Keep makes the shutdown leave the services keep returns true for
// registered: a successor process registered them and serves them.
func (r *Registrar) Keep(keep func(id string) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keep = keep
}

// Status returns the registration state.
func (r *Registrar) Status() RegistrarStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Run registers the services, retrying with capped backoff while the agent
// cannot be reached, re-registers any the agent has lost, and deregisters
// them all when ctx ends.
func (r *Registrar) Run(ctx context.Context) error {
	if len(r.regs) == 0 {
		r.setStatus(RegistrarStatus{Registered: true})
		return nil
	}
	defer r.deregister()
	retries := 0
	for {
		wait := r.resync
		if err := r.sync(ctx); err != nil {
			wait = watch.Backoff(250*time.Millisecond, 30*time.Second, retries)
			retries++
			r.log.Warn("cannot register with the Consul agent; retrying", "error", err, "retry_in", wait.Round(time.Millisecond))
			r.setStatus(RegistrarStatus{LastError: err.Error(), NextTry: time.Now().Add(wait)})
		} else {
			retries = 0
			r.setStatus(RegistrarStatus{Registered: true})
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

func (r *Registrar) setStatus(s RegistrarStatus) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.status.Registered && s.Registered {
		r.log.Info("services registered", "count", len(r.regs))
	}
	r.status = s
}

// sync registers every service the agent does not have, and once each one
// it has that this process has not registered yet (a predecessor's, whose
// definition may differ; the agent keeps the status of a check registered
// again unchanged — checked with Consul 1.14.8: passing stays passing — so
// a successor's registration does not flap the node's services). One the agent
// refuses (an ACL token without service:write on it) does not keep the
// others from registering; every refusal is in the error, naming the rule.
func (r *Registrar) sync(ctx context.Context) error {
	have, err := r.agent.ServicesWithFilterOpts("", (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("list agent services: %w", consulacl.Wrap(err))
	}
	var errs []error
	for _, reg := range r.regs {
		r.mu.Lock()
		mine := r.mine[reg.ID]
		r.mu.Unlock()
		if _, ok := have[reg.ID]; ok && mine {
			continue
		}
		opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
		if err := r.agent.ServiceRegisterOpts(reg, opts); err != nil {
			errs = append(errs, fmt.Errorf("register %s: %w", reg.ID, consulacl.Wrap(err)))
			continue
		}
		r.mu.Lock()
		r.mine[reg.ID] = true
		r.mu.Unlock()
		r.log.Info("registered", "service", reg.Name, "id", reg.ID)
	}
	return errors.Join(errs...)
}

func (r *Registrar) deregister() {
	r.mu.Lock()
	keep := r.keep
	r.mu.Unlock()
	for _, reg := range r.regs {
		if keep != nil && keep(reg.ID) {
			r.log.Info("left registered for the successor", "id", reg.ID)
			continue
		}
		if err := r.agent.ServiceDeregister(reg.ID); err != nil {
			r.log.Warn("deregister failed", "id", reg.ID, "error", consulacl.Wrap(err))
			continue
		}
		r.log.Info("deregistered", "id", reg.ID)
	}
}
