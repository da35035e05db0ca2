package handover

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPass: an owner's sockets go to a successor, by network and address
// (two UDP sockets on one address included); a connection queued in the
// shared accept queue before the owner closes its copy is accepted by the
// successor; ready reaches the owner with the successor's services; Leave
// ends Shared on both sides.
func TestPass(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	path := filepath.Join(t.TempDir(), "data", SocketFile)

	owner := New(nil)
	if n, err := owner.Take(ctx, path); err != nil || n != 0 {
		t.Fatalf("Take with nobody there = %d, %v; want 0, nil", n, err)
	}
	ln, err := owner.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	udp1, err := owner.ListenPacket(ctx, "udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	udpAddr := udp1.LocalAddr().String()
	udp2, err := owner.ListenPacket(ctx, "udp", udpAddr)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- owner.Serve(ctx, path) }()
	eventually(t, func() bool {
		c, err := net.Dial("unixpacket", path) // a peer that says nothing: refused, and blocks nobody
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	next := New(nil)
	n, err := next.Take(ctx, path)
	if err != nil || n != 3 {
		t.Fatalf("Take = %d, %v; want 3 sockets", n, err)
	}
	if !next.Inherited() {
		t.Fatal("Inherited false after a Take that passed sockets")
	}
	eventually(t, func() bool { return owner.Shared() && next.Shared() })

	// A second successor while one takes over is refused.
	if _, err := New(nil).Take(ctx, path); err == nil || !strings.Contains(err.Error(), "another successor") {
		t.Fatalf("second Take = %v, want refused", err)
	}

	// The TCP listener, by the address the owner asked for.
	ln2, err := next.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil || ln2.Addr().String() != ln.Addr().String() {
		t.Fatalf("successor's listener %v (%v), want the owner's %v", ln2.Addr(), err, ln.Addr())
	}
	// A connection made now waits in the one accept queue; the owner
	// closing its copy does not reset it.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ln.Close()
	ln2.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	ac, err := ln2.Accept()
	if err != nil {
		t.Fatalf("the successor did not accept the queued connection: %v", err)
	}
	ac.Close()
	// Both UDP sockets, asked for as the owner asked (as DNS does: the
	// configured address, then the bound one).
	for i, a := range []string{"127.0.0.1:0", udpAddr} {
		pc, err := next.ListenPacket(ctx, "udp", a)
		if err != nil || pc.LocalAddr().String() != udpAddr {
			t.Fatalf("UDP socket %d: %v %v", i, pc, err)
		}
		pc.Close()
	}
	if pc, err := next.ListenPacket(ctx, "udp", udpAddr); err == nil {
		pc.Close()
		t.Fatal("a third UDP socket bound beside the two passed")
	}
	udp1.Close()
	udp2.Close()
	next.CloseUnused()

	if err := next.SayReady([]string{"users-1", "attache"}); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-owner.Ready():
		if len(s.Services) != 2 || s.Services[0] != "users-1" || s.PID == 0 {
			t.Fatalf("ready = %+v", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the owner did not hear ready")
	}
	owner.Leave()
	eventually(t, func() bool { return !owner.Shared() && !next.Shared() })
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestTakeRefused: a peer that is not an owner speaking the protocol
// fails the Take with an error naming the socket, and nothing is kept.
func TestTakeRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), SocketFile)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 512)
		c.Read(buf)
		c.Write([]byte(`{"op":"surprise"}`))
	}()
	s := New(nil)
	if _, err := s.Take(context.Background(), path); err == nil {
		t.Fatal("Take succeeded against a peer speaking nonsense")
	}
	if s.Inherited() || s.Shared() {
		t.Fatal("a failed Take left state behind")
	}
}

func eventually(t *testing.T, f func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); !f(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("timed out")
		}
	}
}
