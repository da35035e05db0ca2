// Package nomad holds no code: its tests check the Nomad job files beside
// them with the pinned Nomad (v1.6.1, scripts/nomad; `scripts/build nomad`
// builds it into .bin/nomad), and run them on a real dev agent.
package nomad

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	miekg "github.com/miekg/dns"

	"attache/control"
	"attache/internal/testcluster"
)

// nomadBinary returns .bin/nomad, or skips the test when it is missing.
func nomadBinary(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs("../.bin/nomad")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Skip("no .bin/nomad (scripts/build nomad builds the pinned Nomad): job files not checked")
	}
	return p
}

// TestJobsValidate: every job file is `nomad fmt` formatted, and `nomad job
// validate` passes on it with its defaults and with the artifact, token and
// driver variables that switch on its dynamic blocks.
func TestJobsValidate(t *testing.T) {
	nomad := nomadBinary(t)
	files, _ := filepath.Glob("*.nomad.hcl")
	if len(files) != 4 {
		t.Fatalf("job files: %v, want attache, attache-docker, control, gateway", files)
	}
	if out, err := exec.Command(nomad, "fmt", "-check", ".").CombinedOutput(); err != nil {
		t.Errorf("nomad fmt -check: %v (run .bin/nomad fmt nomad/)\n%s", err, out)
	}
	artifact := []string{"-var", "attache_artifact=https://releases.invalid/attache.tar.gz", "-var", "attache_artifact_checksum=sha256:" + strings.Repeat("0", 64)}
	for _, tc := range []struct {
		file string
		vars []string
	}{
		{"attache.nomad.hcl", nil},
		{"attache.nomad.hcl", append([]string{"-var", "driver=exec", "-var", `service_files=["/etc/attache/services.hcl"]`}, artifact...)},
		{"attache-docker.nomad.hcl", nil},
		{"control.nomad.hcl", nil},
		{"control.nomad.hcl", append([]string{"-var", "token_from_nomad_var=false"}, artifact...)},
		{"gateway.nomad.hcl", nil},
		{"gateway.nomad.hcl", append([]string{"-var", "tls_from_nomad_var=true"}, artifact...)},
	} {
		args := append(append([]string{"job", "validate"}, tc.vars...), tc.file)
		cmd := exec.Command(nomad, args...)
		// No agent: validate locally (an address nothing listens on).
		cmd.Env = append(os.Environ(), "NOMAD_ADDR=http://127.0.0.1:1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Job validation successful") {
			t.Errorf("nomad %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// agent is a `nomad agent -dev` process.
type agent struct {
	addr string // http://ip:4646
	cmd  *exec.Cmd
	done chan struct{}
	log  string
	tmp  string // its TMPDIR: the NomadClient*/NomadServer* folders it makes
}

// startAgent starts a dev agent (server and client in one) on a random
// loopback address, with raw_exec enabled and Consul at consulAddr. Its
// temporary folders go to a directory of the test's, removed with it.
func startAgent(t *testing.T, nomad, consulAddr string) *agent {
	t.Helper()
	dir := t.TempDir()
	ip := freeIP(t)
	cfg := filepath.Join(dir, "agent.hcl")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
log_level = "INFO"
disable_update_check = true
plugin "raw_exec" {
  config {
    enabled = true
  }
}
consul {
  address = %q
}
`, consulAddr)), 0o644)
	a := &agent{addr: "http://" + ip + ":4646", done: make(chan struct{}), log: filepath.Join(dir, "nomad.log"), tmp: filepath.Join(dir, "tmp")}
	os.MkdirAll(a.tmp, 0o755)
	logf, err := os.Create(a.log)
	if err != nil {
		t.Fatal(err)
	}
	a.cmd = exec.Command(nomad, "agent", "-dev", "-bind", ip, "-config", cfg)
	a.cmd.Env = append(os.Environ(), "TMPDIR="+a.tmp)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); logf.Close(); close(a.done) }()
	t.Cleanup(func() {
		a.stop(t)
		if t.Failed() {
			b, _ := os.ReadFile(a.log)
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("nomad agent log (tail):\n%s", b)
		}
	})
	return a
}

// stop sends SIGINT (Nomad's graceful stop), waits up to 30 s, then kills it
// and whatever task processes it left running from its folders.
func (a *agent) stop(t *testing.T) {
	select {
	case <-a.done:
		return
	default:
	}
	a.cmd.Process.Signal(os.Interrupt)
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		t.Errorf("nomad agent did not stop within 30s of SIGINT: killed")
		a.cmd.Process.Kill()
		<-a.done
	}
	// Task processes (raw_exec) run from the agent's folders: none may
	// outlive it. Found by their command line, which names those folders.
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(a.tmp)) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		t.Errorf("process %d (%s) outlived the nomad agent: killed", pid, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// freeIP picks a random 127.x.y.z on which Nomad's ports are free.
func freeIP(t *testing.T) string {
	t.Helper()
	for range 100 {
		ip := fmt.Sprintf("127.%d.%d.%d", 64+rand.IntN(64), rand.IntN(256), 1+rand.IntN(254))
		free := true
		for _, p := range []string{"4646", "4647", "4648"} {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, p))
			if err != nil {
				free = false
				break
			}
			l.Close()
		}
		if free {
			return ip
		}
	}
	t.Fatal("no free loopback address for Nomad")
	return ""
}

// freePort returns a port nothing listens on now at 127.0.0.1 (TCP and UDP),
// the address a dev agent's client gives its allocations.
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

func (a *agent) get(path string, out any) error {
	resp, err := http.Get(a.addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %s %s", path, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// run runs the nomad CLI against the agent.
func (a *agent) run(t *testing.T, nomad string, args ...string) string {
	t.Helper()
	cmd := exec.Command(nomad, args...)
	cmd.Env = append(os.Environ(), "NOMAD_ADDR="+a.addr)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nomad %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

type alloc struct {
	ID           string
	ClientStatus string
	TaskStates   map[string]struct {
		State  string
		Failed bool
		Events []struct{ Type, DisplayMessage string }
	}
}

func eventually(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// running: job's allocations, one running and none failed.
func (a *agent) running(job string) error {
	var allocs []alloc
	if err := a.get("/v1/job/"+job+"/allocations", &allocs); err != nil {
		return err
	}
	for _, al := range allocs {
		if al.ClientStatus == "running" {
			return nil
		}
		if al.ClientStatus == "failed" {
			return fmt.Errorf("allocation %s failed: %+v", al.ID, al.TaskStates)
		}
	}
	return fmt.Errorf("no running allocation of %s yet: %+v", job, allocs)
}

// artifactServer serves a .tar.gz holding the attache binary built from this
// repository, as a release would, and returns its URL and sha256.
func artifactServer(t *testing.T) (string, string) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "attache")
	build := exec.Command("go", "build", "-o", bin, "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	tw.WriteHeader(&tar.Header{Name: "attache", Mode: 0o755, Size: int64(len(b)), ModTime: time.Now()})
	tw.Write(b)
	tw.Close()
	gz.Close()
	tgz := buf.Bytes()
	sum := sha256.Sum256(tgz)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/attache_linux_amd64.tar.gz" {
			http.NotFound(w, r)
			return
		}
		w.Write(tgz)
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/attache_linux_amd64.tar.gz", "sha256:" + hex.EncodeToString(sum[:])
}

// TestJobsOnDevAgent runs nomad/attache.nomad.hcl (system job, raw_exec, the
// binary as an artifact fetched over HTTP and checked by its sha256) and
// nomad/control.nomad.hcl on a Nomad dev agent pointed at a real Consul
// cluster's client agent, and checks: the allocations run; the sidecar
// registers itself with Consul under the node name Nomad fingerprinted; its
// DNS answers, including for the control service Nomad registered in
// Consul; the control service answers and stores a route document; stopping
// the jobs deregisters the sidecar; the agent stops on SIGINT leaving no
// task process behind. Then, where the dev agent has the docker driver and
// the image attache:dev exists, the same for attache-docker.nomad.hcl.
func TestJobsOnDevAgent(t *testing.T) {
	nomad := nomadBinary(t)
	if testing.Short() {
		t.Skip("-short: no Nomad agent")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	consul := c.Clients[0]
	artifact, sum := artifactServer(t)
	a := startAgent(t, nomad, consul.HTTPAddr)

	// The node is ready and has fingerprinted Consul.
	eventually(t, "the dev agent's node, ready, with Consul", 90*time.Second, func() error {
		var nodes []struct{ ID, Status string }
		if err := a.get("/v1/nodes", &nodes); err != nil {
			return err
		}
		if len(nodes) != 1 || nodes[0].Status != "ready" {
			return fmt.Errorf("nodes: %+v", nodes)
		}
		var node struct{ Attributes map[string]string }
		if err := a.get("/v1/node/"+nodes[0].ID, &node); err != nil {
			return err
		}
		if node.Attributes["consul.version"] == "" || node.Attributes["driver.raw_exec"] != "1" {
			return fmt.Errorf("consul.version %q, driver.raw_exec %q", node.Attributes["consul.version"], node.Attributes["driver.raw_exec"])
		}
		return nil
	})

	dnsPort, adminPort, controlPort := freePort(t), freePort(t), freePort(t)
	a.run(t, nomad, "job", "run", "-detach",
		"-var", "attache_artifact="+artifact, "-var", "attache_artifact_checksum="+sum,
		"-var", "consul_addr="+consul.HTTPAddr,
		"-var", "dns_port="+strconv.Itoa(dnsPort), "-var", "admin_port="+strconv.Itoa(adminPort),
		"attache.nomad.hcl")
	a.run(t, nomad, "job", "run", "-detach",
		"-var", "attache_artifact="+artifact, "-var", "attache_artifact_checksum="+sum,
		"-var", "consul_addr="+consul.HTTPAddr, "-var", "port="+strconv.Itoa(controlPort),
		"-var", "token_from_nomad_var=false",
		"control.nomad.hcl")
	eventually(t, "the attache allocation running", 90*time.Second, func() error { return a.running("attache") })
	eventually(t, "the attache-control allocation running", 90*time.Second, func() error { return a.running("attache-control") })

	// The sidecar registered itself with the node's agent, passing its check,
	// under the agent's node name (attr.unique.consul.name).
	capi := consul.API(t)
	eventually(t, "service attache registered and passing", 60*time.Second, func() error {
		entries, _, err := capi.Health().Service("attache", "", true, nil)
		if err != nil {
			return err
		}
		if len(entries) != 1 || entries[0].Node.Node != consul.Name || entries[0].Service.Port != adminPort {
			return fmt.Errorf("passing attache instances: %d", len(entries))
		}
		return nil
	})

	// DNS through the sidecar: its own entry, and the control service that
	// Nomad registered in Consul (its service block), by SRV with its port.
	dnsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(dnsPort))
	query := func(name string, qtype uint16) (*miekg.Msg, error) {
		m := new(miekg.Msg)
		m.SetQuestion(name, qtype)
		in, err := miekg.Exchange(m, dnsAddr)
		if err != nil {
			return nil, err
		}
		if len(in.Answer) == 0 {
			return nil, fmt.Errorf("%s: no answer (rcode %d)", name, in.Rcode)
		}
		return in, nil
	}
	eventually(t, "attache.service.consul through the sidecar's DNS", 30*time.Second, func() error {
		_, err := query("attache.service.consul.", miekg.TypeA)
		return err
	})
	eventually(t, "attache-control.service.consul SRV through the sidecar's DNS", 60*time.Second, func() error {
		in, err := query("attache-control.service.consul.", miekg.TypeSRV)
		if err != nil {
			return err
		}
		if srv, ok := in.Answer[0].(*miekg.SRV); !ok || int(srv.Port) != controlPort {
			return fmt.Errorf("SRV answer %v, want port %d", in.Answer[0], controlPort)
		}
		return nil
	})

	// The control service answers and stores a route document in Consul.
	ctl := control.NewClient("http://"+net.JoinHostPort("127.0.0.1", strconv.Itoa(controlPort)), "")
	doc, err := os.ReadFile("../deploy/routes.hcl")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := ctl.Apply(ctx, "routes.hcl", doc, nil)
	if err != nil || !res.Changed || res.Version != 1 {
		t.Fatalf("apply through the control job: %+v %v", res, err)
	}
	if h, err := ctl.History(ctx); err != nil || h.Current != 1 {
		t.Fatalf("history through the control job: %+v %v", h, err)
	}

	// Stopping the jobs stops the tasks: the sidecar deregisters itself.
	a.run(t, nomad, "job", "stop", "-detach", "-purge", "attache")
	a.run(t, nomad, "job", "stop", "-detach", "-purge", "attache-control")
	eventually(t, "attache deregistered after the job stopped", 60*time.Second, func() error {
		svcs, err := capi.Agent().Services()
		if err != nil {
			return err
		}
		if _, ok := svcs["attache"]; ok {
			return fmt.Errorf("still registered")
		}
		return nil
	})

	// The Docker variant, over the local image, where the node has Docker
	// and the image (scripts/images builds attache:dev).
	var node struct{ Attributes map[string]string }
	var nodes []struct{ ID string }
	if err := a.get("/v1/nodes", &nodes); err != nil || len(nodes) != 1 {
		t.Fatalf("nodes: %v %v", nodes, err)
	}
	if err := a.get("/v1/node/"+nodes[0].ID, &node); err != nil {
		t.Fatal(err)
	}
	if node.Attributes["driver.docker"] != "1" {
		t.Logf("attache-docker.nomad.hcl not run: the dev agent has no docker driver")
	} else if err := exec.Command("docker", "image", "inspect", "attache:dev").Run(); err != nil {
		t.Logf("attache-docker.nomad.hcl not run: no image attache:dev (scripts/images builds it)")
	} else {
		start := time.Now()
		dnsPort, adminPort := freePort(t), freePort(t)
		a.run(t, nomad, "job", "run", "-detach",
			"-var", "consul_addr="+consul.HTTPAddr,
			"-var", "dns_port="+strconv.Itoa(dnsPort), "-var", "admin_port="+strconv.Itoa(adminPort),
			"attache-docker.nomad.hcl")
		eventually(t, "the attache (docker) allocation running", 90*time.Second, func() error { return a.running("attache") })
		eventually(t, "service attache (docker) registered and passing", 60*time.Second, func() error {
			entries, _, err := capi.Health().Service("attache", "", true, nil)
			if err != nil {
				return err
			}
			if len(entries) != 1 || entries[0].Service.Port != adminPort {
				return fmt.Errorf("passing attache instances: %d", len(entries))
			}
			return nil
		})
		dnsAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(dnsPort))
		eventually(t, "attache.service.consul through the docker sidecar's DNS", 30*time.Second, func() error {
			_, err := query("attache.service.consul.", miekg.TypeA)
			return err
		})
		a.run(t, nomad, "job", "stop", "-detach", "-purge", "attache")
		eventually(t, "attache (docker) deregistered after the job stopped", 60*time.Second, func() error {
			svcs, err := capi.Agent().Services()
			if err != nil {
				return err
			}
			if _, ok := svcs["attache"]; ok {
				return fmt.Errorf("still registered")
			}
			return nil
		})
		t.Logf("attache-docker.nomad.hcl: ran, registered, answered and stopped in %v", time.Since(start).Round(100*time.Millisecond))
	}
	a.stop(t)
}
