// Command catalog benchmarks the catalog watcher against a real Consul
// cluster on loopback (three servers and a client agent it starts itself)
// and prints markdown tables with peers measured in the same run:
//
//	propagation  a health change made through the client agent's API, until
//	             each observer sees it: the watcher's View (default and stale
//	             mode), a raw consul/api blocking query (both modes), Consul's
//	             own DNS on the client agent, and any attache DNS given with
//	             -attache-dns.
//	scale        1,000 services × 10 instances, each with a check; the watcher
//	             runs in a child process (this binary, -scenario child) that
//	             reports its connections to the agent (from /proc), RSS,
//	             queries and bytes at rest, and times health changes: p50/p99,
//	             bytes read and CPU per change; on-demand, it asks for every
//	             name at once.
//
// Usage: catalog [-scenario all|propagation|scale] [-consul-bin .bin/consul]
// [-attache .bin/attache] [-via agent|catalog] [-changes 200] ...
//
// To add a propagation column, append an observer in propagation.go.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"attache/internal/testcluster"
)

func main() {
	var (
		scenario   = flag.String("scenario", "all", "propagation, scale, all (both on one cluster), or child (used by scale)")
		bin        = flag.String("consul-bin", ".bin/consul", "Consul binary")
		changes    = flag.Int("changes", 200, "propagation: health changes to time")
		attacheDNS = flag.String("attache-dns", "", "propagation: also time this attache DNS server (ip:port) instead of starting one")
		attacheBin = flag.String("attache", ".bin/attache", "propagation: attache binary to run as a sidecar beside the client agent (skipped if missing)")
		dir        = flag.String("dir", "", "where the Consul agents keep their data (default: a new temporary directory)")
		via        = flag.String("via", "agent", "propagation: make changes through the agent (TTL check) or the catalog")
		services   = flag.Int("services", 1000, "scale: services to register")
		instances  = flag.Int("instances", 10, "scale: instances per service")
		window     = flag.Duration("window", 10*time.Second, "scale: how long to count queries at rest")
		scaleChg   = flag.Int("scale-changes", 100, "scale: health changes to time (each a flip to critical and back)")
		consul     = flag.String("consul", "", "child: Consul address")
		server     = flag.String("server", "", "child: a Consul server's address, for the changes")
		mode       = flag.String("mode", "all", "child: watch mode")
		want       = flag.Int("want", 0, "child: services to wait for before measuring")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch *scenario {
	case "propagation":
		err = withCluster(ctx, *bin, *dir, func(c *testcluster.Cluster) error {
			return propagation(ctx, c, *changes, *attacheDNS, *attacheBin, *via)
		})
	case "scale":
		err = withCluster(ctx, *bin, *dir, func(c *testcluster.Cluster) error {
			return scale(ctx, c, *services, *instances, *window, *scaleChg)
		})
	case "all":
		err = withCluster(ctx, *bin, *dir, func(c *testcluster.Cluster) error {
			if err := propagation(ctx, c, *changes, *attacheDNS, *attacheBin, *via); err != nil {
				return err
			}
			fmt.Println()
			return scale(ctx, c, *services, *instances, *window, *scaleChg)
		})
	case "child":
		err = child(ctx, *consul, *server, *mode, *want, *instances, *window, *changes)
	default:
		err = fmt.Errorf("unknown scenario %q", *scenario)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/catalog:", err)
		os.Exit(1)
	}
}

func withCluster(ctx context.Context, bin, parent string, f func(*testcluster.Cluster) error) error {
	if parent != "" {
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
	}
	dir, err := os.MkdirTemp(parent, "attache-bench-catalog-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The client agent keeps Consul's default per-client connection limit
	// (200): the watcher's connections stay within its own bound.
	c, err := testcluster.New(testcluster.Options{Clients: 1, Dir: dir, Binary: bin,
		ExtraConfig: "limits {\n  txn_max_req_len = 4194304\n}\n"})
	if c != nil {
		defer c.Close()
	}
	if err != nil {
		return err
	}
	return f(c)
}

// table prints a markdown table.
func table(header []string, rows [][]string) {
	fmt.Println("| " + strings.Join(header, " | ") + " |")
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = "---:"
	}
	sep[0] = "---"
	fmt.Println("|" + strings.Join(sep, "|") + "|")
	for _, r := range rows {
		fmt.Println("| " + strings.Join(r, " | ") + " |")
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }
