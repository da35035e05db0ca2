package proxy

import "syscall"

// peekDirty looks, without waiting or consuming, at whether the socket fd
// has bytes to read or has been closed by its peer (or failed).
func peekDirty(fd uintptr, one []byte) bool {
	_, _, err := syscall.Recvfrom(int(fd), one, syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	// EAGAIN: nothing there, the connection is clean. Anything else is
	// data (n > 0), the peer's close (n == 0) or an error.
	return err != syscall.EAGAIN
}

// drainNow reads, without waiting, what the socket fd holds (up to 4 KiB).
func drainNow(fd uintptr) {
	var buf [4096]byte
	_, _, _ = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_DONTWAIT)
}
