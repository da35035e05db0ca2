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
// only with enable_truncate), and an answer that still does not fit loses its
// additional records, then its answers (Consul would send it over the
// limit). The OPT record stays. Compression is used only when the message
// would not fit without it.
func (s *Server) trim(req, resp *miekg.Msg, opt *miekg.OPT, proto string) {
	// Keep the OPT record aside: it always stays, last.
	var ednsRR miekg.RR
	if n := len(resp.Extra); n > 0 && resp.Extra[n-1].Header().Rrtype == miekg.TypeOPT {
		ednsRR, resp.Extra = resp.Extra[n-1], resp.Extra[:n-1]
	}
	extra := resp.Extra
	numAnswers := len(resp.Answer)
	cut := false // answers dropped for size (not for the answer limit)

	// Consul measures without the OPT record (it adds it after trimming).
	resp.Compress = true
	if proto == "tcp" {
		const maxSize = 65523
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
			resp.Extra = syncExtra(resp.Answer, extra)
		}
		cut = len(resp.Answer) < numAnswers
	} else {
		maxSize := miekg.MinMsgSize
		if opt != nil && int(opt.UDPSize()) > maxSize {
			maxSize = min(int(opt.UDPSize()), maxUDPSize)
		}
		if maxSize == miekg.MinMsgSize && s.cfg.UDPAnswerLimit > 0 && numAnswers > s.cfg.UDPAnswerLimit {
			resp.Compress = false // Consul measures these uncompressed
			resp.Answer = resp.Answer[:s.cfg.UDPAnswerLimit]
			if len(extra) > 0 {
				resp.Extra = syncExtra(resp.Answer, extra)
			}
		}
		limited := len(resp.Answer)
		for len(resp.Answer) > 1 && resp.Len() > maxSize-8 {
			resp.Ns = nil
			if resp.Len()-maxSize > 100 {
				resp.Answer = resp.Answer[:binaryTruncate(resp, maxSize, extra)]
			} else {
				resp.Answer = resp.Answer[:len(resp.Answer)-1]
			}
			if len(extra) > 0 {
				resp.Extra = syncExtra(resp.Answer, extra)
			}
		}
		cut = len(resp.Answer) < limited
	}

	// What Consul would send over the limit: never.
	size := miekg.MaxMsgSize
	if proto != "tcp" {
		size = miekg.MinMsgSize
		if opt != nil {
			size = min(max(int(opt.UDPSize()), miekg.MinMsgSize), maxUDPSize)
		}
	}
	if ednsRR != nil {
		resp.Extra = append(resp.Extra[:len(resp.Extra):len(resp.Extra)], ednsRR)
	}
	resp.Compress = false
	if resp.Len() <= size {
		resp.Truncated = resp.Truncated || cut
		return
	}
	resp.Compress = true
	if resp.Len() <= size {
		resp.Truncated = resp.Truncated || cut
		return
	}
	withOPT := func(rrs []miekg.RR) []miekg.RR {
		if ednsRR == nil {
			return rrs
		}
		return append(rrs[:len(rrs):len(rrs)], ednsRR)
	}
	if len(resp.Answer) > 0 {
		resp.Ns = nil
	}
	resp.Extra = withOPT(nil)
	if resp.Len() > size {
		resp.Answer = nil
		cut = true
	}
	resp.Truncated = resp.Truncated || cut
}

// binaryTruncate finds the number of answers to keep with a binary search,
// as Consul's dnsBinaryTruncate does (including its early stop within 10
// bytes of the limit).
func binaryTruncate(resp *miekg.Msg, maxSize int, extra []miekg.RR) int {
	answers := resp.Answer
	lo, hi := 0, len(answers)+1
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		resp.Answer = answers[:mid]
		if len(extra) > 0 {
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

// syncExtra returns, as Consul's syncExtra, the additional records that go
// with answers: for each SRV target (once), the first record of extra with
// that name, following a CNAME there to the first record of its target.
func syncExtra(answers, extra []miekg.RR) []miekg.RR {
	out := make([]miekg.RR, 0, len(answers))
	resolved := make(map[string]bool, len(answers))
	first := func(name string) miekg.RR {
		for _, rr := range extra {
			if strings.EqualFold(rr.Header().Name, name) {
				return rr
			}
		}
		return nil
	}
	for _, a := range answers {
		srv, ok := a.(*miekg.SRV)
		if !ok {
			continue
		}
		target := strings.ToLower(srv.Target)
		for !resolved[target] {
			resolved[target] = true
			rr := first(target)
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
