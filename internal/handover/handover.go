// Package handover passes a running attache process's listening sockets to
// its successor — a new process started with the same configuration and
// data directory, for a restart or an upgrade — so that no connection and
// no datagram is lost while one replaces the other.
//
// Why pass the sockets rather than let the successor bind its own beside
// them with SO_REUSEPORT: with two sockets in a reuseport group the kernel
// spreads new connections over both accept queues, and when the old process
// closes its socket, the connections waiting in that socket's queue (made
// by the kernel's handshake, not yet accepted) are reset — the classic
// SO_REUSEPORT drop that HAProxy ("expose-fd listeners") and Envoy (hot
// restart) avoid the same way as here. A UDP socket's queued datagrams die
// with it likewise. A passed socket is the same kernel socket, with one
// accept queue (or one datagram queue) that both processes read; the old
// process closing its descriptor leaves the socket open in the successor,
// queue and all.
//
// The protocol, over a unix SOCK_SEQPACKET socket at a path in the data
// directory (one JSON message per packet):
//
//	successor -> owner   {"op":"hello","version":1}
//	owner -> successor   {"op":"socket","key":"tcp 127.0.0.1:9191"} + the descriptor (SCM_RIGHTS), one per socket
//	owner -> successor   {"op":"end"}   ({"op":"busy"} instead, to a second successor while one takes over)
//	successor -> owner   {"op":"ready","services":[...]} once it serves
//
// The connection then stays open: while it is, each process knows the
// other is alive, and neither deregisters the node's services when it
// stops (the other still serves them). The owner closes it as it begins
// to stop; the successor's end closes it when the successor dies first.
//
// Safety case: whoever connects to the socket gets every listening socket,
// so it is created mode 0600 in the data directory (0700 under systemd),
// and a peer whose uid (SO_PEERCRED) is not this process's is refused.
package handover

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"attache/internal/reuseport"
)

// SocketFile is the name of the handover socket in the data directory.
const SocketFile = "handover.sock"

// MaxPath is the longest socket path a unix socket address holds, with its
// terminating NUL (108 bytes on Linux).
const MaxPath = 108

// version of the protocol: a successor speaking another is refused.
const version = 1

// takeTimeout bounds the exchange with the owner at start.
const takeTimeout = 10 * time.Second

// maxMsg bounds one message (a key is an address; services are IDs).
const maxMsg = 64 << 10

type msg struct {
	Op       string   `json:"op"`
	Version  int      `json:"version,omitempty"`
	Key      string   `json:"key,omitempty"`
	Services []string `json:"services,omitempty"`
}

// Successor is what the owner learns when its successor serves.
type Successor struct {
	PID      int      // from SO_PEERCRED
	Services []string // the service IDs it registers
}

// Sockets is one process's listening sockets. Listen and ListenPacket hand
// out the sockets its predecessor passed first (by network and address),
// then bind new ones with SO_REUSEPORT; Serve passes them all on.
type Sockets struct {
	log hclog.Logger

	mu        sync.Mutex
	inherited map[string][]*os.File // from the predecessor, not taken yet
	passed    map[string]bool       // the keys the predecessor passed sockets for
	own       []owned               // what Listen and ListenPacket returned
	peers     int                   // open handover connections: another process of this data dir is alive
	pred      *net.UnixConn         // the connection to the predecessor, while open
	leaving   bool                  // Leave was called: no successor is served any more
	conns     map[*net.UnixConn]bool

	ready chan Successor // a successor serves
}

type owned struct {
	key string
	f   interface{ File() (*os.File, error) }
}

// New returns Sockets with nothing inherited.
func New(log hclog.Logger) *Sockets {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Sockets{log: log.Named("handover"), inherited: map[string][]*os.File{}, passed: map[string]bool{},
		conns: map[*net.UnixConn]bool{}, ready: make(chan Successor, 1)}
}

// Take connects to the owner's socket at path and receives its sockets.
// No socket there (or nobody listening on it) is no predecessor, not an
// error. The connection stays open until Leave, or until the predecessor
// closes it.
func (s *Sockets) Take(ctx context.Context, path string) (int, error) {
	d := net.Dialer{Timeout: takeTimeout}
	c, err := d.DialContext(ctx, "unixpacket", path)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("handover: %w", err)
	}
	conn := c.(*net.UnixConn)
	if err := checkPeer(conn); err != nil {
		conn.Close()
		return 0, err
	}
	_ = conn.SetDeadline(time.Now().Add(takeTimeout))
	fail := func(err error) (int, error) {
		conn.Close()
		s.mu.Lock()
		for k, fs := range s.inherited {
			for _, f := range fs {
				f.Close()
			}
			delete(s.inherited, k)
		}
		s.mu.Unlock()
		return 0, fmt.Errorf("handover from %s: %w", path, err)
	}
	if err := send(conn, msg{Op: "hello", Version: version}, nil); err != nil {
		return fail(err)
	}
	n := 0
	for {
		m, f, err := recv(conn)
		if err != nil {
			return fail(err)
		}
		switch {
		case m.Op == "socket" && f != nil:
			s.mu.Lock()
			s.inherited[m.Key] = append(s.inherited[m.Key], f)
			s.passed[m.Key] = true
			s.mu.Unlock()
			n++
			continue
		case m.Op == "busy":
			return fail(errors.New("another successor is taking over from the running sidecar"))
		case m.Op == "end" && f == nil:
		default:
			if f != nil {
				f.Close()
			}
			return fail(fmt.Errorf("unexpected message %q", m.Op))
		}
		break
	}
	_ = conn.SetDeadline(time.Time{})
	s.mu.Lock()
	s.pred, s.peers = conn, s.peers+1
	s.mu.Unlock()
	go func() { // the predecessor closes it as it begins to stop (or dies)
		buf := make([]byte, 512)
		for {
			if _, err := conn.Read(buf); err != nil {
				break
			}
		}
		s.dropPeer(conn)
	}()
	s.log.Info("took the listening sockets of the running process", "sockets", n)
	return n, nil
}

// Inherited reports whether the predecessor passed any socket.
func (s *Sockets) Inherited() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pred != nil || len(s.inherited) > 0
}

// Shared reports whether another process of this data directory is alive
// and connected: the predecessor still serving, or a successor taking over.
// A process stopping while Shared must leave the node's registration to it.
func (s *Sockets) Shared() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peers > 0
}

// Ready delivers the successor, once it serves.
func (s *Sockets) Ready() <-chan Successor { return s.ready }

// Listen returns the predecessor's listener for network and address, or
// binds a new one with SO_REUSEPORT.
func (s *Sockets) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	key := network + " " + address
	if f := s.take(key); f != nil {
		ln, err := net.FileListener(f)
		f.Close()
		if err == nil {
			s.keep(key, ln)
			return ln, nil
		}
		s.log.Warn("passed socket unusable; binding a new one", "key", key, "error", err)
	}
	ln, err := reuseport.Plain{}.Listen(ctx, network, address)
	if err != nil {
		return nil, err
	}
	s.keep(key, ln)
	return ln, nil
}

// ListenPacket is Listen for UDP. Several sockets on one address (DNS binds
// one per CPU) are passed and handed out in turn; once those are all taken,
// no more is bound beside them: a socket of this process alone in the
// predecessor's reuseport group would take a share of the datagrams, and
// lose its queue if this process failed and closed it while the
// predecessor goes on serving.
func (s *Sockets) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	key := network + " " + address
	f := s.take(key)
	if f == nil && s.wasPassed(key) {
		return nil, fmt.Errorf("handover: every socket passed for %s is taken; no more bound beside them", key)
	}
	if f != nil {
		pc, err := net.FilePacketConn(f)
		f.Close()
		if err == nil {
			s.keep(key, pc)
			return pc, nil
		}
		s.log.Warn("passed socket unusable; binding a new one", "key", key, "error", err)
	}
	pc, err := reuseport.Plain{}.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	s.keep(key, pc)
	return pc, nil
}

func (s *Sockets) wasPassed(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.passed[key]
}

func (s *Sockets) take(key string) *os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
	fs := s.inherited[key]
	if len(fs) == 0 {
		return nil
	}
	s.inherited[key] = fs[1:]
	if len(fs) == 1 {
		delete(s.inherited, key)
	}
	return fs[0]
}

func (s *Sockets) keep(key string, c any) {
	if f, ok := c.(interface{ File() (*os.File, error) }); ok {
		s.mu.Lock()
		s.own = append(s.own, owned{key: key, f: f})
		s.mu.Unlock()
	}
}

// CloseUnused closes the passed sockets nobody took (a listener the new
// configuration dropped): the predecessor serves them until it stops.
func (s *Sockets) CloseUnused() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, fs := range s.inherited {
		for _, f := range fs {
			f.Close()
		}
		s.log.Info("passed socket not used by this configuration; closed", "key", k, "count", len(fs))
		delete(s.inherited, k)
	}
}

// SayReady tells the predecessor this process serves, with the service IDs
// it registers (the predecessor deregisters only the others).
func (s *Sockets) SayReady(services []string) error {
	s.mu.Lock()
	c := s.pred
	s.mu.Unlock()
	if c == nil {
		return nil
	}
	return send(c, msg{Op: "ready", Services: services}, nil)
}

// Serve offers the sockets to a successor at path until ctx ends or Leave
// is called.
func (s *Sockets) Serve(ctx context.Context, path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("handover: %w", err)
	}
	_ = os.Remove(path) // a stale one, or the predecessor's (it is done offering)
	addr := &net.UnixAddr{Name: path, Net: "unixpacket"}
	ln, err := net.ListenUnix("unixpacket", addr)
	if err != nil {
		return fmt.Errorf("handover: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // a successor may have bound the path anew
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("handover: %w", err)
	}
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("handover: accept: %w", err)
		}
		if s.isLeaving() {
			c.Close()
			continue
		}
		go s.serveOne(c)
	}
}

func (s *Sockets) isLeaving() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaving
}

// serveOne passes the sockets to one successor, then waits for its ready
// (or its end).
func (s *Sockets) serveOne(c *net.UnixConn) {
	if err := checkPeer(c); err != nil {
		s.log.Warn("handover refused", "error", err)
		c.Close()
		return
	}
	pid := peerPID(c)
	_ = c.SetDeadline(time.Now().Add(takeTimeout))
	m, f, err := recv(c)
	if f != nil {
		f.Close()
	}
	if err != nil || m.Op != "hello" || m.Version != version {
		s.log.Warn("handover refused: not a successor speaking this protocol", "pid", pid, "op", m.Op, "version", m.Version, "error", err)
		c.Close()
		return
	}
	s.mu.Lock()
	busy := len(s.conns) > 0
	own := append([]owned(nil), s.own...)
	s.mu.Unlock()
	if busy { // two successors would both serve, neither knowing of the other
		s.log.Warn("handover refused: another successor is taking over", "pid", pid)
		_ = send(c, msg{Op: "busy"}, nil)
		c.Close()
		return
	}
	n := 0
	for _, o := range own {
		f, err := o.f.File()
		if err != nil { // closed: that listener has stopped
			continue
		}
		err = send(c, msg{Op: "socket", Key: o.key}, f)
		f.Close()
		if err != nil {
			s.log.Warn("handover failed", "pid", pid, "error", err)
			c.Close()
			return
		}
		n++
	}
	if err := send(c, msg{Op: "end"}, nil); err != nil {
		s.log.Warn("handover failed", "pid", pid, "error", err)
		c.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	s.mu.Lock()
	s.peers++
	s.conns[c] = true
	s.mu.Unlock()
	s.log.Info("passed the listening sockets to a successor; serving until it is ready", "pid", pid, "sockets", n)
	go func() {
		defer s.dropPeer(c)
		for {
			m, f, err := recv(c)
			if f != nil {
				f.Close()
			}
			if err != nil {
				if !s.isLeaving() {
					s.log.Warn("successor gone before it took over; still serving", "pid", pid)
				}
				return
			}
			if m.Op == "ready" {
				s.log.Info("successor serves", "pid", pid)
				select {
				case s.ready <- Successor{PID: pid, Services: m.Services}:
				default:
				}
			}
		}
	}()
}

func (s *Sockets) dropPeer(c *net.UnixConn) {
	c.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if c == s.pred {
		s.pred = nil
		s.peers--
		return
	}
	if s.conns[c] {
		delete(s.conns, c)
		s.peers--
	}
}

// Leave begins this process's stop: no successor is served any more, and
// the handover connections are closed, so that the other process knows it
// is alone from now on (and keeps or removes the registration itself).
func (s *Sockets) Leave() {
	s.mu.Lock()
	s.leaving = true
	var cs []*net.UnixConn
	if s.pred != nil {
		cs = append(cs, s.pred)
	}
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		s.dropPeer(c)
	}
}

func send(c *net.UnixConn, m msg, f *os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if f != nil {
		oob = syscall.UnixRights(int(f.Fd()))
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// recv reads one message and the descriptor that came with it, if any.
func recv(c *net.UnixConn) (msg, *os.File, error) {
	buf, oob := make([]byte, maxMsg), make([]byte, syscall.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return msg{}, nil, err
	}
	var f *os.File
	if oobn > 0 {
		cms, err := syscall.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return msg{}, nil, err
		}
		for _, cm := range cms {
			fds, err := syscall.ParseUnixRights(&cm)
			if err != nil {
				continue
			}
			for i, fd := range fds {
				if i == 0 && f == nil {
					syscall.CloseOnExec(fd)
					f = os.NewFile(uintptr(fd), "handover")
				} else {
					syscall.Close(fd) // one descriptor per message: more is a wrong peer
				}
			}
		}
	}
	if flags&(syscall.MSG_TRUNC|syscall.MSG_CTRUNC) != 0 {
		if f != nil {
			f.Close()
		}
		return msg{}, nil, errors.New("message truncated")
	}
	if n == 0 {
		if f != nil {
			f.Close()
		}
		return msg{}, nil, errors.New("connection closed")
	}
	var m msg
	if err := json.Unmarshal(buf[:n], &m); err != nil {
		if f != nil {
			f.Close()
		}
		return msg{}, nil, fmt.Errorf("bad message: %w", err)
	}
	return m, f, nil
}
