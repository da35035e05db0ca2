//go:build linux

package deploy

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"attache/internal/testcluster"
)

// TestUnitsUnderSystemd starts the units under a real systemd: PID 1 of a
// throwaway container whose /usr is this machine's (read-only) and whose
// /etc is a copy, with the pinned Consul and a fresh attache in /opt/bin. It
// checks what only systemd itself can show: attache-sidecar.service (as
// shipped, but for ExecStart's directory and the drop-in below) reaches
// "active" through READY=1 once the sidecar serves, under its user and
// sandbox; the watchdog (shortened to 4 s by a drop-in) restarts a stopped
// sidecar; SIGUSR2 upgrades it in place (a new main process, no restart);
// `systemctl stop` deregisters it; attache-control.service serves.
//
// Skipped, with one line, where no Docker engine answers or systemd does not
// boot in a container. The drop-in also sets PrivateUsers=no: a container
// nested in a container cannot set up user namespaces ("Failed to set up
// user namespacing"), which says nothing about a host.
func TestUnitsUnderSystemd(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: no systemd container")
	}
	if _, err := os.Stat("/usr/lib/systemd/systemd"); err != nil {
		t.Skip("no /usr/lib/systemd/systemd (Debian: systemd): units not run under systemd")
	}
	if err := exec.Command("docker", "info").Run(); err != nil {
		t.Skip("no Docker engine answers: units not run under systemd")
	}
	consul, err := testcluster.Binary()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	attache := filepath.Join(dir, "attache")
	build := exec.Command("go", "build", "-o", attache, "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	// The root file system: merged-/usr symlinks, empty directories, a copy
	// of /etc (without a machine id: systemd makes one).
	name := fmt.Sprintf("attache-systemd-test-%08x", rand.Uint32())
	var root bytes.Buffer
	tw := tar.NewWriter(&root)
	for _, l := range [][2]string{{"bin", "usr/bin"}, {"lib", "usr/lib"}, {"lib64", "usr/lib64"}, {"sbin", "usr/sbin"}} {
		tw.WriteHeader(&tar.Header{Name: l[0], Linkname: l[1], Typeflag: tar.TypeSymlink, Mode: 0o777})
	}
	for _, d := range []string{"usr", "var", "var/lib", "var/log", "var/tmp", "run", "tmp", "proc", "sys", "dev", "root", "opt", "opt/bin"} {
		tw.WriteHeader(&tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755})
	}
	tw.WriteHeader(&tar.Header{Name: "etc/machine-id", Typeflag: tar.TypeReg, Mode: 0o444})
	filepath.WalkDir("/etc", func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == "/etc/machine-id" {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return nil
		}
		if info.Mode()&fs.ModeSymlink != 0 {
			hdr.Linkname, _ = os.Readlink(p)
		}
		hdr.Name = strings.TrimPrefix(p, "/")
		if d.IsDir() {
			hdr.Name += "/"
		}
		var body []byte
		if info.Mode().IsRegular() {
			if body, err = os.ReadFile(p); err != nil {
				return nil
			}
		}
		tw.WriteHeader(hdr)
		tw.Write(body)
		return nil
	})
	tw.Close()
	imp := exec.Command("docker", "import", "-", name+":test")
	imp.Stdin = &root
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("docker import: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("docker", "rmi", "-f", name+":test").Run() })
	run := exec.Command("docker", "run", "-d", "--name", name, "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
		"-v", "/usr:/usr:ro", "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
		"-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-e", "container=docker",
		name+":test", "/usr/lib/systemd/systemd", "--unit=basic.target")
	if out, err := run.CombinedOutput(); err != nil {
		t.Skipf("systemd does not start in a container here (%v): units not run under systemd\n%s", err, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "exec", name, "journalctl", "--no-pager", "-n", "60",
				"-u", "consul-agent", "-u", "attache-sidecar", "-u", "attache-control").CombinedOutput()
			t.Logf("journal:\n%s", out)
		}
		exec.Command("docker", "rm", "-f", name).Run()
	})
	sh := func(script string) (string, error) {
		out, err := exec.Command("docker", "exec", name, "sh", "-c", script).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	must := func(script string) string {
		t.Helper()
		out, err := sh(script)
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
		return out
	}
	booted := false
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if out, _ := sh("systemctl is-active basic.target"); out == "active" {
			booted = true
			break
		}
	}
	if !booted {
		t.Skip("systemd did not reach basic.target in a container within 60s: units not run under systemd")
	}

	// Install as deploy/README.md says, with the binaries in /opt/bin.
	for _, f := range [][2]string{{attache, "/opt/bin/attache"}, {consul, "/opt/bin/consul"},
		{"systemd/attache.sysusers", "/etc/sysusers.d/attache.conf"},
		{"systemd/services.hcl", "/etc/attache/services.hcl"}} {
		must("mkdir -p " + filepath.Dir(f[1]))
		if out, err := exec.Command("docker", "cp", f[0], name+":"+f[1]).CombinedOutput(); err != nil {
			t.Fatalf("docker cp %s: %v\n%s", f[0], err, out)
		}
	}
	for _, u := range []string{"attache-sidecar", "attache-control", "consul-agent"} {
		b, err := os.ReadFile("systemd/" + u + ".service")
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, u+".service")
		os.WriteFile(p, bytes.ReplaceAll(b, []byte("/usr/local/bin/"), []byte("/opt/bin/")), 0o644)
		if out, err := exec.Command("docker", "cp", p, name+":/etc/systemd/system/").CombinedOutput(); err != nil {
			t.Fatalf("docker cp: %v\n%s", err, out)
		}
	}
	cfg, err := os.ReadFile("systemd/attache.hcl")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "attache.hcl"), bytes.ReplaceAll(cfg, []byte("10.0.0.21:19001"), []byte("127.0.0.1:19001")), 0o644)
	exec.Command("docker", "cp", filepath.Join(dir, "attache.hcl"), name+":/etc/attache/attache.hcl").Run()
	must(`echo 'u consul - "Consul agent" /var/lib/consul' > /etc/sysusers.d/consul.conf && systemd-sysusers
mkdir -p /etc/consul.d && cat > /etc/consul.d/consul.hcl <<'HCL'
datacenter = "dc1"
data_dir = "/var/lib/consul"
node_name = "node1"
server = true
bootstrap_expect = 1
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
retry_join = ["127.0.0.1"]
disable_update_check = true
ports {
  grpc = -1
}
HCL
chgrp consul /etc/consul.d/consul.hcl && chmod 640 /etc/consul.d/consul.hcl
for u in attache-sidecar attache-control; do
  mkdir -p /etc/systemd/system/$u.service.d
  printf '[Service]\nPrivateUsers=no\n' > /etc/systemd/system/$u.service.d/test.conf
done
printf 'WatchdogSec=4s\n' >> /etc/systemd/system/attache-sidecar.service.d/test.conf
systemctl daemon-reload`)

	must("timeout 150 systemctl start consul-agent")
	// Type=notify: start returns once READY=1 came, and /readyz agrees.
	must("timeout 150 systemctl start attache-sidecar")
	if out := must("systemctl is-active attache-sidecar; curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:19001/readyz"); out != "active\n200" {
		t.Fatalf("after start: %q, want active and /readyz 200", out)
	}
	if out := must("ps -o user= -p $(systemctl show -p MainPID --value attache-sidecar)"); out != "attache" {
		t.Errorf("sidecar runs as %q, want attache", out)
	}
	if out := must("dig @127.0.0.1 -p 8653 +short attache.service.consul"); out != "127.0.0.1" {
		t.Errorf("DNS through the sidecar: %q", out)
	}

	// Watchdog: a stopped (SIGSTOP) sidecar misses its pings; systemd kills it
	// and Restart=on-failure brings it back, ready again.
	pid := must("systemctl show -p MainPID --value attache-sidecar")
	must("kill -STOP " + pid)
	restarted := false
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		out, _ := sh("systemctl show -p MainPID --value attache-sidecar; systemctl is-active attache-sidecar")
		if f := strings.Fields(out); len(f) == 2 && f[0] != pid && f[0] != "0" && f[1] == "active" {
			restarted = true
			break
		}
	}
	if !restarted {
		t.Fatal("the watchdog did not restart a stopped sidecar within 60s")
	}
	if out := must("journalctl -u attache-sidecar --no-pager"); !strings.Contains(out, "Watchdog timeout") {
		t.Errorf("no watchdog timeout in the journal")
	}

	// Upgrade in place: SIGUSR2 to the main process starts a successor (the
	// binary at the same path), which takes the sockets; the old one names
	// it the main process (MAINPID=) and exits. The unit stays active, is
	// not restarted, and the watchdog (4 s) follows the new process.
	pid = must("systemctl show -p MainPID --value attache-sidecar")
	restarts := must("systemctl show -p NRestarts --value attache-sidecar")
	must("kill -USR2 " + pid)
	upgraded := ""
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		out, _ := sh("systemctl show -p MainPID --value attache-sidecar; systemctl is-active attache-sidecar; kill -0 " + pid + " 2>/dev/null && echo old-alive || echo old-gone")
		if f := strings.Fields(out); len(f) == 3 && f[0] != pid && f[0] != "0" && f[1] == "active" && f[2] == "old-gone" {
			upgraded = f[0]
			break
		}
	}
	if upgraded == "" {
		out, _ := sh("systemctl status attache-sidecar --no-pager; journalctl -u attache-sidecar --no-pager | tail -30")
		t.Fatalf("SIGUSR2 did not hand the unit over to a new main process within 60s:\n%s", out)
	}
	time.Sleep(10 * time.Second) // two and a half watchdog timeouts
	if out := must("systemctl show -p MainPID --value attache-sidecar; systemctl is-active attache-sidecar; systemctl show -p NRestarts --value attache-sidecar; curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:19001/readyz"); out != upgraded+"\nactive\n"+restarts+"\n200" {
		t.Errorf("10s after the upgrade: %q, want MainPID %s, active, %s restarts, /readyz 200", out, upgraded, restarts)
	}
	if out := must("dig @127.0.0.1 -p 8653 +short attache.service.consul"); out != "127.0.0.1" {
		t.Errorf("DNS through the upgraded sidecar: %q", out)
	}
	// systemd took the successor as an adopted ("alien") main process; on
	// the legacy cgroup hierarchy inside a container (here) it would not
	// wait for such a process to stop, and SIGKILLs it at once.
	// daemon-reload re-reads the main PID, now systemd's own child.
	must("systemctl daemon-reload")

	// Stop: it deregisters from the agent.
	must("systemctl stop attache-sidecar")
	if out := must("curl -s 127.0.0.1:8500/v1/agent/services"); strings.Contains(out, `"attache"`) {
		t.Errorf("attache still registered after systemctl stop: %s", out)
	}

	must("timeout 60 systemctl start attache-control")
	if out := must("sleep 1; curl -s 127.0.0.1:9500/healthz"); out != "ok" {
		t.Errorf("control /healthz: %q", out)
	}
}
