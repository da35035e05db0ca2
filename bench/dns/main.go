// Command dns-bench measures attache's DNS server with dnsperf beside two
// peers, in one run, on two query mixes (A, SRV and tag A over a
// two-instance service; SRV over a ten-instance service):
//
//   - a bare miekg/dns responder that answers a fixed A record: the ceiling
//     for the library on this machine;
//   - Consul's own DNS on a client agent.
//
// It starts a one-server Consul cluster with one client agent on loopback,
// registers a service on the client, runs the attache sidecar binary beside
// the client agent (its DNS fed by its catalog watcher), and prints a markdown section with max QPS, ratios and p99 latency at half
// of each server's max rate.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	miekg "github.com/miekg/dns"

	"attache/internal/testcluster"
)

func main() {
	consulBin := flag.String("consul", ".bin/consul", "Consul binary")
	dnsperf := flag.String("dnsperf", "dnsperf", "dnsperf binary")
	duration := flag.Duration("duration", 8*time.Second, "length of each max-rate run")
	latDuration := flag.Duration("latency-duration", 4*time.Second, "length of each half-rate run")
	clients := flag.Int("clients", 4, "dnsperf -c (client sockets)")
	outstanding := flag.Int("outstanding", 100, "dnsperf -q (queries in flight)")
	attacheBin := flag.String("attache", ".bin/attache", "attache binary, run as a sidecar beside the client agent")
	flag.Parse()
	if err := run(*consulBin, *dnsperf, *duration, *latDuration, *clients, *outstanding, *attacheBin); err != nil {
		fmt.Fprintln(os.Stderr, "dns-bench:", err)
		os.Exit(1)
	}
}

type target struct {
	name, addr string
	maxQPS     float64
	lost       string
	p99        time.Duration
	lat        string
}

func run(consulBin, dnsperf string, dur, latDur time.Duration, clients, outstanding int, attacheBin string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 290*time.Second)
	defer cancel()
	if _, err := exec.LookPath(dnsperf); err != nil {
		return fmt.Errorf("dnsperf not found (apt-get install dnsperf): %w", err)
	}
	dir, err := os.MkdirTemp("", "attache-dns-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// Consul: one server and one client agent on their own loopback addresses.
	c, err := testcluster.New(testcluster.Options{Servers: 1, Clients: 1, Dir: dir, Binary: consulBin})
	if c != nil {
		defer c.Close()
	}
	if err != nil {
		return fmt.Errorf("consul did not start: %w", err)
	}
	cliIP := c.Clients[0].IP
	cl := c.Clients[0].Client()
	if err := waitFor(ctx, 60*time.Second, func() error {
		if l, err := cl.Status().Leader(); err != nil || l == "" {
			return fmt.Errorf("no leader yet (%v)", err)
		}
		_, err := cl.Agent().Self()
		return err
	}); err != nil {
		return fmt.Errorf("consul did not start: %w", err)
	}
	for i, tag := range []string{"v1", "v2"} {
		if err := cl.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: fmt.Sprintf("users-%d", i+1), Name: "users", Port: 9001 + i, Tags: []string{tag},
			Address: fmt.Sprintf("127.0.0.%d", 101+i),
		}); err != nil {
			return err
		}
	}
	// ten: ten instances with addresses of their own, for SRV answers with
	// ten targets and their addresses.
	for i := range 10 {
		if err := cl.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: fmt.Sprintf("ten-%d", i+1), Name: "ten", Port: 9100 + i,
			Address: fmt.Sprintf("127.0.1.%d", 101+i),
		}); err != nil {
			return err
		}
	}
	consulDNS := cliIP + ":8600"
	if err := waitFor(ctx, 30*time.Second, func() error {
		if err := expectAnswers(consulDNS, "users", 2); err != nil {
			return err
		}
		return expectAnswers(consulDNS, "ten", 10)
	}); err != nil {
		return fmt.Errorf("consul DNS: %w", err)
	}

	// attache: the real sidecar binary beside the client agent, as on a node.
	attacheAddr := cliIP + ":8653"
	sc := exec.CommandContext(ctx, attacheBin, "sidecar", "-node", c.Clients[0].Name,
		"-consul", cliIP+":8500", "-admin", cliIP+":19001", "-dns", attacheAddr,
		"-watch-service", "users", "-watch-service", "ten", "-log-level", "warn")
	sc.Stderr = os.Stderr
	if err := sc.Start(); err != nil {
		return fmt.Errorf("start %s: %w", attacheBin, err)
	}
	defer func() { _ = sc.Process.Signal(os.Interrupt); _ = sc.Wait() }()
	if err := waitFor(ctx, 30*time.Second, func() error {
		if err := expectAnswers(attacheAddr, "users", 2); err != nil {
			return err
		}
		return expectAnswers(attacheAddr, "ten", 10)
	}); err != nil {
		return fmt.Errorf("attache DNS: %w", err)
	}

	bareAddr, stopBare, err := startBare()
	if err != nil {
		return err
	}
	defer stopBare()

	mixes := []struct{ name, file, queries string }{
		{"mix: A, SRV, tag A (2 instances)", "mix.txt", "users.service.consul A\nusers.service.consul SRV\nv1.users.service.consul A\n"},
		{"SRV over 10 instances", "srv10.txt", "ten.service.consul SRV\n"},
	}
	type row struct {
		mix     string
		targets []*target
	}
	var rows []row
	for _, mix := range mixes {
		queries := filepath.Join(dir, mix.file)
		if err := os.WriteFile(queries, []byte(mix.queries), 0o644); err != nil {
			return err
		}
		targets := []*target{
			{name: "bare miekg/dns responder (fixed A)", addr: bareAddr},
			{name: "attache DNS", addr: attacheAddr},
			{name: "Consul DNS (client agent)", addr: consulDNS},
		}
		for _, t := range targets {
			out, err := runDNSPerf(ctx, dnsperf, t.addr, queries, dur, clients, outstanding, 0, false)
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			t.maxQPS, t.lost = parseQPS(out), parseLost(out)
		}
		for _, t := range targets {
			out, err := runDNSPerf(ctx, dnsperf, t.addr, queries, latDur, clients, outstanding, int(t.maxQPS/2), true)
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			t.p99, t.lat = p99(out), parseAvg(out)
		}
		rows = append(rows, row{mix.name, targets})
	}

	fmt.Println("## DNS: attache vs bare miekg/dns vs Consul's DNS")
	fmt.Println()
	fmt.Printf("dnsperf %s, %d clients, %d in flight, two query mixes: `users.service.consul A`, `users.service.consul SRV`, `v1.users.service.consul A` over a service of 2 instances; `ten.service.consul SRV` over 10 instances with addresses of their own (10 SRV records and 10 addresses per answer). The bare responder answers a fixed A to all. attache is the `attache sidecar` binary beside the client agent; Consul v1.14.8 client agent with default DNS settings (stale reads, no cache). Max rate over %s; latency at half of each server's own max rate over %s.\n\n",
		dnsperfVersion(dnsperf), clients, outstanding, dur, latDur)
	fmt.Println("| query mix | server | max QPS | lost | vs bare | vs Consul | avg latency @ ½ max | p99 latency @ ½ max |")
	fmt.Println("|---|---|---:|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		bare, consul := r.targets[0], r.targets[2]
		for _, t := range r.targets {
			fmt.Printf("| %s | %s | %.0f | %s | %.2f× | %.2f× | %s | %s |\n", r.mix, t.name, t.maxQPS, t.lost,
				ratio(t.maxQPS, bare.maxQPS), ratio(t.maxQPS, consul.maxQPS), t.lat, fmtDur(t.p99))
		}
	}
	fmt.Println()
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	for _, r := range rows {
		bare, attache, consul := r.targets[0], r.targets[1], r.targets[2]
		fmt.Printf("Goals (%s): attache ≥ 1.0× bare: %.2f× (%s); p99 @ ½ max ≤ bare's: %s vs %s (%s); attache ≥ 5× Consul client agent: %.2f× (%s).\n\n", r.mix,
			ratio(attache.maxQPS, bare.maxQPS), verdict(ratio(attache.maxQPS, bare.maxQPS) >= 1.0),
			fmtDur(attache.p99), fmtDur(bare.p99), verdict(attache.p99 <= bare.p99),
			ratio(attache.maxQPS, consul.maxQPS), verdict(ratio(attache.maxQPS, consul.maxQPS) >= 5))
	}
	return nil
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func fmtDur(d time.Duration) string {
	if d == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.3f ms", float64(d)/float64(time.Millisecond))
}

// runDNSPerf runs dnsperf against addr; qps > 0 limits the rate; verbose
// reports every query (for percentiles).
func runDNSPerf(ctx context.Context, bin, addr, queries string, d time.Duration, clients, outstanding, qps int, verbose bool) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	args := []string{"-s", host, "-p", port, "-d", queries, "-l", strconv.Itoa(int(d.Seconds())),
		"-c", strconv.Itoa(clients), "-q", strconv.Itoa(outstanding), "-t", "2"}
	if qps > 0 {
		args = append(args, "-Q", strconv.Itoa(qps))
	}
	if verbose {
		args = append(args, "-v")
	}
	rctx, cancel := context.WithTimeout(ctx, d+20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(rctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("dnsperf %s: %w\n%s", strings.Join(args, " "), err, tail(out.String(), 20))
	}
	return out.String(), nil
}

var (
	reQPS  = regexp.MustCompile(`Queries per second:\s+([0-9.]+)`)
	reLost = regexp.MustCompile(`Queries lost:\s+([0-9]+ \([0-9.]+%\))`)
	reAvg  = regexp.MustCompile(`Average Latency \(s\):\s+([0-9.]+)`)
	// A verbose line ends with the latency in seconds: "> NOERROR name A 0.000123".
	reVerbose = regexp.MustCompile(`^> \S+ .* ([0-9]+\.[0-9]+)$`)
)

func parseQPS(out string) float64 {
	if m := reQPS.FindStringSubmatch(out); m != nil {
		f, _ := strconv.ParseFloat(m[1], 64)
		return f
	}
	return 0
}

func parseLost(out string) string {
	if m := reLost.FindStringSubmatch(out); m != nil {
		return m[1]
	}
	return "?"
}

func parseAvg(out string) string {
	if m := reAvg.FindStringSubmatch(out); m != nil {
		f, _ := strconv.ParseFloat(m[1], 64)
		return fmt.Sprintf("%.3f ms", f*1000)
	}
	return "n/a"
}

func p99(out string) time.Duration {
	var lat []float64
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if m := reVerbose.FindStringSubmatch(strings.TrimSpace(sc.Text())); m != nil {
			f, _ := strconv.ParseFloat(m[1], 64)
			lat = append(lat, f)
		}
	}
	if len(lat) == 0 {
		return 0
	}
	sort.Float64s(lat)
	return time.Duration(lat[(len(lat)*99)/100] * float64(time.Second))
}

func dnsperfVersion(bin string) string {
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	if m := regexp.MustCompile(`Version (\S+)`).FindSubmatch(out); m != nil {
		return string(m[1])
	}
	return "?"
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// startBare starts the ceiling: a miekg/dns server answering every question
// with one fixed A record, on UDP and TCP.
func startBare() (string, func(), error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	h := miekg.HandlerFunc(func(w miekg.ResponseWriter, r *miekg.Msg) {
		m := new(miekg.Msg)
		m.SetReply(r)
		m.Authoritative = true
		m.Answer = append(m.Answer, &miekg.A{
			Hdr: miekg.RR_Header{Name: r.Question[0].Name, Rrtype: miekg.TypeA, Class: miekg.ClassINET},
			A:   net.IPv4(127, 0, 0, 101),
		})
		w.WriteMsg(m)
	})
	srv := &miekg.Server{PacketConn: pc, Handler: h}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	return pc.LocalAddr().String(), func() { srv.Shutdown() }, nil
}

// expectAnswers asks addr over TCP for <service>.service.consul A and
// checks it has n answers.
func expectAnswers(addr, service string, n int) error {
	m := new(miekg.Msg)
	m.SetQuestion(service+".service.consul.", miekg.TypeA)
	r, _, err := (&miekg.Client{Net: "tcp", Timeout: time.Second}).Exchange(m, addr)
	if err != nil {
		return err
	}
	if len(r.Answer) != n {
		return fmt.Errorf("%d answers, want %d", len(r.Answer), n)
	}
	return nil
}

func waitFor(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
