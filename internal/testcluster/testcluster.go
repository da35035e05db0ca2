// Package testcluster starts throwaway Consul clusters for integration tests:
// three servers (Raft, one leader) and, when asked, client agents, each on its
// own random 127.x.y.z address with Consul's default ports, so that test
// packages running in parallel never fight over a port. It runs the real
// pinned Consul binary that scripts/consul builds into .bin/consul.
package testcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Options says what to start.
type Options struct {
	Servers     int    // default 3
	Clients     int    // client agents, default 0
	Dir         string // where agents keep data, config and logs; New makes one under the temp dir when empty (Close removes it)
	ExtraConfig string // HCL appended to every agent's configuration (limits, log_level...)
	Binary      string // the Consul binary; default Binary()
	// ACL runs the cluster as production clusters run: ACLs enabled with
	// default_policy "deny", bootstrapped (Cluster.ManagementToken) and an
	// agent token set on every agent (a node identity of its own name).
	// Cluster.Token makes tokens with exactly the rules a test gives.
	ACL bool
	// TLS serves the HTTP API over HTTPS only (:8501, plain HTTP off) with
	// certificates from a CA the cluster makes, and verify_incoming: clients
	// present the client certificate of Cluster.TLS.
	TLS bool
	// IPs, when set, are the addresses of the servers and then of the
	// clients (Servers+Clients of them) instead of random free loopback
	// ones: with a Net, its host addresses and its namespaces' addresses.
	IPs []string
	// NetNS runs client i in network namespace NetNS[i] when that is not
	// nil (IPs must then give client i that namespace's address).
	NetNS []*NetNS
}

// Cluster is a running set of Consul agents.
type Cluster struct {
	Servers    []*Agent
	Clients    []*Agent
	Datacenter string
	Dir        string // data, config and logs of the agents
	// ManagementToken is the bootstrap token (with Options.ACL; else empty).
	ManagementToken string
	// TLS holds the CA and a client certificate (with Options.TLS; else nil).
	TLS *TLSFiles

	removeDir bool
}

// Agent is one Consul agent process.
type Agent struct {
	Name     string
	IP       string
	HTTPAddr string // ip:8500, or ip:8501 (HTTPS) with Options.TLS
	Scheme   string // http, or https with Options.TLS
	DNSAddr  string // ip:8600
	Server   bool
	NetNS    *NetNS // the network namespace it runs in; nil: the host's

	binary     string
	config     string
	logPath    string
	tls        *TLSFiles
	token      string // what Client sends: the management token with Options.ACL
	agentToken string // the agent's own token (acl.tokens.agent)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// Binary returns the path of the Consul binary: $ATTACHE_CONSUL, else
// .bin/consul at the repository root, else consul on PATH.
func Binary() (string, error) {
	if p := os.Getenv("ATTACHE_CONSUL"); p != "" {
		return p, nil
	}
	if root, err := repoRoot(); err == nil {
		p := filepath.Join(root, ".bin", "consul")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", errors.New("testcluster: no Consul binary: run scripts/build (it builds the pinned Consul into .bin/consul) or set ATTACHE_CONSUL")
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Start starts the cluster for a test, waits until it has a leader and
// every agent has joined, and stops it when the test ends (showing the
// agents' logs if the test failed).
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	c, err := New(opts)
	if c != nil {
		t.Cleanup(func() {
			c.Close()
			if t.Failed() {
				for _, a := range c.all() {
					t.Logf("consul log of %s (%s):\n%s", a.Name, a.IP, a.logTail(40))
				}
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// New starts a cluster and waits (up to a minute each) until it has a
// leader and every agent has joined. Close stops it. On error the returned
// cluster, if not nil, holds what was started: Close it.
func New(opts Options) (*Cluster, error) {
	bin := opts.Binary
	if bin == "" {
		var err error
		if bin, err = Binary(); err != nil {
			return nil, err
		}
	}
	if opts.Servers == 0 {
		opts.Servers = 3
	}
	c := &Cluster{Datacenter: "dc1", Dir: opts.Dir}
	if c.Dir == "" {
		dir, err := os.MkdirTemp("", "attache-consul-")
		if err != nil {
			return nil, err
		}
		c.Dir, c.removeDir = dir, true
	}
	ips := opts.IPs
	if ips == nil {
		var err error
		if ips, err = freeIPs(opts.Servers + opts.Clients); err != nil {
			return c, err
		}
	} else if len(ips) != opts.Servers+opts.Clients {
		return c, fmt.Errorf("testcluster: %d IPs for %d agents", len(ips), opts.Servers+opts.Clients)
	}
	var err error
	var authority *ca
	if opts.TLS {
		if authority, err = newCA(filepath.Join(c.Dir, "tls")); err != nil {
			return c, fmt.Errorf("testcluster: CA: %w", err)
		}
		cert, key, err := authority.issue("client", []string{"127.0.0.1"}, []string{"localhost"})
		if err != nil {
			return c, fmt.Errorf("testcluster: client certificate: %w", err)
		}
		c.TLS = &TLSFiles{CAFile: filepath.Join(authority.dir, "ca.pem"), CertFile: cert, KeyFile: key}
	}
	var joins []string
	for _, ip := range ips[:opts.Servers] {
		joins = append(joins, fmt.Sprintf("%q", ip+":8301"))
	}
	for i, ip := range ips {
		server := i < opts.Servers
		name := fmt.Sprintf("server%d", i+1)
		if !server {
			name = fmt.Sprintf("client%d", i-opts.Servers+1)
		}
		dir := filepath.Join(c.Dir, name)
		if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
			return c, err
		}
		a := &Agent{
			Name: name, IP: ip, Server: server,
			HTTPAddr: ip + ":8500", Scheme: "http", DNSAddr: ip + ":8600",
			binary: bin, logPath: filepath.Join(dir, "consul.log"), tls: c.TLS,
		}
		if k := i - opts.Servers; k >= 0 && k < len(opts.NetNS) {
			a.NetNS = opts.NetNS[k]
		}
		var certFile, keyFile string
		if opts.TLS {
			a.HTTPAddr, a.Scheme = ip+":8501", "https"
			role := "client"
			if server {
				role = "server"
			}
			certFile, keyFile, err = authority.issue(name, []string{ip, "127.0.0.1"}, []string{"localhost", role + ".dc1.consul"})
			if err != nil {
				return c, fmt.Errorf("testcluster: certificate of %s: %w", name, err)
			}
		}
		if opts.ACL {
			a.agentToken = newUUID()
		}
		cfg := agentConfig(name, ip, dir, server, opts.Servers, joins, opts.TLS) +
			secureConfig(opts, a.agentToken, certFile, keyFile, c.TLS.caFile()) + opts.ExtraConfig
		a.config = filepath.Join(dir, "agent.hcl")
		if err := os.WriteFile(a.config, []byte(cfg), 0o644); err != nil {
			return c, err
		}
		if server {
			c.Servers = append(c.Servers, a)
		} else {
			c.Clients = append(c.Clients, a)
		}
	}
	for _, a := range c.all() {
		if err := a.start(); err != nil {
			return c, err
		}
	}
	if _, err := c.waitLeader(); err != nil {
		return c, err
	}
	if opts.ACL {
		if err := c.bootstrapACL(); err != nil {
			return c, err
		}
	}
	return c, c.waitMembers()
}

// Close stops every agent (and removes the directory New made).
func (c *Cluster) Close() {
	for _, a := range c.all() {
		a.Stop()
	}
	if c.removeDir {
		os.RemoveAll(c.Dir)
	}
}

func agentConfig(name, ip, dir string, server bool, expect int, joins []string, https bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node_name = %q\ndatacenter = \"dc1\"\ndata_dir = %q\n", name, filepath.Join(dir, "data"))
	fmt.Fprintf(&b, "bind_addr = %q\nclient_addr = %q\nadvertise_addr = %q\n", ip, ip, ip)
	fmt.Fprintf(&b, "retry_join = [%s]\nretry_interval = \"1s\"\n", strings.Join(joins, ", "))
	b.WriteString("disable_update_check = true\nlog_level = \"info\"\nenable_script_checks = false\n")
	b.WriteString("ports {\n  grpc = -1\n  grpc_tls = -1\n")
	if https {
		b.WriteString("  http = -1\n  https = 8501\n")
	}
	b.WriteString("}\n")
	b.WriteString("performance {\n  raft_multiplier = 1\n}\n")
	if server {
		fmt.Fprintf(&b, "server = true\nbootstrap_expect = %d\n", expect)
	}
	return b.String()
}

// freeIPs picks n distinct random addresses in 127.64.0.0/10 on which
// nothing listens on Consul's ports.
func freeIPs(n int) ([]string, error) {
	seen := map[string]bool{}
	var ips []string
	for tries := 0; len(ips) < n; tries++ {
		if tries > 1000 {
			return nil, errors.New("testcluster: no free loopback address found")
		}
		ip := fmt.Sprintf("127.%d.%d.%d", 64+rand.IntN(64), rand.IntN(256), 1+rand.IntN(254))
		if seen[ip] || !portsFree(ip) {
			continue
		}
		seen[ip] = true
		ips = append(ips, ip)
	}
	return ips, nil
}

func portsFree(ip string) bool {
	for _, p := range []string{"8300", "8301", "8302", "8500", "8501", "8600"} {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, p))
		if err != nil {
			return false
		}
		l.Close()
	}
	return true
}

func (c *Cluster) all() []*Agent { return append(append([]*Agent{}, c.Servers...), c.Clients...) }

// Start starts the agent's process (again, with the same data, after Stop
// or Kill) and waits for its HTTP API.
func (a *Agent) Start(t testing.TB) {
	t.Helper()
	if err := a.start(); err != nil {
		t.Fatal(err)
	}
}

func (a *Agent) start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		return nil
	}
	logf, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(a.binary, "agent", "-config-file="+a.config)
	dial := (&net.Dialer{Timeout: time.Second}).DialContext
	if a.NetNS != nil {
		// ip netns exec enters the namespace and execs Consul: the
		// process (and its pid) is Consul's.
		cmd = a.NetNS.Command(a.binary, "agent", "-config-file="+a.config)
		dial = a.NetNS.DialContext
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("testcluster: start %s: %w", a.Name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	a.cmd, a.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := dial(ctx, "tcp", a.HTTPAddr)
		cancel()
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-done:
			a.cmd = nil
			return fmt.Errorf("testcluster: %s exited at start:\n%s", a.Name, a.logTail(30))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testcluster: %s's HTTP API did not come up on %s:\n%s", a.Name, a.HTTPAddr, a.logTail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the agent gracefully (SIGTERM, then SIGKILL after 10 s).
func (a *Agent) Stop() { a.signal(syscall.SIGTERM, 10*time.Second) }

// Kill stops the agent at once with SIGKILL, as a crash would.
func (a *Agent) Kill() { a.signal(syscall.SIGKILL, 0) }

func (a *Agent) signal(sig syscall.Signal, grace time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	_ = a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(grace):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
	a.cmd = nil
}

// Pid returns the agent's process id, or 0 when it does not run.
func (a *Agent) Pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Running reports whether the agent's process runs.
func (a *Agent) Running() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cmd != nil
}

// API returns a consul/api client for this agent.
func (a *Agent) API(t testing.TB) *api.Client { return a.Client() }

// URL is the agent's HTTP API as a URL: http://ip:8500, or
// https://ip:8501 with Options.TLS.
func (a *Agent) URL() string { return a.Scheme + "://" + a.HTTPAddr }

// Client returns a consul/api client for this agent: with Options.ACL it
// sends the management token, with Options.TLS it trusts the cluster's CA
// and presents the client certificate.
func (a *Agent) Client() *api.Client {
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = a.HTTPAddr
	cfg.Scheme = a.Scheme
	cfg.Token = a.token
	cfg.TokenFile = ""
	if a.tls != nil {
		cfg.TLSConfig = a.tls.Config()
	}
	if a.NetNS != nil {
		cfg.Transport.DialContext = a.NetNS.DialContext
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		panic(err) // only for a malformed address, and we built it
	}
	return c
}

func (a *Agent) logTail(n int) string {
	b, err := os.ReadFile(a.logPath)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// Leader returns the server that currently leads, waiting for one.
func (c *Cluster) Leader(t testing.TB) *Agent {
	t.Helper()
	addr := c.WaitLeader(t)
	for _, s := range c.Servers {
		if strings.HasPrefix(addr, s.IP+":") {
			return s
		}
	}
	t.Fatalf("testcluster: leader %s is not one of our servers", addr)
	return nil
}

// running reports whether the server with Raft address addr runs.
func (c *Cluster) running(addr string) bool {
	for _, s := range c.Servers {
		if strings.HasPrefix(addr, s.IP+":") {
			return s.Running()
		}
	}
	return false
}

// WaitLeader waits (up to a minute) until every running server names the
// same running leader, and returns its Raft address.
func (c *Cluster) WaitLeader(t testing.TB) string {
	t.Helper()
	l, err := c.waitLeader()
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (c *Cluster) waitLeader() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var last string
	for ctx.Err() == nil {
		leaders := map[string]bool{}
		ok := true
		for _, s := range c.Servers {
			if !s.Running() {
				continue
			}
			l, err := s.Client().Status().Leader()
			if err != nil || l == "" {
				ok = false
				last = fmt.Sprintf("%s: leader %q err %v", s.Name, l, err)
				break
			}
			leaders[l] = true
		}
		if ok && len(leaders) == 1 {
			for l := range leaders {
				if c.running(l) {
					return l, nil
				}
				last = "leader " + l + " is a stopped server"
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "", fmt.Errorf("testcluster: no leader within a minute (%s)", last)
}

func (c *Cluster) waitMembers() error {
	want := len(c.Servers) + len(c.Clients)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		ok := true
		for _, a := range c.all() {
			members, err := a.Client().Agent().Members(false)
			alive := 0
			for _, m := range members {
				if m.Status == serfAlive {
					alive++
				}
			}
			if err != nil || alive < want {
				ok = false
				break
			}
		}
		if ok {
			// Client agents are usable once they have synced with a server.
			for _, a := range c.Clients {
				if _, _, err := a.Client().Catalog().Nodes(nil); err != nil {
					ok = false
				}
			}
		}
		if ok {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("testcluster: not all %d agents joined within a minute", want)
}

// serfAlive is serf.StatusAlive, the Status of a live member in /v1/agent/members.
const serfAlive = 1
