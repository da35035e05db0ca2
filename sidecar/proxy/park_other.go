//go:build !linux

package proxy

import (
	"errors"
	"net"
	"time"
)

// parker is Linux only (an epoll set): elsewhere an idle connection of the
// goroutine path keeps its goroutine and buffer.
type parker struct{}

type parkedConn struct {
	s       *rawServer
	c       net.Conn
	ip      []byte
	last    lastHost
	expires time.Time
}

func newParker(time.Duration) (*parker, error) { return nil, errors.New("no parking on this system") }
func (k *parker) park(*parkedConn) bool        { return false }
func (k *parker) run()                         {}
func (k *parker) wentIdle()                    {}
func (k *parker) closeServer(*rawServer)       {}
func (k *parker) close()                       {}
func (k *parker) parked() int                  { return 0 }
func (k *parker) parkedOf(*rawServer) int      { return 0 }
