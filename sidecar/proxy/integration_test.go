package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
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

// TestIntegration runs the proxy over the real catalog watcher against a
// real three-server Consul cluster: demo backends registered through the
// client agent with HTTP health checks, one of them killed under load.
func TestIntegration(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Consul cluster")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	client := c.Clients[0]
	capi := client.API(t)

	type inst struct {
		id   string
		demo *demo.Server
		srv  *httptest.Server
	}
	var insts []*inst
	for _, id := range []string{"inventory-1", "inventory-2"} {
		d := demo.New("inventory", id)
		srv := httptest.NewServer(d)
		t.Cleanup(srv.Close)
		u, _ := url.Parse(srv.URL)
		port, _ := strconv.Atoi(u.Port())
		err := capi.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "inventory", Address: "127.0.0.1", Port: port,
			Check: &api.AgentServiceCheck{HTTP: srv.URL + "/health", Interval: "500ms", Timeout: "5s"}, // a loaded machine is slow to answer; a killed instance refuses at once
		})
		if err != nil {
			t.Fatal(err)
		}
		insts = append(insts, &inst{id: id, demo: d, srv: srv})
	}

	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{t}})
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
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	wg.Add(1)
	go func() { defer wg.Done(); _ = w.Run(ctx) }()

	// A short breaker window, so that the load test's successes have left it
	// when the breaker scenario runs.
	br, err := breaker.New(breaker.Config{Window: 2 * time.Second}, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{
		Upstreams:     []Upstream{{Name: "inventory", Addr: "127.0.0.1:0"}},
		HTTPProxyAddr: "127.0.0.1:0",
		Node:          client.Name,
		Logger:        log,
		Registerer:    prometheus.NewRegistry(),
	}, w, br)
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := p.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	<-p.Ready()
	hc := newClient()
	upURL := "http://" + p.Addr("inventory").String() + "/items/1"

	// Both instances become passing and both get traffic.
	seen := map[string]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < 2 && time.Now().Before(deadline) {
		resp, err := hc.Get(upURL)
		if err != nil {
			t.Fatal(err)
		}
		var r demo.Response
		if resp.StatusCode == 200 {
			json.NewDecoder(resp.Body).Decode(&r)
			seen[r.Instance] = true
		} else {
			time.Sleep(50 * time.Millisecond)
		}
		resp.Body.Close()
	}
	if len(seen) < 2 {
		t.Fatalf("instances seen through the proxy: %v", seen)
	}

	// Through the HTTP proxy listener, with the service from the host.
	proxyURL, _ := url.Parse("http://" + p.Addr("").String())
	viaProxy := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}}
	if code, _, body := get(t, viaProxy, "http://inventory.service.consul/items/2"); code != 200 {
		t.Fatalf("via HTTP proxy: %d %s", code, body)
	}

	// One of two instances killed under constant load: at least 99.9% of
	// requests succeed, and Consul's check then takes it out of the view.
	const total, workers = 2000, 4
	var ok, failed, next atomic.Int64
	var lwg sync.WaitGroup
	for i := 0; i < workers; i++ {
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			for {
				n := next.Add(1)
				if n > total {
					return
				}
				if n == total/4 {
					insts[1].srv.Listener.Close()
					insts[1].srv.CloseClientConnections()
				}
				resp, err := hc.Get(upURL)
				if err != nil {
					if failed.Add(1) <= 3 {
						t.Logf("failed: %v", err)
					}
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				} else if failed.Add(1) <= 3 {
					t.Logf("failed: %d %s", resp.StatusCode, body)
				}
			}
		}()
	}
	lwg.Wait()
	t.Logf("ok %d failed %d", ok.Load(), failed.Load())
	if rate := float64(ok.Load()) / total; rate < 0.999 {
		t.Fatalf("success rate %.4f < 0.999 with one of two instances killed", rate)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		svc, _ := w.Load().Service("inventory")
		if svc != nil && len(svc.Instances) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("killed instance still in the view: %+v", svc)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The survivor starts failing (its health check too): the caller is
	// told at once — the breaker is open, or Consul has taken the instance
	// out and there is no healthy instance, which does not count against
	// the breaker.
	insts[0].demo.SetFault(demo.ModeFail, 0)
	var last int
	var lastBody []byte
	var lastHdr http.Header
	deadline = time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		last, lastHdr, lastBody = get(t, hc, upURL)
		if lastHdr.Get("X-Attache-Breaker") == "open" || bytes.Contains(lastBody, []byte("no healthy instance")) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if last != 503 {
		t.Fatalf("failing survivor: %d %v %s", last, lastHdr, lastBody)
	}
	if lastHdr.Get("X-Attache-Breaker") == "open" {
		var st struct {
			Service, State string
		}
		if err := json.Unmarshal(lastBody, &st); err != nil || st.Service != "inventory" || st.State != "open" {
			t.Fatalf("breaker body %s", lastBody)
		}
		// Open means no request reaches the service.
		before := insts[0].demo.Count()
		for i := 0; i < 20; i++ {
			get(t, hc, upURL)
		}
		if n := insts[0].demo.Count() - before; n != 0 {
			t.Fatalf("%d requests reached the service while its breaker was open", n)
		}
	}
	// Once Consul has it out, calls with no instance leave the breaker
	// alone, and when it is healthy again it is called at once: a breaker
	// opened before closes when instances appear, well before OpenDuration.
	deadline = time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if svc, _ := w.Load().Service("inventory"); svc != nil && len(svc.Instances) == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 50; i++ {
		if code, h, body := get(t, hc, upURL); code != 503 || h.Get("X-Attache-Breaker") == "" && !bytes.Contains(body, []byte("no healthy instance")) {
			t.Fatalf("no instance: %d %v %s", code, h, body)
		}
	}
	insts[0].demo.SetFault(demo.ModeOK, 0)
	recovered := time.Now()
	for {
		code, _, _ := get(t, hc, upURL)
		if code == 200 {
			break
		}
		if time.Since(recovered) > 8*time.Second {
			t.Fatalf("not called again %v after it became healthy (breaker %s)", time.Since(recovered), br.Service("inventory").State())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("called again %v after the instance became healthy", time.Since(recovered).Round(time.Millisecond))
}
