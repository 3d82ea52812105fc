// Package glab builds a small Kubernetes-like node out of network namespaces
// using netlink only, for kernel tests that run where no `ip` binary exists
// (the qemu guest of test/guest). Every namespace is anonymous and lives as
// long as the test holds its handle, so nothing outlives the test and the
// caller's own namespace is never modified.
//
// Topology: a node namespace; a client namespace outside the cluster
// (192.168.50.2-9/24, gateway NodeIP); pod namespaces 10.244.N.2/24 behind
// 10.244.N.1 on the node, each serving TCP and UDP on PodPort and answering
// every request with "<pod name> <peer address it saw>"; and an in-cluster
// client pod InPodIP.
package glab

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/netnsrun"
)

// Addresses of the topology.
const (
	NodeIP     = "192.168.50.1"
	PodPort    = 8080
	ClusterNet = "10.244.0.0/16"
	InPodIP    = "10.244.9.2"
)

// ClientIP is the i-th (0..7) source address of the client namespace.
func ClientIP(i int) string { return fmt.Sprintf("192.168.50.%d", 2+i) }

// PodIP is pod i's address (pod names are pod1, pod2, ... for i = 0, 1, ...).
func PodIP(i int) string { return fmt.Sprintf("10.244.%d.2", i+1) }

// PodGW is the node's address on pod i's link: the source a pod sees when
// the node masquerades.
func PodGW(i int) string { return fmt.Sprintf("10.244.%d.1", i+1) }

// PodIndex returns i for the pod named "pod<i+1>".
func PodIndex(name string) int {
	var n int
	_, _ = fmt.Sscanf(name, "pod%d", &n)
	return n - 1
}

// NewNS creates an anonymous network namespace, alive until test cleanup
// (and while sockets in it remain open). The calling goroutine's thread never
// leaves its own namespace.
func NewNS(t testing.TB) netns.NsHandle {
	t.Helper()
	var h netns.NsHandle
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = gerr
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		h, err = netns.New()
		// Only a thread that made it back may be reused by the runtime.
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
	}()
	<-done
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// NSPath names the namespace of h for APIs that take a path.
func NSPath(h netns.NsHandle) string { return fmt.Sprintf("/proc/self/fd/%d", int(h)) }

// In runs fn on a thread inside h's namespace. Sockets created in fn stay in
// that namespace after fn returns.
func In(h netns.NsHandle, fn func() error) error { return netnsrun.FD(int(h), fn) }

// Must fails the test on err.
func Must(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// Lab is one node with its client and pods.
type Lab struct {
	T      testing.TB
	Node   netns.NsHandle
	Client netns.NsHandle
	InPod  netns.NsHandle
	Pods   []netns.NsHandle
}

// New builds the topology with nPods serving pods and IP forwarding on in
// the node namespace.
func New(t testing.TB, nPods int) *Lab {
	t.Helper()
	l := &Lab{T: t, Node: NewNS(t), Client: NewNS(t), InPod: NewNS(t)}
	nh, err := netlink.NewHandleAt(l.Node, unix.NETLINK_ROUTE)
	Must(t, err, "netlink in node")
	t.Cleanup(nh.Close)
	link := func(peerNS netns.NsHandle, nodeSide, nodeAddr string, peerAddrs []string) {
		t.Helper()
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nodeSide}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(peerNS))}
		Must(t, nh.LinkAdd(v), "veth "+nodeSide)
		ln, err := nh.LinkByName(nodeSide)
		Must(t, err, "link "+nodeSide)
		Must(t, nh.AddrAdd(ln, mustAddr(nodeAddr+"/24")), "addr "+nodeAddr)
		Must(t, nh.LinkSetUp(ln), "up "+nodeSide)
		ph, err := netlink.NewHandleAt(peerNS, unix.NETLINK_ROUTE)
		Must(t, err, "netlink in peer")
		defer ph.Close()
		lo, err := ph.LinkByName("lo")
		Must(t, err, "peer lo")
		Must(t, ph.LinkSetUp(lo), "peer lo up")
		pl, err := ph.LinkByName("eth0")
		Must(t, err, "peer eth0")
		for _, a := range peerAddrs {
			Must(t, ph.AddrAdd(pl, mustAddr(a+"/24")), "peer addr "+a)
		}
		Must(t, ph.LinkSetUp(pl), "peer up")
		Must(t, ph.RouteAdd(&netlink.Route{Gw: net.ParseIP(nodeAddr), LinkIndex: pl.Attrs().Index}), "peer default route")
	}
	lo, err := nh.LinkByName("lo")
	Must(t, err, "node lo")
	Must(t, nh.LinkSetUp(lo), "node lo up")
	var clientAddrs []string
	for i := 0; i < 8; i++ {
		clientAddrs = append(clientAddrs, ClientIP(i))
	}
	link(l.Client, "vc", NodeIP, clientAddrs)
	link(l.InPod, "vp9", "10.244.9.1", []string{InPodIP})
	for i := 0; i < nPods; i++ {
		p := NewNS(t)
		l.Pods = append(l.Pods, p)
		link(p, fmt.Sprintf("vp%d", i+1), PodGW(i), []string{PodIP(i)})
		l.Serve(p, fmt.Sprintf("pod%d", i+1), PodPort)
	}
	Must(t, In(l.Node, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }), "ip_forward in node")
	return l
}

func mustAddr(s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		panic(err)
	}
	return a
}

// Serve starts TCP and UDP servers in ns on port that answer every line /
// datagram with "<name> <peer address>", until test cleanup.
func (l *Lab) Serve(ns netns.NsHandle, name string, port int) {
	t := l.T
	var ln net.Listener
	var pc net.PacketConn
	Must(t, In(ns, func() error {
		var err error
		if ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port)); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port))
		return err
	}), "listen in "+name)
	t.Cleanup(func() { ln.Close(); pc.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					if _, err := r.ReadString('\n'); err != nil {
						return
					}
					fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
				}
			}()
		}
	}()
	go func() {
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(fmt.Sprintf("%s %s\n", name, from)), from)
		}
	}()
}

// Reply is what one request got back.
type Reply struct {
	Pod  string // answering pod
	Peer string // address the pod saw
}

// PeerHost is the IP part of Peer.
func (r Reply) PeerHost() string {
	h, _, _ := net.SplitHostPort(r.Peer)
	return h
}

// Ask opens a new connection from src (empty: any) in ns to dst, sends one
// request and returns the answer.
func Ask(ns netns.NsHandle, network, src, dst string) (Reply, error) {
	var r Reply
	err := In(ns, func() error {
		d := net.Dialer{Timeout: 2 * time.Second}
		if src != "" {
			ip := net.ParseIP(src)
			if network == "udp" {
				d.LocalAddr = &net.UDPAddr{IP: ip}
			} else {
				d.LocalAddr = &net.TCPAddr{IP: ip}
			}
		}
		c, err := d.Dial(network, dst)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte("hi\n")); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return fmt.Errorf("bad answer %q", line)
		}
		r = Reply{Pod: f[0], Peer: f[1]}
		return nil
	})
	return r, err
}

// Count sends n requests from the client namespace and counts answers per
// pod; any failed request fails the test.
func (l *Lab) Count(network, src, dst string, n int) map[string]int {
	l.T.Helper()
	got, err := l.TryCount(network, src, dst, n)
	if err != nil {
		l.T.Fatal(err)
	}
	return got
}

// TryCount is Count returning the first error instead of failing.
func (l *Lab) TryCount(network, src, dst string, n int) (map[string]int, error) {
	got := map[string]int{}
	for i := 0; i < n; i++ {
		r, err := Ask(l.Client, network, src, dst)
		if err != nil {
			return got, fmt.Errorf("request %d %s %s -> %s: %w", i, network, src, dst, err)
		}
		got[r.Pod]++
	}
	return got, nil
}
