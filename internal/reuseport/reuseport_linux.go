package reuseport

import "syscall"

// soReusePort is SO_REUSEPORT on every Linux architecture (the syscall
// package does not name it).
const soReusePort = 0xf

// Supported reports whether sockets can share an address here.
const Supported = true

func control(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
	})
	if err != nil {
		return err
	}
	return serr
}
