package control

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	"attache/internal/testcluster"
)

// TestSecureConsul runs the control service against a cluster with ACLs in
// default-deny mode and HTTPS only (verify_incoming): with the README's
// control policy, apply, get, history and status work and warnings see the
// services; with a token that may only read the routes, an apply is
// refused naming the missing key:write — not taken for a conflict. No
// token appears in its log or answers.
func TestSecureConsul(t *testing.T) {
	c := testcluster.Start(t, testcluster.Options{Servers: 1, ACL: true, TLS: true})
	var logs lockedBuffer
	run := func(token string) *Client {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv, err := New(Config{Addr: ln.Addr().String(), Consul: c.Servers[0].URL(), ConsulToken: token, ConsulTLS: c.TLS.Config()},
			hclog.New(&hclog.LoggerOptions{Output: io.MultiWriter(&logs, testLog{t}), Level: hclog.Debug}))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.Serve(ctx, ln) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		})
		return NewClient("http://"+ln.Addr().String(), "")
	}
	ctx := context.Background()
	doc := []byte("route \"users\" {\n  prefix = \"/users/\"\n  service = \"users\"\n}\n")
	var answers bytes.Buffer

	token := c.Token(t, "attache-control", testcluster.READMEPolicy(t, "attache-control"))
	cl := run(token)
	res, err := cl.Apply(ctx, "routes.hcl", doc, nil)
	if err != nil || res.Version != 1 {
		t.Fatalf("apply with the README's policy: %+v %v", res, err)
	}
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "no healthy instance") {
		t.Errorf("warnings %q: want users to have no healthy instance (read, not hidden)", res.Warnings)
	}
	if _, err := cl.Get(ctx, 0); err != nil {
		t.Errorf("get: %v", err)
	}
	h, err := cl.History(ctx)
	if err != nil || h.Current != 1 {
		t.Errorf("history: %+v %v", h, err)
	}
	st, err := cl.Status(ctx)
	if err != nil || st.Current != 1 {
		t.Errorf("status: %+v %v", st, err)
	}
	answers.WriteString(res.Diff + strings.Join(res.Warnings, "\n"))

	readOnly := c.Token(t, "routes-read", `key_prefix "attache/routes/" { policy = "read" }`)
	_, err = run(readOnly).Apply(ctx, "routes.hcl", append(doc, []byte("route \"inventory\" {\n  prefix = \"/inventory/\"\n  service = \"inventory\"\n}\n")...), nil)
	var refused *RefusedError
	if err == nil || errors.As(err, &refused) || // a 4xx: a conflict (409) or a refused document
		!strings.Contains(err.Error(), `it lacks key:write on "attache/routes/`) || strings.Contains(err.Error(), "conflict") {
		t.Fatalf("apply with a read-only token = %v, want Consul's failure (502) naming the missing key:write", err)
	}
	answers.WriteString(err.Error())
	t.Logf("refused: %v", err)

	for name, secret := range map[string]string{"control": token, "read-only": readOnly, "management": c.ManagementToken} {
		if strings.Contains(logs.String(), secret) || strings.Contains(answers.String(), secret) {
			t.Errorf("the %s token appears in the control service's log or answers", name)
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
