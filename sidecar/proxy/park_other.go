//go:build !linux

package proxy

import (
	"errors"
	"net"
	"time"

	"attache/sidecar/proxy/h2"
)

// parker is Linux only (an epoll set): elsewhere an idle connection of the
// goroutine path keeps its goroutine and buffer.
type parker struct{}

type parkOwner interface {
	resume(pc *parkedConn)
	draining() bool
}

type parkedConn struct {
	s       parkOwner
	c       net.Conn
	h2      *h2.Conn
	ip      []byte
	last    lastHost
	expires time.Time
}

func newParker(time.Duration) (*parker, error) { return nil, errors.New("no parking on this system") }
func (k *parker) park(*parkedConn) bool        { return false }
func (k *parker) run()                         {}
func (k *parker) wentIdle()                    {}
func (k *parker) closeServer(parkOwner)        {}
func (k *parker) close()                       {}
func (k *parker) parked() int                  { return 0 }
func (k *parker) parkedOf(parkOwner) int       { return 0 }
