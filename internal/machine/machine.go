// Package machine describes the host a benchmark or measurement ran on, for
// the header of its report: the kernel release and the load average. The
// machine is shared with other work, so every figure is printed next to the
// load it was measured under.
package machine

import (
	"os"
	"strings"
)

// LoadAvg returns the 1, 5 and 15 minute load averages as /proc/loadavg
// prints them ("0.52 0.61 0.70"), or "?" when they cannot be read.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return loadAvg(string(b))
}

func loadAvg(procLoadavg string) string {
	f := strings.Fields(procLoadavg)
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// Kernel returns the running kernel's release (uname -r), or "?".
func Kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
