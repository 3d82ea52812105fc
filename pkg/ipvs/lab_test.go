package ipvs

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// The kernel tests build a small node inside network namespaces created from
// Go (the guest has no `ip` binary): a node namespace running the backend, a
// client namespace outside the cluster (192.168.50.0/24, several source
// addresses), pod namespaces 10.244.N.2 with servers that answer with their
// name and the peer address they saw, and an in-cluster client pod.

const (
	nodeIP     = "192.168.50.1"
	podPort    = 8080
	clusterNet = "10.244.0.0/16"
	inPodIP    = "10.244.9.2"
)

func clientIP(i int) string { return fmt.Sprintf("192.168.50.%d", 2+i) }
func podIP(i int) string    { return fmt.Sprintf("10.244.%d.2", i+1) }
func podGW(i int) string    { return fmt.Sprintf("10.244.%d.1", i+1) }

// newNS creates a network namespace and returns a handle that keeps it
// alive; the calling goroutine's thread never leaves its own namespace.
func newNS(t *testing.T) netns.NsHandle {
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

func nsPath(h netns.NsHandle) string { return fmt.Sprintf("/proc/self/fd/%d", int(h)) }

// in runs fn with its thread inside ns.
func in(h netns.NsHandle, fn func() error) error { return inNetNS(nsPath(h), fn) }

type lab struct {
	t      *testing.T
	node   netns.NsHandle
	client netns.NsHandle
	inPod  netns.NsHandle
	pods   []netns.NsHandle
	be     *Backend
	cfg    proxy.Config
}

func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// newLab builds the topology with nPods pod namespaces, each serving TCP and
// UDP on podPort, and a backend (not yet synced) programming the node.
func newLab(t *testing.T, nPods int, opts Options) *lab {
	t.Helper()
	l := &lab{t: t, node: newNS(t), client: newNS(t), inPod: newNS(t)}
	nh, err := netlink.NewHandleAt(l.node, unix.NETLINK_ROUTE)
	must(t, err, "netlink in node")
	t.Cleanup(nh.Close)
	link := func(peerNS netns.NsHandle, nodeSide, nodeAddr string, peerAddrs []string) {
		t.Helper()
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nodeSide}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(peerNS))}
		must(t, nh.LinkAdd(v), "veth "+nodeSide)
		ln, err := nh.LinkByName(nodeSide)
		must(t, err, "link "+nodeSide)
		must(t, nh.AddrAdd(ln, mustAddr(nodeAddr+"/24")), "addr "+nodeAddr)
		must(t, nh.LinkSetUp(ln), "up "+nodeSide)
		ph, err := netlink.NewHandleAt(peerNS, unix.NETLINK_ROUTE)
		must(t, err, "netlink in peer")
		defer ph.Close()
		lo, err := ph.LinkByName("lo")
		must(t, err, "peer lo")
		must(t, ph.LinkSetUp(lo), "peer lo up")
		pl, err := ph.LinkByName("eth0")
		must(t, err, "peer eth0")
		for _, a := range peerAddrs {
			must(t, ph.AddrAdd(pl, mustAddr(a+"/24")), "peer addr "+a)
		}
		must(t, ph.LinkSetUp(pl), "peer up")
		must(t, ph.RouteAdd(&netlink.Route{Gw: net.ParseIP(nodeAddr), LinkIndex: pl.Attrs().Index}), "peer default route")
	}
	lo, err := nh.LinkByName("lo")
	must(t, err, "node lo")
	must(t, nh.LinkSetUp(lo), "node lo up")
	var clientAddrs []string
	for i := 0; i < 8; i++ {
		clientAddrs = append(clientAddrs, clientIP(i))
	}
	link(l.client, "vc", nodeIP, clientAddrs)
	link(l.inPod, "vp9", "10.244.9.1", []string{inPodIP})
	for i := 0; i < nPods; i++ {
		p := newNS(t)
		l.pods = append(l.pods, p)
		link(p, fmt.Sprintf("vp%d", i+1), podGW(i), []string{podIP(i)})
		l.serve(p, fmt.Sprintf("pod%d", i+1), podPort)
	}
	must(t, in(l.node, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }), "ip_forward in node")
	l.cfg = proxy.Config{ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(clusterNet)}}
	opts.NetNSPath = nsPath(l.node)
	l.be, err = New(l.cfg, opts)
	must(t, err, "new backend")
	t.Cleanup(func() {
		if err := l.be.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		l.be.Close()
	})
	return l
}

func mustAddr(s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		panic(err)
	}
	return a
}

// serve starts TCP and UDP servers in ns that answer every line / datagram
// with "<name> <peer address>".
func (l *lab) serve(ns netns.NsHandle, name string, port int) {
	t := l.t
	var ln net.Listener
	var pc net.PacketConn
	must(t, in(ns, func() error {
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

// reply is what one request got back.
type reply struct {
	Pod  string // answering pod
	Peer string // address the pod saw
}

// ask opens a new connection from src (in ns) to dst and returns the answer.
func ask(ns netns.NsHandle, network, src, dst string) (reply, error) {
	var r reply
	err := in(ns, func() error {
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
		r = reply{Pod: f[0], Peer: f[1]}
		return nil
	})
	return r, err
}

// count sends n requests and counts answers per pod; any error fails the test.
func (l *lab) count(network, src, dst string, n int) map[string]int {
	l.t.Helper()
	got := map[string]int{}
	for i := 0; i < n; i++ {
		r, err := ask(l.client, network, src, dst)
		if err != nil {
			l.t.Fatalf("request %d %s %s -> %s: %v", i, network, src, dst, err)
		}
		got[r.Pod]++
	}
	return got
}

func (l *lab) sync(snap *model.Snapshot, full bool) {
	l.t.Helper()
	if _, err := l.be.Sync(context.Background(), snap, full); err != nil {
		l.t.Fatalf("sync (full=%v): %v", full, err)
	}
}

// service builds a one-port service over the first nEps pods.
func service(name, vip string, proto model.Protocol, nEps int, mods ...func(*model.ServicePort)) *model.ServicePort {
	sp := &model.ServicePort{
		Name:       model.ServicePortName{Namespace: "default", Name: name, Protocol: proto},
		ClusterIPs: []netip.Addr{netip.MustParseAddr(vip)}, Port: 80, Protocol: proto,
	}
	for i := 0; i < nEps; i++ {
		sp.Endpoints = append(sp.Endpoints, model.Endpoint{IP: netip.MustParseAddr(podIP(i)), Port: podPort, Ready: true, Serving: true, NodeName: "node1"})
	}
	for _, m := range mods {
		m(sp)
	}
	return sp
}

func snap(sps ...*model.ServicePort) *model.Snapshot {
	s := &model.Snapshot{Node: model.Node{Name: "node1", Addresses: []netip.Addr{netip.MustParseAddr(nodeIP)}},
		Services: map[model.ServicePortName]*model.ServicePort{}}
	for _, sp := range sps {
		s.Services[sp.Name] = sp
	}
	return s
}
