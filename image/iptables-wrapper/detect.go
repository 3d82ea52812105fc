package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
)

// Mode is an iptables variant.
type Mode string

const (
	NFT    Mode = "nft"
	Legacy Mode = "legacy"
)

// Links are the commands the wrapper stands in for until the first call
// replaces them with links to the chosen variant.
var Links = []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"}

// MultiBinary is the multi-call binary of a variant, in the same directory.
func MultiBinary(m Mode) string { return "xtables-" + string(m) + "-multi" }

// Saver runs `<command> args...` of one variant and returns its stdout.
// Failures read as empty output: a variant the kernel lacks holds no rules.
type Saver func(ctx context.Context, m Mode, command string, args ...string) []byte

// ExecSaver runs the variants' multi-call binaries found in dir.
func ExecSaver(dir string) Saver {
	return func(ctx context.Context, m Mode, command string, args ...string) []byte {
		var out, errOut bytes.Buffer
		c := exec.CommandContext(ctx, filepath.Join(dir, MultiBinary(m)), args...)
		c.Args[0] = command // the multi-call binary dispatches on argv[0]
		// Explicit stdin and stderr: left nil, Go opens /dev/null, and a
		// failed open would read as "no rules" where /dev is missing.
		c.Stdin, c.Stdout, c.Stderr = bytes.NewReader(nil), &out, &errOut
		_ = c.Run()
		return out.Bytes()
	}
}

var kubeletChains = regexp.MustCompile(`(?m)^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) `)

// Detect picks the variant this network namespace uses and says why.
func Detect(ctx context.Context, save Saver) (Mode, string) {
	// kubelet (1.17+) creates a marker chain in mangle. Asking nft for one
	// table is cheap and creates nothing.
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		if kubeletChains.Match(save(ctx, NFT, cmd, "-t", "mangle")) {
			return NFT, "kubelet's chains are in nft " + cmd
		}
	}
	// Legacy save with "-t mangle" would create that table in the kernel;
	// without it, only the tables that exist are listed.
	legacy := [][]byte{save(ctx, Legacy, "iptables-save"), save(ctx, Legacy, "ip6tables-save")}
	for i, out := range legacy {
		if kubeletChains.Match(out) {
			return Legacy, "kubelet's chains are in legacy " + []string{"iptables-save", "ip6tables-save"}[i]
		}
	}
	nl := countRules(legacy[0]) + countRules(legacy[1])
	nn := countRules(save(ctx, NFT, "iptables-save")) + countRules(save(ctx, NFT, "ip6tables-save"))
	if nl > nn {
		return Legacy, fmt.Sprintf("no kubelet chains; legacy holds more rules (%d) than nft (%d)", nl, nn)
	}
	return NFT, fmt.Sprintf("no kubelet chains; nft holds as many rules or more (%d) than legacy (%d)", nn, nl)
}

func countRules(save []byte) int {
	n := 0
	for _, l := range bytes.Split(save, []byte("\n")) {
		if bytes.HasPrefix(l, []byte("-")) {
			n++
		}
	}
	return n
}

// Select points every command of Links in dir at mode's multi-call binary.
// Each link is replaced by a rename, so a concurrent caller always finds a
// command (the wrapper or the variant), never a missing file.
func Select(dir string, m Mode) error {
	for _, name := range Links {
		tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d", name, os.Getpid()))
		_ = os.Remove(tmp)
		if err := os.Symlink(MultiBinary(m), tmp); err != nil {
			return fmt.Errorf("link %s to %s: %w", name, MultiBinary(m), err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			_ = os.Remove(tmp)
			return fmt.Errorf("link %s to %s: %w", name, MultiBinary(m), err)
		}
	}
	return nil
}
