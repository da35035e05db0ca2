package sidecar

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	miekg "github.com/miekg/dns"

	"attache/demo"
	"attache/internal/testcluster"
)

// chromium runs Debian's headless chromium with args and the page at url
// last, and returns its standard output.
func chromium(t *testing.T, bin, url string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args = append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--user-data-dir=" + t.TempDir()}, append(args, url)...)
	out, err := exec.CommandContext(ctx, bin, args...).Output()
	if err != nil {
		t.Fatalf("chromium %v: %v", args, err)
	}
	return string(out)
}

// TestStatusPageInBrowser loads the admin status page in a real headless
// browser against a real cluster: it shows the node, Consul, the services
// with their instances, the breakers, the listeners and DNS; when an
// instance fails its health check the page, reloaded, no longer lists it.
// With ATTACHE_SCREENSHOT=FILE it also writes a screenshot there (the one
// under docs/ was made so).
func TestStatusPageInBrowser(t *testing.T) {
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed (Debian: apt-get install chromium); the status page's browser test needs it")
	}
	c := testcluster.Start(t, testcluster.Options{Clients: 1})
	var b strings.Builder
	backends := map[string]*demo.Server{}
	for _, id := range []string{"users-1", "users-2"} {
		d := demo.New("users", id)
		backends[id] = d
		srv := httptest.NewServer(d)
		defer srv.Close()
		host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
		fmt.Fprintf(&b, "service {\n  name = \"users\"\n  id = %q\n  address = %q\n  port = %s\n  check {\n    http = \"http://%s/health\"\n    interval = \"500ms\"\n    timeout = \"1s\"\n    initially_passing = true\n  }\n}\n",
			id, host, port, srv.Listener.Addr())
	}
	svc := filepath.Join(t.TempDir(), "users.hcl")
	if err := os.WriteFile(svc, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	up, dnsAddr := freeAddr(t), freeAddr(t)
	admin, _ := runSidecar(t, "-node", "node-a", "-consul", c.Clients[0].HTTPAddr, "-service", svc, "-data-dir", t.TempDir(),
		"-upstream", "users="+up, "-dns", dnsAddr, "-access-log", filepath.Join(t.TempDir(), "access.log"), "-access-log-all")
	eventually(t, "/readyz 200", 15*time.Second, func() bool { code, _ := get(admin, "/readyz"); return code == 200 })
	eventually(t, "both instances through the upstream", 15*time.Second, func() bool {
		seen := map[string]bool{}
		for i := 0; i < 20; i++ {
			_, body := get(up, "/items/1")
			for id := range backends {
				if strings.Contains(body, `"instance":"`+id+`"`) {
					seen[id] = true
				}
			}
		}
		return len(seen) == 2
	})

	for i := 0; i < 3; i++ { // three DNS queries, counted on the page
		m := new(miekg.Msg)
		m.SetQuestion("users.service.consul.", miekg.TypeA)
		if _, err := miekg.Exchange(m, dnsAddr); err != nil {
			t.Fatal(err)
		}
	}

	// The last minute's rates (sampled once a second) show the calls and
	// the queries, in /v1/stats as on the page.
	var stats statsReply
	eventually(t, "rates in /v1/stats", 10*time.Second, func() bool {
		_, body := get(admin, "/v1/stats")
		stats = statsReply{}
		_ = json.Unmarshal([]byte(body), &stats)
		return len(stats.Upstreams) == 1 && stats.Upstreams[0].Name == "users" && stats.Upstreams[0].RPS > 0 &&
			stats.Upstreams[0].P99ms != nil && stats.DNSQPS != nil && *stats.DNSQPS > 0
	})
	if u := stats.Upstreams[0]; u.ErrorRate != 0 || *u.P99ms <= 0 || *u.P99ms > 10000 {
		t.Errorf("users over the last minute: %+v (p99 %v ms)", u, *u.P99ms)
	}

	url := "http://" + admin + "/"
	dom := chromium(t, bin, url, "--dump-dom")
	for _, want := range []string{"attache on node-a", `<meta http-equiv="refresh" content="5">`, "connected", "fresh",
		"users-1", "users-2", "passing", "upstream http", up, dnsAddr, "Breakers", "closed", "Requests by upstream service", "2xx: ", "NOERROR: 3", "access log: ",
		"requests/s", "error rate", "p99 ms", "0.00%", "queries/s", "/v1/stats"} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page lacks %q:\n%s", want, dom)
		}
	}
	if strings.Contains(dom, "%!") {
		t.Errorf("a number the template could not format:\n%s", dom)
	}
	if t.Failed() {
		return
	}

	// users-2 fails its health check: the view drops it, and so does the page.
	if err := backends["users-2"].SetFault(demo.ModeHealthFail, 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the page to drop users-2", 30*time.Second, func() bool {
		dom = chromium(t, bin, url, "--dump-dom")
		return strings.Contains(dom, "users-1") && !strings.Contains(dom, "users-2")
	})

	if shot := os.Getenv("ATTACHE_SCREENSHOT"); shot != "" {
		abs, err := filepath.Abs(shot)
		if err != nil {
			t.Fatal(err)
		}
		chromium(t, bin, url, "--screenshot="+abs, "--window-size=1100,1000", "--hide-scrollbars")
		if st, err := os.Stat(abs); err != nil || st.Size() == 0 {
			t.Fatalf("no screenshot at %s: %v", abs, err)
		}
	}
}
