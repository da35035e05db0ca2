// Package consulacl turns Consul's ACL refusals into errors that name the
// rule a token lacks. Consul refuses in three ways: a 403 whose body says
// "Permission denied: token with AccessorID '…' lacks permission
// 'key:read' on "attache/routes/current"" (writes, KV reads, agent
// endpoints), a 403 "ACL not found" (the token is unknown), and — for
// list and health reads — no refusal at all: the answer leaves out what
// the token may not read and sets X-Consul-Results-Filtered-By-ACLs.
// Denied covers all three; its message never holds the token, nor the
// token's accessor ID.
package consulacl

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/hashicorp/consul/api"
)

// Denied is a refusal by Consul's ACLs.
type Denied struct {
	// Permission is the missing permission as Consul names it:
	// "service:read", "key:write", "node:read", "agent:read"... Empty when
	// Consul did not say (an unknown token, an old Consul).
	Permission string
	// Resource is the name the rule must cover ("users",
	// "attache/routes/current"); with Prefix, a prefix of names ("" for all).
	Resource string
	Prefix   bool
	// NotFound: Consul does not know the token at all ("ACL not found").
	NotFound bool
	// Filtered: no refusal, but Consul left out of an answer what the token
	// may not read.
	Filtered bool

	// grant, when set by Under, is the prefix the rule of Rule covers
	// instead of Resource alone.
	grant *string
}

// Under returns a copy of d whose Rule grants the permission on every name
// under prefix, as the documented policy does (a gateway refused
// key:read on "attache/routes/current" is told of
// key_prefix "attache/routes/"), rather than on the one name refused.
func (d *Denied) Under(prefix string) *Denied {
	c := *d
	c.grant = &prefix
	return &c
}

func (d *Denied) Error() string {
	switch {
	case d.NotFound:
		return "Consul does not know the ACL token (ACL not found): check the token (-token, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE)"
	case d.Permission == "":
		return "Consul refused the ACL token: permission denied"
	case d.Filtered:
		return fmt.Sprintf("Consul left out what the ACL token may not read: it lacks %s (%s)", d.Missing(), d.Rule())
	}
	return fmt.Sprintf("Consul refused the ACL token: it lacks %s (%s)", d.Missing(), d.Rule())
}

// Missing is the missing permission on its resource, as Consul words it:
// `service:read on "users"`, or `service:read on names starting with ""`.
func (d *Denied) Missing() string {
	if d.Prefix {
		return fmt.Sprintf("%s on names starting with %q", d.Permission, d.Resource)
	}
	return fmt.Sprintf("%s on %q", d.Permission, d.Resource)
}

// Rule is the policy rule that grants what is missing, in HCL:
// `service "users" { policy = "write" }`. Empty when the permission is unknown.
func (d *Denied) Rule() string {
	res, access, ok := strings.Cut(d.Permission, ":")
	if !ok {
		return ""
	}
	switch res {
	case "agent", "node", "service", "key", "session", "event", "query":
	default:
		return fmt.Sprintf("%s = %q", res, access) // acl, operator, keyring, mesh
	}
	name := d.Resource
	if d.grant != nil {
		name = *d.grant
		res += "_prefix"
	} else if d.Prefix {
		res += "_prefix"
	}
	return fmt.Sprintf("%s %q { policy = %q }", res, name, access)
}

// Is makes errors.Is(err, &Denied{}) match any Denied.
func (d *Denied) Is(target error) bool {
	_, ok := target.(*Denied)
	return ok
}

// lacks matches Consul's description of a refusal (Consul 1.11 and later).
var lacks = regexp.MustCompile(`lacks permission '([a-z]+:[a-z]+)' on "([^"]*)"`)

// Parse reads Consul's text of a refusal ("Permission denied: token with
// AccessorID '…' lacks permission 'key:read' on "x"", "ACL not found"), as
// found in a 403's body or a transaction's errors. It returns nil for any
// other text.
func Parse(text string) *Denied {
	if m := lacks.FindStringSubmatch(text); m != nil {
		return &Denied{Permission: m[1], Resource: m[2]}
	}
	switch {
	case strings.Contains(text, "ACL not found"):
		return &Denied{NotFound: true}
	case strings.Contains(text, "Permission denied"):
		return &Denied{}
	}
	return nil
}

// Explain returns a *Denied for an error of consul/api that is an ACL
// refusal (a 403), else nil.
func Explain(err error) *Denied {
	if err == nil {
		return nil
	}
	var se api.StatusError
	if errors.As(err, &se) {
		if se.Code != 403 {
			return nil
		}
		if d := Parse(se.Body); d != nil {
			return d
		}
		return &Denied{}
	}
	if strings.Contains(err.Error(), "403") { // consul/api builds some errors without StatusError
		return Parse(err.Error())
	}
	return nil
}

// Wrap returns err with Explain's reading in front when it is an ACL
// refusal (errors.Is and errors.As see both), else err unchanged.
func Wrap(err error) error {
	d := Explain(err)
	if d == nil {
		return err
	}
	return &wrapped{d: d, err: err}
}

type wrapped struct {
	d   *Denied
	err error
}

// Error is the Denied's message alone: Consul's own text adds only the
// token's accessor ID.
func (w *wrapped) Error() string   { return w.d.Error() }
func (w *wrapped) Unwrap() []error { return []error{w.d, w.err} }

// Filtered returns the Denied of an answer Consul filtered: permission
// (such as "service:read") on resource, a prefix of names when prefix.
func Filtered(permission, resource string, prefix bool) *Denied {
	return &Denied{Permission: permission, Resource: resource, Prefix: prefix, Filtered: true}
}
