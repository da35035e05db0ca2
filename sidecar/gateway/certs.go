package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"attache/control/routes"
)

// certStore holds the certificates the route document names, picks one
// per TLS handshake by SNI, and loads them again when their files change.
type certStore struct {
	log  hclog.Logger
	mu   sync.Mutex // guards want and files
	want []routes.TLSCert
	seen map[string]fileStamp // the files' state when last loaded
	cur  atomic.Pointer[certSet]
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// certSet is the loaded certificates: by exact name, by wildcard suffix,
// and the first one for clients that send no (or an unknown) name.
type certSet struct {
	exact  map[string]*tls.Certificate
	wild   map[string]*tls.Certificate // ".example.com"
	first  *tls.Certificate
	names  []string
	byPair map[routes.TLSCert]*tls.Certificate
}

func newCertStore(log hclog.Logger) *certStore {
	s := &certStore{log: log, seen: map[string]fileStamp{}}
	s.cur.Store(&certSet{byPair: map[routes.TLSCert]*tls.Certificate{}})
	return s
}

// tlsConfig is the gateway TLS listener's configuration: TLS 1.2 at
// least, HTTP/2 by ALPN, certificates from the store.
func (s *certStore) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: s.get,
	}
}

func (s *certStore) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	cs := s.cur.Load()
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	if c := cs.exact[name]; c != nil {
		return c, nil
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		if c := cs.wild[name[i:]]; c != nil {
			return c, nil
		}
	}
	if cs.first == nil {
		return nil, errors.New("gateway: no TLS certificate in the route document")
	}
	return cs.first, nil
}

// set takes the document's certificate list; they are loaded now when the
// list changed.
func (s *certStore) set(want []routes.TLSCert) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if equalCerts(s.want, want) {
		return
	}
	s.want = append([]routes.TLSCert(nil), want...)
	s.loadLocked()
}

func equalCerts(a, b []routes.TLSCert) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// run looks at the files every interval and loads them all again when one
// changed (its modification time or size).
func (s *certStore) run(ctx context.Context, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.mu.Lock()
			changed := false
			for _, c := range s.want {
				for _, f := range []string{c.Cert, c.Key} {
					if st := stamp(f); st != s.seen[f] {
						changed = true
					}
				}
			}
			if changed {
				s.loadLocked()
			}
			s.mu.Unlock()
		}
	}
}

func stamp(file string) fileStamp {
	fi, err := os.Stat(file)
	if err != nil {
		return fileStamp{}
	}
	return fileStamp{mod: fi.ModTime(), size: fi.Size()}
}

// loadLocked loads every pair; a pair that fails keeps its last good
// certificate (a half-written file is tried again at the next look).
func (s *certStore) loadLocked() {
	old := s.cur.Load()
	cs := &certSet{exact: map[string]*tls.Certificate{}, wild: map[string]*tls.Certificate{}, byPair: map[routes.TLSCert]*tls.Certificate{}}
	seen := map[string]fileStamp{}
	for _, c := range s.want {
		seen[c.Cert], seen[c.Key] = stamp(c.Cert), stamp(c.Key)
		crt, err := loadPair(c)
		if err != nil {
			s.log.Error("TLS certificate not loaded", "cert", c.Cert, "key", c.Key, "error", err)
			crt = old.byPair[c]
			delete(seen, c.Cert) // look again next time
			if crt == nil {
				continue
			}
		}
		cs.byPair[c] = crt
		cs.add(crt)
	}
	s.seen = seen
	s.cur.Store(cs)
	if len(s.want) > 0 {
		s.log.Info("TLS certificates loaded", "names", strings.Join(cs.names, ","))
	}
}

func loadPair(c routes.TLSCert) (*tls.Certificate, error) {
	crt, err := tls.LoadX509KeyPair(c.Cert, c.Key)
	if err != nil {
		return nil, err
	}
	if crt.Leaf == nil {
		if crt.Leaf, err = x509.ParseCertificate(crt.Certificate[0]); err != nil {
			return nil, fmt.Errorf("parse %s: %w", c.Cert, err)
		}
	}
	return &crt, nil
}

func (cs *certSet) add(crt *tls.Certificate) {
	if cs.first == nil {
		cs.first = crt
	}
	names := crt.Leaf.DNSNames
	for _, ip := range crt.Leaf.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 && crt.Leaf.Subject.CommonName != "" {
		names = []string{crt.Leaf.Subject.CommonName}
	}
	for _, n := range names {
		n = strings.ToLower(n)
		if strings.HasPrefix(n, "*.") {
			if cs.wild[n[1:]] == nil {
				cs.wild[n[1:]] = crt
			}
		} else if cs.exact[n] == nil {
			cs.exact[n] = crt
		}
		cs.names = append(cs.names, n)
	}
}
