package sidecar

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrintConfig: -print-config shows no secret, whichever way it came
// in, and what it prints reads back as the same configuration.
func TestPrintConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.hcl")
	if err := os.WriteFile(file, []byte("token = \"file-secret\"\nadmin_token = \"file-admin\"\nupstream = [\"users=127.0.0.1:9191\"]\nfallback \"inventory\" {\n  body = \"none\"\n}\nupstream \"db\" {\n  listen = \"127.0.0.1:5432/tcp\"\n  retries = -1\n  try_timeout = \"1s\"\n}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		secrets []string // must not appear
		want    []string // must appear
	}{
		{name: "token from the environment", env: map[string]string{"CONSUL_HTTP_TOKEN": "env-secret", "ATTACHE_ADMIN_TOKEN": "env-admin"},
			secrets: []string{"env-secret", "env-admin"}, want: []string{`token = "<redacted>"`, `admin_token = "<redacted>"`}},
		{name: "tokens from flags", args: []string{"-token", "flag-secret", "-admin-token", "flag-admin"},
			secrets: []string{"flag-secret", "flag-admin"}, want: []string{`token = "<redacted>"`}},
		{name: "tokens from the file", args: []string{"-config", file},
			secrets: []string{"file-secret", "file-admin"}, want: []string{`upstream = ["users=127.0.0.1:9191", "db=127.0.0.1:5432/tcp"]`, `fallback "inventory"`,
				`upstream "db" { try_timeout = "1s" retries = -1 }`}},
		{name: "password in a Consul address", args: []string{"-consul", "https://ops:hunter2@127.0.0.1:8501", "-consul", "127.0.0.2:8500"},
			secrets: []string{"hunter2"}, want: []string{`consul = ["https://ops:<redacted>@127.0.0.1:8501", "127.0.0.2:8500"]`}},
		{name: "no token: empty, not redacted", secrets: []string{"<redacted>"}, want: []string{`token = ""`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := func(k string) string { return tc.env[k] }
			cfg, err := ParseArgs(append(tc.args, "-print-config"), DefaultConfig(env), nil)
			if err != nil {
				t.Fatal(err)
			}
			if !cfg.PrintConfig {
				t.Fatal("-print-config not set")
			}
			out := string(cfg.HCL())
			flat := strings.Join(strings.Fields(out), " ")
			for _, s := range tc.secrets {
				if strings.Contains(out, s) {
					t.Errorf("printed %q:\n%s", s, out)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(flat, strings.Join(strings.Fields(w), " ")) {
					t.Errorf("missing %q in:\n%s", w, out)
				}
			}
			// What is printed is a config file giving the same settings
			// (the secrets aside).
			p := filepath.Join(t.TempDir(), "printed.hcl")
			if err := os.WriteFile(p, []byte(out), 0o644); err != nil {
				t.Fatal(err)
			}
			back, err := ParseArgs([]string{"-config", p}, DefaultConfig(env), nil)
			if err != nil {
				t.Fatalf("printed config does not read back: %v\n%s", err, out)
			}
			if again := string(back.HCL()); again != out {
				t.Errorf("read back prints differently:\n%s\nwant\n%s", again, out)
			}
		})
	}
}
