package dns

import (
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batchSize is the number of datagrams one recvmmsg or sendmmsg moves.
const batchSize = 32

// batchOut is the size of a reply slot; a longer reply is written on its
// own.
const batchOut = 4096

// batchConn reads and writes a UDP socket batchSize datagrams per system
// call (recvmmsg, sendmmsg), without allocating.
//
// Safety: the message headers handed to the kernel point (Name, Iov,
// Base) at buffers this struct owns; Go's heap does not move objects, and
// every pointer is a real Go pointer kept reachable by the struct, so the
// memory stays valid for the duration of each call, which is synchronous
// (MSG_DONTWAIT: the call never blocks; waiting is left to the runtime's
// poller through syscall.RawConn, so closing the socket wakes a reader as
// for any other read). The struct is used by one goroutine only. Replies
// are sent to the sockaddr the query came from, as the kernel wrote it.
type batchConn struct {
	rc syscall.RawConn

	rhdrs  [batchSize]unix.Mmsghdr
	riovs  [batchSize]unix.Iovec
	names  [batchSize]unix.RawSockaddrInet6
	rbufs  [batchSize][udpReadSize]byte
	whdrs  [batchSize]unix.Mmsghdr
	wiovs  [batchSize]unix.Iovec
	wbufs  [batchSize][batchOut]byte
	wcount int // replies queued
	wsent  int

	got    int
	errno  syscall.Errno
	readFn func(fd uintptr) bool
	sendFn func(fd uintptr) bool
}

// newBatchConn returns a batchConn over conn, or nil when batches cannot be
// used.
func newBatchConn(conn *net.UDPConn) *batchConn {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil
	}
	b := &batchConn{rc: rc}
	for i := range b.rhdrs {
		b.riovs[i].Base = &b.rbufs[i][0]
		b.riovs[i].SetLen(udpReadSize)
		b.rhdrs[i].Hdr.Iov = &b.riovs[i]
		b.rhdrs[i].Hdr.SetIovlen(1)
		b.rhdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		b.wiovs[i].Base = &b.wbufs[i][0]
		b.whdrs[i].Hdr.Iov = &b.wiovs[i]
		b.whdrs[i].Hdr.SetIovlen(1)
	}
	b.readFn = func(fd uintptr) bool {
		for {
			n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.rhdrs[0])), batchSize, unix.MSG_DONTWAIT, 0, 0)
			switch e {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait for the poller
			}
			b.got, b.errno = int(n), e
			return true
		}
	}
	b.sendFn = func(fd uintptr) bool {
		for b.wsent < b.wcount {
			n, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.whdrs[b.wsent])), uintptr(b.wcount-b.wsent), unix.MSG_DONTWAIT, 0, 0)
			switch e {
			case 0:
				b.wsent += int(n)
			case unix.EINTR:
			case unix.EAGAIN:
				return false // the socket buffer is full: wait
			default:
				b.wsent++ // this reply cannot be sent (as a failed sendto): the next ones
			}
		}
		return true
	}
	return b
}

// read receives up to batchSize datagrams and returns how many.
func (b *batchConn) read() (int, error) {
	for i := range b.rhdrs {
		b.rhdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		b.rhdrs[i].Hdr.Flags = 0
		b.rhdrs[i].Len = 0
	}
	if err := b.rc.Read(b.readFn); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.got, nil
}

// packet returns datagram i of the last read and its sender.
func (b *batchConn) packet(i int) ([]byte, netip.AddrPort) {
	pkt := b.rbufs[i][:b.rhdrs[i].Len]
	sa := &b.names[i]
	port := func(p *uint16) uint16 {
		be := (*[2]byte)(unsafe.Pointer(p))
		return uint16(be[0])<<8 | uint16(be[1])
	}
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return pkt, netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port(&sa4.Port))
	case unix.AF_INET6:
		return pkt, netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port(&sa.Port))
	}
	return pkt, netip.AddrPort{}
}

// reply returns the buffer of the next reply, to datagram i's sender; queue
// sends it with the batch.
func (b *batchConn) reply() []byte {
	return b.wbufs[b.wcount][:0]
}

// queue adds the reply written into reply's buffer (n bytes) for datagram
// i.
func (b *batchConn) queue(i, n int) {
	h := &b.whdrs[b.wcount]
	h.Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	h.Hdr.Namelen = b.rhdrs[i].Hdr.Namelen
	b.wiovs[b.wcount].SetLen(n)
	b.wcount++
}

// flush sends the queued replies.
func (b *batchConn) flush() error {
	if b.wcount == 0 {
		return nil
	}
	b.wsent = 0
	err := b.rc.Write(b.sendFn)
	b.wcount = 0
	return err
}
