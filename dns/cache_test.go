package dns

import (
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	miekg "github.com/miekg/dns"
)

func packQuery(t *testing.T, name string, qtype uint16, edns uint16) []byte {
	t.Helper()
	m := new(miekg.Msg)
	m.SetQuestion(name, qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cached answers b from the cache as the UDP loop does (filling it on a
// miss), or returns nil when the slow path must answer.
func cached(t *testing.T, s *Server, b []byte, now time.Time) *miekg.Msg {
	t.Helper()
	v, _ := s.lookup(b, nil, now.UnixNano())
	if v == nil {
		if v, _ = s.fill(b, now.UnixNano()); v == nil {
			return nil
		}
	}
	out := append([]byte(nil), v...)
	s.patch(out, b, netip.MustParseAddr("127.0.0.1"))
	m := new(miekg.Msg)
	if err := m.Unpack(out); err != nil {
		t.Fatal(err)
	}
	return m
}

func addrs(m *miekg.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		if a, ok := rr.(*miekg.A); ok {
			out = append(out, a.A.String())
		}
	}
	sort.Strings(out)
	return out
}

func TestCacheFollowsSnapshots(t *testing.T) {
	s, src := newTestServer(t, nil, nil)
	b := packQuery(t, "users.service.consul.", miekg.TypeA, 0)
	now := time.Now()
	if got := addrs(cached(t, s, b, now)); !slices.Equal(got, []string{"127.0.0.21", "127.0.0.99"}) {
		t.Fatalf("got %v", got)
	}
	next := *src.view.Load()
	next.Services = maps1(next.Services)
	users := *next.Services["users"]
	users.Instances = users.Instances[:1]
	next.Services["users"] = &users
	src.view.Publish(&next)
	if got := addrs(cached(t, s, b, now)); !slices.Equal(got, []string{"127.0.0.21"}) {
		t.Fatalf("after the catalog changed: got %v", got)
	}
}

func TestCacheEjections(t *testing.T) {
	ej := &mutableEjections{m: map[string]bool{}}
	s, _ := newTestServer(t, nil, ej)
	b := packQuery(t, "users.service.consul.", miekg.TypeA, 0)
	now := time.Now()
	if got := addrs(cached(t, s, b, now)); len(got) != 2 {
		t.Fatalf("got %v", got)
	}
	ej.set("users/u2", true)
	if got := addrs(cached(t, s, b, now.Add(ejectionRecheck/2))); len(got) != 2 {
		t.Fatalf("before the recheck: got %v", got)
	}
	if got := addrs(cached(t, s, b, now.Add(ejectionRecheck))); !slices.Equal(got, []string{"127.0.0.21"}) {
		t.Fatalf("after the recheck: got %v, want the ejected instance left out", got)
	}
}

func TestCacheRotations(t *testing.T) {
	s, _ := newTestServer(t, nil, nil)
	firsts := map[string]bool{}
	sets := map[string]bool{}
	b := packQuery(t, "many.service.consul.", miekg.TypeA, 0)
	now := time.Now()
	for range 400 {
		m := cached(t, s, b, now)
		if len(m.Answer) != 3 {
			t.Fatalf("%d answers, want Consul's limit of 3", len(m.Answer))
		}
		firsts[m.Answer[0].(*miekg.A).A.String()] = true
		sets[strings.Join(addrs(m), ",")] = true
	}
	if len(firsts) < 30 {
		t.Fatalf("first answers seen: %d distinct of 40, want every rotation", len(firsts))
	}
}

func TestCacheWhatItDoesNotTake(t *testing.T) {
	s, _ := newTestServer(t, func(c *Config) { c.Recursors = []string{"127.0.0.1:1"} }, nil)
	now := time.Now()
	for _, q := range []struct {
		name  string
		qtype uint16
	}{
		{"example.com.", miekg.TypeA},              // recursion
		{"1.2.0.192.in-addr.arpa.", miekg.TypePTR}, // recursion
		{"consul.", miekg.TypeNS},                  // name servers shuffled
	} {
		b := packQuery(t, q.name, q.qtype, 0)
		for range 2 { // the second time, the cache's mark says so at once
			if m := cached(t, s, b, now); m != nil {
				t.Fatalf("%s %s cached: %v", q.name, miekg.TypeToString[q.qtype], m)
			}
		}
	}
	// Not the fast path's: a question with a compression pointer, a query
	// with an answer record, an EDNS option other than a cookie.
	m := new(miekg.Msg)
	m.SetQuestion("users.service.consul.", miekg.TypeA)
	m.SetEdns0(1232, false)
	m.IsEdns0().Option = append(m.IsEdns0().Option, &miekg.EDNS0_NSID{Code: miekg.EDNS0NSID})
	nsid, _ := m.Pack()
	for _, b := range [][]byte{
		append(packQuery(t, "users.service.consul.", miekg.TypeA, 0)[:12:12], 0xc0, 12, 0, 1, 0, 1),
		nsid,
	} {
		if _, ok := parseWire(b); ok {
			t.Fatalf("parseWire took %x", b)
		}
	}
}

func TestCacheSOASerial(t *testing.T) {
	// An answer with an SOA (whose serial is the time in seconds) is made
	// again in the next second.
	s, _ := newTestServer(t, nil, nil)
	b := packQuery(t, "nope.service.consul.", miekg.TypeA, 0)
	now := time.Now()
	if m := cached(t, s, b, now); m.Rcode != miekg.RcodeNameError || len(m.Ns) != 1 {
		t.Fatalf("got %v", m)
	}
	if v, _ := s.lookup(b, nil, now.UnixNano()); v == nil {
		t.Fatal("not cached within the second")
	}
	next := now.Truncate(time.Second).Add(time.Second)
	if v, _ := s.lookup(b, nil, next.UnixNano()); v != nil {
		t.Fatal("still cached in the next second")
	}
}

func TestCacheTouches(t *testing.T) {
	s, src := newTestServer(t, nil, nil)
	b := packQuery(t, "users.service.consul.", miekg.TypeA, 0)
	now := time.Now()
	cached(t, s, b, now)
	src.mu.Lock()
	src.touches = nil
	src.mu.Unlock()
	for i := range 10 {
		cached(t, s, b, now.Add(time.Duration(i)*touchEvery/4))
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if n := len(src.touches); n < 2 || n > 3 {
		t.Fatalf("%d touches over 2.25 s of hits, want one a second", n)
	}
}

type mutableEjections struct {
	mu sync.Mutex
	m  map[string]bool
}

func (e *mutableEjections) set(k string, v bool) { e.mu.Lock(); e.m[k] = v; e.mu.Unlock() }
func (e *mutableEjections) Ejected(service, id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.m[service+"/"+id]
}

func maps1[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
