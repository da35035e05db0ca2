package testcluster

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// EstablishedConns counts this process's TCP connections to addr (an IPv4
// host:port) that are ESTABLISHED, read from the OS (/proc/net/tcp and
// /proc/self/fd), not from any client's own bookkeeping. Linux only.
func EstablishedConns(addr string) (int, error) {
	remote, err := procAddr(addr)
	if err != nil {
		return 0, err
	}
	inodes := map[string]bool{}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	seen := map[string]bool{} // a socket that moves while /proc/net/tcp is read may be listed twice
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) >= 10 && fl[2] == remote && fl[3] == "01" && inodes[fl[9]] {
			seen[fl[9]] = true
		}
	}
	return len(seen), sc.Err()
}

// procAddr writes addr as /proc/net/tcp does: the IPv4 address as the hex
// of its 32 bits in host (little-endian) order, a colon, the port in hex.
func procAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	ip := net.ParseIP(host).To4()
	p, err := strconv.Atoi(port)
	if ip == nil || err != nil {
		return "", fmt.Errorf("testcluster: EstablishedConns wants an IPv4 host:port, not %s", addr)
	}
	return strings.ToUpper(hex.EncodeToString([]byte{ip[3], ip[2], ip[1], ip[0]})) + ":" + fmt.Sprintf("%04X", p), nil
}
