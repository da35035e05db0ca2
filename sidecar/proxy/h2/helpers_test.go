package h2

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// testServer runs a Server on a loopback listener: HTTP/2 with prior
// knowledge (h2c), or TLS with "h2" negotiated by ALPN.
type testServer struct {
	srv   *Server
	addr  string
	tls   bool
	roots *x509.CertPool // TLS: trusts the server's self-signed certificate
	// served gets one value each time a ServeConn returns (the connection
	// ended or was parked).
	served chan struct{}
}

// startServer serves srv until the test ends; then it shuts srv down and
// waits for every ServeConn to return.
func startServer(t *testing.T, srv *Server, useTLS bool) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{srv: srv, addr: ln.Addr().String(), tls: useTLS, served: make(chan struct{}, 1024)}
	var cfg *tls.Config
	if useTLS {
		cert, roots := selfSigned(t)
		ts.roots = roots
		cfg = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if cfg != nil {
					tc := tls.Server(nc, cfg)
					_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
					if err := tc.Handshake(); err != nil || tc.ConnectionState().NegotiatedProtocol != "h2" {
						tc.Close()
						return
					}
					_ = tc.SetDeadline(time.Time{})
					nc = tc
				}
				srv.ServeConn(nc)
				select {
				case ts.served <- struct{}{}:
				default:
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown at the test's end: %v", err)
		}
		wg.Wait()
	})
	return ts
}

// selfSigned makes a certificate for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "h2 test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, roots
}

// client is an http.Client speaking HTTP/2 to ts, on one connection
// (the Transport reuses it); dials counts the connections it made and
// local is the client's address on the last one.
type client struct {
	*http.Client
	base  string
	mu    sync.Mutex
	dials int
	local string
}

func (ts *testServer) client(t *testing.T) *client {
	c := &client{}
	tr := &http2.Transport{}
	dial := func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if ts.tls {
			tc := tls.Client(nc, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				nc.Close()
				return nil, err
			}
			nc = tc
		}
		c.mu.Lock()
		c.dials++
		c.local = nc.LocalAddr().String()
		c.mu.Unlock()
		return nc, nil
	}
	tr.DialTLSContext = dial
	if ts.tls {
		tr.TLSClientConfig = &tls.Config{RootCAs: ts.roots, NextProtos: []string{"h2"}}
		c.base = "https://" + ts.addr
	} else {
		tr.AllowHTTP = true
		c.base = "http://" + ts.addr
	}
	c.Client = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	return c
}

func (c *client) dialed() (int, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dials, c.local
}

// rawClient speaks HTTP/2 frame by frame over plain TCP (prior
// knowledge), for what an http.Client will not do.
type rawClient struct {
	t *testing.T
	// lenient: a failed write is not the test's failure (the server may
	// send the client away mid-write); set before any second goroutine.
	lenient bool
	nc      net.Conn
	fr      *http2.Framer
	hbuf    bytes.Buffer
	enc     *hpack.Encoder
	wmu     sync.Mutex // writes may come from two goroutines
	// streams: what came on each stream, not yet returned by readResponse
	// (the reading goroutine's).
	streams map[uint32]*response
}

// dialRaw connects to addr and sends the client preface and SETTINGS
// unless preface is false.
func dialRaw(t *testing.T, addr string, preface bool) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	rc := &rawClient{t: t, nc: nc, fr: http2.NewFramer(nc, nc)}
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.fr.MaxHeaderListSize = 1 << 20
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	if preface {
		rc.write(func() error {
			if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
				return err
			}
			return rc.fr.WriteSettings()
		})
	}
	return rc
}

// write runs fn, which writes frames, alone; its error fails the test
// (t.Errorf: write may run on the reading goroutine too) unless lenient.
func (rc *rawClient) write(fn func() error) {
	rc.t.Helper()
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	_ = rc.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := fn(); err != nil && !rc.lenient {
		rc.t.Errorf("raw client write: %v", err)
	}
}

// headers opens stream id with a request; fields are more name, value
// pairs.
func (rc *rawClient) headers(id uint32, method, path string, end bool, fields ...string) {
	rc.t.Helper()
	rc.write(func() error {
		rc.hbuf.Reset()
		all := append([]string{":method", method, ":scheme", "http", ":authority", "test", ":path", path}, fields...)
		for i := 0; i+1 < len(all); i += 2 {
			if err := rc.enc.WriteField(hpack.HeaderField{Name: all[i], Value: all[i+1]}); err != nil {
				return err
			}
		}
		block := rc.hbuf.Bytes()
		const max = 16 << 10
		first := true
		for first || len(block) > 0 {
			n := min(len(block), max)
			var err error
			if first {
				err = rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:n], EndStream: end, EndHeaders: n == len(block)})
			} else {
				err = rc.fr.WriteContinuation(id, n == len(block), block[:n])
			}
			if err != nil {
				return err
			}
			block, first = block[n:], false
		}
		return nil
	})
}

// next reads the next frame, acknowledging the server's SETTINGS and
// PINGs on the way; an error is the connection's end (or the deadline).
func (rc *rawClient) next(timeout time.Duration) (http2.Frame, error) {
	for {
		_ = rc.nc.SetReadDeadline(time.Now().Add(timeout))
		f, err := rc.fr.ReadFrame()
		if err != nil {
			return nil, err
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				rc.write(rc.fr.WriteSettingsAck)
			}
			continue
		case *http2.PingFrame:
			if !f.IsAck() { // the server may close before the ack arrives (a drain's PING)
				rc.wmu.Lock()
				_ = rc.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
				_ = rc.fr.WritePing(true, f.Data)
				rc.wmu.Unlock()
			}
			continue
		case *http2.WindowUpdateFrame:
			continue
		}
		return f, nil
	}
}

// response is what came back on one stream.
type response struct {
	status  string
	header  map[string]string // the final HEADERS' fields
	body    []byte
	trailer map[string]string
	end     bool          // END_STREAM came
	reset   http2.ErrCode // RST_STREAM's code, when one came
	wasRST  bool
	frames  []string // "HEADERS", "DATA", ...: what came, in order
	done    bool
}

// goAwayError: the server sent GOAWAY while a response was awaited.
type goAwayError struct {
	code http2.ErrCode
	last uint32
}

func (e goAwayError) Error() string {
	return "GOAWAY " + e.code.String() + " last stream " + strconv.Itoa(int(e.last))
}

// readResponse reads frames until stream id ends (END_STREAM or
// RST_STREAM); frames of other streams are kept for their own
// readResponse. A GOAWAY is returned as a goAwayError.
func (rc *rawClient) readResponse(id uint32, timeout time.Duration) (*response, error) {
	if rc.streams == nil {
		rc.streams = map[uint32]*response{}
	}
	for {
		if r := rc.streams[id]; r != nil && r.done {
			delete(rc.streams, id)
			return r, nil
		}
		f, err := rc.next(timeout)
		if err != nil {
			return rc.stream(id), err
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			return rc.stream(id), goAwayError{ga.ErrCode, ga.LastStreamID}
		}
		r := rc.stream(f.Header().StreamID)
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			r.frames = append(r.frames, "HEADERS")
			if s := f.PseudoValue("status"); s != "" {
				if r.status != "" && r.status[0] != '1' {
					return r, errors.New("a second final HEADERS")
				}
				r.status = s
				r.header = map[string]string{}
				for _, hf := range f.RegularFields() {
					r.header[hf.Name] = hf.Value
				}
			} else {
				r.trailer = map[string]string{}
				for _, hf := range f.RegularFields() {
					r.trailer[hf.Name] = hf.Value
				}
			}
			r.end = f.StreamEnded()
		case *http2.DataFrame:
			r.frames = append(r.frames, "DATA")
			r.body = append(r.body, f.Data()...)
			r.end = f.StreamEnded()
		case *http2.RSTStreamFrame:
			r.frames = append(r.frames, "RST_STREAM")
			r.wasRST, r.reset = true, f.ErrCode
		}
		r.done = r.end || r.wasRST
	}
}

// stream is what came on stream id so far.
func (rc *rawClient) stream(id uint32) *response {
	if rc.streams == nil {
		rc.streams = map[uint32]*response{}
	}
	r := rc.streams[id]
	if r == nil {
		r = &response{}
		rc.streams[id] = r
	}
	return r
}

// closed waits for the server to close the connection, returning the
// GOAWAY codes seen on the way; false: it did not within timeout.
func (rc *rawClient) closed(timeout time.Duration) (goAways []http2.ErrCode, ok bool) {
	deadline := time.Now().Add(timeout)
	for {
		f, err := rc.next(time.Until(deadline))
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return goAways, false
			}
			return goAways, true // EOF, reset: closed
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			goAways = append(goAways, ga.ErrCode)
		}
	}
}
