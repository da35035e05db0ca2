package evloop

import (
	"os"
	"path"
	"strconv"
	"strings"
)

// CPULimit is the CPU limit of the process's cgroup and its
// ancestors (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), rounded up to whole
// processors; 0 when there is none or it cannot be read.
func CPULimit() int {
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0
	}
	return cpuLimitFrom(string(cg), string(mi), os.ReadFile)
}

// cpuLimitFrom reads the limit of the cgroups named in cgroup
// (/proc/self/cgroup) under their mounts in mountinfo
// (/proc/self/mountinfo), through read.
func cpuLimitFrom(cgroup, mountinfo string, read func(string) ([]byte, error)) int {
	limit := 0
	lower := func(l int) {
		if l > 0 && (limit == 0 || l < limit) {
			limit = l
		}
	}
	for _, line := range strings.Split(mountinfo, "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 3 {
			continue
		}
		root, mnt := f[3], f[4]
		v2 := g[0] == "cgroup2"
		if !v2 && (g[0] != "cgroup" || !hasItem(g[2], "cpu")) {
			continue
		}
		p, ok := cgroupPath(cgroup, v2)
		if !ok {
			continue
		}
		if root != "/" {
			if p != root && !strings.HasPrefix(p, root+"/") {
				continue
			}
			p = strings.TrimPrefix(p, root)
		}
		for dir := path.Join(mnt, p); ; dir = path.Dir(dir) {
			if v2 {
				lower(cpuMaxV2(read, dir))
			} else {
				lower(cpuMaxV1(read, dir))
			}
			if dir == mnt || len(dir) <= len(mnt) {
				break
			}
		}
	}
	return limit
}

// cgroupPath is the process's cgroup in the v2 hierarchy, or in the v1
// one holding the cpu controller.
func cgroupPath(cgroup string, v2 bool) (string, bool) {
	for _, line := range strings.Split(cgroup, "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if v2 && parts[0] == "0" && parts[1] == "" || !v2 && hasItem(parts[1], "cpu") {
			return parts[2], true
		}
	}
	return "", false
}

func hasItem(list, item string) bool {
	for _, s := range strings.Split(list, ",") {
		if s == item {
			return true
		}
	}
	return false
}

func cpuMaxV2(read func(string) ([]byte, error), dir string) int {
	b, err := read(path.Join(dir, "cpu.max"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] == "max" {
		return 0
	}
	return quotaCPUs(f[0], f[1])
}

func cpuMaxV1(read func(string) ([]byte, error), dir string) int {
	q, err := read(path.Join(dir, "cpu.cfs_quota_us"))
	if err != nil {
		return 0
	}
	p, err := read(path.Join(dir, "cpu.cfs_period_us"))
	if err != nil {
		return 0
	}
	return quotaCPUs(strings.TrimSpace(string(q)), strings.TrimSpace(string(p)))
}

// quotaCPUs is quota/period rounded up; 0 for no limit (-1) or nonsense.
func quotaCPUs(quota, period string) int {
	q, err1 := strconv.ParseInt(quota, 10, 64)
	p, err2 := strconv.ParseInt(period, 10, 64)
	if err1 != nil || err2 != nil || q <= 0 || p <= 0 {
		return 0
	}
	return int((q + p - 1) / p)
}
