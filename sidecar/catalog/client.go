package catalog

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// Every query the sidecar makes to Consul — the catalog's blocking queries
// and fetches, and registration through Client — goes through one
// http.Transport whose MaxConnsPerHost is Config.MaxConns: however many
// services are watched, the sidecar never holds more than MaxConns
// connections to a Consul address. Requests beyond it wait for a connection.

// conns counts the connections to Consul and the bytes read from them.
type conns struct {
	open atomic.Int64
	read atomic.Int64
}

// countedConn counts what it reads and holds back every read until the
// first write. The latter keeps net/http's transport from ever seeing an
// answer before its request: Consul writes "429 Too Many Requests" on a
// connection over its per-client limit as soon as it accepts it, and a
// transport that finds bytes on a connection it has not used yet logs
// "Unsolicited response received on idle HTTP channel" to the standard
// logger (stderr, outside hclog). Held back, that answer is read as the
// answer to the request, and the 429 becomes an error like any other.
type countedConn struct {
	net.Conn
	c      *conns
	wrote  chan struct{}
	once   sync.Once
	closed atomic.Bool
}

func (c *countedConn) Write(b []byte) (int, error) {
	c.once.Do(func() { close(c.wrote) })
	return c.Conn.Write(b)
}

func (c *countedConn) Read(b []byte) (int, error) {
	<-c.wrote
	n, err := c.Conn.Read(b)
	c.c.read.Add(int64(n))
	return n, err
}

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.c.open.Add(-1)
		c.once.Do(func() { close(c.wrote) }) // unblock a pending Read
	}
	return c.Conn.Close()
}

// dial returns a DialContext that counts and gates its connections; with
// network set it always dials network and addr (a unix socket).
func (cs *conns) dial(network, addr string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	fixedNet, fixedAddr := network, addr
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if fixedNet != "" {
			network, addr = fixedNet, fixedAddr
		}
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		cs.open.Add(1)
		return &countedConn{Conn: c, c: cs, wrote: make(chan struct{})}, nil
	}
}

// buildClients builds one consul/api client per address, each with its own
// bounded transport.
func (w *Watcher) buildClients() error {
	tlsCfg, err := api.SetupTLSConfig(&w.cfg.TLS)
	if err != nil {
		return fmt.Errorf("catalog: TLS settings: %w", err)
	}
	token := w.cfg.Token
	if w.cfg.TokenFile != "" {
		b, err := os.ReadFile(w.cfg.TokenFile)
		if err != nil {
			return fmt.Errorf("catalog: token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if strings.ContainsAny(token, "\r\n") {
		return errors.New("catalog: the ACL token contains a line break")
	}
	for _, addr := range w.cfg.Addresses {
		scheme, rest, err := splitAddress(addr, w.cfg.SSL)
		if err != nil {
			return err
		}
		dial := w.conns.dial("", "")
		if scheme == "unix" {
			// consul/api would build its own, unbounded transport for a
			// unix socket: dial the socket ourselves behind a placeholder host.
			dial = w.conns.dial("unix", rest)
			scheme, rest = "http", "consul-agent.sock"
		}
		tr := &http.Transport{
			Proxy:               nil, // Consul is local: never through an HTTP proxy
			DialContext:         dial,
			MaxConnsPerHost:     w.cfg.MaxConns,
			MaxIdleConns:        0,
			MaxIdleConnsPerHost: w.cfg.MaxConns,
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: 10 * time.Second,
			TLSClientConfig:     tlsCfg.Clone(),
			ForceAttemptHTTP2:   true, // multiplexes everything on one connection when Consul speaks HTTPS
		}
		w.transports = append(w.transports, tr)
		ac := api.DefaultNonPooledConfig()
		ac.Address = rest
		ac.Scheme = scheme
		ac.Datacenter = w.cfg.Datacenter
		ac.Token = token
		ac.TokenFile = ""
		ac.HttpClient = &http.Client{Transport: tr}
		ac.TLSConfig = w.cfg.TLS
		ac.Namespace, ac.Partition = "", ""
		c, err := api.NewClient(ac)
		if err != nil {
			return fmt.Errorf("catalog: Consul address %q: %w", addr, err)
		}
		w.clients = append(w.clients, c)
	}
	return nil
}

// splitAddress parses host:port, http://host:port, https://host:port or
// unix:///path into a scheme and the rest, refusing anything else clearly.
func splitAddress(raw string, ssl bool) (scheme, rest string, err error) {
	scheme, rest = "http", raw
	if ssl {
		scheme = "https"
	}
	if i := strings.Index(raw, "://"); i >= 0 {
		scheme, rest = strings.ToLower(raw[:i]), raw[i+3:]
	}
	switch scheme {
	case "unix":
		if rest == "" {
			return "", "", fmt.Errorf("catalog: Consul address %q: no socket path", raw)
		}
		return scheme, rest, nil
	case "http", "https":
	default:
		return "", "", fmt.Errorf("catalog: Consul address %q: unknown scheme %q (want http, https or unix)", raw, scheme)
	}
	rest = strings.TrimSuffix(rest, "/")
	if strings.Contains(rest, "/") {
		return "", "", fmt.Errorf("catalog: Consul address %q: a path prefix is not supported", raw)
	}
	if rest == "" {
		return "", "", fmt.Errorf("catalog: Consul address %q: no host", raw)
	}
	return scheme, rest, nil
}

// Client returns the consul/api client the watcher uses for its i-th Consul
// address (with the same token and TLS settings, and the same bounded
// connections), for other talk to that agent such as registration.
func (w *Watcher) Client(i int) (*api.Client, error) {
	return w.clients[i%len(w.clients)], nil
}
