package dns

import (
	"strings"

	miekg "github.com/miekg/dns"
)

// trim makes resp fit what the client can take: 512 bytes over plain UDP,
// the EDNS0 buffer size when the query has one, 64 KiB over TCP. A plain
// UDP answer is first cut to UDPAnswerLimit records, as Consul (no TC: the
// shuffled subset is the answer). When the answer records themselves do not
// fit, as many as fit are kept, with the additional records they need, and
// TC is set so that the client retries over TCP. Additional records alone
// are dropped without TC (RFC 2181 section 9). Compression is used only when
// the message would not fit without it.
func (s *Server) trim(req, resp *miekg.Msg, opt *miekg.OPT, proto string) {
	size := miekg.MinMsgSize
	switch {
	case proto == "tcp":
		size = miekg.MaxMsgSize
	case opt != nil:
		size = max(int(opt.UDPSize()), miekg.MinMsgSize)
		size = min(size, maxUDPSize)
	}
	if proto != "tcp" && opt == nil && s.cfg.UDPAnswerLimit > 0 && len(resp.Answer) > s.cfg.UDPAnswerLimit {
		resp.Answer = resp.Answer[:s.cfg.UDPAnswerLimit]
		resp.Extra = syncExtra(resp.Answer, resp.Extra)
	}
	resp.Compress = false
	if resp.Len() <= size {
		return
	}
	resp.Compress = true
	if resp.Len() <= size {
		return
	}

	// Keep the OPT record aside: it always stays, last.
	var ednsRR miekg.RR
	extra := resp.Extra
	if n := len(extra); n > 0 && extra[n-1].Header().Rrtype == miekg.TypeOPT {
		ednsRR, extra = extra[n-1], extra[:n-1]
	}
	withOPT := func(rrs []miekg.RR) []miekg.RR {
		out := make([]miekg.RR, 0, len(rrs)+1)
		out = append(out, rrs...)
		if ednsRR != nil {
			out = append(out, ednsRR)
		}
		return out
	}

	// The authority section first (Consul drops it too), then the
	// additional records the answers do not need, then all of them.
	if len(resp.Answer) > 0 {
		resp.Ns = nil
	}
	resp.Extra = withOPT(syncExtra(resp.Answer, extra))
	if resp.Len() <= size {
		return
	}
	resp.Extra = withOPT(nil)
	if resp.Len() <= size {
		return
	}

	// The answers do not fit: keep the most that do, with their extras.
	answers := resp.Answer
	lo, hi := 0, len(answers) // lo fits, hi does not
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		resp.Answer = answers[:mid]
		resp.Extra = withOPT(syncExtra(resp.Answer, extra))
		if resp.Len() <= size {
			lo = mid
		} else {
			hi = mid
		}
	}
	resp.Answer = answers[:lo]
	resp.Extra = withOPT(syncExtra(resp.Answer, extra))
	if resp.Len() > size {
		resp.Extra = withOPT(nil)
	}
	resp.Truncated = true
}

// syncExtra returns the records of extra that give the addresses of the
// targets of the SRV records in answers, and the OPT record.
func syncExtra(answers, extra []miekg.RR) []miekg.RR {
	if len(extra) == 0 {
		return extra
	}
	out := make([]miekg.RR, 0, len(answers)+1)
	for _, rr := range extra {
		h := rr.Header()
		if h.Rrtype == miekg.TypeOPT {
			out = append(out, rr)
			continue
		}
		if h.Rrtype != miekg.TypeA && h.Rrtype != miekg.TypeAAAA {
			continue
		}
		for _, a := range answers {
			if srv, ok := a.(*miekg.SRV); ok && strings.EqualFold(srv.Target, h.Name) {
				out = append(out, rr)
				break
			}
		}
	}
	// OPT last.
	for i, rr := range out {
		if rr.Header().Rrtype == miekg.TypeOPT && i != len(out)-1 {
			out = append(append(out[:i:i], out[i+1:]...), rr)
			break
		}
	}
	return out
}
