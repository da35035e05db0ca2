package consulacl

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// The bodies are what Consul v1.14.8 answered in a default-deny cluster
// (internal/testcluster with ACL), accessor IDs included.
func TestExplain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		want    string // Error(), "" for nil
		rule    string
		missing string
	}{
		{
			name:    "service write through the agent",
			err:     api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID '8ef8e7f9-7425-b63c-b5bf-dc6996a828f9' lacks permission 'service:write' on "users"`},
			want:    `Consul refused the ACL token: it lacks service:write on "users" (service "users" { policy = "write" })`,
			rule:    `service "users" { policy = "write" }`,
			missing: `service:write on "users"`,
		},
		{
			name:    "key read forwarded to a server",
			err:     fmt.Errorf("gateway: %w", api.StatusError{Code: 403, Body: `rpc error making call: Permission denied: token with AccessorID '245b8801-505f-2fa4-91a5-55fbdb44b38b' lacks permission 'key:read' on "attache/routes/current"`}),
			want:    `Consul refused the ACL token: it lacks key:read on "attache/routes/current" (key "attache/routes/current" { policy = "read" })`,
			rule:    `key "attache/routes/current" { policy = "read" }`,
			missing: `key:read on "attache/routes/current"`,
		},
		{
			name: "agent read",
			err:  api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID '8ef8e7f9-7425-b63c-b5bf-dc6996a828f9' lacks permission 'agent:read' on "client1"`},
			want: `Consul refused the ACL token: it lacks agent:read on "client1" (agent "client1" { policy = "read" })`,
			rule: `agent "client1" { policy = "read" }`,
		},
		{
			name: "operator",
			err:  api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID 'x' lacks permission 'operator:read' on ""`},
			want: `Consul refused the ACL token: it lacks operator:read on "" (operator = "read")`,
			rule: `operator = "read"`,
		},
		{
			name: "unknown token",
			err:  api.StatusError{Code: 403, Body: `rpc error making call: ACL not found`},
			want: "Consul does not know the ACL token (ACL not found): check the token (-token, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE)",
		},
		{
			name: "a 403 without words",
			err:  api.StatusError{Code: 403, Body: `Permission denied`},
			want: "Consul refused the ACL token: permission denied",
		},
		{name: "other status", err: api.StatusError{Code: 500, Body: `Permission denied: lacks permission 'key:read' on "x"`}},
		{name: "not Consul's", err: errors.New("connection refused")},
		{name: "nil"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Explain(tc.err)
			if tc.want == "" {
				if d != nil {
					t.Fatalf("Explain = %v, want nil", d)
				}
				if w := Wrap(tc.err); w != tc.err {
					t.Fatalf("Wrap changed a non-ACL error: %v", w)
				}
				return
			}
			if d == nil {
				t.Fatalf("Explain(%v) = nil", tc.err)
			}
			if d.Error() != tc.want {
				t.Errorf("Error()\n got %s\nwant %s", d.Error(), tc.want)
			}
			if d.Rule() != tc.rule {
				t.Errorf("Rule() = %q, want %q", d.Rule(), tc.rule)
			}
			if tc.missing != "" && d.Missing() != tc.missing {
				t.Errorf("Missing() = %q, want %q", d.Missing(), tc.missing)
			}
			w := Wrap(tc.err)
			if w.Error() != tc.want || strings.Contains(w.Error(), "AccessorID") {
				t.Errorf("Wrap: %v", w)
			}
			if !errors.Is(w, &Denied{}) || !errors.Is(w, tc.err) {
				t.Errorf("Wrap lost a cause: Is Denied %v, Is original %v", errors.Is(w, &Denied{}), errors.Is(w, tc.err))
			}
			var got *Denied
			if !errors.As(w, &got) || got.Permission != d.Permission {
				t.Errorf("errors.As: %v", got)
			}
		})
	}
}

// TestFiltered: the messages of answers Consul filtered, and of refusals
// whose rule covers a prefix (Under).
func TestFiltered(t *testing.T) {
	for _, tc := range []struct {
		d    *Denied
		want string
	}{
		{Filtered("service:read", "users", false), `Consul left out what the ACL token may not read: it lacks service:read on "users" (service "users" { policy = "read" })`},
		{Filtered("node:read", "", true), `Consul left out what the ACL token may not read: it lacks node:read on names starting with "" (node_prefix "" { policy = "read" })`},
		{Parse(`Permission denied: token with AccessorID 'a' lacks permission 'key:read' on "attache/routes/current"`).Under("attache/routes/"),
			`Consul refused the ACL token: it lacks key:read on "attache/routes/current" (key_prefix "attache/routes/" { policy = "read" })`},
		{Parse(`lacks permission 'operator:read' on ""`).Under("x/"), `Consul refused the ACL token: it lacks operator:read on "" (operator = "read")`},
	} {
		if tc.d.Error() != tc.want {
			t.Errorf("\n got %s\nwant %s", tc.d.Error(), tc.want)
		}
	}
}

// FuzzParse: any text parses without panicking, and a Denied it finds
// never repeats an accessor ID.
func FuzzParse(f *testing.F) {
	f.Add(`Permission denied: token with AccessorID 'a' lacks permission 'key:read' on "x"`)
	f.Add("rpc error making call: ACL not found")
	f.Add(`lacks permission 'service:write' on ""`)
	f.Fuzz(func(t *testing.T, s string) {
		d := Parse(s)
		if d == nil {
			return
		}
		_ = d.Rule()
		if strings.Contains(d.Error(), "AccessorID") {
			t.Fatalf("accessor in %q", d.Error())
		}
	})
}
