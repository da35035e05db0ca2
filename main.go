// Command attache is a Consul-native service-mesh sidecar.
//
//	attache sidecar [flags]   the per-node process: catalog view, DNS, proxy, gateway
//	attache control [flags]   the control service
//	attache routes SUBCOMMAND the route documents: validate, diff, apply, get, history, rollback, status
//	attache version
//
// Run `attache COMMAND -h` for the flags of each command.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"attache/control"
	"attache/sidecar"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `Usage: attache COMMAND [flags]

Commands:
  sidecar   run the per-node sidecar (catalog view, DNS, proxy, gateway)
  control   run the control service
  routes    manage the gateway's routes (validate, diff, apply, get, history, rollback, status)
  version   print the version

Run 'attache COMMAND -h' for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the process: it returns the exit code
// (0 success, 1 failure, 2 usage error).
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "sidecar":
		return runSidecar(ctx, args[1:], stdout, stderr)
	case "control":
		return runControl(ctx, args[1:], stderr)
	case "routes":
		return runRoutes(ctx, args[1:], stdout, stderr)
	case "version", "-v", "-version", "--version":
		fmt.Fprintln(stdout, "attache", version)
		return 0
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "attache: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

func runSidecar(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	// SIGHUP reloads the configuration (caught from the start: its
	// default action would end the process).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	cfg, err := sidecar.ParseArgs(args, sidecar.DefaultConfig(os.Getenv), stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "attache sidecar: %v\n", err)
		return 2
	}
	if cfg.PrintConfig {
		_, _ = stdout.Write(cfg.HCL())
		return 0
	}
	log := newLogger(cfg.LogLevel, cfg.LogJSON, stderr)
	s, err := sidecar.New(cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "attache sidecar: %v\n", err)
		return 2
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				log.Info("SIGHUP: reading the configuration again")
				_ = s.ReloadArgs(args, sidecar.DefaultConfig(os.Getenv)) // logs what it did or why not
			}
		}
	}()
	// SIGUSR2: start a successor (the binary now at this path, same
	// arguments), which takes over the sockets without dropping a request.
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)
	go func() {
		for range usr2 {
			if _, err := s.StartSuccessor(); err != nil {
				log.Error("SIGUSR2: no successor started", "error", err)
			}
		}
	}()
	if err := s.Run(ctx); err != nil {
		log.Error("exiting", "error", err)
		return 1
	}
	return 0
}

func runControl(ctx context.Context, args []string, stderr io.Writer) int {
	cfg := control.DefaultConfig()
	if v := os.Getenv("CONSUL_HTTP_ADDR"); v != "" {
		cfg.Consul = strings.TrimPrefix(v, "http://")
	}
	cfg.ConsulToken = os.Getenv("CONSUL_HTTP_TOKEN")
	cfg.APIToken = os.Getenv("ATTACHE_CONTROL_TOKEN")
	fs := flag.NewFlagSet("attache control", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.Addr, "listen", cfg.Addr, "HTTP listen `address` of the control API")
	fs.StringVar(&cfg.Consul, "consul", cfg.Consul, "Consul HTTP `address`; $CONSUL_HTTP_ADDR sets the default")
	fs.StringVar(&cfg.ConsulToken, "token", cfg.ConsulToken, "Consul ACL `token`; $CONSUL_HTTP_TOKEN sets the default")
	fs.StringVar(&cfg.APIToken, "api-token", cfg.APIToken, "bearer `token` required by the API (needed off loopback); $ATTACHE_CONTROL_TOKEN sets the default")
	fs.StringVar(&cfg.KVPrefix, "kv-prefix", cfg.KVPrefix, "Consul KV `prefix` of the routes")
	fs.IntVar(&cfg.Keep, "keep", cfg.Keep, "route versions kept (older ones are deleted)")
	level := fs.String("log-level", "info", "log `level`: trace, debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "attache control: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if cfg.Keep < 1 {
		fmt.Fprintf(stderr, "attache control: -keep %d: keep at least 1 version\n", cfg.Keep)
		return 2
	}
	srv, err := control.New(cfg, newLogger(*level, false, stderr))
	if err != nil {
		fmt.Fprintf(stderr, "attache control: %v\n", err)
		return 2
	}
	if err := srv.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "attache control: %v\n", err)
		return 1
	}
	return 0
}

func newLogger(level string, json bool, w io.Writer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "attache",
		Level:      hclog.LevelFromString(strings.ToLower(level)),
		JSONFormat: json,
		Output:     w,
	})
}
