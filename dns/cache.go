package dns

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	miekg "github.com/miekg/dns"

	"attache/sidecar/catalog"
)

// The answer cache serves UDP queries as bytes packed once. Between two
// catalog changes every query about the same question gets the same answer
// up to its ID, its RD and CD bits, the RA bit (which depends on the
// client), the shuffle and, in the SOA of a negative answer, the serial
// (the time). So an answer is made by the slow path (Answer, the same code
// that answers every other query) once per snapshot and key, in every
// rotation of a shuffle fixed per snapshot, and packed; a query is answered
// by copying one rotation, picked at random, and patching the header.
//
// The key is the question section as sent (name with its case, type,
// class) and the query's EDNS0 state: none, or its buffer size as the trim
// sees it and the DO bit. What the fast path does not recognise (see
// parseWire) never reaches the cache; what the slow path cannot answer
// from the question and the zone alone (recursion, the apex's SOA and NS,
// Nearest) is marked for the slow path.
const (
	// maxRotations bounds the rotations kept per answer; an answer over more
	// instances than this is made per query (so every instance can come
	// first, as with a shuffle).
	maxRotations = 64
	// maxCacheEntries and maxCacheBytes bound one snapshot's cache; when
	// either is reached it starts over empty.
	maxCacheEntries = 4096
	maxCacheBytes   = 16 << 20
	// ejectionRecheck is how long an answer that left out ejected
	// instances (or could have) is served before it is made again: ejections
	// change without a new snapshot.
	ejectionRecheck = 250 * time.Millisecond
	// touchEvery is how often a cache hit tells the Source that its service
	// is still in use.
	touchEvery = time.Second
)

// answerCache holds the packed answers made from one snapshot.
type answerCache struct {
	snap  *catalog.Snapshot
	tun   *tuning // the settings its answers were built with (a reload replaces the cache)
	mu    sync.RWMutex
	m     map[string]*entry
	bytes int
}

// entry is one question's packed answer in every rotation, or (variants
// nil) a mark that the slow path answers it.
type entry struct {
	variants [][]byte
	building bool   // being made; the slow path answers meanwhile
	qtype    uint16 // for the metrics
	rcode    int
	expires  int64  // unix nanoseconds; 0: lives as long as the snapshot
	service  string // touched on hits; "" for none
	touched  atomic.Int64
}

// wireQuery is what parseWire reads from a query.
type wireQuery struct {
	qend int // end of the question section
	edns bool
	size uint16 // the EDNS0 buffer size
	do   bool
}

// parseWire recognises the queries the cache answers: a QUERY with one
// question whose name is plain labels (no compression), no answer or
// authority records, and at most one additional record, an OPT record for
// the root of EDNS version 0 whose options are only cookies or padding,
// with nothing after it. Everything else goes to the slow path.
func parseWire(b []byte) (wireQuery, bool) {
	var q wireQuery
	if len(b) < 12+1+4 {
		return q, false
	}
	if b[2]&0xf8 != 0 { // QR set or an opcode other than QUERY
		return q, false
	}
	if binary.BigEndian.Uint16(b[4:]) != 1 || b[6]|b[7]|b[8]|b[9] != 0 || b[10] != 0 || b[11] > 1 {
		return q, false
	}
	off := 12
	for {
		if off >= len(b) {
			return q, false
		}
		l := int(b[off])
		if l == 0 {
			off++
			break
		}
		if l > 63 {
			return q, false
		}
		off += 1 + l
		if off-12 > 254 { // the name with its final zero is at most 255 bytes
			return q, false
		}
	}
	if off+4 > len(b) {
		return q, false
	}
	off += 4 // type and class
	q.qend = off
	if b[11] == 0 {
		return q, off == len(b)
	}
	// OPT: root name, type 41, class = buffer size, TTL = extended rcode,
	// version, flags; then the options.
	if off+11 > len(b) || b[off] != 0 || binary.BigEndian.Uint16(b[off+1:]) != miekg.TypeOPT {
		return q, false
	}
	if b[off+6] != 0 { // version
		return q, false
	}
	q.edns = true
	q.size = binary.BigEndian.Uint16(b[off+3:])
	q.do = b[off+7]&0x80 != 0
	rdlen := int(binary.BigEndian.Uint16(b[off+9:]))
	off += 11
	if off+rdlen != len(b) {
		return q, false
	}
	for off < len(b) {
		if off+4 > len(b) {
			return q, false
		}
		code := binary.BigEndian.Uint16(b[off:])
		olen := int(binary.BigEndian.Uint16(b[off+2:]))
		if code != miekg.EDNS0COOKIE && code != miekg.EDNS0PADDING {
			return q, false
		}
		off += 4 + olen
		if off > len(b) {
			return q, false
		}
	}
	return q, true
}

// cacheKey appends the cache key of the query to dst.
func cacheKey(dst, b []byte, q wireQuery) []byte {
	dst = append(dst, b[12:q.qend]...)
	if !q.edns {
		return append(dst, 0, 0, 0)
	}
	flags := byte(1)
	if q.do {
		flags |= 2
	}
	size := max(q.size, miekg.MinMsgSize)
	size = min(size, maxUDPSize)
	return append(dst, flags, byte(size>>8), byte(size))
}

// cacheFor returns the cache of the current snapshot and settings, or nil
// when another goroutine just replaced it with one of another snapshot
// (the slow path answers then). An answer built after a reload may go
// into the cache of the settings before it, which is dropped then: a
// cache never holds answers older than its settings.
func (s *Server) cacheFor() *answerCache {
	snap, tun := s.src.Load(), s.tun.Load()
	c := s.cache.Load()
	if c != nil && c.snap == snap && c.tun == tun {
		return c
	}
	nc := &answerCache{snap: snap, tun: tun, m: map[string]*entry{}}
	if s.cache.CompareAndSwap(c, nc) {
		return nc
	}
	if c = s.cache.Load(); c != nil && c.snap == snap && c.tun == tun {
		return c
	}
	return nil
}

// lookup returns a cached answer to the query (one rotation, picked at
// random, not yet patched by patch), or nil when the slow path must answer
// it. It does not allocate; key is scratch space.
func (s *Server) lookup(b []byte, key []byte, now int64) ([]byte, *entry) {
	q, ok := parseWire(b)
	if !ok {
		return nil, nil
	}
	c := s.cacheFor()
	if c == nil {
		return nil, nil
	}
	key = cacheKey(key[:0], b, q)
	c.mu.RLock()
	e := c.m[string(key)]
	c.mu.RUnlock()
	if e == nil || e.variants == nil || (e.expires != 0 && now >= e.expires) {
		return nil, nil
	}
	if e.service != "" {
		if t := e.touched.Load(); now-t >= int64(touchEvery) && e.touched.CompareAndSwap(t, now) {
			s.src.Want(s.done, e.service)
		}
	}
	return e.pick(), e
}

func (e *entry) pick() []byte {
	if len(e.variants) == 1 {
		return e.variants[0]
	}
	return e.variants[rand.IntN(len(e.variants))]
}

// patch writes the query's ID, RD and CD bits and the client's RA bit into
// a copy of a cached answer.
func (s *Server) patch(resp, req []byte, from netip.Addr) {
	resp[0], resp[1] = req[0], req[1]
	resp[2] = resp[2]&^0x01 | req[2]&0x01 // RD
	resp[3] &^= 0x80 | 0x10
	resp[3] |= req[3] & 0x10 // CD
	if s.canRecurse(from) {
		resp[3] |= 0x80 // RA
	}
}

// fill makes the cache entry for a query the fast path recognised but did
// not find, and returns its answer (not yet patched); nil when the slow
// path must answer (the answer cannot be cached, or another query is making
// it now).
func (s *Server) fill(b []byte, now int64) ([]byte, *entry) {
	q, ok := parseWire(b)
	if !ok {
		return nil, nil
	}
	c := s.cacheFor()
	if c == nil {
		return nil, nil
	}
	key := string(cacheKey(nil, b, q))
	c.mu.Lock()
	if e := c.m[key]; e != nil && (e.building || e.variants == nil || e.expires == 0 || now < e.expires) {
		c.mu.Unlock()
		if e.variants == nil {
			return nil, nil
		}
		return e.pick(), e
	}
	if len(c.m) >= maxCacheEntries || c.bytes >= maxCacheBytes {
		clear(c.m)
		c.bytes = 0
	}
	c.m[key] = &entry{building: true}
	c.mu.Unlock()

	e := s.makeEntry(b, c, now)
	c.mu.Lock()
	if old := c.m[key]; old != nil {
		for _, v := range old.variants {
			c.bytes -= len(v)
		}
	}
	c.m[key] = e
	for _, v := range e.variants {
		c.bytes += len(v)
	}
	c.mu.Unlock()
	if e.variants == nil {
		return nil, nil
	}
	return e.pick(), e
}

// makeEntry answers the query with Answer in every rotation and packs the
// answers.
func (s *Server) makeEntry(b []byte, c *answerCache, now int64) *entry {
	e := &entry{}
	req := new(miekg.Msg)
	if err := req.Unpack(b); err != nil || len(req.Question) != 1 {
		return e
	}
	req.Id, req.RecursionDesired, req.CheckingDisabled = 0, false, false
	e.qtype = req.Question[0].Qtype
	bd := &build{z: s.zones.get(c.snap)}
	// Answer as a client that may not recurse: RA is patched per query. A
	// client that may recurse is needed for names the recursors answer, but
	// those are not cached, and Answer does not forward them in a build.
	from := netip.IPv6Unspecified()
	n := 1
	for rot := 0; rot < n; rot++ {
		bd.rot = rot
		resp := s.answer(req, from, "udp", bd)
		if bd.noCache || bd.n > maxRotations {
			return &entry{qtype: e.qtype}
		}
		if rot == 0 {
			n = max(bd.n, 1)
			e.rcode, e.service = resp.Rcode, bd.service
			if bd.ej {
				e.expires = now + int64(ejectionRecheck)
			}
			if hasSOA(resp) {
				// The SOA serial is the time in seconds: until the next second.
				next := (now/int64(time.Second) + 1) * int64(time.Second)
				if e.expires == 0 || next < e.expires {
					e.expires = next
				}
			}
		}
		p, err := resp.Pack()
		if err != nil {
			return &entry{qtype: e.qtype}
		}
		e.variants = append(e.variants, p)
	}
	e.touched.Store(now)
	return e
}

func hasSOA(m *miekg.Msg) bool {
	for _, sec := range [][]miekg.RR{m.Answer, m.Ns} {
		for _, rr := range sec {
			if rr.Header().Rrtype == miekg.TypeSOA {
				return true
			}
		}
	}
	return false
}
