package sidecar

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclparse"
)

// A service file (-service FILE) describes local services to register with
// the node's agent, in a subset of Consul's own service definition:
//
//	service {
//	  name    = "users"
//	  id      = "users-1"          # default: name
//	  address = "127.0.0.21"       # default: the node's address
//	  port    = 8081
//	  tags    = ["v1"]
//	  meta    = { version = "1" }
//	  weight  = 1                  # Consul's Weights.Passing
//	  check {
//	    http     = "http://127.0.0.21:8081/health"   # or tcp = "127.0.0.21:8081"
//	    interval = "2s"
//	    timeout  = "1s"
//	    deregister_critical_service_after = "10m"
//	  }
//	}
type serviceFile struct {
	Services []serviceBlock `hcl:"service,block"`
}

type serviceBlock struct {
	Name    string            `hcl:"name"`
	ID      *string           `hcl:"id,optional"`
	Address *string           `hcl:"address,optional"`
	Port    int               `hcl:"port"`
	Tags    []string          `hcl:"tags,optional"`
	Meta    map[string]string `hcl:"meta,optional"`
	Weight  *int              `hcl:"weight,optional"`
	Checks  []checkBlock      `hcl:"check,block"`
}

type checkBlock struct {
	HTTP                *string `hcl:"http,optional"`
	TCP                 *string `hcl:"tcp,optional"`
	Interval            *string `hcl:"interval,optional"`
	Timeout             *string `hcl:"timeout,optional"`
	DeregisterAfter     *string `hcl:"deregister_critical_service_after,optional"`
	InitialStatusPassed *bool   `hcl:"initially_passing,optional"`
}

// loadServiceFiles reads every service file, in order.
func loadServiceFiles(paths []string) ([]*api.AgentServiceRegistration, error) {
	var all []*api.AgentServiceRegistration
	for _, p := range paths {
		src, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("service file: %w", err)
		}
		regs, err := parseServices(p, src)
		if err != nil {
			return nil, err
		}
		all = append(all, regs...)
	}
	return all, nil
}

// parseServices parses one service file. Errors carry file:line and say what is wrong.
func parseServices(name string, src []byte) ([]*api.AgentServiceRegistration, error) {
	f, diags := hclparse.NewParser().ParseHCL(src, name)
	if diags.HasErrors() {
		return nil, diagError(diags)
	}
	var sf serviceFile
	if diags := gohcl.DecodeBody(f.Body, nil, &sf); diags.HasErrors() {
		return nil, diagError(diags)
	}
	if len(sf.Services) == 0 {
		return nil, fmt.Errorf("%s: no service block: a service file holds one or more `service { name = ... port = ... }` blocks", name)
	}
	var regs []*api.AgentServiceRegistration
	for i, s := range sf.Services {
		where := fmt.Sprintf("%s: service %d (%q)", name, i+1, s.Name)
		if s.Name == "" {
			return nil, fmt.Errorf("%s: name must not be empty", where)
		}
		if s.Port <= 0 || s.Port > 65535 {
			return nil, fmt.Errorf("%s: port %d is not a TCP port (1-65535)", where, s.Port)
		}
		r := &api.AgentServiceRegistration{
			Name: s.Name, ID: s.Name, Port: s.Port, Tags: s.Tags, Meta: s.Meta,
		}
		set(&r.ID, s.ID)
		set(&r.Address, s.Address)
		if s.Weight != nil {
			if *s.Weight < 1 {
				return nil, fmt.Errorf("%s: weight %d: want 1 or more", where, *s.Weight)
			}
			r.Weights = &api.AgentWeights{Passing: *s.Weight, Warning: 1}
		}
		for _, c := range s.Checks {
			chk, err := c.registration()
			if err != nil {
				return nil, fmt.Errorf("%s: check: %w", where, err)
			}
			r.Checks = append(r.Checks, chk)
		}
		regs = append(regs, r)
	}
	return regs, nil
}

func (c checkBlock) registration() (*api.AgentServiceCheck, error) {
	chk := &api.AgentServiceCheck{Interval: "10s", Timeout: "2s"}
	switch {
	case c.HTTP != nil && c.TCP != nil:
		return nil, errors.New("set http or tcp, not both")
	case c.HTTP != nil:
		chk.HTTP = *c.HTTP
	case c.TCP != nil:
		chk.TCP = *c.TCP
	default:
		return nil, errors.New("needs http = \"http://ADDR/health\" or tcp = \"ADDR\"")
	}
	for _, d := range []struct {
		name string
		v    *string
		dst  *string
	}{
		{"interval", c.Interval, &chk.Interval},
		{"timeout", c.Timeout, &chk.Timeout},
		{"deregister_critical_service_after", c.DeregisterAfter, &chk.DeregisterCriticalServiceAfter},
	} {
		if d.v == nil {
			continue
		}
		if _, err := time.ParseDuration(*d.v); err != nil {
			return nil, fmt.Errorf("%s %q: want a duration such as \"2s\"", d.name, *d.v)
		}
		*d.dst = *d.v
	}
	if c.InitialStatusPassed != nil && *c.InitialStatusPassed {
		chk.Status = api.HealthPassing
	}
	return chk, nil
}
