package catalog

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Each watched service holds one blocking query open all the time. Through
// net/http that costs three goroutines and a pair of buffers per
// connection; with a thousand watches that is most of the watcher's memory.
// So the service loops speak HTTP/1.1 themselves: each owns one keep-alive
// connection, writes its request, and waits for the answer's first byte
// with no buffer at all; a pooled reader is taken only to read the answer.

// healthEntry is the part of an entry of /v1/health/service that the view
// keeps; the JSON decoder skips the rest.
type healthEntry struct {
	Node struct {
		Node       string
		Address    string
		Datacenter string
	}
	Service struct {
		ID      string
		Service string
		Address string
		Port    int
		Tags    []string
		Meta    map[string]string
		Weights struct{ Passing, Warning int }
	}
	Checks []struct {
		CheckID string
		Status  string
	}
}

// status is Consul's aggregated status of the entry's checks (as
// api.HealthChecks.AggregatedStatus): maintenance, then critical, then
// warning, then passing; no checks is passing; an unknown status is not
// healthy.
func (e *healthEntry) status() string {
	var warning, critical, maint bool
	for _, c := range e.Checks {
		if c.CheckID == api.NodeMaint || strings.HasPrefix(c.CheckID, api.ServiceMaintPrefix) {
			maint = true
			continue
		}
		switch c.Status {
		case api.HealthPassing:
		case api.HealthWarning:
			warning = true
		case api.HealthCritical:
			critical = true
		default:
			return ""
		}
	}
	switch {
	case maint:
		return api.HealthMaint
	case critical:
		return api.HealthCritical
	case warning:
		return api.HealthWarning
	}
	return api.HealthPassing
}

// endpoint is a Consul address parsed for dialing.
type endpoint struct {
	network, addr string // to dial
	host          string // the Host header
	tls           *tls.Config
}

// parseEndpoint parses host:port, http://host:port, https://host:port or
// unix:///path.
func parseEndpoint(raw string, ssl bool, tlsCfg *tls.Config) (endpoint, error) {
	scheme, rest := "http", raw
	if ssl {
		scheme = "https"
	}
	if i := strings.Index(raw, "://"); i >= 0 {
		scheme, rest = strings.ToLower(raw[:i]), raw[i+3:]
	}
	switch scheme {
	case "unix":
		return endpoint{network: "unix", addr: rest, host: "localhost"}, nil
	case "http", "https":
	default:
		return endpoint{}, fmt.Errorf("catalog: Consul address %q: unknown scheme %q (want http, https or unix)", raw, scheme)
	}
	rest = strings.TrimSuffix(rest, "/")
	if strings.Contains(rest, "/") {
		return endpoint{}, fmt.Errorf("catalog: Consul address %q: a path prefix is not supported", raw)
	}
	if _, _, err := net.SplitHostPort(rest); err != nil {
		port := "8500"
		if scheme == "https" {
			port = "8501"
		}
		rest = net.JoinHostPort(strings.Trim(rest, "[]"), port)
	}
	ep := endpoint{network: "tcp", addr: rest, host: rest}
	if scheme == "https" {
		c := tlsCfg.Clone()
		if c.ServerName == "" {
			c.ServerName, _, _ = net.SplitHostPort(rest)
		}
		ep.tls = c
	}
	return ep, nil
}

// maxBody bounds an answer from Consul (a service with very many instances
// is a few MB).
const maxBody = 64 << 20

var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

// poller is one service loop's connection to Consul.
type poller struct {
	w    *Watcher
	ep   int // index of the endpoint conn is connected to, -1 for none
	conn net.Conn
	stop func() bool // ends the AfterFunc that unblocks conn when the watch stops
}

func (p *poller) close() {
	if p.conn != nil {
		p.stop()
		p.conn.Close()
		p.conn, p.ep, p.stop = nil, -1, nil
	}
}

// health runs one (blocking) health query for service on endpoint ci. A
// kept-alive connection that turns out closed by the server is replaced
// once, at once, without counting as an error.
func (p *poller) health(ctx context.Context, ci int, service string, q *api.QueryOptions, deadline time.Time) ([]healthEntry, *api.QueryMeta, error) {
	if p.conn != nil && p.ep != ci {
		p.close()
	}
	for attempt := 0; ; attempt++ {
		reused := p.conn != nil
		out, meta, started, err := p.roundTrip(ctx, ci, service, q, deadline)
		if err == nil {
			return out, meta, nil
		}
		p.close()
		if !reused || started || attempt > 0 || ctx.Err() != nil {
			return nil, nil, fmt.Errorf("catalog: health of %q from %s: %w", service, p.w.cfg.Addresses[ci], err)
		}
	}
}

// roundTrip writes the request and reads the answer. started reports
// whether any byte of an answer came back.
func (p *poller) roundTrip(ctx context.Context, ci int, service string, q *api.QueryOptions, deadline time.Time) (out []healthEntry, meta *api.QueryMeta, started bool, err error) {
	ep := &p.w.endpoints[ci]
	if p.conn == nil {
		var c net.Conn
		onShortStack(func() {
			d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second, Deadline: deadline}
			if c, err = d.DialContext(ctx, ep.network, ep.addr); err != nil || ep.tls == nil {
				return
			}
			tc := tls.Client(c, ep.tls)
			if err = tc.HandshakeContext(ctx); err != nil {
				c.Close()
				return
			}
			c = tc
		})
		if err != nil {
			return nil, nil, false, err
		}
		p.conn, p.ep = c, ci
		p.stop = context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	}
	conn := p.conn
	if ctx.Err() != nil {
		return nil, nil, false, ctx.Err()
	}
	_ = conn.SetDeadline(deadline)
	if ctx.Err() != nil { // cancelled meanwhile: the AfterFunc may have run first
		return nil, nil, false, ctx.Err()
	}

	if _, err := conn.Write(p.request(service, q)); err != nil {
		return nil, nil, false, err
	}
	var first [1]byte
	if _, err := io.ReadFull(conn, first[:]); err != nil {
		return nil, nil, false, err
	}
	// Parsing and decoding grow a goroutine's stack to several kB, which a
	// long-lived loop would keep while it waits: do them on a short-lived one.
	type answer struct {
		out   []healthEntry
		meta  *api.QueryMeta
		close bool
		err   error
	}
	ch := make(chan answer, 1)
	go func() {
		var a answer
		a.out, a.meta, a.close, a.err = readAnswer(conn, first[0])
		ch <- a
	}()
	a := <-ch
	if a.err != nil {
		return nil, nil, true, a.err
	}
	if a.close {
		p.close()
	}
	return a.out, a.meta, true, nil
}

// onShortStack runs f on a goroutine of its own and waits for it. The
// watch loops live as long as their watch and mostly wait; what grows a
// stack (dialing, JSON, reflect.DeepEqual, logging) runs here, so that a
// thousand idle loops keep small stacks.
func onShortStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// readAnswer reads an HTTP answer to a health query from conn, whose first
// byte was already read. close reports that the server will close conn.
func readAnswer(conn net.Conn, first byte) (out []healthEntry, meta *api.QueryMeta, close bool, err error) {
	br := readerPool.Get().(*bufio.Reader)
	br.Reset(io.MultiReader(bytes.NewReader([]byte{first}), conn))
	defer func() {
		br.Reset(nil)
		readerPool.Put(br)
	}()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, nil, true, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, nil, true, fmt.Errorf("Consul answered %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	meta = &api.QueryMeta{}
	idx := resp.Header.Get("X-Consul-Index")
	if meta.LastIndex, err = strconv.ParseUint(idx, 10, 64); err != nil {
		return nil, nil, true, fmt.Errorf("bad X-Consul-Index %q", idx)
	}
	if lc, err := strconv.ParseUint(resp.Header.Get("X-Consul-LastContact"), 10, 32); err == nil {
		meta.LastContact = time.Duration(lc) * time.Millisecond
	}
	meta.KnownLeader = resp.Header.Get("X-Consul-KnownLeader") == "true"
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(&out); err != nil {
		return nil, nil, true, fmt.Errorf("decoding the answer: %w", err)
	}
	// Drain what follows the JSON value so the connection can be reused.
	if n, _ := io.Copy(io.Discard, io.LimitReader(resp.Body, 4096)); n >= 4096 {
		return nil, nil, true, errors.New("trailing data after the JSON answer")
	}
	return out, meta, resp.Close, nil
}

// request builds the GET request of a health query.
func (p *poller) request(service string, q *api.QueryOptions) []byte {
	v := url.Values{}
	if !p.w.cfg.IncludeWarning {
		v.Set("passing", "true")
	}
	if q.WaitIndex > 0 {
		v.Set("index", strconv.FormatUint(q.WaitIndex, 10))
		v.Set("wait", strconv.FormatInt(q.WaitTime.Milliseconds(), 10)+"ms")
	}
	if q.AllowStale {
		v.Set("stale", "")
	}
	if p.w.cfg.Datacenter != "" {
		v.Set("dc", p.w.cfg.Datacenter)
	}
	if !p.w.cfg.Streaming {
		v.Set("near", "_agent") // bypasses the agent's streaming backend
	}
	var b bytes.Buffer
	b.Grow(256)
	b.WriteString("GET /v1/health/service/")
	b.WriteString(url.PathEscape(service))
	b.WriteString("?")
	b.WriteString(v.Encode())
	b.WriteString(" HTTP/1.1\r\nHost: ")
	b.WriteString(p.w.endpoints[p.ep].host)
	b.WriteString("\r\nUser-Agent: attache-catalog\r\nAccept: application/json\r\n")
	if p.w.token != "" {
		b.WriteString("X-Consul-Token: ")
		b.WriteString(p.w.token)
		b.WriteString("\r\n")
	}
	b.WriteString("\r\n")
	return b.Bytes()
}
