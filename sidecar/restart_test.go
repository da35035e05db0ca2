package sidecar

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"

	"attache/control/routes"
	"attache/demo"
	"attache/internal/handover"
	"attache/internal/reuseport"
	"attache/internal/testcluster"
)

// startSidecar runs a sidecar with args (which name its admin address) and
// returns a channel closed when Run returns, Run's error (once closed), and
// a stop function.
func startSidecar(t *testing.T, name string, args ...string) (<-chan struct{}, *error, func()) {
	t.Helper()
	cfg, err := ParseArgs(args, DefaultConfig(noEnv), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Name: name, Output: testWriter{t}, Level: hclog.Info}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() { runErr = s.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Errorf("%s did not stop within 20s", name)
		}
	})
	return done, &runErr, cancel
}

// loadStats counts what a load loop sent and what failed.
type loadStats struct {
	sent, failed atomic.Int64
	first        atomic.Value
}

func (l *loadStats) fail(err error) {
	l.failed.Add(1)
	l.first.CompareAndSwap(nil, err.Error())
}

func (l *loadStats) String() string {
	return fmt.Sprintf("%d sent, %d failed (first: %v)", l.sent.Load(), l.failed.Load(), l.first.Load())
}

// TestRestartUnderLoad replaces a running sidecar with a new one started
// with the same configuration, under constant HTTP load through an upstream
// listener (a new connection per request, and keep-alive connections whose
// requests Go's client may not retry), through a gateway listener, and
// constant DNS queries over UDP and TCP: the new one takes the sockets, serves once it has a view, the old
// one hands over and exits on its own. Before it, a successor that fails
// leaves the old one serving. No request fails and no query is lost; the
// registration stays with the new one all along, and when the new one is
// stopped alone it deregisters as usual.
func TestRestartUnderLoad(t *testing.T) {
	if !reuseport.Supported {
		t.Skip("no SO_REUSEPORT here")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	users := httptest.NewServer(demo.New("users", "users-1"))
	defer users.Close()
	svc := svcFile(t, "users", map[string]string{"users-1": users.Listener.Addr().String()})
	admin, up, dnsAddr, gw := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	dataDir := t.TempDir()
	args := []string{"-admin", admin, "-consul", c.Clients[0].HTTPAddr, "-service", svc, "-data-dir", dataDir,
		"-upstream", "users=" + up, "-dns", dnsAddr, "-gateway", gw, "-node", "gateway", "-drain-timeout", "5s"}
	// Routes in KV, as the control service writes them: the gateway
	// serves /users/.
	keys := routes.NewKV("")
	ver, _ := json.Marshal(routes.Version{Number: 1, Created: time.Now().UTC(), Source: "apply",
		Document: "route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n}\n"})
	kv := c.Clients[0].API(t).KV()
	for k, v := range map[string][]byte{keys.Version(1): ver, keys.Current(): []byte("1")} {
		if _, err := kv.Put(&api.KVPair{Key: k, Value: v}, nil); err != nil {
			t.Fatal(err)
		}
	}

	doneA, errA, _ := startSidecar(t, "A", args...)
	eventually(t, "A's /readyz 200", 20*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	eventually(t, "users through A", 10*time.Second, func() bool { code, _ := get(up, "/x"); return code == 200 })
	eventually(t, "users through A's gateway", 20*time.Second, func() bool { code, _ := get(gw, "/users/x"); return code == 200 })

	var fresh, keep, gateway, udp, tcp loadStats
	stop := make(chan struct{})
	var wg sync.WaitGroup
	deadline := time.Now().Add(60 * time.Second)
	loop := func(n int, f func(i int)) {
		for w := 0; w < n; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 20000 && time.Now().Before(deadline); i++ {
					select {
					case <-stop:
						return
					default:
					}
					f(i)
					time.Sleep(time.Millisecond)
				}
			}()
		}
	}
	httpLoad := func(st *loadStats, base string, cl *http.Client, method string) func(int) {
		return func(i int) {
			var body io.Reader
			if method == http.MethodPost {
				body = strings.NewReader("x")
			}
			req, _ := http.NewRequest(method, "http://"+base+"/items/"+fmt.Sprint(i), body)
			// A body Go's client cannot rewind: it never retries the
			// request, not even on a kept-alive connection closed under it.
			req.GetBody = nil
			st.sent.Add(1)
			resp, err := cl.Do(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			if err != nil {
				st.fail(err)
			}
		}
	}
	loop(2, httpLoad(&fresh, up, &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}, http.MethodGet))
	loop(1, httpLoad(&gateway, gw+"/users", &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}, http.MethodGet))
	loop(2, httpLoad(&keep, up, &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}}, http.MethodPost))
	dnsLoad := func(st *loadStats, net string) func(int) {
		cl := &miekg.Client{Net: net, Timeout: 2 * time.Second}
		return func(int) {
			m := new(miekg.Msg)
			m.SetQuestion("users.service.consul.", miekg.TypeA)
			st.sent.Add(1)
			in, _, err := cl.Exchange(m, dnsAddr)
			if err == nil && (in.Rcode != miekg.RcodeSuccess || len(in.Answer) != 1) {
				err = fmt.Errorf("rcode %s, %d answers", miekg.RcodeToString[in.Rcode], len(in.Answer))
			}
			if err != nil {
				st.fail(err)
			}
		}
	}
	loop(2, dnsLoad(&udp, "udp"))
	loop(1, dnsLoad(&tcp, "tcp"))
	time.Sleep(time.Second)

	// A successor that fails (here an extra listener whose address another
	// program holds) takes A's sockets, exits, and leaves A serving, still
	// the one a later successor takes over from.
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	doneBad, errBad, _ := startSidecar(t, "bad", append(args, "-upstream", "other="+held.Addr().String())...)
	select {
	case <-doneBad:
		if *errBad == nil || !strings.Contains((*errBad).Error(), held.Addr().String()) {
			t.Fatalf("the failing successor's Run = %v, want an error naming %s", *errBad, held.Addr())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the failing successor did not fail within 30s")
	}
	select {
	case <-doneA:
		t.Fatalf("A stopped (%v) when a successor failed", *errA)
	case <-time.After(500 * time.Millisecond):
	}

	// B, with the same configuration: it takes A's sockets, and once it
	// serves, A stops on its own.
	doneB, errB, stopB := startSidecar(t, "B", args...)
	select {
	case <-doneA:
		if *errA != nil {
			t.Fatalf("A's Run: %v", *errA)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("A did not hand over to B and stop within 30s")
	}
	sentAtHandover := fresh.sent.Load() + keep.sent.Load()
	// Served by B alone now, registered all along.
	agent := c.Clients[0].API(t)
	for i := 0; i < 10; i++ {
		svcs, err := agent.Agent().Services()
		if err != nil || svcs["users-1"] == nil || svcs["attache"] == nil || svcs["attache-gateway-gateway"] == nil {
			t.Fatalf("after the handover the agent has %v (%v), want users-1, attache and attache-gateway-gateway", svcs, err)
		}
		if code, body := get(admin, "/readyz"); code != 200 {
			t.Fatalf("/readyz after the handover: %d %s", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	for _, l := range []struct {
		name string
		st   *loadStats
	}{{"HTTP, a connection per request", &fresh}, {"HTTP, keep-alive, never retried", &keep}, {"gateway, a connection per request", &gateway}, {"DNS over UDP", &udp}, {"DNS over TCP", &tcp}} {
		t.Logf("%s: %s", l.name, l.st)
		if l.st.failed.Load() != 0 {
			t.Errorf("%s: %s", l.name, l.st)
		}
		if l.st.sent.Load() < 100 {
			t.Errorf("%s: only %d sent; the test proves nothing", l.name, l.st.sent.Load())
		}
	}
	if fresh.sent.Load()+keep.sent.Load() <= sentAtHandover {
		t.Error("no request after the handover")
	}

	// B alone: its stop deregisters, as without a handover.
	stopB()
	<-doneB
	if *errB != nil {
		t.Fatalf("B's Run: %v", *errB)
	}
	svcs, err := agent.Agent().Services()
	if err != nil || len(svcs) != 0 {
		t.Fatalf("after B stopped alone the agent has %v (%v), want nothing", svcs, err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, handover.SocketFile)); err != nil {
		t.Logf("handover socket after the stop: %v", err)
	}
	if conn, err := net.Dial("tcp", up); err == nil {
		conn.Close()
		t.Error("the upstream listener still accepts after both stopped")
	}
}
