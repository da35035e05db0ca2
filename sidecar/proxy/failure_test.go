package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"attache/demo"
	"attache/internal/testcluster"
	"attache/sidecar/breaker"
	"attache/sidecar/catalog"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
)

// The failure semantics of issues 17 and 20, against a real Consul
// cluster: demo instances registered with the client agent with HTTP
// health checks, the real catalog watcher, the proxy on the event loops or
// (-noloop) the goroutine path. Durations are short so that the suite stays
// quick; assertions are on counts and states with generous bounds.

type mesh struct {
	t        *testing.T
	src      Source
	log      hclog.Logger
	register func(service string, in *minst) // with a health check of its /health
}

// startMesh starts a real Consul cluster and the catalog watcher over its
// client agent.
func startMesh(t *testing.T) *mesh {
	if testing.Short() {
		t.Skip("starts a Consul cluster")
	}
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: testWriter{t}})
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	client := c.Clients[0]
	wcfg := catalog.DefaultConfig()
	wcfg.Addresses = []string{client.HTTPAddr}
	wcfg.Node = client.Name
	wcfg.Wait = 30 * time.Second
	wcfg.MinInterval = 5 * time.Millisecond
	wcfg.RetryBase = 50 * time.Millisecond
	wcfg.RetryMax = 500 * time.Millisecond
	wcfg.Logger = log
	w, err := catalog.NewWatcher(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = w.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	capi := client.API(t)
	m := &mesh{t: t, src: w, log: log}
	m.register = func(service string, in *minst) {
		u, _ := url.Parse("http://" + in.addr)
		port, _ := strconv.Atoi(u.Port())
		err := capi.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: in.id, Name: service, Address: "127.0.0.1", Port: port,
			Check: &api.AgentServiceCheck{HTTP: "http://" + in.addr + "/health", Interval: "300ms", Timeout: "5s"},
		})
		if err != nil {
			m.t.Fatal(err)
		}
	}
	return m
}

// minst is a demo instance registered with Consul, its HTTP check every
// 300 ms (5 s timeout: a loaded machine is slow to answer; a killed
// instance refuses at once); restart brings it back on the same port after kill.
type minst struct {
	id   string
	demo *demo.Server
	addr string
	mu   sync.Mutex
	srv  *httptest.Server
}

func (m *mesh) add(service string, n int) []*minst {
	var out []*minst
	for i := 1; i <= n; i++ {
		id := fmt.Sprintf("%s-%d", service, i)
		in := &minst{id: id, demo: demo.New(service, id)}
		in.srv = httptest.NewServer(in.demo)
		in.addr = in.srv.Listener.Addr().String()
		m.t.Cleanup(func() { in.kill() })
		m.register(service, in)
		out = append(out, in)
	}
	return out
}

func (in *minst) kill() {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.srv != nil {
		in.srv.Listener.Close()
		in.srv.CloseClientConnections()
		in.srv.Close()
		in.srv = nil
	}
}

func (in *minst) restart(t *testing.T) {
	in.mu.Lock()
	defer in.mu.Unlock()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", in.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("restart %s: %v", in.id, err)
	}
	in.srv = httptest.NewUnstartedServer(in.demo)
	in.srv.Listener.Close()
	in.srv.Listener = ln
	in.srv.Start()
}

// healthy waits until the view holds n instances of service.
func (m *mesh) healthy(service string, n int) {
	m.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	m.src.Want(ctx, service)
	cancel()
	for {
		if svc, ok := m.src.Load().Service(service); ok && len(svc.Instances) == n {
			return
		}
		if time.Now().After(deadline) {
			svc, _ := m.src.Load().Service(service)
			m.t.Fatalf("%s: want %d healthy instances, view has %+v", service, n, svc)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// proxy starts a proxy with one upstream listener for service, and its
// breaker registry (running), and returns the listener's URL.
func (m *mesh) proxy(service string, cfg Config, bcfg breaker.Config) (string, *breaker.Registry) {
	t := m.t
	if cfg.EventLoops == 0 {
		cfg.EventLoops = 2
	}
	br, err := breaker.New(bcfg, m.log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	cfg.Upstreams = []Upstream{{Name: service, Addr: "127.0.0.1:0"}}
	cfg.Logger, cfg.Registerer = m.log, prometheus.NewRegistry()
	p, err := New(cfg, m.src, br, WithEngines(testEngines()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = br.Run(ctx) }()
	go func() {
		defer wg.Done()
		if err := p.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	<-p.Ready()
	return "http://" + p.Addr(service).String() + "/items/1", br
}

// answer is one request's outcome as a caller saw it.
type answer struct {
	start, end time.Time
	code       int
	fallback   string // X-Attache-Fallback
	breaker    string // X-Attache-Breaker
	err        error
}

// load runs callers that each send requests one after another until stop
// is closed (or max requests in all), and returns every answer.
func load(u string, callers, max int, stop <-chan struct{}) []answer {
	c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: callers}}
	defer c.CloseIdleConnections()
	var mu sync.Mutex
	var all []answer
	var n atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n.Add(1) <= int64(max) {
				select {
				case <-stop:
					return
				default:
				}
				a := answer{start: time.Now()}
				resp, err := c.Get(u)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					a.code, a.fallback, a.breaker = resp.StatusCode, resp.Header.Get("X-Attache-Fallback"), resp.Header.Get("X-Attache-Breaker")
				}
				a.err, a.end = err, time.Now()
				mu.Lock()
				all = append(all, a)
				mu.Unlock()
				time.Sleep(2 * time.Millisecond) // ~hundreds of requests/s per caller at most
			}
		}()
	}
	wg.Wait()
	return all
}

func ejected(br *breaker.Registry, service, id string) bool { return br.Ejected(service, id) }

func TestFailureSemantics(t *testing.T) {
	m := startMesh(t)

	// Issue 17, steps 1-3: b2 killed under load, started again, then b1
	// answers 500: b2 comes back with a clean record, so the requests after
	// b1's failures go to b2 and at least 99 % succeed.
	t.Run("rolling restart", func(t *testing.T) {
		m.t = t
		bs := m.add("roll", 2)
		m.healthy("roll", 2)
		u, br := m.proxy("roll", Config{TryTimeout: time.Second, RequestTimeout: 3 * time.Second}, breaker.Config{})
		stop := make(chan struct{})
		var got []answer
		done := make(chan struct{})
		go func() { got = load(u, 4, 1_000_000, stop); close(done) }()
		time.Sleep(300 * time.Millisecond)
		bs[1].kill()
		m.healthy("roll", 1)
		close(stop)
		<-done
		fails := 0
		for _, a := range got {
			if a.err != nil || a.code != 200 {
				fails++
			}
		}
		t.Logf("step 1: %d of %d requests failed with b2 killed", fails, len(got))
		if fails*100 > len(got) {
			t.Fatalf("step 1: %d of %d failed", fails, len(got))
		}
		bs[1].restart(t)
		m.healthy("roll", 2)
		time.Sleep(100 * time.Millisecond) // the proxy follows the view
		if ejected(br, "roll", bs[1].id) {
			t.Fatal("b2 came back in Consul but is still ejected")
		}
		bs[0].demo.SetFault(demo.ModeFail, 0)
		step1 := len(got) - fails
		got = load(u, 4, 400, nil)
		ok := 0
		for _, a := range got {
			if a.err == nil && a.code == 200 {
				ok++
			}
		}
		t.Logf("steps 1-3: %d of %d requests succeeded", step1+ok, step1+fails+len(got))
		t.Logf("step 3: %d of %d requests succeeded with b1 failing; b1 ejected %v", ok, len(got), ejected(br, "roll", bs[0].id))
		if ok*100 < 99*len(got) {
			t.Fatalf("step 3: only %d of %d succeeded", ok, len(got))
		}
		if st := br.Service("roll").State(); st != breaker.Closed {
			t.Fatalf("breaker %s", st)
		}
	})

	// Issue 17, step 4: calls while the service has no healthy instance do
	// not open its breaker; calls work as soon as instances are healthy.
	t.Run("no healthy instance", func(t *testing.T) {
		m.t = t
		bs := m.add("ghost", 1)
		bs[0].demo.SetFault(demo.ModeHealthFail, 0)
		u, br := m.proxy("ghost", Config{}, breaker.Config{})
		got := load(u, 4, 200, nil)
		for _, a := range got {
			if a.err != nil || a.code != 503 {
				t.Fatalf("no instance: %d %v", a.code, a.err)
			}
		}
		if st := br.Service("ghost").State(); st != breaker.Closed {
			t.Fatalf("breaker %s after %d calls with no instance", st, len(got))
		}
		bs[0].demo.SetFault(demo.ModeOK, 0)
		m.healthy("ghost", 1)
		time.Sleep(100 * time.Millisecond)
		got = load(u, 4, 100, nil)
		for _, a := range got {
			if a.err != nil || a.code != 200 {
				t.Fatalf("after the instance became healthy: %d %v", a.code, a.err)
			}
		}
	})

	// Issue 20: every instance hangs; the breaker opens while the calls
	// hang, answers come from the fallback at once, and after recovery
	// nothing is refused for longer than the open period and the trial.
	for _, callers := range []int{2, 8, 32} {
		t.Run(fmt.Sprintf("all hang, %d callers", callers), func(t *testing.T) {
			m.t = t
			svc := fmt.Sprintf("hang%d", callers)
			bs := m.add(svc, 2)
			m.healthy(svc, 2)
			// SlowCallDuration 1 s: on a loaded 2-core machine under -race
			// a few hundred ms with nothing answered happen.
			bcfg := breaker.Config{SlowCallDuration: time.Second, Window: 2 * time.Second, OpenDuration: time.Second}
			u, br := m.proxy(svc, Config{
				TryTimeout: 3 * time.Second, RequestTimeout: 8 * time.Second,
				Fallbacks: map[string]Fallback{svc: {Body: "Stock status unavailable", ContentType: "text/plain"}},
			}, bcfg)
			stop := make(chan struct{})
			var got []answer
			done := make(chan struct{})
			go func() { got = load(u, callers, 1_000_000, stop); close(done) }()
			time.Sleep(500 * time.Millisecond)
			for deadline := time.Now().Add(5 * time.Second); br.Service(svc).State() != breaker.Closed && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond) // a slow start on a loaded machine may have tripped it
			}
			hung := time.Now()
			for _, b := range bs {
				b.demo.SetFault(demo.ModeHang, 0)
			}
			var opened time.Time
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if br.BreakerOpen(svc) {
					opened = time.Now()
					break
				}
			}
			if opened.IsZero() {
				close(stop)
				<-done
				t.Fatalf("breaker never opened while every instance hung (%d callers)", callers)
			}
			time.Sleep(4 * time.Second) // past the stuck calls' try timeout
			recovered := time.Now()
			for _, b := range bs {
				b.demo.SetFault(demo.ModeOK, 0)
			}
			time.Sleep(3 * time.Second)
			close(stop)
			<-done
			// A trial in flight at the recovery fails at SlowCallDuration,
			// the breaker stays open OpenDuration more, then its trials pass.
			settle := bcfg.SlowCallDuration + bcfg.OpenDuration + 500*time.Millisecond
			var after, fast, fallback, refusedLate, okLate, late int
			lastRefused := recovered
			for _, a := range got {
				if a.start.After(opened) && a.start.Before(recovered) {
					after++
					if a.end.Sub(a.start) < 300*time.Millisecond {
						fast++
					}
					if a.code == 200 && a.fallback != "" {
						fallback++
					}
				}
				if a.start.After(recovered) && a.fallback == CauseBreakerOpen {
					if a.start.After(lastRefused) {
						lastRefused = a.start
					}
				}
				if a.start.After(recovered.Add(settle)) {
					late++
					if a.fallback == CauseBreakerOpen || a.fallback == CauseMaxRequests {
						refusedLate++
					} else if a.code == 200 && a.fallback == "" {
						okLate++
					}
				}
			}
			t.Logf("%d callers: opened %v after the hang (bound %v); %d calls between open and recovery, %d answered within 300ms, %d by the fallback; last refusal %v after recovery; %d of %d calls from %v after recovery refused",
				callers, opened.Sub(hung).Round(time.Millisecond), bcfg.SlowCallDuration+bcfg.Window/10,
				after, fast, fallback, lastRefused.Sub(recovered).Round(time.Millisecond), refusedLate, late, settle)
			if d := opened.Sub(hung); d > bcfg.SlowCallDuration+bcfg.Window/10+2*time.Second {
				t.Errorf("opened %v after the hang", d)
			}
			if after == 0 || fast*10 < after*9 || fallback*10 < after*9 {
				t.Errorf("while open: %d calls, %d fast, %d fallback", after, fast, fallback)
			}
			// (Consul may also take a instance out now and then on a loaded
			// machine: "no-healthy" is not the breaker's refusal.)
			if refusedLate != 0 || okLate*10 < late*9 {
				causes := map[string]int{}
				for _, a := range got {
					if a.start.After(recovered.Add(settle)) {
						causes[fmt.Sprint(a.code, a.fallback)]++
					}
				}
				t.Errorf("after recovery: %d of %d refused, %d ok: %v; state %+v", refusedLate, late, okLate, causes, br.State())
			}
		})
	}

	// Issue 20: every instance answers 500; the fallback answers from the
	// first failure on, closed breaker or open.
	t.Run("all fail", func(t *testing.T) {
		m.t = t
		bs := m.add("failing", 2)
		m.healthy("failing", 2)
		u, br := m.proxy("failing", Config{
			Fallbacks: map[string]Fallback{"failing": {Body: "Stock status unavailable", ContentType: "text/plain"}},
		}, breaker.Config{})
		for _, b := range bs {
			b.demo.SetFault(demo.ModeFail, 0)
		}
		got := load(u, 8, 400, nil)
		causes := map[string]int{}
		for _, a := range got {
			if a.err != nil || a.code != 200 || a.fallback == "" {
				t.Fatalf("not the fallback: %d %q %v", a.code, a.fallback, a.err)
			}
			causes[a.fallback]++
		}
		t.Logf("%d calls, fallback causes %v, breaker %s", len(got), causes, br.Service("failing").State())
		if causes[Cause5xx] == 0 || causes[CauseBreakerOpen] == 0 {
			t.Fatalf("causes %v: want upstream-5xx then breaker-open", causes)
		}
	})

	// Issue 20: one instance hangs; it is ejected, the breaker stays closed
	// and no caller waits much longer than one try timeout.
	t.Run("one hangs", func(t *testing.T) {
		m.t = t
		bs := m.add("onehang", 2)
		m.healthy("onehang", 2)
		try := 300 * time.Millisecond
		u, br := m.proxy("onehang", Config{TryTimeout: try, RequestTimeout: 3 * time.Second},
			breaker.Config{SlowCallDuration: time.Second, Window: 2 * time.Second})
		bs[0].demo.SetFault(demo.ModeHang, 0)
		got := load(u, 8, 1500, nil)
		slow, bad, gone := 0, 0, 0
		codes := map[string]int{}
		for _, a := range got {
			if a.code == 503 && a.err == nil && a.fallback == "" && a.breaker == "" {
				gone++ // Consul had no instance passing (a loaded machine's checks time out): not the proxy's doing
				continue
			}
			if a.err != nil || a.code != 200 {
				bad++
				codes[fmt.Sprint(a.code, a.err)]++
			}
			if a.end.Sub(a.start) > try+time.Second {
				slow++
			}
		}
		t.Logf("%d calls: %d not 200, %d longer than the try timeout + 1s, %d with no instance in Consul's view; ejected %v; breaker %s",
			len(got), bad, slow, gone, ejected(br, "onehang", bs[0].id), br.Service("onehang").State())
		if bad*100 > len(got) || slow*100 > len(got) { // a loaded machine may time out a good try now and then
			t.Fatalf("%d failed (%v), %d slow", bad, codes, slow)
		}
		if !ejected(br, "onehang", bs[0].id) || br.Service("onehang").State() != breaker.Closed {
			t.Fatalf("hung instance ejected %v, breaker %s", ejected(br, "onehang", bs[0].id), br.Service("onehang").State())
		}
	})
}
