// Package deploy holds no code: its tests check the deployment files beside
// them (the systemd units under systemd/).
package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"attache/internal/testcluster"
)

// TestSystemdUnits runs `systemd-analyze verify` on every unit (and on the
// sidecar with its port-53 drop-in) and requires silence: verify exits 0 on
// unknown keys and bad values, printing a warning. The units are copied with
// ExecStart pointing at real binaries (verify insists that they exist): a
// fresh build of attache, and the pinned Consul. The attache units must also
// rate 2.0 or better ("OK") in `systemd-analyze security --offline`.
func TestSystemdUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian: systemd): units not verified")
	}
	consul, err := testcluster.Binary()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	attache := filepath.Join(dir, "attache")
	if out, err := exec.Command("go", "build", "-o", attache, "..").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	units, err := filepath.Glob("systemd/*.service")
	if err != nil || len(units) != 3 {
		t.Fatalf("units: %v %v, want attache-sidecar, attache-control, consul-agent", units, err)
	}
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		s := strings.NewReplacer("/usr/local/bin/attache", attache, "/usr/local/bin/consul", consul).Replace(string(b))
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(u)), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verify := func(t *testing.T, unit string) {
		out, err := exec.Command(analyze, "verify", filepath.Join(dir, unit)).CombinedOutput()
		if err != nil || len(out) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
		}
	}
	for _, u := range units {
		unit := filepath.Base(u)
		t.Run(unit, func(t *testing.T) {
			verify(t, unit)
			if !strings.HasPrefix(unit, "attache-") {
				return
			}
			out, err := exec.Command(analyze, "security", "--offline=true", filepath.Join(dir, unit)).CombinedOutput()
			m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindSubmatch(out)
			if err != nil || m == nil {
				t.Fatalf("systemd-analyze security: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), "✓ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)") {
				t.Errorf("%s may bind privileged ports without the drop-in:\n%s", unit, out)
			}
			if level, _ := strconv.ParseFloat(string(m[1]), 64); level > 2.0 {
				t.Errorf("exposure level %.1f, want 2.0 or better:\n%s", level, out)
			}
		})
	}
	t.Run("attache-sidecar.service+port-53.conf", func(t *testing.T) {
		b, err := os.ReadFile("systemd/port-53.conf")
		if err != nil {
			t.Fatal(err)
		}
		d := filepath.Join(dir, "attache-sidecar.service.d")
		os.MkdirAll(d, 0o755)
		if err := os.WriteFile(filepath.Join(d, "port-53.conf"), b, 0o644); err != nil {
			t.Fatal(err)
		}
		verify(t, "attache-sidecar.service")
		// Only the bind capability is granted: the unit without the drop-in
		// passes this line of the report, with it fails it.
		out, _ := exec.Command(analyze, "security", "--offline=true", filepath.Join(dir, "attache-sidecar.service")).CombinedOutput()
		if !strings.Contains(string(out), "✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)") {
			t.Errorf("the drop-in grants no CAP_NET_BIND_SERVICE:\n%s", out)
		}
		if strings.Count(string(out), "✗ CapabilityBoundingSet=") != 1 {
			t.Errorf("the drop-in grants more than CAP_NET_BIND_SERVICE:\n%s", out)
		}
	})
}

// TestSysusers: systemd-sysusers makes the user and group the attache units
// run as from attache.sysusers, into an empty root.
func TestSysusers(t *testing.T) {
	sysusers, err := exec.LookPath("systemd-sysusers")
	if err != nil {
		t.Skip("systemd-sysusers not installed (Debian: systemd): attache.sysusers not checked")
	}
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	conf, _ := filepath.Abs("systemd/attache.sysusers")
	if out, err := exec.Command(sysusers, "--root="+root, conf).CombinedOutput(); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	passwd, _ := os.ReadFile(filepath.Join(root, "etc/passwd"))
	group, _ := os.ReadFile(filepath.Join(root, "etc/group"))
	if !regexp.MustCompile(`(?m)^attache:x:\d+:\d+:[^:]*:/var/lib/attache:\S*nologin$`).Match(passwd) ||
		!regexp.MustCompile(`(?m)^attache:x:\d+:`).Match(group) {
		t.Errorf("no system user and group attache:\n%s\n%s", passwd, group)
	}
}
