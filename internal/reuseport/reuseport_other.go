//go:build !linux

package reuseport

import "syscall"

// Supported reports whether sockets can share an address here.
const Supported = false

// control does nothing where SO_REUSEPORT is not used: a second socket on
// the same address fails to bind.
func control(_, _ string, _ syscall.RawConn) error { return nil }
