package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"attache/control"
	"attache/internal/testcluster"
)

func TestRunExitCodes(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		code    int
		wantOut string
	}{
		{"no command", nil, 2, "Usage: attache COMMAND"},
		{"unknown command", []string{"frob"}, 2, `unknown command "frob"`},
		{"version", []string{"version"}, 0, "attache "},
		{"help", []string{"-h"}, 0, "Commands:"},
		{"sidecar help", []string{"sidecar", "-h"}, 0, "-upstream"},
		{"sidecar flag without value", []string{"sidecar", "-dns"}, 2, "flag needs an argument: -dns"},
		{"sidecar bad address", []string{"sidecar", "-admin", "nowhere"}, 2, `-admin "nowhere": want HOST:PORT`},
		{"sidecar missing config", []string{"sidecar", "-config", "/nonexistent/attache.hcl"}, 2, "no such file"},
		{"sidecar missing service file", []string{"sidecar", "-service", "/nonexistent/svc.hcl"}, 2, "service file"},
		{"sidecar print-config redacts", []string{"sidecar", "-print-config", "-token", "s3cret", "-upstream", "users=127.0.0.1:9191"}, 0, `"<redacted>"`},
		{"control bad flag", []string{"control", "-listen"}, 2, "flag needs an argument"},
		{"control address in use", []string{"control", "-listen", "256.0.0.1:1", "-api-token", "x"}, 1, "control: listen on 256.0.0.1:1"},
		{"control off loopback without token", []string{"control", "-listen", "0.0.0.0:9500"}, 2, "needs an API token"},
		{"control keeps nothing", []string{"control", "-keep", "0"}, 2, "keep at least 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			code := run(tt.args, &out, &out)
			if code != tt.code || !strings.Contains(out.String(), tt.wantOut) {
				t.Fatalf("run(%q) = %d, output:\n%s\nwant %d and %q", tt.args, code, out.String(), tt.code, tt.wantOut)
			}
		})
	}
}

// TestRoutesCLI runs `attache routes` against a control service over a real
// Consul cluster: outputs and exit codes (0 success, 1 refused, 2 usage).
func TestRoutesCLI(t *testing.T) {
	dir := t.TempDir()
	write := func(name, src string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	seed := write("routes.hcl", "route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n}\n")
	changed := write("changed.hcl", "route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users-v2\"\n}\n")
	broken := write("broken.hcl", "route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n  colour  = \"red\"\n}\n")

	// Offline first: validate needs no control service.
	offline := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"validate", []string{"routes", "validate", "-f", seed}, 0, "valid, 1 routes"},
		{"validate the example", []string{"routes", "validate", "-f", "deploy/routes.hcl"}, 0, "valid, 2 routes"},
		{"validate broken", []string{"routes", "validate", "-f", broken}, 1, "broken.hcl:4,3: Unsupported argument"},
		{"validate missing file", []string{"routes", "validate", "-f", filepath.Join(dir, "none.hcl")}, 1, "no such file"},
		{"validate without -f", []string{"routes", "validate"}, 2, "-f FILE is required"},
		{"no subcommand", []string{"routes"}, 2, "Subcommands:"},
		{"unknown subcommand", []string{"routes", "frob"}, 2, `unknown subcommand "frob"`},
		{"bad flag", []string{"routes", "get", "-version", "x"}, 2, "invalid value"},
		{"extra argument", []string{"routes", "history", "now"}, 2, `unexpected argument "now"`},
		{"rollback without version", []string{"routes", "rollback"}, 2, "-version N is required"},
		{"apply broken refused before sending", []string{"routes", "apply", "-f", broken, "-control", "http://127.0.0.1:1"}, 1, "broken.hcl:4,3"},
		{"control unreachable", []string{"routes", "history", "-control", "http://127.0.0.1:1"}, 1, "is the control service running"},
	}
	for _, tt := range offline {
		t.Run(tt.name, func(t *testing.T) { runCLI(t, tt.args, tt.code, tt.want) })
	}

	c := testcluster.Start(t, testcluster.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := control.DefaultConfig()
	cfg.Addr, cfg.Consul, cfg.APIToken = ln.Addr().String(), c.Servers[0].HTTPAddr, "tok"
	srv, err := control.New(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	url := "http://" + cfg.Addr
	t.Setenv("ATTACHE_CONTROL", url)
	t.Setenv("ATTACHE_CONTROL_TOKEN", "tok")

	online := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"history empty", []string{"routes", "history"}, 0, "no versions yet"},
		{"get nothing", []string{"routes", "get"}, 1, "nothing has been applied yet"},
		{"diff against nothing", []string{"routes", "diff", "-f", seed}, 0, "+ route \"users\" (added)"},
		{"apply", []string{"routes", "apply", "-f", seed}, 0, "applied: version 1 is current"},
		{"apply again", []string{"routes", "apply", "-f", seed}, 0, "unchanged: the document equals the current version 1"},
		{"diff unchanged", []string{"routes", "diff", "-f", seed}, 0, "no change"},
		{"diff changed", []string{"routes", "diff", "-f", changed}, 0, "    - service = \"users\"\n    + service = \"users-v2\""},
		{"apply with a stale expect", []string{"routes", "apply", "-f", changed, "-expect", "0"}, 1, "conflict"},
		{"apply changed", []string{"routes", "apply", "-f", changed, "-expect", "1"}, 0, "applied: version 2 is current (was 1)"},
		{"get", []string{"routes", "get"}, 0, "# version 2, apply"},
		{"get version", []string{"routes", "get", "-version", "1"}, 0, "service = \"users\"\n"},
		{"get missing version", []string{"routes", "get", "-version", "9"}, 1, "no such version"},
		{"rollback", []string{"routes", "rollback", "-version", "1"}, 0, "applied: version 3 is current (was 2)"},
		{"history", []string{"routes", "history"}, 0, "rollback to 1  current\n"},
		{"status", []string{"routes", "status"}, 0, "current version: 3\nno gateway has reported a version"},
		{"wrong token", []string{"routes", "status", "-api-token", "nope"}, 1, "bearer token is required"},
	}
	for _, tt := range online {
		t.Run(tt.name, func(t *testing.T) { runCLI(t, tt.args, tt.code, tt.want) })
	}
}

func runCLI(t *testing.T, args []string, code int, want string) {
	t.Helper()
	var out strings.Builder
	got := run(args, &out, &out)
	if got != code || !strings.Contains(out.String(), want) {
		t.Fatalf("attache %s = %d, output:\n%s\nwant %d and %q", strings.Join(args, " "), got, out.String(), code, want)
	}
}
