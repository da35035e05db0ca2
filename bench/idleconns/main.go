// Command idleconns opens -n keep-alive client connections to -addr, makes
// one request on each (so that the proxy has served it, as a browser that
// loaded a page), prints "ready N" and holds them open, idle, until its
// standard input ends (or -hold passes). It measures what an idle client
// connection costs a proxy (scripts/bench proxy: RSS growth per client).
package main

import (
	"bufio"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "proxy address")
	n := flag.Int("n", 10000, "connections")
	host := flag.String("host", "users", "Host header")
	path := flag.String("path", "/users/", "request path")
	hold := flag.Duration("hold", 10*time.Minute, "hold the connections at most this long")
	par := flag.Int("parallel", 64, "connections opened at once")
	useTLS := flag.Bool("tls", false, "connect over TLS (HTTP/1.1 by ALPN; the certificate is not checked)")
	useH2 := flag.Bool("h2", false, "with -tls: HTTP/2 by ALPN (one request on each connection, as with HTTP/1.1)")
	flag.Parse()
	var tc *tls.Config
	if *useTLS {
		tc = &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}, ClientSessionCache: tls.NewLRUClientSessionCache(1)}
		if *useH2 {
			tc.NextProtos = []string{"h2"}
		}
	}
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", *path, *host)
	conns := make([]io.Closer, *n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed int
	var firstErr error
	sem := make(chan struct{}, *par)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			var c io.Closer
			var err error
			if *useH2 && tc != nil {
				c, err = openH2(*addr, *host, *path, tc)
			} else {
				c, err = open(*addr, req, tc)
			}
			if err != nil {
				mu.Lock()
				failed++
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "idleconns: %d of %d connections failed: %v\n", failed, *n, firstErr)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", *n)
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(*hold):
	}
	for _, c := range conns {
		c.Close()
	}
}

// open connects (over TLS with tc), sends req and reads its answer; the
// connection stays open.
func open(addr, req string, tc *tls.Config) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if tc != nil {
		c = tls.Client(c, tc)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Close {
		c.Close()
		return nil, fmt.Errorf("status %d, close %v", resp.StatusCode, resp.Close)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// h2Conn is an HTTP/2 client connection held by a Transport of its own.
type h2Conn struct{ tr *http.Transport }

func (c h2Conn) Close() error {
	c.tr.CloseIdleConnections()
	return nil
}

// openH2 connects over TLS with HTTP/2, makes one request and keeps the
// connection (idle in a Transport of its own).
func openH2(addr, host, path string, tc *tls.Config) (io.Closer, error) {
	tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, MaxConnsPerHost: 1}
	req, err := http.NewRequest("GET", "https://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	req.Host = host
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("status %d, %s", resp.StatusCode, resp.Proto)
	}
	return h2Conn{tr}, nil
}
