package sidecar

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"

	"attache/sidecar/breaker"
	"attache/sidecar/proxy"
)

// UpstreamSettings are one service's own forwarding settings, from an HCL
// block `upstream "users" { ... }`: they apply to every call to that
// service through this sidecar (its upstream listener, the HTTP proxy
// listener, gateway routes that set nothing of their own). Zero fields
// keep the sidecar's flags; Listen, when set, also opens an upstream
// listener: the file's list of upstream listeners gets NAME=LISTEN, as
// `-upstream NAME=LISTEN` would add (an -upstream flag replaces the list).
type UpstreamSettings struct {
	Listen      string        // ADDR[/PROTOCOL]: an upstream listener for the service; "": none
	Balancer    string        // lb
	TryTimeout  time.Duration // try_timeout
	ReqTimeout  time.Duration // request_timeout
	Retries     *int          // retries: extra tries; -1 (or 0) none
	EjectAfter  *int          // eject_after: consecutive failures; -1 never
	EjectTime   time.Duration // eject_time
	SlowCall    time.Duration // slow_call
	MaxRequests *int          // max_requests: calls in flight; -1 no limit
	FailureRate *float64      // failure_rate: percent of failed calls that opens the breaker; 0 off
	Window      time.Duration // window: the breaker's sliding window
	OpenTime    time.Duration // open_time: how long an open breaker fails fast
}

// upstreamBlock is the HCL form of UpstreamSettings.
type upstreamBlock struct {
	Name        string   `hcl:"name,label"`
	Listen      *string  `hcl:"listen,optional"`
	Balancer    *string  `hcl:"lb,optional"`
	TryTimeout  *string  `hcl:"try_timeout,optional"`
	ReqTimeout  *string  `hcl:"request_timeout,optional"`
	Retries     *int     `hcl:"retries,optional"`
	EjectAfter  *int     `hcl:"eject_after,optional"`
	EjectTime   *string  `hcl:"eject_time,optional"`
	SlowCall    *string  `hcl:"slow_call,optional"`
	MaxRequests *int     `hcl:"max_requests,optional"`
	FailureRate *float64 `hcl:"failure_rate,optional"`
	Window      *string  `hcl:"window,optional"`
	OpenTime    *string  `hcl:"open_time,optional"`
}

// upstreamSettings turns the upstream "NAME" blocks of a config file into
// checked settings by service name; errors name the file and the block's
// line.
func upstreamSettings(file string, blocks []*hcl.Block) (map[string]UpstreamSettings, error) {
	out := make(map[string]UpstreamSettings, len(blocks))
	for _, blk := range blocks {
		var b upstreamBlock
		if diags := gohcl.DecodeBody(blk.Body, nil, &b); diags.HasErrors() {
			return nil, diagError(diags)
		}
		b.Name = blk.Labels[0]
		at := fmt.Sprintf("%s:%d", file, blk.DefRange.Start.Line)
		name := strings.ToLower(b.Name)
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("%s: upstream %q: set twice", at, b.Name)
		}
		u := UpstreamSettings{Retries: b.Retries, EjectAfter: b.EjectAfter, MaxRequests: b.MaxRequests, FailureRate: b.FailureRate}
		set(&u.Listen, b.Listen)
		set(&u.Balancer, b.Balancer)
		for _, d := range []struct {
			attr string
			v    *string
			dst  *time.Duration
		}{
			{"try_timeout", b.TryTimeout, &u.TryTimeout},
			{"request_timeout", b.ReqTimeout, &u.ReqTimeout},
			{"eject_time", b.EjectTime, &u.EjectTime},
			{"slow_call", b.SlowCall, &u.SlowCall},
			{"window", b.Window, &u.Window},
			{"open_time", b.OpenTime, &u.OpenTime},
		} {
			if d.v == nil {
				continue
			}
			v, err := time.ParseDuration(*d.v)
			if err != nil {
				return nil, fmt.Errorf("%s: upstream %q: %s: %w (use a duration such as \"2s\")", at, b.Name, d.attr, err)
			}
			*d.dst = v
		}
		if err := u.validate(b.Name); err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		out[name] = u
	}
	return out, nil
}

// validate says what is wrong with one service's settings.
func (u UpstreamSettings) validate(name string) error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("upstream %q: "+format, append([]any{name}, args...)...))
	}
	if u.Listen != "" {
		if _, err := proxy.ParseUpstream(name + "=" + u.Listen); err != nil {
			bad("listen: %v", err)
		}
	}
	if u.Balancer != "" {
		if _, err := proxy.ParseBalancer(u.Balancer); err != nil {
			bad("lb: %v", err)
		}
	}
	for _, d := range []struct {
		attr string
		v    time.Duration
	}{{"try_timeout", u.TryTimeout}, {"request_timeout", u.ReqTimeout}, {"eject_time", u.EjectTime},
		{"slow_call", u.SlowCall}, {"window", u.Window}, {"open_time", u.OpenTime}} {
		if d.v < 0 {
			bad("%s %v must not be negative", d.attr, d.v)
		}
	}
	if u.TryTimeout > 0 && u.ReqTimeout > 0 && u.TryTimeout > u.ReqTimeout {
		bad("try_timeout %v is longer than request_timeout %v", u.TryTimeout, u.ReqTimeout)
	}
	if u.Retries != nil && (*u.Retries < -1 || *u.Retries > 10) {
		bad("retries %d: want -1 (none) to 10", *u.Retries)
	}
	if u.FailureRate != nil && (*u.FailureRate < 0 || *u.FailureRate > 100) {
		bad("failure_rate %v: want a percentage (0 turns the rule off)", *u.FailureRate)
	}
	return errors.Join(errs...)
}

// policy is the proxy's form of the settings; nil when they change none
// of its fields.
func (u UpstreamSettings) policy() *proxy.Policy {
	p := proxy.Policy{TryTimeout: u.TryTimeout, RequestTimeout: u.ReqTimeout}
	if u.Balancer != "" {
		p.Balancer, _ = proxy.ParseBalancer(u.Balancer) // checked by validate
	}
	if u.Retries != nil {
		p.Retries, p.NoRetries = max(*u.Retries, 0), *u.Retries <= 0
	}
	if p == (proxy.Policy{}) {
		return nil
	}
	return &p
}

// breakerConfig is base (the sidecar's flags) with the settings over it;
// ok false when they change nothing of it.
func (u UpstreamSettings) breakerConfig(base breaker.Config) (c breaker.Config, ok bool) {
	c = base
	if u.EjectAfter != nil {
		c.ConsecutiveFailures, c.NoEjection = *u.EjectAfter, *u.EjectAfter <= 0
		if c.NoEjection {
			c.ConsecutiveFailures = 0
		}
	}
	if u.EjectTime > 0 {
		c.BaseEjectionTime = u.EjectTime
	}
	if u.SlowCall > 0 {
		c.SlowCallDuration = u.SlowCall
	}
	if u.MaxRequests != nil {
		c.MaxRequests, c.NoRequestLimit = *u.MaxRequests, *u.MaxRequests <= 0
		if c.NoRequestLimit {
			c.MaxRequests = 0
		}
	}
	if u.FailureRate != nil {
		c.FailureRateThreshold, c.NoFailureRate = *u.FailureRate, *u.FailureRate == 0
	}
	if u.Window > 0 {
		c.Window = u.Window
	}
	if u.OpenTime > 0 {
		c.OpenDuration = u.OpenTime
	}
	return c, c != base
}

// applyUpstreams gives the breakers and the proxy config the services'
// own settings (the listeners the blocks ask for are in Config.Upstreams).
func applyUpstreams(settings map[string]UpstreamSettings, br *breaker.Registry, pc *proxy.Config) error {
	names := make([]string, 0, len(settings))
	for name := range settings {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		u := settings[name]
		if err := u.validate(name); err != nil {
			return err
		}
		if c, ok := u.breakerConfig(br.Config()); ok {
			if err := br.Configure(name, c); err != nil {
				return err
			}
		}
		if pol := u.policy(); pol != nil {
			if pc.Policies == nil {
				pc.Policies = map[string]*proxy.Policy{}
			}
			pc.Policies[name] = pol
		}
	}
	return nil
}

// block is the HCL form of the settings of service name, for
// -print-config. Its listener, if any, is in the upstream list already.
func (u UpstreamSettings) block(name string) upstreamBlock {
	b := upstreamBlock{Name: name, Retries: u.Retries, EjectAfter: u.EjectAfter, MaxRequests: u.MaxRequests, FailureRate: u.FailureRate}
	if u.Balancer != "" {
		b.Balancer = &u.Balancer
	}
	for _, d := range []struct {
		v   time.Duration
		dst **string
	}{
		{u.TryTimeout, &b.TryTimeout}, {u.ReqTimeout, &b.ReqTimeout}, {u.EjectTime, &b.EjectTime},
		{u.SlowCall, &b.SlowCall}, {u.Window, &b.Window}, {u.OpenTime, &b.OpenTime},
	} {
		if d.v > 0 {
			s := d.v.String()
			*d.dst = &s
		}
	}
	return b
}
