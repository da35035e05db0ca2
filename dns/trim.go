package dns

import (
	"strings"

	miekg "github.com/miekg/dns"
)

// trim makes resp fit what the client can take, the way Consul's
// trimUDPResponse and trimTCPResponse do, so that both cut at the same
// record:
//
//   - UDP: the limit is 512 bytes, or the client's EDNS0 buffer size when it
//     is larger (capped at maxUDPSize). When the limit is 512 (no EDNS0, or
//     an EDNS0 buffer of 512 or less) the answer is first cut to
//     UDPAnswerLimit records, as Consul (no TC: the shuffled subset is the
//     answer), and measured uncompressed.
//   - TCP: the limit is 65523 bytes, after at most 4096 answers (1024 SRV).
//   - While more than one answer is left and the message is over the limit
//     (8 bytes less over UDP), the authority section goes, then answers from
//     the end, each time with the additional section cut to the first
//     record of each SRV target that is left (as Consul's syncExtra).
//
// Unlike Consul, TC is set when answers were dropped to fit (Consul sets it
// only with enable_truncate), the OPT record stays (Consul's syncExtra drops
// it with the additional records), and an answer that still does not fit
// loses answers, then its additional records, then all answers (Consul
// would send it over the limit). Compression is used only when the message
// would not fit without it.
func (s *Server) trim(req, resp *miekg.Msg, opt *miekg.OPT, proto string) {
	// As Consul, the OPT record is in the additional section while trimming
	// (so it counts in the size), and syncExtra leaves it out as soon as
	// answers are cut; unlike Consul, it is put back afterwards.
	var ednsRR miekg.RR
	if n := len(resp.Extra); n > 0 && resp.Extra[n-1].Header().Rrtype == miekg.TypeOPT {
		ednsRR = resp.Extra[n-1]
	}
	extra := indexExtra(resp.Extra)
	numAnswers := len(resp.Answer)
	limited := numAnswers // answers left after the answer limit

	resp.Compress = true
	maxSize := 65523
	if proto == "tcp" {
		limit := 4096
		if len(req.Question) > 0 && req.Question[0].Qtype == miekg.TypeSRV {
			limit = 1024
		}
		if len(resp.Answer) > limit {
			resp.Answer = resp.Answer[:limit]
		}
		for len(resp.Answer) > 1 && resp.Len() > maxSize {
			resp.Ns = nil
			if resp.Len()-maxSize > 100 {
				resp.Answer = resp.Answer[:binaryTruncate(resp, maxSize, extra)]
			} else {
				resp.Answer = resp.Answer[:len(resp.Answer)-1]
			}
			if extra != nil {
				resp.Extra = syncExtra(resp.Answer, extra)
			}
		}
	} else {
		maxSize = miekg.MinMsgSize
		if opt != nil && int(opt.UDPSize()) > maxSize {
			maxSize = min(int(opt.UDPSize()), maxUDPSize)
		}
		if maxSize == miekg.MinMsgSize && s.cfg.UDPAnswerLimit > 0 && numAnswers > s.cfg.UDPAnswerLimit {
			resp.Compress = false // Consul measures these uncompressed
			resp.Answer = resp.Answer[:s.cfg.UDPAnswerLimit]
			if extra != nil {
				resp.Extra = syncExtra(resp.Answer, extra)
			}
			limited = len(resp.Answer)
		}
		for len(resp.Answer) > 1 && resp.Len() > maxSize-8 {
			resp.Ns = nil
			if resp.Len()-maxSize > 100 {
				resp.Answer = resp.Answer[:binaryTruncate(resp, maxSize, extra)]
			} else {
				resp.Answer = resp.Answer[:len(resp.Answer)-1]
			}
			if extra != nil {
				resp.Extra = syncExtra(resp.Answer, extra)
			}
		}
		maxSize = miekg.MinMsgSize
		if opt != nil {
			maxSize = min(max(int(opt.UDPSize()), miekg.MinMsgSize), maxUDPSize)
		}
	}
	if ednsRR != nil && (len(resp.Extra) == 0 || resp.Extra[len(resp.Extra)-1] != ednsRR) {
		resp.Extra = append(resp.Extra[:len(resp.Extra):len(resp.Extra)], ednsRR)
	}

	// Over the limit still (Consul would send it so): fewer answers, then
	// no additional records, then no answers.
	resp.Compress = false
	if resp.Len() > maxSize {
		resp.Compress = true
	}
	for len(resp.Answer) > 1 && resp.Len() > maxSize {
		resp.Ns = nil
		resp.Answer = resp.Answer[:len(resp.Answer)-1]
		resp.Extra = withOPT(syncExtra(resp.Answer, extra), ednsRR)
	}
	if resp.Len() > maxSize {
		resp.Ns = nil
		resp.Extra = withOPT(nil, ednsRR)
		if resp.Len() > maxSize {
			resp.Answer = nil
		}
	}
	if len(resp.Answer) < limited {
		resp.Truncated = true
	}
}

// withOPT returns rrs with the OPT record, if any, at the end.
func withOPT(rrs []miekg.RR, opt miekg.RR) []miekg.RR {
	if opt == nil {
		return rrs
	}
	return append(rrs[:len(rrs):len(rrs)], opt)
}

// binaryTruncate finds the number of answers to keep with a binary search,
// as Consul's dnsBinaryTruncate does (including its early stop within 10
// bytes of the limit).
func binaryTruncate(resp *miekg.Msg, maxSize int, extra map[string]miekg.RR) int {
	answers := resp.Answer
	lo, hi := 0, len(answers)+1
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		resp.Answer = answers[:mid]
		if extra != nil {
			resp.Extra = syncExtra(resp.Answer, extra)
		}
		n := resp.Len()
		if n <= maxSize {
			if maxSize-n < 10 {
				resp.Answer = answers
				return mid
			}
			lo = mid
		} else {
			hi = mid
		}
	}
	resp.Answer = answers
	return lo
}

// indexExtra maps each lower-cased name of the additional records to the
// first record with that name, as Consul's indexRRs; nil when there are
// none.
func indexExtra(extra []miekg.RR) map[string]miekg.RR {
	if len(extra) == 0 {
		return nil
	}
	index := make(map[string]miekg.RR, len(extra))
	for _, rr := range extra {
		name := strings.ToLower(rr.Header().Name)
		if _, ok := index[name]; !ok {
			index[name] = rr
		}
	}
	return index
}

// syncExtra returns, as Consul's syncExtra, the additional records that go
// with answers: for each SRV target (once), the first additional record
// with that name, following a CNAME there to the first record of its
// target.
func syncExtra(answers []miekg.RR, index map[string]miekg.RR) []miekg.RR {
	out := make([]miekg.RR, 0, len(answers))
	resolved := make(map[string]bool, len(answers))
	for _, a := range answers {
		srv, ok := a.(*miekg.SRV)
		if !ok {
			continue
		}
		target := strings.ToLower(srv.Target)
		for !resolved[target] {
			resolved[target] = true
			rr := index[target]
			if rr == nil {
				break
			}
			out = append(out, rr)
			cname, ok := rr.(*miekg.CNAME)
			if !ok {
				break
			}
			target = strings.ToLower(cname.Target)
		}
	}
	return out
}
