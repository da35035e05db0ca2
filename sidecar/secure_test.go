package sidecar

import (
	"bytes"
	"encoding/json"
	"html"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	miekg "github.com/miekg/dns"

	"attache/control/routes"
	"attache/demo"
	"attache/internal/testcluster"
	"attache/internal/testrun"
)

// TestSidecarSecureConsul runs sidecars against a cluster as production
// runs it — ACLs with default_policy "deny", HTTPS only with
// verify_incoming — configured the HashiCorp way (CONSUL_HTTP_ADDR,
// CONSUL_HTTP_TOKEN, CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY).
// With the README's sidecar policy, registration, DNS and both proxy
// listeners and a gateway following routes in KV work; with a token missing rules, the sidecar names each
// missing rule and serves what it may read. No token appears in a log line
// or an admin endpoint.
func TestSidecarSecureConsul(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Servers: 1, Clients: 2, ACL: true, TLS: true})
	mgmt := c.Clients[0].Client()
	backendSrv := httptest.NewServer(demo.New("users", "users-1"))
	defer backendSrv.Close()
	port := strings.Split(backendSrv.Listener.Addr().String(), ":")[1]
	svcFile := func(name, id string) string {
		f := filepath.Join(t.TempDir(), id+".hcl")
		os.WriteFile(f, []byte(`service {
  name = "`+name+`"
  id   = "`+id+`"
  address = "127.0.0.1"
  port = `+port+`
}`), 0o644)
		return f
	}
	registered := func(id string) bool {
		name := strings.TrimRight(id, "-0123456789") // users-1: users; attache itself
		if strings.HasPrefix(id, "attache-gateway-") {
			name = "attache-gateway" // its ID is attache-gateway-<node>
		}
		entries, _, err := mgmt.Catalog().Service(name, "", nil)
		for _, e := range entries {
			if e.ServiceID == id {
				return true
			}
		}
		_ = err
		return false
	}
	var logs syncBuffer
	env := func(agent *testcluster.Agent, token string) func(string) string {
		return func(k string) string {
			return map[string]string{
				"CONSUL_HTTP_ADDR":   agent.URL(),
				"CONSUL_HTTP_TOKEN":  token,
				"CONSUL_CACERT":      c.TLS.CAFile,
				"CONSUL_CLIENT_CERT": c.TLS.CertFile,
				"CONSUL_CLIENT_KEY":  c.TLS.KeyFile,
			}[k]
		}
	}

	// The README's policies (a gateway: the sidecar's and the gateway's
	// rules, its node named "gateway" as in the README): everything works.
	token := c.Token(t, "attache-gateway", testcluster.READMEPolicy(t, "attache-sidecar")+testcluster.READMEPolicy(t, "attache-gateway"))
	dnsAddr, upstream, httpProxy, gw := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	admin, _ := runSidecarEnv(t, env(c.Clients[0], token), &logs, "-service", svcFile("users", "users-1"), "-node", "gateway",
		"-dns", dnsAddr, "-upstream", "users="+upstream, "-http-proxy", httpProxy, "-gateway", gw, "-data-dir", t.TempDir())
	eventually(t, "/readyz 200", 20*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	for _, id := range []string{"attache", "users-1", "attache-gateway-gateway"} { // the gateway registers as attache-gateway-<node>
		eventually(t, id+" registered", 10*time.Second, func() bool { return registered(id) })
	}
	eventually(t, "users.service.consul from the sidecar's DNS", 10*time.Second, func() bool {
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		in, err := miekg.Exchange(m, dnsAddr)
		return err == nil && len(in.Answer) == 1
	})
	if code, body := get(upstream, "/items/1"); code != 200 || !strings.Contains(body, `"instance":"users-1"`) {
		t.Errorf("through the upstream listener: %d %s", code, body)
	}
	pu, _ := url.Parse("http://" + httpProxy)
	pc := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}}
	if resp, err := pc.Get("http://users.service.consul/items/2"); err != nil || resp.StatusCode != 200 {
		t.Errorf("through the HTTP proxy: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	// Routes published in KV (as the control service writes them): the
	// gateway reads them, serves /users/ and records what it applied.
	keys := routes.NewKV("")
	ver, _ := json.Marshal(routes.Version{Number: 1, Created: time.Now().UTC(), Source: "apply",
		Document: "route \"users\" {\n  prefix  = \"/users/\"\n  service = \"users\"\n}\n"})
	for k, v := range map[string][]byte{keys.Version(1): ver, keys.Current(): []byte("1")} {
		if _, err := mgmt.KV().Put(&api.KVPair{Key: k, Value: v}, nil); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the gateway serving /users/", 20*time.Second, func() bool {
		code, body := get(gw, "/users/1")
		return code == 200 && strings.Contains(body, `"instance":"users-1"`)
	})
	eventually(t, "routes/applied/gateway written", 10*time.Second, func() bool {
		p, _, err := mgmt.KV().Get(keys.Applied("gateway"), nil)
		return err == nil && p != nil && strings.Contains(string(p.Value), `"version":1`)
	})
	if st := snapshotStatus(t, admin); len(st.ACLDenied) > 0 || !st.Connected {
		t.Errorf("with the README's policy: connected %v, ACL gaps %q", st.Connected, st.ACLDenied)
	}

	// A token missing rules (no service_prefix read, no write on inventory)
	// on the other node: each missing rule is named; users, which it may
	// read, is served. inventory-1 is there for it to miss.
	if err := mgmt.Agent().ServiceRegister(&api.AgentServiceRegistration{Name: "inventory", ID: "inventory-1", Address: "127.0.0.1", Port: 1}); err != nil {
		t.Fatal(err)
	}
	partial := c.Token(t, "partial", `node_prefix "" { policy = "read" }
service "attache" { policy = "write" }
service "users" { policy = "read" }`)
	dns2 := freeAddr(t)
	admin2, _ := runSidecarEnv(t, env(c.Clients[1], partial), &logs, "-service", svcFile("inventory", "inventory-2"),
		"-dns", dns2, "-watch-service", "users", "-watch-service", "inventory")
	want := []string{
		`service:read on "inventory" (service "inventory" { policy = "read" })`,
		`service:read on names starting with "" (service_prefix "" { policy = "read" })`,
	}
	eventually(t, "the missing read rules named in /v1/snapshot", 20*time.Second, func() bool {
		st := snapshotStatus(t, admin2)
		for _, w := range want {
			found := false
			for _, d := range st.ACLDenied {
				found = found || strings.Contains(d, w)
			}
			if !found {
				return false
			}
		}
		return true
	})
	eventually(t, "the missing write rule named in /readyz", 20*time.Second, func() bool {
		code, body := get(admin2, "/readyz")
		return code == 503 && strings.Contains(body, `it lacks service:write on \"inventory\" (service \"inventory\" { policy = \"write\" })`)
	})
	eventually(t, "users served by the partial token's sidecar", 10*time.Second, func() bool {
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		in, err := miekg.Exchange(m, dns2)
		return err == nil && len(in.Answer) == 1
	})
	if !registered("attache") {
		t.Error("the partial token's sidecar did not register itself (it may)")
	}
	for _, w := range append(want, `service:write on \"inventory\"`) {
		w = strings.ReplaceAll(w, `\"`, `"`)
		if !strings.Contains(logs.String(), strings.ReplaceAll(w, `"`, `\"`)) && !strings.Contains(logs.String(), w) {
			t.Errorf("no log line names %s", w)
		}
	}

	// A gateway whose token lacks key:read on the routes: /v1/routes (and
	// the status page, which shows the same status) names the README's
	// rule, not Consul's text with the token's accessor ID.
	noKey := c.Token(t, "no-key-read", testcluster.READMEPolicy(t, "attache-sidecar")+`service "attache-gateway" { policy = "write" }`)
	admin4, _ := runSidecarEnv(t, env(c.Clients[1], noKey), &logs, "-gateway", freeAddr(t), "-data-dir", t.TempDir())
	wantGW := `Consul refused the ACL token: it lacks key:read on "attache/routes/current" (key_prefix "attache/routes/" { policy = "read" })`
	var gwStatus struct {
		LastError string `json:"last_error"`
	}
	eventually(t, "the gateway's missing key:read named in /v1/routes", 20*time.Second, func() bool {
		_, body := get(admin4, "/v1/routes")
		return json.Unmarshal([]byte(body), &gwStatus) == nil && gwStatus.LastError != ""
	})
	if gwStatus.LastError != wantGW {
		t.Errorf("/v1/routes last_error\n got %s\nwant %s", gwStatus.LastError, wantGW)
	}
	if _, page := get(admin4, "/"); !strings.Contains(page, html.EscapeString(wantGW)) {
		t.Errorf("the status page does not show %s", wantGW)
	}

	// An unknown token is said to be unknown.
	admin3, _ := runSidecarEnv(t, env(c.Clients[1], "6d2c0e51-3a43-4a8f-9b65-8a1f0b9a2b7e"), &logs, "-watch-service", "users")
	eventually(t, "an unknown token named on /readyz", 20*time.Second, func() bool {
		code, body := get(admin3, "/readyz")
		return code == 503 && strings.Contains(body, "Consul does not know the ACL token (ACL not found)")
	})

	// No token anywhere: logs, every admin endpoint of every sidecar.
	var out bytes.Buffer
	out.WriteString(logs.String())
	for _, a := range []string{admin, admin2, admin3, admin4} {
		for _, p := range []string{"/", "/healthz", "/readyz", "/metrics", "/v1/snapshot", "/v1/breakers", "/v1/routes"} {
			_, body := get(a, p)
			out.WriteString(body)
		}
	}
	for name, secret := range map[string]string{"gateway": token, "partial": partial, "no-key-read": noKey, "management": c.ManagementToken, "unknown": "6d2c0e51-3a43-4a8f-9b65-8a1f0b9a2b7e"} {
		if strings.Contains(out.String(), secret) {
			t.Errorf("the %s token appears in the sidecars' logs or admin endpoints", name)
		}
	}
	if !strings.Contains(out.String(), "acl_denied") {
		t.Error("the grep read no snapshot status: it proves nothing")
	}
}

func snapshotStatus(t *testing.T, admin string) (st struct {
	Connected bool
	ACLDenied []string `json:"acl_denied"`
}) {
	t.Helper()
	_, body := get(admin, "/v1/snapshot")
	var s struct {
		Status json.RawMessage
	}
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		return st // not listening yet: callers wait with eventually
	}
	_ = json.Unmarshal(s.Status, &st)
	return st
}

// runSidecarEnv starts a sidecar whose defaults come from env, logging to
// w (and the test's log).
func runSidecarEnv(t *testing.T, env func(string) string, w io.Writer, args ...string) (string, func() error) {
	t.Helper()
	admin := freeAddr(t)
	cfg, err := ParseArgs(append([]string{"-admin", admin}, args...), DefaultConfig(env), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(cfg, hclog.New(&hclog.LoggerOptions{Name: "test", Output: io.MultiWriter(w, testWriter{t}), Level: hclog.Debug}))
	if err != nil {
		t.Fatal(err)
	}
	h := testrun.Start(t, s)
	return admin, h.Stop
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
