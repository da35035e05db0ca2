//go:build !linux

package proxy

import (
	"context"
	"errors"
	"time"
)

// evServer: the event loops are Linux's (epoll); elsewhere the goroutine
// fast path serves every connection.
type evServer struct{}

func newEvServer(context.Context, *Proxy, []*httpListener) (*evServer, error) {
	return nil, errors.New("event loops need Linux")
}

func (s *evServer) serve()                      {}
func (s *evServer) stopAccepting(time.Duration) {}

func (s *evServer) addListener(*httpListener) bool { return false }
func (s *evServer) removeListener(*httpListener)   {}
