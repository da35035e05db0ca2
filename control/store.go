package control

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/control/routes"
	"attache/internal/consulacl"
)

// Errors a caller tells apart.
var (
	// ErrConflict: another apply changed the current version first; read
	// the new current version and retry.
	ErrConflict = errors.New("control: conflict: the current version changed while applying; check the diff and retry")
	// ErrNotFound: no such version (never written, or pruned).
	ErrNotFound = errors.New("control: no such version")
	// errCorrupt: a stored value does not decode (written by hand?).
	errCorrupt = errors.New("control: corrupt routes data in Consul KV")
)

// Store keeps the route versions in the Consul KV store. It holds no state
// of its own: every call reads what it needs, so any number of control
// services can share one cluster.
type Store struct {
	kv   routes.KV
	c    *api.Client
	keep int
	now  func() time.Time

	beforeTxn func() // tests: runs between reading the pointer and writing
}

// maxPrunePerApply bounds the deletes one transaction carries (Consul caps
// the operations of a transaction); any left are pruned by the next apply.
const maxPrunePerApply = 32

// maxTxnValue is the largest encoded version value sent in a transaction,
// leaving room under Consul's 512 KiB for the other operations.
const maxTxnValue = 480 << 10

// newStore returns a store keeping the last keep versions under prefix.
func newStore(c *api.Client, prefix string, keep int) *Store {
	return &Store{kv: routes.NewKV(prefix), c: c, keep: max(1, keep), now: time.Now}
}

// KV returns the key layout.
func (s *Store) KV() routes.KV { return s.kv }

// current reads the pointer: the current version's number (0 when none)
// and the pointer's ModifyIndex for check-and-set (0 when absent).
func (s *Store) current(ctx context.Context) (uint64, uint64, error) {
	p, _, err := s.c.KV().Get(s.kv.Current(), (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return 0, 0, fmt.Errorf("control: read %s: %w", s.kv.Current(), consulacl.Wrap(err))
	}
	if p == nil {
		return 0, 0, nil
	}
	n, err := s.kv.VersionNumber(string(p.Value))
	if err != nil {
		return 0, p.ModifyIndex, fmt.Errorf("%w: %s holds %q, not a version number", errCorrupt, s.kv.Current(), p.Value)
	}
	return n, p.ModifyIndex, nil
}

// Current returns the current version's number, 0 when nothing was applied.
func (s *Store) Current(ctx context.Context) (uint64, error) {
	n, _, err := s.current(ctx)
	return n, err
}

// Get returns version n (0: the current one) and its document.
func (s *Store) Get(ctx context.Context, n uint64) (*routes.Version, *routes.Document, error) {
	if n == 0 {
		cur, err := s.Current(ctx)
		if err != nil {
			return nil, nil, err
		}
		if cur == 0 {
			return nil, nil, fmt.Errorf("%w: nothing has been applied yet", ErrNotFound)
		}
		n = cur
	}
	p, _, err := s.c.KV().Get(s.kv.Version(n), (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, nil, fmt.Errorf("control: read %s: %w", s.kv.Version(n), consulacl.Wrap(err))
	}
	if p == nil {
		return nil, nil, fmt.Errorf("%w: version %d", ErrNotFound, n)
	}
	v, doc, err := routes.DecodeVersion(p.Value)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %w", errCorrupt, s.kv.Version(n), err)
	}
	return v, doc, nil
}

// Result is the outcome of an apply or a rollback.
type Result struct {
	Version  uint64   `json:"version"`  // the current version afterwards
	Previous uint64   `json:"previous"` // the current version before (0: none)
	Changed  bool     `json:"changed"`  // false: the document equals the current one, nothing was written
	Diff     string   `json:"diff,omitempty"`
	Pruned   []uint64 `json:"pruned,omitempty"`
	Message  string   `json:"message"`
	Warnings []string `json:"warnings,omitempty"`
}

// Apply makes doc the current version, unless it equals the current one.
// The new version, the pointer (check-and-set on its ModifyIndex) and the
// pruning of versions beyond the kept number are one KV transaction: a
// concurrent apply makes this one fail with ErrConflict, a crash leaves
// either all of it or none. expect, when not nil, is the version the caller
// based its change on: another current version is a conflict too.
func (s *Store) Apply(ctx context.Context, doc *routes.Document, source string, expect *uint64) (*Result, error) {
	canon := routes.Encode(doc)
	if len(canon) > routes.MaxDocumentBytes {
		return nil, fmt.Errorf("control: the canonical document is %d bytes, more than %d", len(canon), routes.MaxDocumentBytes)
	}
	// A pointer or current version that does not decode (or is gone) is
	// replaced by this apply, still with check-and-set on the pointer: an
	// apply is how to repair it.
	cur, idx, err := s.current(ctx)
	if err != nil && !errors.Is(err, errCorrupt) {
		return nil, err
	}
	if expect != nil && *expect != cur {
		return nil, fmt.Errorf("%w (the current version is %d, not %d)", ErrConflict, cur, *expect)
	}
	var prev *routes.Document
	if cur > 0 {
		v, d, err := s.Get(ctx, cur)
		switch {
		case err == nil && v.Document == string(canon):
			return &Result{Version: cur, Previous: cur, Message: fmt.Sprintf("unchanged: the document equals the current version %d; nothing written", cur)}, nil
		case err == nil:
			prev = d
		case !errors.Is(err, errCorrupt) && !errors.Is(err, ErrNotFound):
			return nil, err
		}
	}
	nums, err := s.versionNumbers(ctx)
	if err != nil {
		return nil, err
	}
	next := cur + 1
	if len(nums) > 0 && nums[len(nums)-1] >= next {
		next = nums[len(nums)-1] + 1
	}
	val, err := json.Marshal(routes.Version{Number: next, Created: s.now().UTC().Truncate(time.Millisecond), Source: source, Document: string(canon)})
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	// A Consul transaction carries values in base64 and is capped at
	// 512 KiB (txn_max_req_len): refuse what would not fit, clearly.
	if n := base64.StdEncoding.EncodedLen(len(val)); n > maxTxnValue {
		return nil, fmt.Errorf("control: version %d would take %d bytes in a Consul transaction, more than %d: make the document smaller", next, n, maxTxnValue)
	}
	ops := api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: s.kv.Current(), Value: []byte(strconv.FormatUint(next, 10)), Index: idx}},
		{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: s.kv.Version(next), Value: val, Index: 0}},
	}
	var pruned []uint64
	for _, n := range nums {
		if n+uint64(s.keep) <= next && len(pruned) < maxPrunePerApply {
			pruned = append(pruned, n)
			ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVDelete, Key: s.kv.Version(n)}})
		}
	}
	if s.beforeTxn != nil {
		s.beforeTxn()
	}
	ok, resp, _, err := s.c.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("control: write version %d: %w", next, consulacl.Wrap(err))
	}
	if !ok {
		var what []string
		for _, e := range resp.Errors {
			// Consul reports a refused operation among the transaction's
			// errors, as it does a failed check-and-set: not a conflict.
			if d := consulacl.Parse(e.What); d != nil {
				return nil, fmt.Errorf("control: write version %d: %w", next, d)
			}
			what = append(what, e.What)
		}
		return nil, fmt.Errorf("%w (%s)", ErrConflict, strings.Join(what, "; "))
	}
	res := &Result{Version: next, Previous: cur, Changed: true, Diff: routes.Diff(prev, doc), Pruned: pruned,
		Message: fmt.Sprintf("applied: version %d is current", next)}
	if cur > 0 {
		res.Message += fmt.Sprintf(" (was %d)", cur)
	}
	return res, nil
}

// Rollback makes a copy of version n the new current version (history
// stays linear: rolling back is an apply of an old document).
func (s *Store) Rollback(ctx context.Context, n uint64, expect *uint64) (*Result, error) {
	if n == 0 {
		return nil, fmt.Errorf("%w: version 0", ErrNotFound)
	}
	_, doc, err := s.Get(ctx, n)
	if err != nil {
		return nil, err
	}
	return s.Apply(ctx, doc, fmt.Sprintf("rollback to %d", n), expect)
}

// versionNumbers lists the stored versions, ascending.
func (s *Store) versionNumbers(ctx context.Context) ([]uint64, error) {
	keys, _, err := s.c.KV().Keys(s.kv.Versions(), "/", (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("control: list %s: %w", s.kv.Versions(), consulacl.Wrap(err))
	}
	var nums []uint64
	for _, k := range keys {
		if n, err := s.kv.VersionNumber(k); err == nil {
			nums = append(nums, n)
		}
	}
	sort.Slice(nums, func(i, j int) bool { return nums[i] < nums[j] })
	return nums, nil
}

// HistoryEntry is one stored version, without its document.
type HistoryEntry struct {
	Version uint64    `json:"version"`
	Created time.Time `json:"created"`
	Source  string    `json:"source"`
	Routes  int       `json:"routes"`
	Current bool      `json:"current,omitempty"`
	Error   string    `json:"error,omitempty"` // a stored value that does not decode
}

// History lists the stored versions, newest first.
func (s *Store) History(ctx context.Context) (uint64, []HistoryEntry, error) {
	cur, err := s.Current(ctx)
	if err != nil {
		return 0, nil, err
	}
	pairs, _, err := s.c.KV().List(s.kv.Versions(), (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return 0, nil, fmt.Errorf("control: list %s: %w", s.kv.Versions(), consulacl.Wrap(err))
	}
	var out []HistoryEntry
	for _, p := range pairs {
		n, err := s.kv.VersionNumber(p.Key)
		if err != nil {
			continue
		}
		e := HistoryEntry{Version: n, Current: n == cur}
		v, doc, err := routes.DecodeVersion(p.Value)
		if v != nil {
			e.Created, e.Source = v.Created, v.Source
		}
		if err != nil {
			e.Error = err.Error()
		} else {
			e.Routes = len(doc.Routes)
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version > out[j].Version })
	return cur, out, nil
}

// maxGateways bounds the applied records Status reads.
const maxGateways = 1000

// GatewayStatus is one gateway's applied record.
type GatewayStatus struct {
	routes.Applied
	Current bool   `json:"current"`           // serves the current version
	Invalid string `json:"invalid,omitempty"` // the record did not decode
}

// Status lists which gateway serves which version (from the records the
// gateways write under routes/applied/), by node name.
func (s *Store) Status(ctx context.Context) (uint64, []GatewayStatus, error) {
	cur, err := s.Current(ctx)
	if err != nil {
		return 0, nil, err
	}
	pairs, _, err := s.c.KV().List(s.kv.AppliedPrefix(), (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return 0, nil, fmt.Errorf("control: list %s: %w", s.kv.AppliedPrefix(), consulacl.Wrap(err))
	}
	var out []GatewayStatus
	for _, p := range pairs[:min(len(pairs), maxGateways)] {
		var g GatewayStatus
		if err := json.Unmarshal(p.Value, &g.Applied); err != nil {
			g.Invalid = err.Error()
		}
		if g.Node == "" {
			g.Node = strings.TrimPrefix(p.Key, s.kv.AppliedPrefix())
		}
		g.Current = g.Invalid == "" && g.Version == cur
		out = append(out, g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return cur, out, nil
}

// Warnings lists what is suspicious but allowed in a document: routes to a
// service (or tag) with no healthy instance now. At most maxHealthChecks
// services are asked about.
func (s *Store) Warnings(ctx context.Context, doc *routes.Document) []string {
	const maxHealthChecks = 200
	var out []string
	seen := map[routes.Destination]bool{}
	asked := 0
	for _, r := range doc.Routes {
		for _, d := range r.Destinations {
			key := routes.Destination{Service: d.Service, Tag: d.Tag}
			if seen[key] {
				continue
			}
			seen[key] = true
			if asked == maxHealthChecks {
				out = append(out, fmt.Sprintf("health of more than %d services not checked", maxHealthChecks))
				return out
			}
			asked++
			entries, meta, err := s.c.Health().Service(d.Service, d.Tag, true, (&api.QueryOptions{}).WithContext(ctx))
			what := "service " + d.Service
			if d.Tag != "" {
				what += " (tag " + d.Tag + ")"
			}
			switch {
			case err != nil:
				out = append(out, fmt.Sprintf("route %q: could not check the health of %s: %v", r.Name, what, consulacl.Wrap(err)))
			case len(entries) == 0 && meta.ResultsFilteredByACLs:
				out = append(out, fmt.Sprintf("route %q: could not check the health of %s: %v", r.Name, what, consulacl.Filtered("service:read", d.Service, false)))
			case len(entries) == 0:
				out = append(out, fmt.Sprintf("route %q: %s has no healthy instance now", r.Name, what))
			}
		}
	}
	return out
}
