package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

// cluster is a throwaway Consul cluster on loopback: three servers and one
// client agent, each on its own random 127.x.y.z address with Consul's
// default ports. The client agent allows many connections per client
// address, since the watcher holds one long poll per watched service.
type cluster struct {
	dir     string
	servers []*agent
	client  *agent
}

type agent struct {
	name, ip string
	cmd      *exec.Cmd
	done     chan struct{}
}

func (a *agent) httpAddr() string { return a.ip + ":8500" }
func (a *agent) dnsAddr() string  { return a.ip + ":8600" }

func (a *agent) api() *api.Client {
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = a.httpAddr()
	cfg.Token = ""
	c, err := api.NewClient(cfg)
	if err != nil {
		panic(err) // only on a malformed address, which we built
	}
	return c
}

func startCluster(ctx context.Context, bin, dir string) (*cluster, error) {
	c := &cluster{dir: dir}
	ips, err := freeIPs(4)
	if err != nil {
		return nil, err
	}
	var joins []string
	for _, ip := range ips[:3] {
		joins = append(joins, fmt.Sprintf("%q", ip+":8301"))
	}
	for i, ip := range ips {
		server := i < 3
		name := fmt.Sprintf("bench-server%d", i+1)
		if !server {
			name = "bench-client1"
		}
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Join(d, "data"), 0o755); err != nil {
			return nil, err
		}
		var b strings.Builder
		fmt.Fprintf(&b, "node_name = %q\ndatacenter = \"dc1\"\ndata_dir = %q\n", name, filepath.Join(d, "data"))
		fmt.Fprintf(&b, "bind_addr = %q\nclient_addr = %q\nadvertise_addr = %q\n", ip, ip, ip)
		fmt.Fprintf(&b, "retry_join = [%s]\nretry_interval = \"1s\"\n", strings.Join(joins, ", "))
		b.WriteString("disable_update_check = true\nlog_level = \"warn\"\n")
		b.WriteString("ports {\n  grpc = -1\n  grpc_tls = -1\n}\nperformance {\n  raft_multiplier = 1\n}\n")
		b.WriteString("limits {\n  http_max_conns_per_client = 8192\n  txn_max_req_len = 4194304\n}\n")
		if server {
			b.WriteString("server = true\nbootstrap_expect = 3\n")
		}
		cfgPath := filepath.Join(d, "agent.hcl")
		if err := os.WriteFile(cfgPath, []byte(b.String()), 0o644); err != nil {
			return nil, err
		}
		logf, err := os.Create(filepath.Join(d, "consul.log"))
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(bin, "agent", "-config-file="+cfgPath)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting %s: %w", bin, err)
		}
		a := &agent{name: name, ip: ip, cmd: cmd, done: make(chan struct{})}
		go func() { _ = cmd.Wait(); logf.Close(); close(a.done) }()
		if server {
			c.servers = append(c.servers, a)
		} else {
			c.client = a
		}
	}
	// Ready when the client agent answers catalog reads through a leader.
	deadline := time.Now().Add(90 * time.Second)
	for {
		if ctx.Err() != nil {
			return c, ctx.Err()
		}
		if l, err := c.servers[0].api().Status().Leader(); err == nil && l != "" {
			if nodes, _, err := c.client.api().Catalog().Nodes(nil); err == nil && len(nodes) == 4 {
				return c, nil
			}
		}
		if time.Now().After(deadline) {
			return c, errors.New("the Consul cluster did not come up in 90s (logs in " + dir + ")")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *cluster) stop() {
	for _, a := range append(append([]*agent{}, c.servers...), c.client) {
		if a == nil {
			continue
		}
		_ = a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.done:
		case <-time.After(10 * time.Second):
			_ = a.cmd.Process.Kill()
			<-a.done
		}
	}
}

func freeIPs(n int) ([]string, error) {
	seen := map[string]bool{}
	var ips []string
	for tries := 0; len(ips) < n; tries++ {
		if tries > 1000 {
			return nil, errors.New("no free loopback address found")
		}
		ip := fmt.Sprintf("127.%d.%d.%d", 128+rand.IntN(64), rand.IntN(256), 1+rand.IntN(254))
		if seen[ip] || !portsFree(ip) {
			continue
		}
		seen[ip] = true
		ips = append(ips, ip)
	}
	return ips, nil
}

func portsFree(ip string) bool {
	for _, p := range []string{"8300", "8301", "8302", "8500", "8600"} {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, p))
		if err != nil {
			return false
		}
		l.Close()
	}
	return true
}
