package dns

import (
	"encoding/hex"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	miekg "github.com/miekg/dns"

	"attache/sidecar/catalog"
)

// zone is what the answers need from one Snapshot, computed once per
// Snapshot so the hot path parses no addresses and lower-cases nothing.
type zone struct {
	snap     *catalog.Snapshot
	dc       string // lower-cased local datacenter
	services map[string]*svcEntry
	nodes    map[string]*nodeEntry
	// ptrNodes maps the reverse name of a node's address
	// ("1.0.0.127.in-addr.arpa.") to "<node>.node.<dc>." (without the
	// domain); ptrServices maps a service address, as written in the
	// catalog, to "<service>.service.<dc>.". Where several share an address,
	// the first in Consul's order wins: node name, then node and instance ID.
	ptrNodes    map[string]string
	ptrServices map[string]string
	// seed fixes the order the answer cache's rotations run over, per zone.
	seed uint64
}

type svcEntry struct {
	name      string // as registered
	instances []instEntry
}

type instEntry struct {
	inst *catalog.Instance
	ip   net.IP // 4 or 16 bytes; nil when the address is a host name
	v4   bool
	host string // fully qualified host name when the address is not an IP
	// target is the SRV target without the domain: "<node>.node.<dc>." when
	// the service address is the node's, "<hex>.addr.<dc>." otherwise.
	target string
	node   *nodeEntry // nil when the node is not in the snapshot
	weight uint16
	txt    []string // instance meta, RFC 1464 encoded, sorted
}

type nodeEntry struct {
	node *catalog.Node
	ip   net.IP
	v4   bool
	host string
	// canon is "<node>.node.<dc>." without the domain: where SRV answers put
	// node meta TXT records.
	canon string
	txt   []string // node meta, RFC 1464 encoded, sorted by key
}

// zoneCache holds the zone of the newest Snapshot seen, rebuilt when the
// Source returns a different one.
type zoneCache struct {
	cur atomic.Pointer[zone]
	mu  sync.Mutex
}

func (c *zoneCache) get(snap *catalog.Snapshot) *zone {
	if z := c.cur.Load(); z != nil && z.snap == snap {
		return z
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if z := c.cur.Load(); z != nil && z.snap == snap {
		return z
	}
	z := buildZone(snap)
	// Keep the newest: an older snapshot (a slow reader) must not replace a
	// newer one for everybody else.
	if old := c.cur.Load(); old == nil || old.snap == nil || snap == nil || old.snap.Version <= snap.Version {
		c.cur.Store(z)
	}
	return z
}

func buildZone(snap *catalog.Snapshot) *zone {
	z := &zone{snap: snap, services: map[string]*svcEntry{}, nodes: map[string]*nodeEntry{},
		ptrNodes: map[string]string{}, ptrServices: map[string]string{}, seed: rand.Uint64()}
	if snap == nil {
		return z
	}
	defer z.indexPTR()
	z.dc = strings.ToLower(snap.Datacenter)
	for key, n := range snap.Nodes {
		if n == nil {
			continue
		}
		ne := &nodeEntry{node: n, txt: encodeMeta(n.Meta)}
		ne.ip, ne.v4, ne.host = parseAddress(n.Address)
		dc := strings.ToLower(n.Datacenter)
		if dc == "" {
			dc = z.dc
		}
		ne.canon = n.Name + ".node." + dc + "."
		z.nodes[key] = ne
	}
	for key, svc := range snap.Services {
		if svc == nil {
			continue
		}
		se := &svcEntry{name: svc.Name, instances: make([]instEntry, 0, len(svc.Instances))}
		for i := range svc.Instances {
			in := &svc.Instances[i]
			ie := instEntry{inst: in, txt: encodeMeta(in.Meta)}
			addr := in.Address
			if addr == "" {
				addr = in.NodeAddress
			}
			ie.ip, ie.v4, ie.host = parseAddress(addr)
			ie.node = z.nodes[strings.ToLower(in.Node)]
			dc := strings.ToLower(in.Datacenter)
			if dc == "" {
				dc = z.dc
			}
			switch {
			case ie.ip == nil:
				ie.target = ie.host
			case addr == in.NodeAddress || in.NodeAddress == "":
				ie.target = in.Node + ".node." + dc + "."
			default:
				ie.target = hex.EncodeToString(ie.ip) + ".addr." + dc + "."
			}
			w := in.Weight
			if w <= 0 {
				w = 1
			}
			if w > 65535 {
				w = 65535
			}
			ie.weight = uint16(w)
			se.instances = append(se.instances, ie)
		}
		z.services[key] = se
	}
	return z
}

// parseAddress returns the address as a 4- or 16-byte IP, or, when it is a
// host name, the fully qualified name.
func parseAddress(a string) (ip net.IP, v4 bool, host string) {
	if a == "" {
		return nil, false, ""
	}
	p, err := netip.ParseAddr(a)
	if err != nil {
		return nil, false, strings.TrimSuffix(a, ".") + "."
	}
	p = p.Unmap()
	if p.Is4() {
		return net.IP(p.AsSlice()), true, ""
	}
	return net.IP(p.AsSlice()), false, ""
}

// encodeMeta returns meta as TXT strings: "key=value" encoded as RFC 1464,
// except keys starting with "rfc1035-" whose value is used as is, as Consul.
func encodeMeta(meta map[string]string) []string {
	if len(meta) == 0 {
		return nil
	}
	keys := make([]string, 0, len(meta))
	for k := range meta {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		if strings.HasPrefix(strings.ToLower(k), "rfc1035-") {
			out = append(out, meta[k])
			continue
		}
		out = append(out, encodeKVasRFC1464(k, meta[k]))
	}
	return out
}

// encodeKVasRFC1464 encodes a key-value pair as RFC 1464 does, as Consul.
func encodeKVasRFC1464(key, value string) string {
	key = strings.ReplaceAll(key, "`", "``")
	key = strings.ReplaceAll(key, "=", "`=")
	lead := len(key) - len(strings.TrimLeft(key, " "))
	key = strings.Repeat("` ", lead) + key[lead:]
	trail := len(key) - len(strings.TrimRight(key, " "))
	key = key[:len(key)-trail] + strings.Repeat("` ", trail)
	value = strings.ReplaceAll(value, "`", "``")
	return key + "=" + value
}

// indexPTR fills the reverse lookup maps.
func (z *zone) indexPTR() {
	nodeKeys := make([]string, 0, len(z.nodes))
	for k := range z.nodes {
		nodeKeys = append(nodeKeys, k)
	}
	sort.Strings(nodeKeys)
	for _, k := range nodeKeys {
		ne := z.nodes[k]
		if ne.ip == nil {
			continue
		}
		arpa, err := miekg.ReverseAddr(ne.node.Address)
		if err != nil {
			continue
		}
		if _, ok := z.ptrNodes[arpa]; !ok {
			z.ptrNodes[arpa] = ne.canon
		}
	}
	type svcAddr struct{ node, id, addr, name string }
	var list []svcAddr
	for _, se := range z.services {
		for i := range se.instances {
			in := se.instances[i].inst
			if in.Address == "" || in.Address == in.NodeAddress || se.instances[i].ip == nil {
				continue // no address of its own
			}
			dc := strings.ToLower(in.Datacenter)
			if dc == "" {
				dc = z.dc
			}
			name := in.Service
			if name == "" {
				name = se.name
			}
			list = append(list, svcAddr{strings.ToLower(in.Node), strings.ToLower(in.ID), in.Address, name + ".service." + dc + "."})
		}
	}
	sort.Slice(list, func(a, b int) bool {
		if list[a].node != list[b].node {
			return list[a].node < list[b].node
		}
		return list[a].id < list[b].id
	})
	for _, sa := range list {
		if _, ok := z.ptrServices[sa.addr]; !ok {
			z.ptrServices[sa.addr] = sa.name
		}
	}
}
