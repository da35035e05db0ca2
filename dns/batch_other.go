//go:build !linux

package dns

import (
	"net"
	"net/netip"
)

// batchConn is Linux only; elsewhere the UDP loop reads one datagram at a
// time.
type batchConn struct{}

func newBatchConn(*net.UDPConn) *batchConn               { return nil }
func (b *batchConn) read() (int, error)                  { return 0, nil }
func (b *batchConn) packet(int) ([]byte, netip.AddrPort) { return nil, netip.AddrPort{} }
func (b *batchConn) reply() []byte                       { return nil }
func (b *batchConn) queue(int, int)                      {}
func (b *batchConn) flush() error                        { return nil }

const batchOut = 0
