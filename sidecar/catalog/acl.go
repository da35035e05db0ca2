package catalog

import (
	"sort"
	"sync"

	"github.com/hashicorp/go-hclog"

	"attache/internal/consulacl"
)

// aclGaps records what Consul's ACLs refused or hid from the watcher, by
// the query that saw it ("services/", "service/users"), so that Status can
// name every rule the token lacks and each is logged once. The watcher
// keeps serving everything else.
type aclGaps struct {
	log    hclog.Logger
	mu     sync.Mutex
	gaps   map[string]*consulacl.Denied
	warned map[string]bool
}

func newACLGaps(log hclog.Logger) *aclGaps {
	return &aclGaps{log: log, gaps: map[string]*consulacl.Denied{}, warned: map[string]bool{}}
}

// set records d for the query key; nil clears it (the query got a whole answer).
func (a *aclGaps) set(key string, d *consulacl.Denied) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if d == nil {
		delete(a.gaps, key)
		return
	}
	a.gaps[key] = d
	if msg := d.Error(); !a.warned[msg] {
		a.warned[msg] = true
		a.log.Warn("Consul ACL: the token lacks a permission; serving what it may read", "missing", d.Missing(), "rule", d.Rule(), "error", msg)
	}
}

// list returns the current gaps, one message each, sorted.
func (a *aclGaps) list() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, d := range a.gaps {
		if m := d.Error(); !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	sort.Strings(out)
	return out
}

// filteredList is what a list query's filtered answer lacks.
func filteredList(kind string) *consulacl.Denied {
	switch kind {
	case "services":
		return consulacl.Filtered("service:read", "", true)
	case "nodes", "coordinates":
		return consulacl.Filtered("node:read", "", true)
	}
	return nil // the health queries: the service and node lists name the same gaps
}

// filteredService is what a filtered answer about one service lacks: read
// on the service when Consul left nothing, else read on some of its
// instances' nodes.
func filteredService(name string, entries int) *consulacl.Denied {
	if entries == 0 {
		return consulacl.Filtered("service:read", name, false)
	}
	return consulacl.Filtered("node:read", "", true)
}
