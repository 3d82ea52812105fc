package ipvs

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/test/guest/glab"
)

const vip = "10.96.0.10"

var vipPort = vip + ":80"

// TestKernel runs the backend against a real IPVS. On a kernel without IPVS
// it skips; TestGuest then runs it inside a qemu guest that has IPVS.
func TestKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root for network namespaces")
	}
	if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
		t.Skip("skipping: this kernel has no IPVS loaded (TestGuest runs these tests in a qemu guest)")
	}
	t.Run("ClusterIPTCP", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("web", vip, model.TCP, 3)), true)
		for i := 0; i < 30; i++ {
			r, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), vipPort)
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			n := glab.PodIndex(r.Pod)
			if host := r.PeerHost(); host != glab.PodGW(n) {
				t.Fatalf("%s saw peer %s; want the node's address %s (masquerade of an off-cluster client)", r.Pod, r.Peer, glab.PodGW(n))
			}
		}
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 30); len(got) != 3 {
			t.Fatalf("want all 3 endpoints reached, got %v", got)
		}
	})
	t.Run("ClusterIPUDP", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("dns", vip, model.UDP, 3)), true)
		if got := l.Count("udp", glab.ClientIP(0), vipPort, 30); len(got) != 3 {
			t.Fatalf("want all 3 endpoints reached over UDP, got %v", got)
		}
	})
	t.Run("RoundRobinExactlyEven", func(t *testing.T) {
		l := newLab(t, 3, Options{Scheduler: "rr"})
		l.sync(snap(service("web", vip, model.TCP, 3)), true)
		got := l.Count("tcp", glab.ClientIP(0), vipPort, 30)
		for i := 1; i <= 3; i++ {
			if got[fmt.Sprintf("pod%d", i)] != 10 {
				t.Fatalf("rr over 30 connections: want 10 each, got %v", got)
			}
		}
	})
	t.Run("NoMasqueradeFromPods", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("web", vip, model.TCP, 3)), true)
		for i := 0; i < 6; i++ {
			r, err := glab.Ask(l.InPod, "tcp", "", vipPort)
			if err != nil {
				t.Fatal(err)
			}
			if host := r.PeerHost(); host != glab.InPodIP {
				t.Fatalf("%s saw %s; a pod-to-service connection must keep the pod's source %s", r.Pod, r.Peer, glab.InPodIP)
			}
		}
	})
	for _, sched := range []string{"sh", "mh"} {
		t.Run("Scheduler"+strings.ToUpper(sched)+"SourceSticky", func(t *testing.T) {
			l := newLab(t, 3, Options{Scheduler: sched})
			l.sync(snap(service("web", vip, model.TCP, 3)), true)
			pods := map[string]bool{}
			for c := 0; c < 8; c++ {
				got := l.Count("tcp", glab.ClientIP(c), vipPort, 6)
				if len(got) != 1 {
					t.Fatalf("%s: source %s spread over %v; want one endpoint", sched, glab.ClientIP(c), got)
				}
				for p := range got {
					pods[p] = true
				}
			}
			if len(pods) < 2 {
				t.Fatalf("%s: 8 sources all hashed to %v; want at least 2 endpoints used", sched, pods)
			}
		})
	}
	t.Run("SessionAffinityPersistence", func(t *testing.T) {
		l := newLab(t, 3, Options{Scheduler: "rr"})
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) { sp.AffinitySeconds = 60 })), true)
		s, err := l.be.ipvs.GetService(ipvsService(Key{netip.MustParseAddr(vip), model.TCP, 80}, nil))
		if err != nil {
			t.Fatal(err)
		}
		if s.Flags&svcFlagPersistent == 0 || s.Timeout != 60 {
			t.Fatalf("virtual server not persistent for 60s: flags %#x timeout %d", s.Flags, s.Timeout)
		}
		pods := map[string]bool{}
		for c := 0; c < 4; c++ {
			got := l.Count("tcp", glab.ClientIP(c), vipPort, 8)
			if len(got) != 1 {
				t.Fatalf("client %s not sticky: %v", glab.ClientIP(c), got)
			}
			for p := range got {
				pods[p] = true
			}
		}
		if len(pods) < 2 {
			t.Fatalf("rr with persistence should still place different clients on different endpoints, got %v", pods)
		}
	})
	t.Run("EndpointChangePropagates", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("web", vip, model.TCP, 2)), true)
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 20); got["pod1"] != 10 || got["pod2"] != 10 {
			t.Fatalf("2 endpoints: %v", got)
		}
		l.sync(snap(service("web", vip, model.TCP, 3)), false)
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 30); got["pod1"] != 10 || got["pod2"] != 10 || got["pod3"] != 10 {
			t.Fatalf("after scale-up (partial sync): %v", got)
		}
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) { sp.Endpoints = sp.Endpoints[1:] })), false)
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 20); got["pod1"] != 0 || got["pod2"] != 10 || got["pod3"] != 10 {
			t.Fatalf("after removing pod1 (partial sync): %v", got)
		}
		// pod1's closed connections linger in TIME_WAIT, so it drains at
		// weight 0 rather than disappearing (GracefulDrain covers removal).
		if d := l.realServers(t, vip, model.TCP, 80); d[netip.AddrPortFrom(netip.MustParseAddr(glab.PodIP(0)), glab.PodPort)] != 0 || len(d) < 2 {
			t.Fatalf("removed endpoint must be gone or at weight 0, real servers: %v", d)
		}
	})
	t.Run("GracefulDrain", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("web", vip, model.TCP, 3)), true)
		var held net.Conn
		glab.Must(t, glab.In(l.Client, func() error {
			var err error
			held, err = net.DialTimeout("tcp", vipPort, 2*time.Second)
			return err
		}), "dial held connection")
		defer held.Close()
		hr := bufio.NewReader(held)
		talk := func() string {
			_ = held.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := held.Write([]byte("hi\n")); err != nil {
				t.Fatalf("held connection write: %v", err)
			}
			line, err := hr.ReadString('\n')
			if err != nil {
				t.Fatalf("held connection read: %v", err)
			}
			return strings.Fields(line)[0]
		}
		victim := talk()
		idx := glab.PodIndex(victim)
		without := service("web", vip, model.TCP, 3, func(sp *model.ServicePort) {
			sp.Endpoints = append(sp.Endpoints[:idx:idx], sp.Endpoints[idx+1:]...)
		})
		l.sync(snap(without), false)
		gone := netip.AddrPortFrom(netip.MustParseAddr(glab.PodIP(idx)), glab.PodPort)
		if w, ok := l.realServers(t, vip, model.TCP, 80)[gone]; !ok || w != 0 {
			t.Fatalf("%s with an open connection must stay at weight 0, real servers: %v", gone, l.realServers(t, vip, model.TCP, 80))
		}
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 20); got[victim] != 0 || len(got) != 2 {
			t.Fatalf("new connections reached the draining %s: %v", victim, got)
		}
		if again := talk(); again != victim {
			t.Fatalf("held connection moved from %s to %s", victim, again)
		}
		// Reset instead of FIN so IPVS forgets the connection after its
		// short CLOSE timeout rather than TIME_WAIT's two minutes.
		if tc, ok := held.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		held.Close()
		deadline := time.Now().Add(90 * time.Second)
		for {
			l.sync(snap(without), false)
			if _, ok := l.realServers(t, vip, model.TCP, 80)[gone]; !ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still present after its connection ended: %v", gone, l.realServers(t, vip, model.TCP, 80))
			}
			time.Sleep(500 * time.Millisecond)
		}
		if len(l.be.Draining()) != 0 {
			t.Fatalf("drain bookkeeping left: %v", l.be.Draining())
		}
	})
	t.Run("NodePort", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) { sp.NodePort = 30080 })), true)
		for i := 0; i < 30; i++ {
			r, err := glab.Ask(l.Client, "tcp", glab.ClientIP(1), glab.NodeIP+":30080")
			if err != nil {
				t.Fatalf("nodeport request %d: %v", i, err)
			}
			if host := r.PeerHost(); host != glab.PodGW(glab.PodIndex(r.Pod)) {
				t.Fatalf("NodePort (Cluster policy) must masquerade: %s saw %s", r.Pod, r.Peer)
			}
		}
		if got := l.Count("tcp", glab.ClientIP(1), glab.NodeIP+":30080", 30); len(got) != 3 {
			t.Fatalf("nodeport reached %v", got)
		}
	})
	t.Run("ServiceAddressOnlyServicePorts", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		l.Serve(l.Node, "node", 81) // a node-local socket on every address
		l.sync(snap(service("web", vip, model.TCP, 3)), true)
		if r, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), glab.NodeIP+":81"); err != nil || r.Pod != "node" {
			t.Fatalf("node's own port 81 must stay reachable on its own address: %v %v", r, err)
		}
		_, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), vip+":81")
		if err == nil || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("a non-service port on a service address must be rejected, got %v", err)
		}
	})
	t.Run("LoadBalancerSourceRanges", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		lb := "198.51.100.9"
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) {
			sp.LoadBalancerIPs = []netip.Addr{netip.MustParseAddr(lb)}
			sp.LoadBalancerSourceRanges = []netip.Prefix{netip.MustParsePrefix(glab.ClientIP(0) + "/32")}
		})), true)
		if got := l.Count("tcp", glab.ClientIP(0), lb+":80", 6); len(got) == 0 {
			t.Fatalf("allowed source got nothing")
		}
		if _, err := glab.Ask(l.Client, "tcp", glab.ClientIP(1), lb+":80"); err == nil {
			t.Fatalf("source %s outside loadBalancerSourceRanges reached the load balancer", glab.ClientIP(1))
		}
		if _, err := glab.Ask(l.Client, "tcp", glab.ClientIP(1), vipPort); err != nil {
			t.Fatalf("source ranges must not apply to the cluster IP: %v", err)
		}
	})
	t.Run("LoadBalancerSourceRangesNoneValid", func(t *testing.T) {
		// The Service lists source ranges, none readable: nobody may reach
		// the LB IP (an empty list would let everybody in).
		l := newLab(t, 3, Options{})
		lb := "198.51.100.9"
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) {
			sp.LoadBalancerIPs = []netip.Addr{netip.MustParseAddr(lb)}
			sp.LoadBalancerSourceRangesInvalid = true
		})), true)
		if _, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), vipPort); err != nil {
			t.Fatalf("the cluster IP must still answer: %v", err)
		}
		for i := 0; i < 2; i++ {
			if _, err := glab.Ask(l.Client, "tcp", glab.ClientIP(i), lb+":80"); err == nil {
				t.Fatalf("source %s reached a load balancer whose source ranges are all unreadable", glab.ClientIP(i))
			}
		}
	})
	t.Run("DriftRepair", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		foreign := l.addForeign(t)
		s := snap(service("web", vip, model.TCP, 3))
		l.sync(s, true)
		h := l.ipvsHandle(t)
		glab.Must(t, h.DelService(ipvsService(Key{netip.MustParseAddr(vip), model.TCP, 80}, nil)), "delete virtual server by hand")
		nh, err := netlink.NewHandleAt(l.Node, unix.NETLINK_ROUTE)
		glab.Must(t, err, "netlink")
		defer nh.Close()
		link, err := nh.LinkByName(DefaultInterface)
		glab.Must(t, err, "kube-ipvs0")
		glab.Must(t, nh.AddrDel(link, hostAddr(netip.MustParseAddr(vip))), "unbind VIP by hand")
		c := l.nftConn(t)
		c.DelTable(&nftables.Table{Name: TableName, Family: nftables.TableFamilyINet})
		glab.Must(t, c.Flush(), "delete table by hand")
		l.sync(s, true)
		if got := l.Count("tcp", glab.ClientIP(0), vipPort, 30); len(got) != 3 {
			t.Fatalf("after full sync, want all 3 endpoints, got %v", got)
		}
		if r, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), vip+":81"); err == nil {
			t.Fatalf("filter table not restored: port 81 answered %v", r)
		}
		if !h.IsServicePresent(foreign) {
			t.Fatalf("someone else's virtual server was removed")
		}
	})
	t.Run("RestartReconcileAndCleanup", func(t *testing.T) {
		l := newLab(t, 3, Options{})
		foreign := l.addForeign(t)
		l.sync(snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) { sp.NodePort = 30080 })), true)
		// A new process (fresh backend) whose snapshot no longer has the
		// service must remove its virtual servers, including the NodePort
		// ones on node addresses it knows only from the nftables record.
		be2, err := New(l.cfg, Options{})
		glab.Must(t, err, "second backend")
		defer be2.Close()
		if _, err := be2.Sync(context.Background(), snap(service("other", "10.96.0.20", model.TCP, 1)), true); err != nil {
			t.Fatal(err)
		}
		h := l.ipvsHandle(t)
		svcs, err := h.GetServices()
		glab.Must(t, err, "list")
		var keys []string
		for _, s := range svcs {
			k, _ := keyOf(s)
			keys = append(keys, k.String())
		}
		if strings.Join(keys, " ") != "10.96.0.20:80/TCP 192.168.50.1:9999/TCP" && strings.Join(keys, " ") != "192.168.50.1:9999/TCP 10.96.0.20:80/TCP" {
			t.Fatalf("after restart reconcile, virtual servers: %v", keys)
		}
		glab.Must(t, be2.Cleanup(context.Background()), "cleanup")
		svcs, _ = h.GetServices()
		if len(svcs) != 1 || !h.IsServicePresent(foreign) {
			t.Fatalf("cleanup must leave exactly the foreign virtual server, left %d", len(svcs))
		}
		nh, _ := netlink.NewHandleAt(l.Node, unix.NETLINK_ROUTE)
		defer nh.Close()
		if _, err := nh.LinkByName(DefaultInterface); err == nil {
			t.Fatalf("cleanup left %s", DefaultInterface)
		}
		tables, _ := l.nftConn(t).ListTablesOfFamily(nftables.TableFamilyINet)
		for _, tb := range tables {
			if tb.Name == TableName {
				t.Fatalf("cleanup left table %s", TableName)
			}
		}
	})
	t.Run("CrashBetweenCreateAndRecord", testCrashBetweenCreateAndRecord)
	t.Run("ForeignVirtualServersSurvive", testForeignVirtualServersSurvive)
	t.Run("SIGKILLDuringLargeSync", testSIGKILLDuringLargeSync)
	t.Run("StrictARPOnlyInNodeNamespace", func(t *testing.T) {
		before, _ := os.ReadFile("/proc/sys/net/ipv4/conf/all/arp_ignore")
		l := newLab(t, 1, Options{StrictARP: true})
		l.sync(snap(service("web", vip, model.TCP, 1)), true)
		var ign, ann []byte
		glab.Must(t, glab.In(l.Node, func() error {
			var err error
			if ign, err = os.ReadFile("/proc/sys/net/ipv4/conf/all/arp_ignore"); err != nil {
				return err
			}
			ann, err = os.ReadFile("/proc/sys/net/ipv4/conf/all/arp_announce")
			return err
		}), "read node sysctls")
		if strings.TrimSpace(string(ign)) != "1" || strings.TrimSpace(string(ann)) != "2" {
			t.Fatalf("node namespace arp_ignore=%q arp_announce=%q, want 1 and 2", ign, ann)
		}
		after, _ := os.ReadFile("/proc/sys/net/ipv4/conf/all/arp_ignore")
		if string(before) != string(after) {
			t.Fatalf("the test's own namespace changed: arp_ignore %q -> %q", before, after)
		}
	})
}

func (l *lab) ipvsHandle(t *testing.T) *mobyipvs.Handle {
	h, err := mobyipvs.New(glab.NSPath(l.Node))
	glab.Must(t, err, "ipvs handle")
	t.Cleanup(h.Close)
	return h
}

func (l *lab) nftConn(t *testing.T) *nftables.Conn {
	c, err := nftables.New(nftables.WithNetNSFd(int(l.Node)))
	glab.Must(t, err, "nftables")
	return c
}

// addForeign creates a virtual server miniproxy does not own, on the node's
// address (as keepalived might), which no sync or cleanup may remove.
func (l *lab) addForeign(t *testing.T) *mobyipvs.Service {
	s := &mobyipvs.Service{Address: net.ParseIP(glab.NodeIP).To4(), Protocol: unix.IPPROTO_TCP, Port: 9999,
		AddressFamily: unix.AF_INET, SchedName: "rr", Netmask: 0xffffffff}
	glab.Must(t, l.ipvsHandle(t).NewService(s), "foreign virtual server")
	return s
}

// realServers returns the kernel's real servers of a virtual server and their weights.
func (l *lab) realServers(t *testing.T, ip string, p model.Protocol, port uint16) map[netip.AddrPort]int {
	t.Helper()
	ds, err := l.be.ipvs.GetDestinations(ipvsService(Key{netip.MustParseAddr(ip), p, port}, nil))
	glab.Must(t, err, "list real servers")
	out := map[netip.AddrPort]int{}
	for _, d := range ds {
		a, _ := netip.AddrFromSlice(d.Address)
		out[netip.AddrPortFrom(a.Unmap(), d.Port)] = d.Weight
	}
	return out
}
