package dns

import (
	"strings"

	miekg "github.com/miekg/dns"
)

// kind is what a question name asks about.
type kind uint8

const (
	kindInvalid     kind = iota // not a name Consul's DNS defines: NXDOMAIN
	kindApex                    // the domain itself
	kindService                 // [tag.]svc.service, _svc._tag.service
	kindNode                    // node.node
	kindAddr                    // hex.addr
	kindUnsupported             // connect, ingress, virtual, query, peer lookups: NXDOMAIN here
)

// query is a parsed question name. Its strings point into the lower-cased
// question name; parsing allocates only for unusual names.
type query struct {
	kind    kind
	service string // kindService
	tag     string // kindService, "" for none
	node    string // kindNode
	addr    string // kindAddr: hex digits
	dc      string // explicit datacenter, "" for the local one
}

// maxLabels is the number of labels parsed without allocating.
const maxLabels = 16

// parseName parses rest, the lower-cased question name with the domain and
// the dot before it removed ("" for the apex), as Consul's dispatch does.
func parseName(rest string, qtype uint16) query {
	if rest == "" {
		return query{kind: kindApex}
	}
	// Label boundaries: label i is rest[start[i]:end[i]].
	var startBuf, endBuf [maxLabels]int
	start, end := startBuf[:0], endBuf[:0]
	from := 0
	for i := 0; i <= len(rest); i++ {
		if i == len(rest) || rest[i] == '.' {
			if i == from { // empty label
				return query{}
			}
			start, end = append(start, from), append(end, i)
			from = i + 1
		}
	}
	label := func(i int) string { return rest[start[i]:end[i]] }
	// join returns labels [a, b) joined by dots, without allocating.
	join := func(a, b int) string { return rest[start[a]:end[b-1]] }

	n := len(start)
	var k string
	kindAt := -1
	for i := n - 1; i >= 0 && kindAt < 0; i-- {
		switch l := label(i); l {
		case "service", "connect", "virtual", "ingress", "node", "query", "addr":
			k, kindAt = l, i
		default:
			// The "service" label is optional for RFC 2782 SRV questions.
			if qtype == miekg.TypeSRV && strings.HasPrefix(l, "_") {
				k, kindAt = "_", i+1
			}
		}
	}
	if kindAt < 0 {
		return query{}
	}
	parts := kindAt // labels [0, parts) come before the kind label
	suffixFrom := kindAt + 1
	if k == "_" {
		suffixFrom = kindAt
	}
	dc, ok := locality(rest, start[suffixFrom:n], end[suffixFrom:n])
	if !ok {
		return query{}
	}

	switch k {
	case "service", "_":
		if parts < 1 {
			return query{}
		}
		if dc == peerLocality {
			return query{kind: kindUnsupported}
		}
		if parts == 2 && strings.HasPrefix(label(0), "_") && strings.HasPrefix(label(1), "_") {
			tag := label(1)[1:]
			if tag == "tcp" {
				tag = ""
			}
			return query{kind: kindService, service: label(0)[1:], tag: tag, dc: dc}
		}
		q := query{kind: kindService, service: label(parts - 1), dc: dc}
		if parts >= 2 {
			q.tag = join(0, parts-1)
		}
		return q
	case "node":
		if parts < 1 {
			return query{}
		}
		if dc == peerLocality {
			return query{kind: kindUnsupported}
		}
		return query{kind: kindNode, node: join(0, parts), dc: dc}
	case "addr":
		if parts != 1 {
			return query{}
		}
		return query{kind: kindAddr, addr: label(0)}
	default: // connect, virtual, ingress, query
		if parts < 1 {
			return query{}
		}
		return query{kind: kindUnsupported}
	}
}

// peerLocality marks a cluster-peering locality, which attache does not serve.
const peerLocality = "\x00peer"

// locality parses the labels after the kind label as Consul's OSS
// parseLocality does: none, "<dc>", "<dc>.dc", "<peer>.peer" (and pairs of
// these). It returns the datacenter ("" for the local one).
func locality(rest string, start, end []int) (string, bool) {
	switch len(start) {
	case 0:
		return "", true
	case 1:
		return rest[start[0]:end[0]], true
	case 2, 4:
		dc, peer := "", false
		for i := 0; i < len(start); i += 2 {
			switch rest[start[i+1]:end[i+1]] {
			case "dc":
				dc = rest[start[i]:end[i]]
			case "peer":
				peer = true
			default:
				return "", false
			}
		}
		if peer {
			if dc != "" {
				return "", false
			}
			return peerLocality, true
		}
		return dc, true
	}
	return "", false
}
