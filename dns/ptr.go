package dns

import (
	"net"
	"strings"

	miekg "github.com/miekg/dns"
)

// isReverse reports whether the lower-cased, fully qualified name is under
// "arpa.", the names Consul's DNS answers with its reverse lookup handler
// (any type).
func isReverse(lname string) bool {
	return lname == "arpa." || strings.HasSuffix(lname, ".arpa.")
}

// answerPTR answers a question under arpa. from memory as Consul's handlePtr
// does, and reports whether it found the address: first a node of the
// catalog with that address (PTR "<node>.node.<dc>.<domain>"), else an
// instance in the view whose service address it is (PTR
// "<service>.service.<dc>.<domain>"). One PTR record, TTL 0, whatever the
// question's type (as Consul), with the zone's SOA in the authority section
// for an SOA question. When nothing matches, the question goes to the
// recursors.
func (s *Server) answerPTR(q miekg.Question, lname string, z *zone, resp *miekg.Msg) bool {
	if !strings.HasSuffix(lname, ".") {
		lname += "."
	}
	target, ok := z.ptrNodes[lname]
	if !ok {
		addr := addressFromReverse(lname)
		if addr == "" {
			return false
		}
		if target, ok = z.ptrServices[addr]; !ok {
			return false
		}
	}
	resp.Answer = append(resp.Answer, &miekg.PTR{
		Hdr: miekg.RR_Header{Name: q.Name, Rrtype: miekg.TypePTR, Class: miekg.ClassINET},
		Ptr: target + s.domains[0],
	})
	if q.Qtype == miekg.TypeSOA {
		resp.Ns = append(resp.Ns, s.soa(0))
	}
	return true
}

// addressFromReverse returns the address a reverse name stands for, in the
// canonical text form, or "" (as Consul's dnsutil.ExtractAddressFromReverse).
func addressFromReverse(lname string) string {
	const v4, v6 = ".in-addr.arpa.", ".ip6.arpa."
	var labels []string
	switch {
	case strings.HasSuffix(lname, v4):
		labels = strings.Split(strings.TrimSuffix(lname, v4), ".")
		reverseStrings(labels)
		ip := net.ParseIP(strings.Join(labels, ".")).To4()
		if ip == nil {
			return ""
		}
		return ip.String()
	case strings.HasSuffix(lname, v6):
		labels = strings.Split(strings.TrimSuffix(lname, v6), ".")
		reverseStrings(labels)
		groups := make([]string, 0, len(labels)/4)
		for i := 0; i+4 <= len(labels); i += 4 {
			groups = append(groups, strings.Join(labels[i:i+4], ""))
		}
		ip := net.ParseIP(strings.Join(groups, ":")).To16()
		if ip == nil {
			return ""
		}
		return ip.String()
	}
	return ""
}

func reverseStrings(s []string) {
	for i, j := 0, len(s)-1; i < j; i, j = i+1, j-1 {
		s[i], s[j] = s[j], s[i]
	}
}
