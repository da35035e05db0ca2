package sidecar

import (
	"io"
	"reflect"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// reload applies a new configuration (from ParseArgs: defaults, file,
// flags) while every listener keeps serving: what it can change (the
// bindings marked reload) is changed, what needs a restart is named in one
// log line and keeps its old value. An invalid configuration, or one the
// proxy cannot take (an address it cannot bind), is refused whole: the
// error says why and nothing changes. Reloads run one at a time.
func (s *Sidecar) reload(next Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	next.settle()
	if err := next.Validate(); err != nil {
		return err
	}
	cur := s.Config()
	applied := cur // next's reloadable settings over the current ones
	var restart []string
	for _, b := range bindings {
		cv, nv := reflect.ValueOf(b.ptr(&cur)).Elem(), reflect.ValueOf(b.ptr(&next)).Elem()
		same := reflect.DeepEqual(cv.Interface(), nv.Interface())
		if b.off != nil {
			same = same && *b.off(&cur) == *b.off(&next)
		}
		if same {
			continue
		}
		// The listeners can be added and moved only while a proxy runs.
		listener := b.name == "upstream" || b.name == "http-proxy"
		if b.reload && !(listener && s.proxy == nil) {
			reflect.ValueOf(b.ptr(&applied)).Elem().Set(nv)
			if b.off != nil {
				*b.off(&applied) = *b.off(&next)
			}
			continue
		}
		restart = append(restart, b.setting())
	}
	if s.proxy != nil {
		if err := s.proxy.Update(applied.Proxy); err != nil {
			return err
		}
	}
	if err := s.breakers.SetConfig(applied.Breaker); err != nil {
		s.log.Error("reload: breakers", "error", err) // only the window can be refused, and it is not configurable
	}
	if s.dns != nil {
		dc := applied.DNS
		dc.Node = applied.Node
		if err := s.dns.SetTuning(dc); err != nil {
			s.log.Error("reload: DNS settings refused; the old ones stay", "error", err)
			applied.DNS = cur.DNS
		}
	}
	if applied.LogLevel != cur.LogLevel {
		s.log.SetLevel(hclogLevel(applied.LogLevel))
	}
	applied.PrintConfig = false
	s.applied.Store(&applied)
	if len(restart) > 0 {
		s.log.Warn("reload: these settings need a restart and keep their old values until then", "settings", strings.Join(restart, ", "))
	}
	s.log.Info("reloaded", "upstreams", upstreamStrings(applied.Proxy.Upstreams), "http_proxy", applied.Proxy.HTTPProxyAddr,
		"try_timeout", applied.Proxy.TryTimeout, "request_timeout", applied.Proxy.RequestTimeout, "retries", applied.Proxy.MaxRetries, "no_retries", applied.Proxy.NoRetries)
	return nil
}

// Config returns the configuration in force: the one the sidecar started
// with, with what reloads changed.
func (s *Sidecar) Config() Config {
	if c := s.applied.Load(); c != nil {
		return *c
	}
	return s.cfg
}

// ReloadArgs reads the configuration again from the command line args (and
// the file it names) over defaults, as at start, so flags still win over
// the file, and applies it (Reload). A configuration that does not parse
// or is invalid is refused with one log line naming the file, the line
// and the reason; the old one stays.
func (s *Sidecar) ReloadArgs(args []string, defaults Config) error {
	next, err := ParseArgs(args, defaults, io.Discard)
	if err == nil {
		err = s.reload(next)
	}
	if err != nil {
		s.log.Error("reload refused; the configuration in force stays", "error", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	return err
}

func hclogLevel(l string) hclog.Level { return hclog.LevelFromString(strings.ToLower(l)) }
