// Command backend is the benchmarks' HTTP backend: the cheapest answer net/http
// can give (a fixed 2-byte body), so that a proxy's own cost shows in the
// ratios. It listens on every -listen address given.
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "comma-separated addresses to listen on")
	flag.Parse()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok"))
	})
	errs := make(chan error)
	for _, a := range strings.Split(*listen, ",") {
		go func() { errs <- http.ListenAndServe(a, h) }()
	}
	fmt.Fprintln(os.Stderr, "backend:", <-errs)
	os.Exit(1)
}
