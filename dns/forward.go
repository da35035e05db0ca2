package dns

import (
	"net/netip"

	miekg "github.com/miekg/dns"
)

// recurse answers a name outside the domains: REFUSED without recursors or
// for a client outside AllowRecursion, else the first usable answer of the
// recursors tried in order (an answer other than NOERROR or NXDOMAIN, or no
// answer within RecursorTimeout, moves on to the next), else SERVFAIL. It
// returns either a recursor's message, to be sent as is, or resp filled in.
func (s *Server) recurse(req, resp *miekg.Msg, from netip.Addr, proto string) *miekg.Msg {
	if !s.canRecurse(from) {
		resp.Rcode = miekg.RcodeRefused
		return resp
	}
	if proto != "tcp" {
		proto = "udp"
	}
	c := &miekg.Client{Net: proto, Timeout: s.cfg.RecursorTimeout}
	for _, r := range s.tun.Load().recursors {
		in, _, err := c.Exchange(req, r)
		if err != nil {
			s.log.Debug("recursor failed", "recursor", r, "question", req.Question[0].Name, "error", err)
			continue
		}
		if in.Rcode != miekg.RcodeSuccess && in.Rcode != miekg.RcodeNameError {
			s.log.Debug("recursor answered with an error", "recursor", r, "question", req.Question[0].Name, "rcode", miekg.RcodeToString[in.Rcode])
			continue
		}
		in.Id = req.Id
		in.Compress = true
		return in
	}
	s.log.Warn("all recursors failed", "question", req.Question[0].Name, "recursors", s.tun.Load().recursors)
	resp.Rcode = miekg.RcodeServerFailure
	resp.RecursionAvailable = true
	return resp
}
