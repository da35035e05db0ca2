//go:build !linux

package dns

import "syscall"

// reusePort does nothing where SO_REUSEPORT is not supported: one UDP
// socket is bound, and extra ones fail to bind and are skipped.
func reusePort(_, _ string, _ syscall.RawConn) error { return nil }
