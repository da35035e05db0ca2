package sidecar

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"attache/internal/testrun"
	"attache/sidecar/proxy"
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
	if err := s.reload(next); err != nil {
		t.Fatal(err)
	}
	got := s.Config()
	if got.Proxy.TryTimeout != time.Second || got.Breaker.ConsecutiveFailures != 3 || len(got.Proxy.Upstreams) != 2 || got.LogLevel != "debug" {
		t.Errorf("reloadable settings not applied: %+v", got)
	}
	if got.Node != "n1" || got.DNS.Domain != "consul." || got.Proxy.Balancer != "least-request" {
		t.Errorf("settings needing a restart changed: node %q domain %q lb %q", got.Node, got.DNS.Domain, got.Proxy.Balancer)
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
	bad.Proxy.Upstreams = []proxy.Upstream{{Name: "users"}} // no address
	if err := s.reload(bad); err == nil {
		t.Fatal("invalid upstream accepted")
	}
	if got := s.Config(); len(got.Proxy.Upstreams) != 2 {
		t.Errorf("refused reload changed the upstreams: %v", got.Proxy.Upstreams)
	}
}

// TestReloadArgs: a reload reads the file again under the same command
// line, whose flags still win; a broken file is refused with one log line
// naming file and line, and nothing changes.
func TestReloadArgs(t *testing.T) {
	file := filepath.Join(t.TempDir(), "attache.hcl")
	write := func(s string) {
		if err := os.WriteFile(file, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	users := freeAddr(t)
	write(fmt.Sprintf("consul = [%q]\nupstream = [\"users=%s\"]\ntry_timeout = \"1s\"\nretries = 1\n", freeAddr(t), users))
	args := []string{"-config", file, "-admin", freeAddr(t), "-try-timeout", "3s"}
	cfg, err := ParseArgs(args, DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info}))
	if err != nil {
		t.Fatal(err)
	}
	testrun.Start(t, s)
	<-s.proxy.Ready()

	write(strings.Replace(strings.Replace(mustRead(t, file), `"1s"`, `"2s"`, 1), "retries = 1", "retries = 3", 1))
	if err := s.ReloadArgs(args, DefaultConfig(noEnv)); err != nil {
		t.Fatal(err)
	}
	if c := s.Config(); c.Proxy.TryTimeout != 3*time.Second || c.Proxy.MaxRetries != 3 {
		t.Errorf("try timeout %v (the flag's 3s wins) retries %d (the file's 3)", c.Proxy.TryTimeout, c.Proxy.MaxRetries)
	}
	write("retries = \n")
	err = s.ReloadArgs(args, DefaultConfig(noEnv))
	if err == nil || !strings.Contains(err.Error(), "attache.hcl:1,") {
		t.Fatalf("broken file: %v", err)
	}
	if c := s.Config(); c.Proxy.MaxRetries != 3 {
		t.Errorf("refused reload changed retries to %d", c.Proxy.MaxRetries)
	}
	var refused []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "reload refused") {
			refused = append(refused, l)
		}
	}
	if len(refused) != 1 || !strings.Contains(refused[0], "attache.hcl:1,") {
		t.Errorf("want one refusal line naming file and line, got %q", refused)
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
