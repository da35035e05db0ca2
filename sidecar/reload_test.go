package sidecar

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"attache/internal/testrun"
)

// TestReloadWhatChanges: a reload changes what it can (an upstream added,
// the try timeout, the ejection threshold, the log level), names in one
// log line what needs a restart (the node, the DNS domain, the default
// balancer) and keeps their old values; an invalid configuration changes
// nothing.
func TestReloadWhatChanges(t *testing.T) {
	consul, admin, users, inv := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	base := []string{"-consul", consul, "-admin", admin, "-node", "n1", "-upstream", "users=" + users}
	cfg, err := ParseArgs(base, DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info}))
	if err != nil {
		t.Fatal(err)
	}
	testrun.Start(t, s)
	eventually(t, "/healthz", 5*time.Second, func() bool { code, _ := get(admin, "/healthz"); return code == 200 })
	<-s.proxy.Ready()

	next, err := ParseArgs(append(base[:len(base)-1], "users="+users, "-upstream", "inventory="+inv,
		"-try-timeout", "1s", "-eject-after", "3", "-log-level", "debug", "-node", "n2", "-dns-domain", "example.", "-lb", "round-robin"),
		DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(next); err != nil {
		t.Fatal(err)
	}
	got := s.Config()
	if got.TryTimeout != time.Second || got.EjectAfter != 3 || len(got.Upstreams) != 2 || got.LogLevel != "debug" {
		t.Errorf("reloadable settings not applied: %+v", got)
	}
	if got.Node != "n1" || got.DNSDomain != "consul." || got.Balancer != "least-request" {
		t.Errorf("settings needing a restart changed: node %q domain %q lb %q", got.Node, got.DNSDomain, got.Balancer)
	}
	if s.proxy.Addr("inventory") == nil {
		t.Error("inventory upstream not listening")
	}
	if s.breakers.Config().ConsecutiveFailures != 3 {
		t.Error("breaker threshold not applied")
	}
	if !s.log.IsDebug() {
		t.Error("log level not applied")
	}
	var restart []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "need a restart") {
			restart = append(restart, l)
		}
	}
	if len(restart) != 1 || !strings.Contains(restart[0], "node, dns_domain, lb") {
		t.Errorf("want one line naming node, dns_domain, lb; got %q", restart)
	}

	bad := next
	bad.Upstreams = []string{"users"}
	if err := s.Reload(bad); err == nil {
		t.Fatal("invalid upstream accepted")
	}
	if got := s.Config(); len(got.Upstreams) != 2 {
		t.Errorf("refused reload changed the upstreams: %v", got.Upstreams)
	}
}
