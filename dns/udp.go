package dns

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	miekg "github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// maxSlowInFlight bounds the UDP queries being answered on the slow path at
// once (each in its own goroutine: it may wait for Consul or a recursor);
// queries beyond it are dropped and counted, as a full socket buffer would.
const maxSlowInFlight = 1024

// udpReadSize is the largest query read, as miekg/dns's UDPSize of 4096:
// the rest of a longer datagram is cut off (and the query is malformed).
const udpReadSize = 4096

// udpServer reads queries from one UDP socket: one goroutine per socket
// (the sockets share the address with SO_REUSEPORT, so the kernel spreads
// clients over them). A query the answer cache has is answered in that
// goroutine without allocating; any other goes to a goroutine of its own
// on the slow path, which answers exactly as miekg/dns's server and
// ServeDNS do.
type udpServer struct {
	s        *Server
	conn     *net.UDPConn
	wildcard bool // bound to 0.0.0.0 or ::: replies need the query's destination as their source
	slow     chan struct{}
	wg       *sync.WaitGroup
}

func newUDPServer(s *Server, conn *net.UDPConn, slow chan struct{}, wg *sync.WaitGroup) *udpServer {
	u := &udpServer{s: s, conn: conn, slow: slow, wg: wg}
	if a, ok := conn.LocalAddr().(*net.UDPAddr); ok && a.IP.IsUnspecified() {
		u.answerFromDestination()
	}
	return u
}

// answerFromDestination makes the loop read each datagram's destination
// address and answer from it, as miekg/dns does on a wildcard socket
// (errors ignored: one family may be missing).
func (u *udpServer) answerFromDestination() {
	u.wildcard = true
	_ = ipv4.NewPacketConn(u.conn).SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, true)
	_ = ipv6.NewPacketConn(u.conn).SetControlMessage(ipv6.FlagDst|ipv6.FlagInterface, true)
}

// serve reads until the socket is closed: in batches where it can (Linux,
// a socket bound to one address), else one datagram at a time (a wildcard
// socket needs each query's destination address to answer from).
func (u *udpServer) serve() error {
	if !u.wildcard {
		if b := newBatchConn(u.conn); b != nil {
			return u.serveBatches(b)
		}
	}
	buf := make([]byte, udpReadSize)
	out := make([]byte, 0, maxUDPSize)
	key := make([]byte, 0, 512)
	var oob []byte
	if u.wildcard {
		oob = make([]byte, 256)
	}
	for {
		var (
			n, oobn int
			from    netip.AddrPort
			err     error
		)
		if u.wildcard {
			n, oobn, _, from, err = u.conn.ReadMsgUDPAddrPort(buf, oob)
		} else {
			n, from, err = u.conn.ReadFromUDPAddrPort(buf)
		}
		if err != nil {
			if done, err := u.readError(err); done {
				return err
			}
			continue
		}
		start := time.Now()
		pkt := buf[:n]
		v, e := u.fast(pkt, from, oob[:oobn], start, key)
		if v == nil {
			continue
		}
		r := append(out[:0], v...)
		if e != nil {
			u.s.patch(r, pkt, from.Addr().Unmap())
		}
		u.write(r, from, oob[:oobn])
		if e != nil {
			u.s.m.observe(e.qtype, e.rcode, time.Since(start))
		}
	}
}

// serveBatches is serve with recvmmsg and sendmmsg.
func (u *udpServer) serveBatches(b *batchConn) error {
	big := make([]byte, 0, maxUDPSize)
	key := make([]byte, 0, 512)
	for {
		n, err := b.read()
		if err != nil {
			if done, err := u.readError(err); done {
				return err
			}
			continue
		}
		start := time.Now()
		for i := range n {
			pkt, from := b.packet(i)
			v, e := u.fast(pkt, from, nil, start, key)
			if v == nil {
				continue
			}
			if len(v) > batchOut {
				r := append(big[:0], v...)
				u.s.patch(r, pkt, from.Addr().Unmap())
				u.write(r, from, nil)
			} else {
				r := append(b.reply(), v...)
				if e != nil {
					u.s.patch(r, pkt, from.Addr().Unmap())
				}
				b.queue(i, len(r))
			}
			if e != nil {
				u.s.m.observe(e.qtype, e.rcode, time.Since(start))
			}
		}
		if err := b.flush(); err != nil {
			if done, err := u.readError(err); done {
				return err
			}
		}
	}
}

// readError says whether an error of a read ends the loop (the socket was
// closed, or Run is stopping: no error to report) or is passed over (a
// timeout).
func (u *udpServer) readError(err error) (bool, error) {
	if errors.Is(err, net.ErrClosed) {
		return true, nil
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return u.s.draining.Load(), nil
	}
	return true, err
}

// fast answers a query when the rate limit or the answer cache can: it
// returns the cached answer to patch and the entry (for the metrics), or a
// REFUSED answer with no entry. nil: nothing to send now (dropped, or gone
// to the slow path, which writes its own answer).
func (u *udpServer) fast(pkt []byte, from netip.AddrPort, oob []byte, start time.Time, key []byte) ([]byte, *entry) {
	s := u.s
	addr := from.Addr().Unmap()
	if s.limit != nil && !s.limit.allow(addr, start.UnixNano()) {
		s.m.limited.Inc()
		if r := refused(key[:0], pkt); r != nil {
			return r, nil
		}
		return nil, nil
	}
	if v, e := s.lookup(pkt, key, start.UnixNano()); v != nil {
		return v, e
	}
	select {
	case u.slow <- struct{}{}:
	default:
		s.m.dropped.Inc()
		return nil, nil
	}
	q := append([]byte(nil), pkt...)
	var qoob []byte
	if len(oob) > 0 {
		qoob = append([]byte(nil), oob...)
	}
	u.wg.Add(1)
	go func() {
		defer func() { <-u.slow; u.wg.Done() }()
		if r := s.serveSlow(q, addr, start); r != nil {
			u.write(r, from, qoob)
		}
	}()
	return nil, nil
}

// write sends an answer; on a wildcard socket from the address the query
// was sent to.
func (u *udpServer) write(b []byte, to netip.AddrPort, oob []byte) {
	var err error
	if u.wildcard {
		_, _, err = u.conn.WriteMsgUDPAddrPort(b, replySource(oob), to)
	} else {
		_, err = u.conn.WriteToUDPAddrPort(b, to)
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		u.s.log.Debug("cannot write answer", "error", err, "client", to)
	}
}

// replySource returns the control message that makes a reply leave from
// the destination address of the query whose control message is oob (as
// miekg/dns's correctSource).
func replySource(oob []byte) []byte {
	if len(oob) == 0 {
		return nil
	}
	var c6 ipv6.ControlMessage
	if c6.Parse(oob) == nil && c6.Dst != nil {
		if c6.Dst.To4() == nil {
			return (&ipv6.ControlMessage{Src: c6.Dst}).Marshal()
		}
		return (&ipv4.ControlMessage{Src: c6.Dst}).Marshal()
	}
	var c4 ipv4.ControlMessage
	if c4.Parse(oob) == nil && c4.Dst != nil {
		return (&ipv4.ControlMessage{Src: c4.Dst}).Marshal()
	}
	return nil
}

// serveSlow answers a query the cache did not: from a cache entry it makes
// now when the query is one the cache takes, else exactly as miekg/dns's
// server and ServeDNS do (its accept rules, FORMERR for what it cannot
// parse, Answer). It returns nil when nothing is to be sent.
func (s *Server) serveSlow(pkt []byte, from netip.Addr, start time.Time) []byte {
	if len(pkt) < 12 {
		s.m.malformed.Inc()
		return nil // as miekg/dns: too short to answer
	}
	if v, e := s.fill(pkt, start.UnixNano()); v != nil {
		r := append([]byte(nil), v...)
		s.patch(r, pkt, from)
		s.m.observe(e.qtype, e.rcode, time.Since(start))
		return r
	}
	bits := binary.BigEndian.Uint16(pkt[2:])
	if bits&(1<<15) != 0 {
		return nil // a response: ignored
	}
	reject, notImp := false, false
	switch opcode := int(bits>>11) & 0xf; {
	case opcode != miekg.OpcodeQuery && opcode != miekg.OpcodeNotify:
		reject, notImp = true, true
	case binary.BigEndian.Uint16(pkt[4:]) != 1, binary.BigEndian.Uint16(pkt[6:]) > 1,
		binary.BigEndian.Uint16(pkt[8:]) > 1, binary.BigEndian.Uint16(pkt[10:]) > 2:
		reject = true
	}
	req := new(miekg.Msg)
	if !reject {
		if err := req.Unpack(pkt); err != nil {
			s.m.malformed.Inc()
			s.log.Trace("malformed query", "error", err)
			reject = true
		}
	} else {
		_ = req.Unpack(pkt[:12]) // the header only, as miekg/dns does
	}
	if reject {
		opcode := req.Opcode
		req.SetRcodeFormatError(req)
		req.Zero = false
		if notImp {
			req.Opcode = opcode
			req.Rcode = miekg.RcodeNotImplemented
		}
		req.Ns, req.Answer, req.Extra = nil, nil, nil
		b, err := req.Pack()
		if err != nil {
			return nil
		}
		return b
	}
	resp := s.Answer(req, from, "udp")
	return s.pack(req, resp, start, nil)
}

// refused writes into dst a REFUSED answer to pkt (its question, and an
// OPT record when it had one) for a client over its rate limit, or returns
// nil when pkt is not a query the fast path recognises.
func refused(dst, pkt []byte) []byte {
	q, ok := parseWire(pkt)
	if !ok {
		return nil
	}
	dst = append(dst, pkt[:q.qend]...)
	dst[2] = 0x80 | dst[2]&0x01 // QR, RD
	dst[3] = dst[3]&0x10 | miekg.RcodeRefused
	binary.BigEndian.PutUint16(dst[6:], 0)
	binary.BigEndian.PutUint16(dst[8:], 0)
	binary.BigEndian.PutUint16(dst[10:], 0)
	if q.edns {
		binary.BigEndian.PutUint16(dst[10:], 1)
		dst = append(dst, 0, 0, byte(miekg.TypeOPT), ednsSize>>8, ednsSize&0xff, 0, 0, 0, 0, 0, 0)
	}
	return dst
}
