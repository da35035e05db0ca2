package dns

import (
	"context"
	"encoding/hex"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strings"
	"time"

	miekg "github.com/miekg/dns"
)

// SOA timers, as Consul's defaults.
const (
	soaRefresh = 3600
	soaRetry   = 600
	soaExpire  = 86400
	// ednsSize is the UDP payload size we advertise in our OPT record.
	ednsSize = 4096
	// maxUDPSize caps a client's EDNS0 buffer size, as Consul.
	maxUDPSize = 65535 - 68
	// maxNS is the number of Consul servers named in NS answers, as Consul.
	maxNS = 3
)

// Answer returns the response to req, asked by from over proto ("udp" or
// "tcp"). It reads the catalog view only, except for a question about a
// service that is not watched yet (Source.Want, bounded by WantTimeout) and
// for names outside the domains, which are forwarded to the recursors. It
// never returns nil and never panics on any req.
func (s *Server) Answer(req *miekg.Msg, from netip.Addr, proto string) *miekg.Msg {
	return s.answer(req, from, proto, nil)
}

// build collects what the answer cache needs to know about an answer while
// it is made for the cache (cache.go); it is nil for answers made per query.
type build struct {
	z   *zone // the zone to answer from
	rot int   // the rotation of the instances to answer with, instead of a shuffle
	// Filled in while answering:
	n       int    // the number of instances the rotations run over
	noCache bool   // the answer depends on more than the question and the zone
	ej      bool   // ejections were consulted (they change between snapshots)
	service string // the service answered about, to be touched on cache hits
}

func (s *Server) answer(req *miekg.Msg, from netip.Addr, proto string, b *build) *miekg.Msg {
	resp := new(miekg.Msg)
	if req == nil {
		resp.Response = true
		resp.Rcode = miekg.RcodeFormatError
		return resp
	}
	resp.Id = req.Id
	resp.Response = true
	resp.Opcode = req.Opcode
	resp.RecursionDesired = req.RecursionDesired
	resp.CheckingDisabled = req.CheckingDisabled
	if len(req.Question) > 0 {
		resp.Question = req.Question[:1:1]
	}
	switch {
	case req.Response || len(req.Question) != 1:
		resp.Rcode = miekg.RcodeFormatError
		return resp
	case req.Opcode != miekg.OpcodeQuery:
		resp.Rcode = miekg.RcodeNotImplemented
		return resp
	}
	opt := req.IsEdns0()
	if opt != nil && opt.Version() != 0 {
		resp.Rcode = miekg.RcodeBadVers
		resp.Extra = append(resp.Extra, newOPT())
		return resp
	}

	q := req.Question[0]
	lname := strings.ToLower(q.Name) // allocates only when there are upper-case letters
	rest, di, ok := s.inDomain(lname)
	switch {
	case ok:
		resp.Authoritative = true
		resp.RecursionAvailable = s.canRecurse(from)
		s.answerLocal(q, rest, di, resp, b)
	case isReverse(lname) && s.answerPTR(q, lname, s.zoneFor(b), resp):
		resp.Authoritative = true
		resp.RecursionAvailable = s.canRecurse(from)
	case b != nil:
		// Never cached, and never forwarded while the cache makes an entry.
		b.noCache = true
		resp.Rcode = miekg.RcodeRefused
		return resp
	default:
		out := s.recurse(req, resp, from, proto)
		if out != resp {
			return out
		}
	}

	if opt != nil {
		resp.Extra = append(resp.Extra, newOPT())
	}
	s.trim(req, resp, opt, proto)
	return resp
}

func newOPT() *miekg.OPT {
	o := &miekg.OPT{Hdr: miekg.RR_Header{Name: ".", Rrtype: miekg.TypeOPT}}
	o.SetUDPSize(ednsSize)
	return o
}

// inDomain reports whether the lower-cased name is in one of the domains, and
// returns the part before the domain (without its final dot) and the index
// of the matching domain in s.domains.
func (s *Server) inDomain(lname string) (rest string, di int, ok bool) {
	if !strings.HasSuffix(lname, ".") {
		lname += "."
	}
	// The longer domain first, so that "a.consul." as an alt domain of
	// "consul." is matched as itself.
	for _, i := range s.domainOrder {
		d := s.domains[i]
		if lname == d {
			return "", i, true
		}
		if len(lname) > len(d) && strings.HasSuffix(lname, d) && lname[len(lname)-len(d)-1] == '.' {
			return lname[:len(lname)-len(d)-1], i, true
		}
	}
	return "", 0, false
}

// zoneFor returns the zone to answer from: the build's, or the newest.
func (s *Server) zoneFor(b *build) *zone {
	if b != nil {
		return b.z
	}
	return s.zones.get(s.src.Load())
}

// answerLocal fills resp for a question in domain s.domains[di].
func (s *Server) answerLocal(q miekg.Question, rest string, di int, resp *miekg.Msg, b *build) {
	qt := q.Qtype
	pq := parseName(rest, qt)
	if pq.kind == kindApex {
		switch qt {
		case miekg.TypeSOA, miekg.TypeNS:
			if b != nil {
				b.noCache = true // the name servers are shuffled
			}
		}
		switch qt {
		case miekg.TypeSOA:
			resp.Answer = append(resp.Answer, s.soa(di))
			resp.Ns, resp.Extra = s.nameservers(di)
			return
		case miekg.TypeNS:
			resp.Answer, resp.Extra = s.nameservers(di)
			return
		}
	}
	switch qt {
	case miekg.TypeAXFR, miekg.TypeIXFR:
		resp.Rcode = miekg.RcodeNotImplemented
		return
	}
	z := s.zoneFor(b)
	if pq.dc != "" && z.dc != "" && pq.dc != z.dc {
		// Another datacenter: attache knows only its own. Consul answers
		// NXDOMAIN for a datacenter it has no path to.
		pq.kind = kindInvalid
	}
	switch pq.kind {
	case kindApex:
		// The apex exists (it has SOA and NS): no data, not NXDOMAIN.
		resp.Ns = append(resp.Ns, s.soa(di))
	case kindService:
		s.answerService(q, pq, di, z, resp, b)
	case kindNode:
		s.answerNode(q, pq, di, z, resp)
	case kindAddr:
		s.answerAddr(q, pq, resp)
	default:
		s.nxdomain(di, resp)
	}
}

func (s *Server) nxdomain(di int, resp *miekg.Msg) {
	resp.Rcode = miekg.RcodeNameError
	resp.Answer, resp.Extra = nil, nil
	resp.Ns = append(resp.Ns[:0], s.soa(di))
}

func (s *Server) soa(di int) *miekg.SOA {
	tun := s.tun.Load() // one reading of the settings for the whole answer
	d := s.domains[di]
	return &miekg.SOA{
		Hdr:     miekg.RR_Header{Name: d, Rrtype: miekg.TypeSOA, Class: miekg.ClassINET, Ttl: tun.negTTL},
		Ns:      "ns." + d,
		Mbox:    "hostmaster." + d,
		Serial:  uint32(time.Now().Unix()),
		Refresh: soaRefresh,
		Retry:   soaRetry,
		Expire:  soaExpire,
		Minttl:  tun.negTTL,
	}
}

// lookupService returns the service's entry, asking the Source to watch it
// when the catalog knows it but the view has no instances of it yet.
func (s *Server) lookupService(z *zone, name string) (*zone, *svcEntry) {
	if se := z.services[name]; se != nil {
		// Tell the watcher the service is in use (so that its on-demand
		// watch is kept): with a context that is already done, Want never
		// waits.
		s.src.Want(s.done, name)
		return z, se
	}
	snap := z.snap
	if snap != nil && len(snap.Known) > 0 && !snap.Known[name] {
		return z, nil // not in the catalog at all: no round trip
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WantTimeout)
	defer cancel()
	snap = s.src.Want(ctx, name)
	if snap == nil {
		return z, nil
	}
	z = s.zones.get(snap)
	return z, z.services[name]
}

// pick returns the indexes of the instances to answer with, in answer
// order: tag filtered, ejected ones left out unless none would be left,
// shuffled or nearest first; for a build, rotation b.rot of one shuffle
// fixed per zone. buf is scratch space.
func (s *Server) pick(se *svcEntry, tag string, buf []int, b *build) []int {
	tun := s.tun.Load() // one reading of the settings for the whole answer
	idx := buf[:0]
	for i := range se.instances {
		if tag != "" && !se.instances[i].inst.HasTag(tag) {
			continue
		}
		idx = append(idx, i)
	}
	if len(idx) == 0 {
		return idx
	}
	if s.ej != nil && tun.honourEjections {
		if b != nil {
			b.ej = true
		}
		kept := 0
		for _, i := range idx {
			if !s.ej.Ejected(se.name, se.instances[i].inst.ID) {
				kept++
			}
		}
		if kept > 0 && kept < len(idx) {
			out := idx[:0]
			for _, i := range idx {
				if !s.ej.Ejected(se.name, se.instances[i].inst.ID) {
					out = append(out, i)
				}
			}
			idx = out
		}
	}
	if b != nil {
		b.n = len(idx)
		if tun.nearest && s.cfg.Node != "" {
			b.noCache = true
		}
		return rotate(idx, b.z.seed, b.rot)
	}
	rand.Shuffle(len(idx), func(a, b int) { idx[a], idx[b] = idx[b], idx[a] })
	if tun.nearest && s.cfg.Node != "" && len(idx) > 1 {
		s.sortNearest(se, idx)
	}
	return idx
}

// rotate shuffles idx with a generator seeded by seed (the same order for
// every rotation of one zone) and rotates it left by rot.
func rotate(idx []int, seed uint64, rot int) []int {
	r := rand.New(rand.NewPCG(seed, uint64(len(idx))))
	r.Shuffle(len(idx), func(a, b int) { idx[a], idx[b] = idx[b], idx[a] })
	if len(idx) > 1 {
		rot %= len(idx)
		out := make([]int, 0, len(idx))
		idx = append(append(out, idx[rot:]...), idx[:rot]...)
	}
	return idx
}

func (s *Server) sortNearest(se *svcEntry, idx []int) {
	snap := s.src.Load()
	rtt := make(map[int]time.Duration, len(idx))
	for _, i := range idx {
		d, ok := snap.RTT(s.cfg.Node, se.instances[i].inst.Node)
		if !ok {
			d = time.Duration(1<<63 - 1) // unknown coordinates last
		}
		rtt[i] = d
	}
	sort.SliceStable(idx, func(a, b int) bool { return rtt[idx[a]] < rtt[idx[b]] })
}

func (s *Server) answerService(q miekg.Question, pq query, di int, z *zone, resp *miekg.Msg, b *build) {
	z2, se := s.lookupService(z, pq.service)
	if b != nil {
		b.service = pq.service
		if z2 != z {
			b.noCache = true // the service was fetched: a newer zone
		}
	}
	if se == nil {
		s.nxdomain(di, resp)
		return
	}
	var buf [16]int
	idx := s.pick(se, pq.tag, buf[:], b)
	if len(idx) == 0 {
		// A known service without healthy instances: NXDOMAIN, as Consul 1.14.
		s.nxdomain(di, resp)
		return
	}
	ttl := s.serviceTTL(pq.service)
	switch q.Qtype {
	case miekg.TypeSRV:
		s.srvRecords(q, se, idx, di, ttl, resp)
	case miekg.TypeTXT:
		s.txtRecords(q, se, idx, ttl, resp)
	default:
		s.addrRecords(q, se, idx, ttl, resp)
	}
	if len(resp.Answer) == 0 {
		resp.Ns = append(resp.Ns, s.soa(di))
	}
}

func wantV4(qt uint16) bool { return qt == miekg.TypeA || qt == miekg.TypeANY }
func wantV6(qt uint16) bool { return qt == miekg.TypeAAAA || qt == miekg.TypeANY }

func ipRR(name string, ip net.IP, v4 bool, ttl uint32) miekg.RR {
	if v4 {
		return &miekg.A{Hdr: miekg.RR_Header{Name: name, Rrtype: miekg.TypeA, Class: miekg.ClassINET, Ttl: ttl}, A: ip}
	}
	return &miekg.AAAA{Hdr: miekg.RR_Header{Name: name, Rrtype: miekg.TypeAAAA, Class: miekg.ClassINET, Ttl: ttl}, AAAA: ip}
}

// addrRecords answers A, AAAA and ANY (and, with nothing, other types) with
// the instances' addresses, one record per distinct address. When no
// instance has an IP address of the asked family, the first host-name
// address is answered as a CNAME, as Consul.
func (s *Server) addrRecords(q miekg.Question, se *svcEntry, idx []int, ttl uint32, resp *miekg.Msg) {
	qt := q.Qtype
	if !wantV4(qt) && !wantV6(qt) {
		return
	}
	resp.Answer = make([]miekg.RR, 0, len(idx))
	cname := ""
	var seen map[[16]byte]bool // distinct addresses
	for _, i := range idx {
		ie := &se.instances[i]
		if ie.ip == nil {
			if cname == "" {
				cname = ie.host
			}
			continue
		}
		if (ie.v4 && !wantV4(qt)) || (!ie.v4 && !wantV6(qt)) {
			continue
		}
		if seen == nil {
			seen = make(map[[16]byte]bool, len(idx))
		}
		key := [16]byte(ie.ip.To16())
		if seen[key] {
			continue
		}
		seen[key] = true
		resp.Answer = append(resp.Answer, ipRR(q.Name, ie.ip, ie.v4, ttl))
	}
	if len(resp.Answer) == 0 && cname != "" {
		resp.Answer = append(resp.Answer, &miekg.CNAME{
			Hdr:    miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypeCNAME, Class: miekg.ClassINET, Ttl: ttl},
			Target: cname,
		})
	}
}

// srvRecords answers SRV: one record per distinct node, address and port,
// with the targets' addresses (and node meta) in the additional section.
func (s *Server) srvRecords(q miekg.Question, se *svcEntry, idx []int, di int, ttl uint32, resp *miekg.Msg) {
	domain := s.domains[di]
	resp.Answer = make([]miekg.RR, 0, len(idx))
	resp.Extra = make([]miekg.RR, 0, len(idx))
	type key struct {
		node, addr string
		port       int
	}
	seen := make(map[key]bool, len(idx))
	metaDone := make(map[*nodeEntry]bool, len(idx))
	for _, i := range idx {
		ie := &se.instances[i]
		k := key{ie.inst.Node, ie.inst.Address, ie.inst.Port}
		if seen[k] {
			continue
		}
		seen[k] = true
		target := ie.target
		if ie.ip != nil {
			target += domain
		}
		resp.Answer = append(resp.Answer, &miekg.SRV{
			Hdr:      miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypeSRV, Class: miekg.ClassINET, Ttl: ttl},
			Priority: 1,
			Weight:   ie.weight,
			Port:     uint16(ie.inst.Port),
			Target:   target,
		})
		if ie.ip != nil {
			resp.Extra = append(resp.Extra, ipRR(target, ie.ip, ie.v4, ttl))
		}
		if s.cfg.NodeMetaTXT && ie.node != nil && !metaDone[ie.node] {
			metaDone[ie.node] = true
			for _, t := range ie.node.txt {
				resp.Extra = append(resp.Extra, &miekg.TXT{
					Hdr: miekg.RR_Header{Name: ie.node.canon + domain, Rrtype: miekg.TypeTXT, Class: miekg.ClassINET, Ttl: ttl},
					Txt: []string{t},
				})
			}
		}
	}
}

// txtRecords answers TXT with the instances' service meta, one record per
// distinct "key=value". (Consul answers A records here.)
func (s *Server) txtRecords(q miekg.Question, se *svcEntry, idx []int, ttl uint32, resp *miekg.Msg) {
	seen := map[string]bool{}
	for _, i := range idx {
		for _, t := range se.instances[i].txt {
			if seen[t] {
				continue
			}
			seen[t] = true
			resp.Answer = append(resp.Answer, &miekg.TXT{
				Hdr: miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypeTXT, Class: miekg.ClassINET, Ttl: ttl},
				Txt: []string{t},
			})
		}
	}
}

func (s *Server) answerNode(q miekg.Question, pq query, di int, z *zone, resp *miekg.Msg) {
	tun := s.tun.Load() // one reading of the settings for the whole answer
	ne := z.nodes[pq.node]
	if ne == nil {
		s.nxdomain(di, resp)
		return
	}
	qt := q.Qtype
	if qt != miekg.TypeA && qt != miekg.TypeAAAA && qt != miekg.TypeANY && qt != miekg.TypeTXT {
		return // as Consul: NOERROR, nothing
	}
	if qt != miekg.TypeTXT {
		switch {
		case ne.ip == nil && ne.host != "":
			resp.Answer = append(resp.Answer, &miekg.CNAME{
				Hdr:    miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypeCNAME, Class: miekg.ClassINET, Ttl: tun.nodeTTL},
				Target: ne.host,
			})
		case ne.ip != nil && ((ne.v4 && wantV4(qt)) || (!ne.v4 && wantV6(qt))):
			resp.Answer = append(resp.Answer, ipRR(q.Name, ne.ip, ne.v4, tun.nodeTTL))
		}
	}
	if qt == miekg.TypeTXT || qt == miekg.TypeANY || s.cfg.NodeMetaTXT {
		target := &resp.Extra
		if qt == miekg.TypeTXT || qt == miekg.TypeANY {
			target = &resp.Answer
		}
		for _, t := range ne.txt {
			*target = append(*target, &miekg.TXT{
				Hdr: miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypeTXT, Class: miekg.ClassINET, Ttl: tun.nodeTTL},
				Txt: []string{t},
			})
		}
	}
}

// answerAddr answers "<hex>.addr[.<dc>].<domain>", the SRV target Consul
// uses for a service address other than its node's.
func (s *Server) answerAddr(q miekg.Question, pq query, resp *miekg.Msg) {
	var v4 bool
	switch len(pq.addr) {
	case 8:
		v4 = true
	case 32:
	default:
		return // as Consul: NOERROR, nothing
	}
	b, err := hex.DecodeString(pq.addr)
	if err != nil {
		resp.Rcode = miekg.RcodeNameError
		resp.Ns = append(resp.Ns, s.soa(s.domainOf(q.Name)))
		return
	}
	rr := ipRR(q.Name, net.IP(b), v4, s.tun.Load().nodeTTL)
	if (v4 && wantV4(q.Qtype)) || (!v4 && wantV6(q.Qtype)) {
		resp.Answer = append(resp.Answer, rr)
	} else {
		resp.Extra = append(resp.Extra, rr)
	}
}

func (s *Server) domainOf(name string) int {
	_, di, _ := s.inDomain(strings.ToLower(name))
	return di
}

// nameservers returns NS records naming up to three Consul servers (the
// "consul" service) and their addresses, as Consul.
func (s *Server) nameservers(di int) (ns, glue []miekg.RR) {
	tun := s.tun.Load() // one reading of the settings for the whole answer
	_, se := s.lookupService(s.zones.get(s.src.Load()), "consul")
	if se == nil {
		return nil, nil
	}
	var buf [16]int
	idx := buf[:0]
	for i := range se.instances {
		idx = append(idx, i)
	}
	rand.Shuffle(len(idx), func(a, b int) { idx[a], idx[b] = idx[b], idx[a] })
	domain := s.domains[di]
	seen := map[*nodeEntry]bool{}
	for _, i := range idx {
		ne := se.instances[i].node
		if ne == nil || seen[ne] || !miekg.IsFqdn(ne.canon) {
			continue
		}
		seen[ne] = true
		name := strings.ToLower(ne.canon + domain)
		if _, ok := miekg.IsDomainName(name); !ok {
			continue
		}
		ns = append(ns, &miekg.NS{
			Hdr: miekg.RR_Header{Name: domain, Rrtype: miekg.TypeNS, Class: miekg.ClassINET, Ttl: tun.nodeTTL},
			Ns:  name,
		})
		if ne.ip != nil {
			glue = append(glue, ipRR(name, ne.ip, ne.v4, tun.nodeTTL))
		}
		if len(ns) >= maxNS {
			break
		}
	}
	return ns, glue
}

// serviceTTL returns the TTL for a (lower-cased) service, in seconds.
func (s *Server) serviceTTL(name string) uint32 {
	tun := s.tun.Load() // one reading of the settings for the whole answer
	if t, ok := tun.ttlExact[name]; ok {
		return t
	}
	for _, p := range tun.ttlPrefix { // longest prefix first
		if strings.HasPrefix(name, p.prefix) {
			return p.ttl
		}
	}
	return tun.defTTL
}
