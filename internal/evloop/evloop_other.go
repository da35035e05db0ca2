//go:build !linux

package evloop

// CPULimit is 0 (unknown) elsewhere than Linux, where the loops do not run.
func CPULimit() int { return 0 }

// MaxLoops is 1 elsewhere than Linux, where the loops do not run.
func MaxLoops(limit int) int { return 1 }
