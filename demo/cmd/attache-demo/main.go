// Command attache-demo runs the demo backend (package demo) on one address.
//
//	attache-demo -service users -instance users-1 -listen 127.0.0.21:8081
//
// Fault switches: curl -X POST 'ADDR/fault?mode=fail' (ok, fail, slow&delay=300ms, hang, health-fail).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"attache/demo"
)

func main() {
	fs := flag.NewFlagSet("attache-demo", flag.ContinueOnError)
	service := fs.String("service", "", "service name to answer with (required)")
	instance := fs.String("instance", "", "instance id to answer with (default SERVICE-LISTEN)")
	listen := fs.String("listen", "127.0.0.1:8080", "address to listen on")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if *service == "" {
		fmt.Fprintln(os.Stderr, "attache-demo: -service is required, e.g. -service users")
		os.Exit(2)
	}
	if *instance == "" {
		*instance = *service + "-" + *listen
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "attache-demo: listen on %s: %v\n", *listen, err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: demo.New(*service, *instance), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "attache-demo: %v\n", err)
		os.Exit(1)
	}
}
