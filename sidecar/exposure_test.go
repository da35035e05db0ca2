package sidecar

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"attache/sidecar/proxy"
)

func TestLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:19001": true, "127.0.0.21:8653": true, "[::1]:15001": true, "localhost:9191": true,
		"0.0.0.0:19001": false, ":19001": false, "[::]:8653": false, "10.0.0.21:19001": false,
		"node1.example:19001": false, "nowhere": false,
	} {
		if got := loopback(addr); got != want {
			t.Errorf("loopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

// TestAdminOffLoopbackNeedsToken: the configuration refuses an admin API
// off loopback without a token, and takes it with one (flag, file or env).
func TestAdminOffLoopbackNeedsToken(t *testing.T) {
	_, err := ParseArgs([]string{"-admin", "10.0.0.21:19001"}, DefaultConfig(noEnv), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-admin-token") {
		t.Fatalf("admin off loopback without a token: %v", err)
	}
	if _, err := ParseArgs([]string{"-admin", ":19001"}, DefaultConfig(noEnv), io.Discard); err == nil {
		t.Fatal("admin on every address without a token was accepted")
	}
	cfg, err := ParseArgs([]string{"-admin", "10.0.0.21:19001", "-admin-token", "s3cret"}, DefaultConfig(noEnv), io.Discard)
	if err != nil || cfg.AdminToken != "s3cret" {
		t.Fatalf("with -admin-token: %v %q", err, cfg.AdminToken)
	}
	env := func(k string) string { return map[string]string{"ATTACHE_ADMIN_TOKEN": "from-env"}[k] }
	if cfg, err := ParseArgs([]string{"-admin", "10.0.0.21:19001"}, DefaultConfig(env), io.Discard); err != nil || cfg.AdminToken != "from-env" {
		t.Fatalf("with $ATTACHE_ADMIN_TOKEN: %v %q", err, cfg.AdminToken)
	}
	if _, err := ParseArgs(nil, DefaultConfig(noEnv), io.Discard); err != nil {
		t.Fatalf("the defaults (loopback, no token): %v", err)
	}
}

// TestAdminAuth: with a token, /healthz and /readyz answer without it and
// everything else needs it.
func TestAdminAuth(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) })
	h := adminAuth("s3cret", ok)
	for _, tc := range []struct {
		path, auth string
		want       int
	}{
		{"/healthz", "", 200},
		{"/readyz", "", 200},
		{"/metrics", "", 401},
		{"/v1/snapshot", "Bearer wrong", 401},
		{"/v1/breakers", "s3cret", 401},
		{"/v1/snapshot", "Bearer s3cret", 200},
		{"/", "Bearer s3cret", 200},
	} {
		r := httptest.NewRequest("GET", tc.path, nil)
		if tc.auth != "" {
			r.Header.Set("Authorization", tc.auth)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != tc.want {
			t.Errorf("%s with %q: %d, want %d", tc.path, tc.auth, w.Code, tc.want)
		}
		if strings.Contains(w.Body.String(), "s3cret") {
			t.Errorf("%s: the answer holds the token", tc.path)
		}
	}
	if adminAuth("", ok) == nil {
		t.Fatal("no token: nil handler")
	}
}

// TestWarnExposed: each listener off loopback is named once, with what
// anyone reaching it can do; loopback ones are not.
func TestWarnExposed(t *testing.T) {
	var buf bytes.Buffer
	cfg := Config{Admin: "10.0.0.21:19001", AdminToken: "s3cret"}
	cfg.DNS.Addr, cfg.Proxy.HTTPProxyAddr = "127.0.0.1:8653", "0.0.0.0:15001"
	cfg.Proxy.Upstreams = []proxy.Upstream{{Name: "users", Addr: "127.0.0.1:9191"}, {Name: "db", Addr: "[::]:9300", Protocol: proxy.ProtoTCP}}
	s := &Sidecar{cfg: cfg}
	s.warnExposed(hclog.New(&hclog.LoggerOptions{Output: &buf}))
	out := buf.String()
	for _, want := range []string{"listener=http-proxy addr=0.0.0.0:15001", "relay requests into the mesh",
		`listener="upstream db" addr=[::]:9300`, "listener=admin addr=10.0.0.21:19001"} {
		if strings.Count(out, want) != 1 {
			t.Errorf("want %q once in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "upstream users") || strings.Contains(out, "listener=dns") || strings.Contains(out, "s3cret") {
		t.Errorf("warned about a loopback listener, or showed the token:\n%s", out)
	}
}
