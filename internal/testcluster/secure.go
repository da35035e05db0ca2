package testcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TLSFiles are PEM files of the cluster's certificate authority and of a
// client certificate it signed (the HTTPS API verifies incoming
// certificates, so every client needs one).
type TLSFiles struct {
	CAFile   string
	CertFile string // client certificate
	KeyFile  string // its key
}

// Config returns the consul/api TLS settings of these files.
func (f *TLSFiles) Config() api.TLSConfig {
	return api.TLSConfig{CAFile: f.CAFile, CertFile: f.CertFile, KeyFile: f.KeyFile}
}

// ClientTLS returns a crypto/tls client configuration trusting the CA and
// presenting the client certificate.
func (f *TLSFiles) ClientTLS() (*tls.Config, error) {
	return api.SetupTLSConfig(&api.TLSConfig{CAFile: f.CAFile, CertFile: f.CertFile, KeyFile: f.KeyFile})
}

// ca is a certificate authority made for one cluster.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	dir  string
}

// newCA makes a CA in dir (ca.pem).
func newCA(dir string) (*ca, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "attache test cluster CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return &ca{cert: cert, key: key, dir: dir}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// issue writes name.pem and name-key.pem: a certificate for the given
// addresses and DNS names, good for serving and for client authentication.
func (c *ca) issue(name string, ips []string, dnsNames []string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dnsNames,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return "", "", err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(c.dir, name+".pem"), filepath.Join(c.dir, name+"-key.pem")
	if err := writePEM(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return "", "", err
	}
	return certFile, keyFile, writePEM(keyFile, "EC PRIVATE KEY", kder, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// secureConfig is the HCL an agent gets with Options.ACL and Options.TLS.
func secureConfig(opts Options, agentToken, certFile, keyFile, caFile string) string {
	var b strings.Builder
	if opts.ACL {
		fmt.Fprintf(&b, "acl {\n  enabled = true\n  default_policy = \"deny\"\n  down_policy = \"extend-cache\"\n  tokens {\n    agent = %q\n  }\n}\n", agentToken)
	}
	if opts.TLS {
		fmt.Fprintf(&b, "tls {\n  defaults {\n    ca_file = %q\n    cert_file = %q\n    key_file = %q\n  }\n  https {\n    verify_incoming = true\n  }\n}\n", caFile, certFile, keyFile)
	}
	return b.String()
}

// bootstrapACL bootstraps the ACL system through the leader (retrying
// while the servers finish setting it up), then creates every agent's
// token with the secret its configuration already holds: a node identity
// (node:write on its own name, service:read on every service), as
// Consul's documentation advises for agent tokens.
func (c *Cluster) bootstrapACL() error {
	deadline := time.Now().Add(time.Minute)
	var last error
	for time.Now().Before(deadline) {
		for _, s := range c.Servers {
			tok, _, err := s.Client().ACL().Bootstrap()
			if err == nil {
				c.ManagementToken = tok.SecretID
				break
			}
			last = err
		}
		if c.ManagementToken != "" {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if c.ManagementToken == "" {
		return fmt.Errorf("testcluster: ACL bootstrap: %w", last)
	}
	for _, a := range c.all() {
		a.token = c.ManagementToken
	}
	for _, a := range c.all() {
		tok := &api.ACLToken{
			SecretID:       a.agentToken,
			Description:    "agent " + a.Name,
			NodeIdentities: []*api.ACLNodeIdentity{{NodeName: a.Name, Datacenter: c.Datacenter}},
		}
		if err := retry(func() error { _, _, err := c.Servers[0].Client().ACL().TokenCreate(tok, nil); return err }); err != nil {
			return fmt.Errorf("testcluster: agent token of %s: %w", a.Name, err)
		}
	}
	return nil
}

// retry runs f until it succeeds, for up to 30 s (a fresh leader may
// refuse writes for a moment).
func retry(f func() error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Token creates an ACL policy named name with the given HCL rules and a
// token holding exactly that policy, and returns the token's secret.
func (c *Cluster) Token(t testing.TB, name, rules string) string {
	t.Helper()
	secret, err := c.NewToken(name, rules)
	if err != nil {
		t.Fatal(err)
	}
	return secret
}

// NewToken is Token without a test.
func (c *Cluster) NewToken(name, rules string) (string, error) {
	if c.ManagementToken == "" {
		return "", errors.New("testcluster: Token needs a cluster started with ACL")
	}
	acl := c.Servers[0].Client().ACL()
	var pol *api.ACLPolicy
	err := retry(func() error {
		var err error
		pol, _, err = acl.PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules}, nil)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("testcluster: policy %s: %w", name, err)
	}
	var tok *api.ACLToken
	err = retry(func() error {
		var err error
		tok, _, err = acl.TokenCreate(&api.ACLToken{Description: name, Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("testcluster: token for %s: %w", name, err)
	}
	return tok.SecretID, nil
}

func (f *TLSFiles) caFile() string {
	if f == nil {
		return ""
	}
	return f.CAFile
}

// newUUID returns a random UUID, the form Consul wants for token secrets.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// READMEPolicy returns the ACL policy the repository's README.md documents
// under the name given: the ```hcl block whose first line is
// "# policy: NAME". Tests run with exactly what users are told to grant.
func READMEPolicy(t testing.TB, name string) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	marker := "```hcl\n# policy: " + name + "\n"
	_, rest, ok := strings.Cut(string(b), marker)
	if !ok {
		t.Fatalf("README.md has no policy %q (a block starting %q)", name, marker)
	}
	policy, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatalf("README.md: policy %q is not closed", name)
	}
	return policy
}
