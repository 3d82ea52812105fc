// Command iptables-wrapper stands in for iptables, ip6tables and their -save
// and -restore commands in miniproxy's image, which ships both iptables
// variants. On its first call it finds which variant the node already uses,
// points those six commands at that variant's multi-call binary, and execs
// it; later calls go to the variant directly.
//
// The detection follows kube-proxy's image (kubernetes-sigs/iptables-wrappers):
// kubelet's marker chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY) in the
// nft mangle tables, then in the legacy tables; failing both, the variant
// holding more rules wins, nft on a tie (a fresh node).
//
// It writes nothing to stdout or stderr of its own: callers read
// iptables-save's output, often combined with stderr.
//
// `iptables-wrapper detect` prints the mode it would pick and why, and
// changes nothing.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args))
}

func run(argv []string) int {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "iptables-wrapper: %v\n", err)
		return 1
	}
	dir := filepath.Dir(exe)
	// Each probe is one iptables-*-save run; a node with a huge ruleset
	// takes seconds, a wedged kernel call must not hang the proxy forever.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	mode, why := Detect(ctx, ExecSaver(dir))
	cancel()

	name := filepath.Base(argv[0])
	if name == "iptables-wrapper" {
		if len(argv) == 2 && argv[1] == "detect" {
			fmt.Printf("%s\t%s\n", mode, why)
			return 0
		}
		fmt.Fprintln(os.Stderr, "usage: iptables-wrapper detect (or call it as iptables, ip6tables, iptables-save, ...)")
		return 2
	}
	// A read-only root filesystem keeps the links as they are: every call
	// detects again, which is slower but still right.
	_ = Select(dir, mode)
	multi := filepath.Join(dir, MultiBinary(mode))
	// The multi-call binary dispatches on argv[0]'s base name.
	err = syscall.Exec(multi, append([]string{name}, argv[1:]...), os.Environ())
	fmt.Fprintf(os.Stderr, "iptables-wrapper: exec %s: %v\n", multi, err)
	return 1
}
