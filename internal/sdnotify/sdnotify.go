// Package sdnotify tells systemd (or any service manager speaking its notify
// protocol) how a long-running attache process is doing: READY=1 once the
// process serves, WATCHDOG=1 at half the watchdog interval while it runs, and
// STOPPING=1 when it starts shutting down.
//
// The datagrams are sent by github.com/coreos/go-systemd/v22/daemon. As the
// protocol defines, the service manager's side comes from the environment:
// NOTIFY_SOCKET (no socket: every notification is skipped), WATCHDOG_USEC and
// WATCHDOG_PID (no watchdog unless WATCHDOG_USEC is set and WATCHDOG_PID, when
// set, is this process). Outside systemd a Notifier does nothing but poll.
package sdnotify

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
)

// Config of a Notifier.
type Config struct {
	// Ready reports whether the process serves. Run polls it every
	// PollInterval until it first returns true, then sends READY=1 once.
	// Required.
	Ready func() bool
	// PollInterval is how often Ready is asked before it first holds.
	// Default 100ms.
	PollInterval time.Duration
	// Logger; default hclog.NewNullLogger(). Named "sdnotify".
	Logger hclog.Logger
}

// DefaultConfig returns the defaults (without Ready, which the caller sets).
func DefaultConfig() Config {
	return Config{PollInterval: 100 * time.Millisecond, Logger: hclog.NewNullLogger()}
}

// Notifier sends the notifications; New builds it, Run sends them.
type Notifier struct {
	cfg      Config
	log      hclog.Logger
	watchdog time.Duration // the manager's watchdog timeout; 0: off
	handed   atomic.Bool   // HandOver was called: no STOPPING=1
}

// New reads the watchdog settings from the environment; a malformed
// WATCHDOG_USEC is an error (systemd never sets one: someone else did).
func New(cfg Config) (*Notifier, error) {
	if cfg.Ready == nil {
		return nil, errors.New("sdnotify: Config.Ready is required")
	}
	def := DefaultConfig()
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = def.PollInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = def.Logger
	}
	wd, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return nil, fmt.Errorf("sdnotify: %w", err)
	}
	return &Notifier{cfg: cfg, log: cfg.Logger.Named("sdnotify"), watchdog: wd}, nil
}

// Watchdog returns the service manager's watchdog timeout (0 when off).
// Run pings at half of it.
func (n *Notifier) Watchdog() time.Duration { return n.watchdog }

// Run polls Ready until it holds and then sends READY=1, pings WATCHDOG=1
// every half watchdog timeout from the same loop (also before READY: the
// manager's start timeout, not the watchdog, bounds the wait for it), and
// when ctx ends sends STOPPING=1 and returns nil. A failed send is logged, never
// fatal: the service manager, not the process, decides what a missing
// notification means.
func (n *Notifier) Run(ctx context.Context) error {
	poll := time.NewTicker(n.cfg.PollInterval)
	defer poll.Stop()
	var ping <-chan time.Time
	if n.watchdog > 0 {
		t := time.NewTicker(n.watchdog / 2)
		defer t.Stop()
		ping = t.C
		n.log.Debug("watchdog on", "timeout", n.watchdog, "ping_every", n.watchdog/2)
	}
	ready := false
	for {
		if !ready && n.cfg.Ready() {
			ready = true
			n.send(daemon.SdNotifyReady)
			n.log.Debug("ready")
			poll.Stop()
		}
		select {
		case <-ctx.Done():
			if !n.handed.Load() {
				n.send(daemon.SdNotifyStopping)
			}
			return nil
		case <-poll.C:
		case <-ping:
			n.send(daemon.SdNotifyWatchdog)
		}
	}
}

// HandOver tells the service manager that the successor process pid (a new
// attache started to replace this one, see internal/handover) is the
// service's main process from now on (MAINPID=; pid 0: unknown, not
// sent), and leaves STOPPING=1 out when this one ends: the service goes on.
// systemd takes MAINPID= from the main process (NotifyAccess=main), for a
// process of the service's own control group.
func (n *Notifier) HandOver(pid int) {
	n.handed.Store(true)
	if pid > 0 {
		n.send("MAINPID=" + strconv.Itoa(pid))
	}
}

func (n *Notifier) send(state string) {
	sent, err := daemon.SdNotify(false, state)
	switch {
	case err != nil:
		n.log.Warn("cannot notify the service manager", "state", state, "error", err)
	case sent:
		n.log.Trace("notified the service manager", "state", state)
	}
}
