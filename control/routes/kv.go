package routes

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// KV is the layout of the routes in the Consul KV store under a prefix
// (default "attache/"):
//
//	<prefix>routes/versions/<n>   a Version (JSON), n = 1, 2, ...
//	<prefix>routes/current        the current version's number, in decimal
//	<prefix>routes/applied/<node> an Applied (JSON), written by each gateway
type KV struct {
	Prefix string
}

// DefaultKVPrefix is the default prefix.
const DefaultKVPrefix = "attache/"

// NewKV returns the layout under prefix ("" means DefaultKVPrefix); a
// missing trailing slash is added.
func NewKV(prefix string) KV {
	if prefix == "" {
		prefix = DefaultKVPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return KV{Prefix: prefix}
}

// Current is the key of the pointer to the current version.
func (k KV) Current() string { return k.Prefix + "routes/current" }

// Versions is the key prefix of the versions.
func (k KV) Versions() string { return k.Prefix + "routes/versions/" }

// Version is the key of version n.
func (k KV) Version(n uint64) string { return k.Versions() + strconv.FormatUint(n, 10) }

// AppliedPrefix is the key prefix of the gateways' applied versions.
func (k KV) AppliedPrefix() string { return k.Prefix + "routes/applied/" }

// Applied is the key a gateway on node writes its applied version to.
func (k KV) Applied(node string) string { return k.AppliedPrefix() + node }

// VersionNumber parses a key under Versions, or the value of Current.
func (k KV) VersionNumber(s string) (uint64, error) {
	n, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(s), k.Versions()), 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("routes: %q is not a version number", s)
	}
	return n, nil
}

// Version is one stored version of the route document.
type Version struct {
	Number   uint64    `json:"version"`
	Created  time.Time `json:"created"`
	Source   string    `json:"source"`   // "apply", "rollback to 3"
	Document string    `json:"document"` // canonical HCL (Encode)
}

// DecodeVersion reads a stored version and parses its document.
func DecodeVersion(value []byte) (*Version, *Document, error) {
	var v Version
	if err := json.Unmarshal(value, &v); err != nil {
		return nil, nil, fmt.Errorf("routes: stored version: %w", err)
	}
	doc, err := Parse(fmt.Sprintf("version %d", v.Number), []byte(v.Document))
	if err != nil {
		return &v, nil, err
	}
	return &v, doc, nil
}

// Applied is what a gateway writes to KV.Applied(node) after it swapped a
// version in (or refused one).
type Applied struct {
	Node    string         `json:"node"`
	Version uint64         `json:"version"`         // the version it serves
	Time    time.Time      `json:"time"`            // when it started serving it
	Error   string         `json:"error,omitempty"` // why the newest version was refused, if it was
	Refused uint64         `json:"refused,omitempty"`
	Routes  []AppliedRoute `json:"routes,omitempty"` // its table, document and service routes
}

// AppliedRoute is one route of a gateway's table and where it came from.
type AppliedRoute struct {
	Name   string `json:"name"`
	Host   string `json:"host,omitempty"`
	Prefix string `json:"prefix"`
	Origin string `json:"origin"` // Origin.String(): "document" or "service users"
}

// AppliedRoutes lists a table's routes for an Applied record.
func AppliedRoutes(t *Table) []AppliedRoute {
	out := make([]AppliedRoute, 0, len(t.Routes()))
	for _, r := range t.Routes() {
		out = append(out, AppliedRoute{Name: r.Name, Host: r.Host, Prefix: r.Prefix, Origin: r.Origin.String()})
	}
	return out
}
