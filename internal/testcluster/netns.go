package testcluster

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Net is a small network a test makes so that it can cut a node off, as a
// network partition would: a bridge on the host holding host addresses
// (prefix.11, .12, ...) that agents and sidecars on the host bind, and
// network namespaces, each joined to the bridge by a veth pair and holding
// one address (prefix.2, .3, ...). Processes in a namespace are started with
// `ip netns exec`; the test reaches them with NetNS.DialContext. It needs
// root (CAP_NET_ADMIN) and network namespace support: NewNet skips the test
// otherwise. Everything it made is removed when the test ends.
type Net struct {
	Prefix string // "10.a.b.": the /24 of every address, picked free at random
	Bridge string
	Spaces []*NetNS
	host   *os.File // the test process's own network namespace
}

// NetNS is a network namespace of a Net.
type NetNS struct {
	Name   string // as `ip netns` knows it
	IP     string // its address, on its end of the veth pair
	hostIf string // the host end of the veth pair, a port of the bridge
	fd     *os.File
	host   *os.File
}

// NewNet makes a Net with hostIPs addresses on the host and one namespace
// per name in spaces. It skips the test when it cannot (not root, no
// network namespaces, no veth or bridge support) and says why.
func NewNet(t testing.TB, hostIPs int, spaces ...string) *Net {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("no network partition: needs root (it makes network namespaces and veth pairs)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no network partition: needs iproute2's ip command")
	}
	host, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Skipf("no network partition: no network namespaces here: %v", err)
	}
	tag := fmt.Sprintf("%06x", rand.IntN(1<<24))
	n := &Net{Bridge: "at" + tag + "br", host: host}
	t.Cleanup(n.close)
	if n.Prefix, err = freePrefix(); err != nil {
		t.Skipf("no network partition: %v", err)
	}
	if err := ipCmd("link", "add", n.Bridge, "type", "bridge"); err != nil {
		t.Skipf("no network partition: cannot make a bridge: %v", err)
	}
	if err := ipCmd("link", "set", n.Bridge, "up"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < hostIPs; i++ {
		if err := ipCmd("addr", "add", n.HostIP(i)+"/24", "dev", n.Bridge); err != nil {
			t.Fatal(err)
		}
	}
	for i, name := range spaces {
		ns := &NetNS{Name: "attache-" + tag + "-" + name, IP: fmt.Sprintf("%s%d", n.Prefix, 2+i),
			hostIf: fmt.Sprintf("at%s%dh", tag, i), host: host}
		if err := ipCmd("netns", "add", ns.Name); err != nil {
			t.Skipf("no network partition: cannot make a network namespace: %v", err)
		}
		n.Spaces = append(n.Spaces, ns)
		in := fmt.Sprintf("at%s%dn", tag, i)
		for _, args := range [][]string{
			{"link", "add", ns.hostIf, "type", "veth", "peer", "name", in, "netns", ns.Name},
			{"link", "set", ns.hostIf, "master", n.Bridge},
			{"link", "set", ns.hostIf, "up"},
			{"-n", ns.Name, "addr", "add", ns.IP + "/24", "dev", in},
			{"-n", ns.Name, "link", "set", in, "up"},
			{"-n", ns.Name, "link", "set", "lo", "up"},
		} {
			if err := ipCmd(args...); err != nil {
				t.Skipf("no network partition: cannot join a namespace to the bridge: %v", err)
			}
		}
		if ns.fd, err = os.Open("/run/netns/" + ns.Name); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// HostIP returns the i-th host address (prefix.11 for 0).
func (n *Net) HostIP(i int) string { return fmt.Sprintf("%s%d", n.Prefix, 11+i) }

func (n *Net) close() {
	for _, ns := range n.Spaces {
		if ns.fd != nil {
			ns.fd.Close()
		}
		// The veth pair goes with the namespace (once its last process
		// has ended: the agents' and sidecars' are stopped before this).
		_ = ipCmd("netns", "del", ns.Name)
	}
	if n.Bridge != "" {
		_ = ipCmd("link", "del", n.Bridge)
	}
	n.host.Close()
}

// freePrefix picks a random 10.x.y.0/24 that no address or route of the
// host's uses.
func freePrefix() (string, error) {
	out, err := exec.Command("ip", "-4", "-o", "addr").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip addr: %v: %s", err, out)
	}
	routes, err := exec.Command("ip", "-4", "route", "show", "table", "all").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip route: %v: %s", err, routes)
	}
	used := " " + strings.Join(strings.Fields(string(out)+" "+string(routes)), " ")
	for range 100 {
		p := fmt.Sprintf("10.%d.%d.", 200+rand.IntN(50), rand.IntN(256))
		if !strings.Contains(used, " "+p) {
			return p, nil
		}
	}
	return "", errors.New("no free 10.x.y.0/24")
}

func ipCmd(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Cut cuts the namespace off the bridge (the host end of its veth pair goes
// down): nothing passes either way, as when a node's link or switch fails;
// the namespace keeps its address, so its processes still reach each other.
func (ns *NetNS) Cut() error { return ipCmd("link", "set", ns.hostIf, "down") }

// Heal joins the namespace to the bridge again.
func (ns *NetNS) Heal() error { return ipCmd("link", "set", ns.hostIf, "up") }

// Command returns a command that runs name in the namespace.
func (ns *NetNS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// DialContext dials addr from inside the namespace: the socket is made on
// a thread that has entered the namespace, and a socket stays in the
// namespace it was made in, wherever it is used afterwards.
//
// Safety: the dialing goroutine is locked to its thread from before it
// enters the namespace until after it has left it; if leaving fails the
// goroutine ends still locked, so the runtime ends that thread instead of
// giving it to other goroutines. An IP literal address needs no resolver and
// one address dials in the calling goroutine, so no other goroutine makes a
// socket on this thread's behalf.
func (ns *NetNS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.fd.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("enter network namespace %s: %w", ns.Name, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if unix.Setns(int(ns.host.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
