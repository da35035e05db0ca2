package sidecar

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// StartSuccessor starts the sidecar's successor for a restart or an upgrade
// (SIGUSR2, as nginx's binary upgrade): the executable now at this one's
// path (a new version installed there is the one that starts) with the
// same arguments, environment and standard output and error. The successor
// takes this sidecar's listening sockets through the data dir, and once it
// serves, this one hands over and stops (see Run); under systemd it names
// the successor the service's main process first (MAINPID=). A successor
// that fails (a config the new version refuses) exits and leaves this one
// serving. It returns the successor's pid.
func (s *Sidecar) StartSuccessor() (int, error) {
	if s.cfg.DataDir == "" {
		return 0, errors.New("restart: a successor takes over through the data dir: run with -data-dir")
	}
	exe, err := os.Executable() // "(deleted)" already cut off when the file was replaced
	if err != nil {
		return 0, fmt.Errorf("restart: %w", err)
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// The watchdog is systemd's for the main process: the successor pings
	// it (ignored until it is the main process) rather than take this
	// pid's WATCHDOG_PID for a sign that the watchdog is not its own.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "WATCHDOG_PID=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("restart: %w", err)
	}
	pid := cmd.Process.Pid
	go func() { // reaped if it ends while this process runs
		err := cmd.Wait()
		s.log.Info("successor process ended", "pid", pid, "result", fmt.Sprint(err))
	}()
	s.log.Info("started a successor; handing over once it serves", "pid", pid, "path", exe)
	return pid, nil
}
