package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"math"
	"net/http"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"attache/sidecar/breaker"
)

// lockedBuf is an io.Writer tests read from while the log writes.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuf) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuf) entries(t *testing.T) []AccessEntry {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []AccessEntry
	for _, line := range strings.Split(strings.TrimSpace(w.b.String()), "\n") {
		if line == "" {
			continue
		}
		var e AccessEntry
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("access log line %q: %v", line, err)
		}
		out = append(out, e)
	}
	// Lines of requests that end at once may be written out of order.
	sort.SliceStable(out, func(i, j int) bool { return out[i].Time.Before(out[j].Time) })
	return out
}

// TestAccessLogEngines: every engine (the event loops, the goroutine fast
// path, fasthttp, h2c) writes one line per proxied request with its
// fields, refusals included; upstream listeners log only with AccessLogAll.
func TestAccessLogEngines(t *testing.T) {
	h2c := &http.Transport{TLSClientConfig: &tls.Config{}}
	h2c.Protocols = new(http.Protocols)
	h2c.Protocols.SetUnencryptedHTTP2(true)
	for _, tt := range []struct {
		name   string
		eng    Engines
		client *http.Client
		proto  int
	}{
		{"event loops", Engines{}, newClient(), 1},
		{"goroutine fast path", Engines{NoEventLoops: true}, newClient(), 1},
		{"fasthttp", Engines{NoFastPath: true}, newClient(), 1},
		{"h2c", Engines{}, &http.Client{Transport: h2c, Timeout: 10 * time.Second}, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf lockedBuf
			var cfg Config
			cfg.AccessLog, cfg.AccessLogAll = &buf, true
			cfg.Upstreams = []Upstream{upstream("users"), upstream("empty")}
			b := newBackend(t, "users", "users-1", nil)
			tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"users": {b}, "empty": {}}, tt.eng)
			resp, err := tt.client.Get(tp.url("users", "/items/7?x=1"))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 || resp.ProtoMajor != tt.proto {
				t.Fatalf("got %d over %s", resp.StatusCode, resp.Proto)
			}
			resp, err = tt.client.Get(tp.url("empty", "/none"))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			var es []AccessEntry
			deadline := time.Now().Add(10 * time.Second)
			for len(es) < 2 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
				es = buf.entries(t)
			}
			if len(es) != 2 {
				t.Fatalf("%d access log lines, want 2: %+v", len(es), es)
			}
			ok, refused := es[0], es[1]
			if ok.Listener != "users" || ok.Method != "GET" || !strings.HasPrefix(ok.Path, "/items/7") || ok.Host == "" ||
				ok.Service != "users" || ok.Instance != "users-1" || ok.Status != 200 || ok.Tries != 1 || ok.Breaker != "closed" ||
				ok.Duration <= 0 || time.Since(ok.Time) > time.Minute {
				t.Errorf("answered request's line: %+v", ok)
			}
			if refused.Listener != "empty" || refused.Path != "/none" || refused.Status != resp.StatusCode || refused.Status != 503 ||
				refused.Tries != 0 || refused.Instance != "" {
				t.Errorf("refused request's line: %+v (client got %d)", refused, resp.StatusCode)
			}
		})
	}

	// Without AccessLogAll the upstream listeners log nothing.
	var buf lockedBuf
	b := newBackend(t, "users", "users-1", nil)
	tp := startProxy(t, Config{AccessLog: &buf, Upstreams: []Upstream{upstream("users")}}, breaker.Config{}, map[string][]*backend{"users": {b}})
	if code, _, _ := get(t, newClient(), tp.url("users", "/x")); code != 200 {
		t.Fatalf("got %d", code)
	}
	tp.cancel()
	<-tp.stopped // the writer has written all it had
	if es := buf.entries(t); len(es) != 0 {
		t.Errorf("upstream listener logged without AccessLogAll: %+v", es)
	}
}

// stalledWriter blocks every Write until released, and keeps what it
// was given.
type stalledWriter struct {
	entered chan struct{}
	release chan struct{}
	b       bytes.Buffer
}

func (w *stalledWriter) Write(p []byte) (int, error) {
	w.entered <- struct{}{}
	<-w.release
	w.b.Write(p)
	return len(p), nil
}

// checkLines parses every line of b as an AccessEntry (a torn or
// interleaved line does not parse) and returns them.
func checkLines(t *testing.T, b []byte) []AccessEntry {
	t.Helper()
	var out []AccessEntry
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var e AccessEntry
		if line[len(line)-1] != '\n' {
			t.Fatalf("line without its end: %.200q", line)
		}
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatalf("access log line %.200q: %v", line, err)
		}
		out = append(out, e)
	}
	return out
}

// TestAccessLogStalledWriter: a writer that does not return makes the log
// drop lines and count them once its buffer is full; recording never
// waits; when the writer comes back, every line not dropped is written,
// whole, at the latest when the log stops.
func TestAccessLogStalledWriter(t *testing.T) {
	w := &stalledWriter{entered: make(chan struct{}, 1), release: make(chan struct{})}
	a := newAccessLog(Config{AccessLog: w, AccessLogBuffer: 4096, AccessLogSample: 1}.withDefaults(), hclog.NewNullLogger())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.run(ctx) }()
	const n = 1000 // ~150 KiB of lines for a 4 KiB buffer
	recorded := make(chan struct{})
	go func() {
		defer close(recorded)
		for i := range n {
			a.record(&AccessEntry{Path: "/p/" + strconv.Itoa(i), Listener: "users", Method: "GET"})
		}
	}()
	select {
	case <-recorded:
	case <-time.After(10 * time.Second):
		t.Fatal("recording waited for a stalled writer")
	}
	<-w.entered // the writer holds a chunk and is stuck
	dropped := testutil.ToFloat64(a.dropped)
	if dropped == 0 || dropped >= n {
		t.Errorf("dropped %v of %d lines with the writer stuck and a 4 KiB buffer", dropped, n)
	}
	cancel()
	go func() {
		for range w.entered {
		}
	}()
	close(w.release)
	<-done
	es := checkLines(t, w.b.Bytes())
	if lines := testutil.ToFloat64(a.lines); int(lines) != len(es) || len(es)+int(dropped) != n {
		t.Errorf("%d lines written (counted %v), %v dropped, want %d in all", len(es), lines, dropped, n)
	}
	seen := map[string]bool{}
	for _, e := range es {
		if seen[e.Path] {
			t.Errorf("%s written twice", e.Path)
		}
		seen[e.Path] = true
	}
}

// signalWriter tells of every Write.
type signalWriter struct {
	lockedBuf
	wrote chan struct{}
}

func (w *signalWriter) Write(p []byte) (int, error) {
	n, err := w.lockedBuf.Write(p)
	select {
	case w.wrote <- struct{}{}:
	default:
	}
	return n, err
}

// TestAccessLogFlush: lines that fill no chunk are written by the
// writer's timer while the proxy runs, and at once when the log stops.
func TestAccessLogFlush(t *testing.T) {
	w := &signalWriter{wrote: make(chan struct{}, 1)}
	a := newAccessLog(Config{AccessLog: w, AccessLogSample: 1}.withDefaults(), hclog.NewNullLogger())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.run(ctx) }()
	a.record(&AccessEntry{Path: "/one"})
	<-w.wrote // the timer's flush: the log is still running
	if es := w.entries(t); len(es) != 1 || es[0].Path != "/one" {
		t.Fatalf("after the flush: %+v", es)
	}
	for i := range 10 { // quiet again: the next line sets the timer again
		a.record(&AccessEntry{Path: "/again/" + strconv.Itoa(i)})
	}
	<-w.wrote
	for i := range 100 {
		a.record(&AccessEntry{Path: "/last/" + strconv.Itoa(i)})
	}
	cancel()
	<-done
	es := w.entries(t)
	if len(es) != 111 || es[0].Path != "/one" {
		t.Fatalf("%d lines after the stop, want 111", len(es))
	}
	if got := testutil.ToFloat64(a.lines); got != 111 {
		t.Errorf("lines_total %v, want 111", got)
	}
}

// TestAccessLogConcurrent: requests ending at once on many goroutines,
// some with lines longer than a chunk, never tear or interleave a line;
// every line is written or counted as dropped.
func TestAccessLogConcurrent(t *testing.T) {
	var w lockedBuf
	a := newAccessLog(Config{AccessLog: &w, AccessLogBuffer: 64 << 10, AccessLogSample: 1}.withDefaults(), hclog.NewNullLogger())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.run(ctx) }()
	const goroutines, each = 8, 2000
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				path := "/g" + strconv.Itoa(g) + "/" + strconv.Itoa(i) + "/" + strings.Repeat("x\"\n", i%50)
				if i%500 == 7 {
					path += strings.Repeat("long", 20000) // 80 KB: more than a chunk
				}
				a.record(&AccessEntry{Path: path, Listener: "users", Method: "GET", Status: 200})
			}
		}()
	}
	wg.Wait()
	cancel()
	<-done
	w.mu.Lock()
	es := checkLines(t, w.b.Bytes())
	w.mu.Unlock()
	dropped := int(testutil.ToFloat64(a.dropped))
	if len(es)+dropped != goroutines*each || int(testutil.ToFloat64(a.lines)) != len(es) {
		t.Errorf("%d lines written, %d dropped, want %d in all", len(es), dropped, goroutines*each)
	}
	seen := map[string]bool{}
	for _, e := range es {
		key := e.Path[:strings.LastIndexByte(e.Path[:min(len(e.Path), 20)], '/')]
		if seen[key] {
			t.Errorf("%s written twice", key)
		}
		seen[key] = true
	}
}

// TestAccessLogGateway: the gateway's listeners, plain and TLS, log
// without AccessLogAll (the upstream listeners beside them do not).
func TestAccessLogGateway(t *testing.T) {
	for _, engine := range []Engines{{}, {NoEventLoops: true}, {NoFastPath: true}} {
		var buf lockedBuf
		a := newBackend(t, "a", "a1", nil)
		rt := &prefixRouter{routes: map[string]string{"/a/": "a"}}
		var cfg Config
		cfg.AccessLog = &buf
		cfg.Upstreams = []Upstream{upstream("a")}
		cfg.Gateways = []GatewayListener{
			{Addr: "127.0.0.1:0", Router: rt},
			{Addr: "127.0.0.1:0", Router: rt, TLS: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}},
		}
		tp := startProxy(t, cfg, breaker.Config{}, map[string][]*backend{"a": {a}}, engine)
		// HTTP/1.1 over TLS: neither the log nor the engine may leave the
		// request's URI parsed as https (the instance's client refuses it:
		// with fasthttp alone this answered 502).
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		for _, u := range []string{"http://" + tp.p.GatewayAddr(0).String() + "/a/1", "https://" + tp.p.GatewayAddr(1).String() + "/a/2", tp.url("a", "/a/3")} {
			if code, _, body := get(t, c, u); code != 200 {
				t.Fatalf("%s: %d %s", u, code, body)
			}
		}
		tp.cancel()
		select { // fasthttp alone (NoFastPath) once kept the TLS keep-alive connection to its idle timeout
		case <-tp.stopped:
		case <-time.After(10 * time.Second):
			t.Fatalf("%+v: Run did not return with a keep-alive TLS client", engine)
		}
		es := buf.entries(t)
		if len(es) != 2 || es[0].Listener != "gateway-http" || es[0].Path != "/a/1" || es[0].Instance != "a1" || es[0].Status != 200 ||
			es[1].Listener != "gateway-https" || es[1].Path != "/a/2" {
			t.Errorf("%+v: access log lines: %+v", engine, es)
		}
	}
}

// FuzzAppendAccess: the hand-written encoder gives the line encoding/json
// gives, once both are read back, whatever the request's strings hold
// (quotes, control characters, invalid UTF-8) and whatever the time and
// its zone (two lines through one time cache, the second ns later), and
// one line only.
func FuzzAppendAccess(f *testing.F) {
	f.Add("GET", "users.service.consul", "/a\"b\\c\n\x00\xff\u2028<&>", "i-1", int64(1700000000123456789), int64(1), 3600, 12.345, 200)
	f.Add("", "", "", "", int64(0), int64(0), 0, 0.0, 0)
	f.Add("GET", "h", "/", "", int64(1700000000999999999), int64(1), -34200, 0.5, 503)
	f.Add("GET", "h", "/", "", int64(1700000000999999999), int64(1), 0, 1.001, 200)
	f.Add("GET", "h", "/", "", int64(1700000000999999999), int64(1), 0, 123456.78, 200)
	f.Fuzz(func(t *testing.T, method, host, path, instance string, ns, later int64, offset int, dur float64, status int) {
		if math.IsNaN(dur) || math.IsInf(dur, 0) || offset <= -24*3600 || offset >= 24*3600 || later < 0 {
			return
		}
		zone := time.UTC
		if offset != 0 {
			zone = time.FixedZone("z", offset)
		}
		var tc timeCache
		for _, at := range []int64{ns, ns + later} {
			e := AccessEntry{Time: time.Unix(0, at).In(zone), Listener: "users", Method: method, Host: host, Path: path,
				Service: "users", Instance: instance, Status: status, Duration: dur, Tries: 2, Breaker: "closed"}
			if e.Time.Year() > 9999 || e.Time.Year() < 0 {
				return
			}
			if got, want := appendMillis(nil, dur), strconv.AppendFloat(nil, dur, 'f', -1, 64); !bytes.Equal(got, want) {
				t.Fatalf("duration %v: %s, strconv %s", dur, got, want)
			}
			if us := float64(ns%1e9) / 1000; true { // a whole number of microseconds, as logAccess gives
				if got, want := appendMillis(nil, us), strconv.AppendFloat(nil, us, 'f', -1, 64); !bytes.Equal(got, want) {
					t.Fatalf("duration %v: %s, strconv %s", us, got, want)
				}
			}
			line := appendAccess(nil, &e, &tc)
			if bytes.Count(line, []byte("\n")) != 1 || line[len(line)-1] != '\n' {
				t.Fatalf("not one line: %q", line)
			}
			want, err := json.Marshal(&e)
			if err != nil {
				t.Skip(err)
			}
			if got, exp := bytes.SplitN(line, []byte(`","`), 2)[0], bytes.SplitN(want, []byte(`","`), 2)[0]; !bytes.Equal(got, exp) {
				t.Fatalf("time %s, encoding/json %s", got, exp)
			}
			var got, exp AccessEntry
			if err := json.Unmarshal(line, &got); err != nil {
				t.Fatalf("%v: %s", err, line)
			}
			if err := json.Unmarshal(want, &exp); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, exp) {
				t.Fatalf("got  %+v\nwant %+v\nline %s", got, exp, line)
			}
		}
	})
}
