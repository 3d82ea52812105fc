// Package netnstest gives kernel tests a private network namespace that is
// removed when the test ends, so no test ever touches the root namespace.
package netnstest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/netnsrun"
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

// FD opens the namespace for netlink sockets that must act inside it
// (netlink.Config.NetNS, nftables.WithNetNSFd) and closes it at test cleanup.
func (n *NS) FD(t testing.TB) int {
	t.Helper()
	f, err := os.Open(n.Path())
	if err != nil {
		t.Fatalf("open netns %s: %v", n.Name, err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

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

// Pod is a namespace attached to a "node" namespace by a veth pair, routed
// (no bridge): the node side holds Gateway/32 and a host route to the pod.
type Pod struct {
	*NS
	IP netip.Addr
}

// AddPod creates a pod namespace with address ip behind node. The veth is
// created inside node and its peer moved straight into the pod, so nothing
// ever appears in the root namespace. gateway is the node-side address
// (shared by every pod of the node).
func AddPod(t testing.TB, node *NS, ip, gateway string) *Pod {
	t.Helper()
	pod := New(t, "pod")
	addr := netip.MustParseAddr(ip)
	a4 := addr.As4()
	host := fmt.Sprintf("v%x", a4[1:])
	node.MustRun(t, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod.Name)
	node.MustRun(t, "ip", "addr", "add", gateway+"/32", "dev", host)
	node.MustRun(t, "ip", "link", "set", host, "up")
	node.MustRun(t, "ip", "route", "add", ip+"/32", "dev", host)
	pod.MustRun(t, "ip", "addr", "add", ip+"/32", "dev", "eth0")
	pod.MustRun(t, "ip", "link", "set", "eth0", "up")
	pod.MustRun(t, "ip", "route", "add", gateway, "dev", "eth0")
	pod.MustRun(t, "ip", "route", "add", "default", "via", gateway)
	return &Pod{NS: pod, IP: addr}
}

// Do runs fn on an OS thread switched into the namespace. Sockets created by
// fn stay in the namespace after the thread switches back.
func (n *NS) Do(fn func() error) error { return netnsrun.Path(n.Path(), fn) }

// ServeName starts a TCP and a UDP server on port inside the namespace that
// answer every connection / datagram with name, and stops them at cleanup.
func (n *NS) ServeName(t testing.TB, port int, name string) {
	t.Helper()
	var ln net.Listener
	var pc net.PacketConn
	if err := n.Do(func() (err error) {
		if ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close(); pc.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(name + " " + c.RemoteAddr().String() + "\n"))
			c.Close()
		}
	}()
	go func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(name+" "+from.String()+"\n"), from)
		}
	}()
}

// Ask opens one connection (tcp or udp) from inside the namespace to addr and
// returns the first word of the answer (the server's name) and the source
// address the server saw.
func (n *NS) Ask(network, addr string, timeout time.Duration) (name, seenFrom string, err error) {
	var conn net.Conn
	if err := n.Do(func() (err error) {
		conn, err = net.DialTimeout(network, addr, timeout)
		return err
	}); err != nil {
		return "", "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if network == "udp" {
		if _, err := conn.Write([]byte("?")); err != nil {
			return "", "", err
		}
	}
	buf := make([]byte, 256)
	k, err := conn.Read(buf)
	if err != nil {
		return "", "", err
	}
	f := strings.Fields(string(buf[:k]))
	if len(f) < 2 {
		return "", "", fmt.Errorf("short answer %q", buf[:k])
	}
	return f[0], f[1], nil
}

// Node is the smallest topology where DNAT to pods can be observed with real
// connections: a node namespace with forwarding on, routed pod namespaces
// (pod names "poda", "podb", … in the order given) answering TCP and UDP on
// port 8080 with their name, and a client pod at 10.180.0.100. Every pod's
// gateway is 10.180.0.1 on the node side.
type Node struct {
	*NS
	Pods   map[string]*Pod
	Client *Pod
}

// NewNode builds a Node with one serving pod per address in podIPs.
func NewNode(t testing.TB, podIPs ...string) *Node {
	t.Helper()
	n := &Node{NS: New(t, "node"), Pods: map[string]*Pod{}}
	n.MustRun(t, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	for i, ip := range podIPs {
		p := AddPod(t, n.NS, ip, "10.180.0.1")
		name := "pod" + string(rune('a'+i))
		p.ServeName(t, 8080, name)
		n.Pods[name] = p
	}
	n.Client = AddPod(t, n.NS, "10.180.0.100", "10.180.0.1")
	return n
}
