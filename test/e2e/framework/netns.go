package framework

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/netnsrun"
)

// NetNS is a named network namespace (a bind mount under /run/netns) that
// this run created. Everything the framework builds lives in such namespaces;
// the root namespace is never touched.
type NetNS struct {
	Name string
}

// ipBin is resolved once per call site; absolute paths keep `ip netns exec`
// independent of the caller's PATH.
func ipBin() string {
	for _, p := range []string{"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "ip"
}

// newNetNS creates the namespace and brings loopback up.
func newNetNS(ctx context.Context, name string) (*NetNS, error) {
	if out, err := exec.CommandContext(ctx, ipBin(), "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, out)
	}
	ns := &NetNS{Name: name}
	if _, err := ns.Run(ctx, "ip", "link", "set", "lo", "up"); err != nil {
		_ = ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Path is the namespace's bind-mount path, for setns.
func (n *NetNS) Path() string { return "/run/netns/" + n.Name }

// Delete removes the namespace. Interfaces inside it (and veth peers) go with
// it once no process holds it open.
func (n *NetNS) Delete() error {
	out, err := exec.Command(ipBin(), "netns", "del", n.Name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("ip netns del %s: %w: %s", n.Name, err, out)
	}
	return nil
}

// Run runs a command inside the namespace and returns its combined output.
// "ip" as the command is run directly with -n, everything else through
// `ip netns exec` with an absolute path.
func (n *NetNS) Run(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var cmd *exec.Cmd
	if args[0] == "ip" {
		cmd = exec.CommandContext(ctx, ipBin(), append([]string{"-n", n.Name}, args[1:]...)...)
	} else {
		cmd = exec.CommandContext(ctx, ipBin(), append([]string{"netns", "exec", n.Name, absPath(args[0])}, args[1:]...)...)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("netns %s: %s: %w: %s", n.Name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// RunAll runs several commands in order and stops at the first error.
func (n *NetNS) RunAll(ctx context.Context, cmds ...[]string) error {
	for _, c := range cmds {
		if _, err := n.Run(ctx, c...); err != nil {
			return err
		}
	}
	return nil
}

func absPath(bin string) string {
	if filepath.IsAbs(bin) {
		return bin
	}
	if p, err := exec.LookPath(bin); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if _, err := os.Stat(filepath.Join(dir, bin)); err == nil {
			return filepath.Join(dir, bin)
		}
	}
	return bin
}

// Command returns an exec.Cmd that runs bin inside the namespace. The child is
// killed if the test process dies (Pdeathsig), and gets its own process group
// so Stop can signal everything it started.
func (n *NetNS) Command(bin string, args ...string) *exec.Cmd {
	cmd := exec.Command(ipBin(), append([]string{"netns", "exec", n.Name, absPath(bin)}, args...)...)
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true, Pdeathsig: unix.SIGKILL}
	return cmd
}

// Do runs fn on an OS thread that has joined the namespace. Sockets created
// inside fn stay in the namespace after the thread switches back, which is
// how the framework dials "from a pod" without forking a process.
func (n *NetNS) Do(fn func() error) error { return netnsrun.Path(n.Path(), fn) }

// DialContext opens a connection whose socket lives in the namespace. The
// connect itself completes through the netpoller like any other socket.
func (n *NetNS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := n.Do(func() error {
		// Creating the socket is synchronous in DialContext; only the socket
		// creation must happen on the namespaced thread, but the whole dial
		// is short, so it is simplest to keep it here.
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		conn = c
		return err
	})
	if err != nil {
		return nil, err
	}
	return conn, nil
}

// ListenPacket opens a packet socket in the namespace (used for UDP flows
// whose replies must come back to a known local port).
func (n *NetNS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() error {
		c, err := net.ListenPacket(network, addr)
		pc = c
		return err
	})
	return pc, err
}
