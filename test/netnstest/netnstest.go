// Package netnstest gives kernel tests a private network namespace that is
// removed when the test ends, so no test ever touches the root namespace.
package netnstest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// RequireRoot skips the test, printing why, unless it runs as root with the
// given binaries available.
func RequireRoot(t testing.TB, bins ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces")
	}
	for _, b := range append([]string{"ip"}, bins...) {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("skipping: %s not installed (%v)", b, err)
		}
	}
}

// NS is a named network namespace under /run/netns.
type NS struct{ Name string }

// New creates a namespace with loopback up and deletes it at test cleanup.
func New(t testing.TB, prefix string) *NS {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := fmt.Sprintf("mp-%s-%s", prefix, hex.EncodeToString(b[:]))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Path is the namespace's bind-mount path, for setns.
func (n *NS) Path() string { return "/run/netns/" + n.Name }

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(ctx context.Context, stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s in netns %s: %w: %s", strings.Join(args, " "), n.Name, err, out.String())
	}
	return out.String(), nil
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Run(context.Background(), "", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
