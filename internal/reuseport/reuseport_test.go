package reuseport

import (
	"context"
	"net"
	"strings"
	"testing"
)

// TestShare: two sockets of Plain share an address, TCP and UDP; a socket
// bound without SO_REUSEPORT keeps its address to itself.
func TestShare(t *testing.T) {
	if !Supported {
		t.Skip("no SO_REUSEPORT here")
	}
	ctx := context.Background()
	var b Plain
	ln1, err := b.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln1.Close()
	addr := ln1.Addr().String()
	ln2, err := b.Listen(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("second TCP listener on %s: %v", addr, err)
	}
	ln2.Close()
	pc1, err := b.ListenPacket(ctx, "udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer pc1.Close()
	pc2, err := b.ListenPacket(ctx, "udp", addr)
	if err != nil {
		t.Fatalf("second UDP socket on %s: %v", addr, err)
	}
	pc2.Close()

	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if ln, err := b.Listen(ctx, "tcp", plain.Addr().String()); err == nil {
		ln.Close()
		t.Fatal("bound beside a listener without SO_REUSEPORT")
	} else if !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("error %v, want address already in use", err)
	}
}
