// Package reuseport binds listening TCP and UDP sockets with SO_REUSEPORT
// (Linux; elsewhere plain sockets), so that a second attache process started
// with the same configuration binds the same addresses while the first one
// still serves: the way a restart or an upgrade hands over without a moment
// where nobody listens (see internal/handover for the rest of it).
//
// Safety case: SO_REUSEPORT only lets sockets share an address when every
// one of them set it and all belong to the same effective user (Linux), so
// another user's process cannot take a share of attache's traffic, and a
// port held by a process that did not set it (any program but attache)
// still fails to bind with "address already in use".
package reuseport

import (
	"context"
	"net"
)

// Binder binds listening sockets. Plain binds new ones; a handover.Sockets
// hands out the ones a predecessor passed first.
type Binder interface {
	Listen(ctx context.Context, network, address string) (net.Listener, error)
	ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error)
}

// Plain binds new sockets with SO_REUSEPORT.
type Plain struct{}

// Listen binds a TCP listener with SO_REUSEPORT.
func (Plain) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	lc := net.ListenConfig{Control: control}
	return lc.Listen(ctx, network, address)
}

// ListenPacket binds a UDP socket with SO_REUSEPORT.
func (Plain) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	lc := net.ListenConfig{Control: control}
	return lc.ListenPacket(ctx, network, address)
}

// Or returns b, or Plain when b is nil: for components whose Config leaves
// the Binder unset.
func Or(b Binder) Binder {
	if b == nil {
		return Plain{}
	}
	return b
}
