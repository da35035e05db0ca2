package main

import (
	"strings"
	"testing"
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
		{"control bad flag", []string{"control", "-listen"}, 2, "flag needs an argument"},
		{"control address in use", []string{"control", "-listen", "256.0.0.1:1"}, 1, "control: listen on 256.0.0.1:1"},
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
