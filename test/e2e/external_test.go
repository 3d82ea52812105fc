package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// extSvc is a Service (created through the API, adjusted by the test before
// creation) with a Deployment of podserver pods behind it.
type extSvc struct {
	ns  string
	svc *corev1.Service
	dep *framework.Deployment
}

// newExtSvc creates a namespace, the Service (framework.ClusterIPService
// changed by mutate) and replicas pods placed round robin over nodes.
func newExtSvc(t *testing.T, ctx context.Context, me *framework.ModeEnv, name string, replicas int, nodes []*framework.Node, mutate func(*corev1.Service)) *extSvc {
	t.Helper()
	c := me.Cluster
	ns, err := c.NewNamespace(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	svc := framework.ClusterIPService(ns, name)
	if mutate != nil {
		mutate(svc)
	}
	svc, err = c.CreateService(ctx, svc)
	if err != nil {
		t.Fatal(err)
	}
	dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name, Replicas: replicas, Nodes: nodes})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = dep.Delete()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = c.DeleteService(ctx, ns, name)
	})
	// Registered after the deletion above, so it runs first: the rules are
	// dumped while the Service still exists (ForEachMode's own dump runs
	// after every cleanup of the test).
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, n := range me.Nodes {
			rules, err := n.Rules(ctx, me.Mode)
			t.Logf("--- rules on %s while %s/%s exists (err=%v) ---\n%s", n.Name, ns, name, err, rules)
		}
	})
	return &extSvc{ns: ns, svc: svc, dep: dep}
}

// podsOn returns the names of the Deployment's pods on node.
func (s *extSvc) podsOn(node *framework.Node) []string {
	var out []string
	for _, p := range s.dep.Pods() {
		if p.Node == node {
			out = append(out, p.Name)
		}
	}
	return out
}

func (s *extSvc) pod(name string) *framework.Pod {
	for _, p := range s.dep.Pods() {
		if p.Name == name {
			return p
		}
	}
	return nil
}

func (s *extSvc) nodePort(t *testing.T, port string) int {
	t.Helper()
	np, err := framework.NodePortOf(s.svc, port)
	if err != nil {
		t.Fatal(err)
	}
	return np
}

// extClient returns shared off-cluster client k.
func extClient(t *testing.T, ctx context.Context, c *framework.Cluster, k int) *framework.ExtClient {
	t.Helper()
	x, err := c.External(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// extRoute routes dst via the node in the client's namespace for the rest of
// the test.
func extRoute(t *testing.T, ctx context.Context, x *framework.ExtClient, dst netip.Addr, via *framework.Node) {
	t.Helper()
	undo, err := x.Route(ctx, netip.PrefixFrom(dst, dst.BitLen()), via.IP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = undo() })
}

// extWaitExactly polls until n connections from ns to addr are answered by
// exactly the endpoints in want, with no failure, bounded by timeout.
func extWaitExactly(ctx context.Context, ns *framework.NetNS, addr string, want []string, timeout time.Duration) (framework.Counts, error) {
	want = slices.Sorted(slices.Values(want))
	n := 20 + 12*len(want)
	var last framework.Counts
	err := framework.WaitFor(ctx, timeout, 200*time.Millisecond, func() (bool, error) {
		var err error
		last, err = framework.TCPCountsFrom(ctx, ns, addr, n)
		if err != nil {
			return false, err
		}
		return last.Errors == 0 && slices.Equal(last.Names(), want), nil
	})
	return last, err
}

// extWaitOutcome polls single probes until one has outcome want.
func extWaitOutcome(ctx context.Context, ns *framework.NetNS, addr string, want framework.ProbeOutcome, probeTimeout, timeout time.Duration) (framework.ProbeResult, error) {
	var last framework.ProbeResult
	err := framework.WaitFor(ctx, timeout, 200*time.Millisecond, func() (bool, error) {
		last = framework.Probe(ctx, ns, addr, probeTimeout)
		return last.Outcome == want, nil
	})
	return last, err
}

// extExpectAll probes several times and requires outcome want every time:
// one drop could be a lost packet, a rule that drops drops them all.
func extExpectAll(t *testing.T, ctx context.Context, ns *framework.NetNS, addr string, want framework.ProbeOutcome, probeTimeout time.Duration, what string) {
	t.Helper()
	for i := 0; i < 3; i++ {
		if r := framework.Probe(ctx, ns, addr, probeTimeout); r.Outcome != want {
			t.Fatalf("%s: probe %d to %s from %s: got %v, want %s", what, i, addr, ns.Name, r, want)
		}
	}
}

// extRulesMention polls until the node's rules do (or do not) mention s.
func extRulesMention(ctx context.Context, n *framework.Node, mode, s string, want bool, timeout time.Duration) (string, error) {
	var rules string
	err := framework.WaitFor(ctx, timeout, 250*time.Millisecond, func() (bool, error) {
		var err error
		rules, err = n.Rules(ctx, mode)
		return err == nil && strings.Contains(rules, s) == want, err
	})
	return rules, err
}

// extUpstreamName is what "the rest of the network" answers with.
const extUpstreamName = "upstream-network"

// extUpstream makes shared off-cluster client 9 the real owner of addr (like
// the load balancer itself, or whatever a node's default route leads to),
// answering TCP on the Service port with extUpstreamName, and routes addr
// to it from each of nodes. A connection to addr that no proxy rule
// captures is then answered by the upstream instead of failing in a way that
// depends on ICMP rate limits, so "untouched", "dropped" and "proxied" are
// three distinct, deterministic results.
func extUpstream(t *testing.T, ctx context.Context, c *framework.Cluster, addr netip.Addr, nodes ...*framework.Node) {
	t.Helper()
	up := extClient(t, ctx, c, 9)
	undoAddr, err := up.Own(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = undoAddr() })
	stop, err := up.ServeName(framework.SvcPort, extUpstreamName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stop() })
	for _, n := range nodes {
		undo, err := framework.RouteIn(ctx, n.NS, netip.PrefixFrom(addr, addr.BitLen()), up.IP)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = undo() })
	}
}

func extHostPort(a netip.Addr, port int) string {
	return netip.AddrPortFrom(a, uint16(port)).String()
}

// extTestIP gives each mode its own external/LB address, so a conntrack entry
// or route left by one mode's test can never satisfy another's.
func extTestIP(mode string, base netip.Addr, slot int) netip.Addr {
	off := map[string]int{"iptables": 0, "nftables": 20, "ipvs": 40}[mode]
	a := base.As4()
	a[3] += byte(off + slot)
	return netip.AddrFrom4(a)
}

func extRand() string {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// TestNodePort: a NodePort answers on every node's address from an
// off-cluster client and from a pod on another node, and every endpoint
// (on either node) is reached.
func TestNodePort(t *testing.T) {
	suite.ForEachMode(t, "NodePort on every node address from outside", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		s := newExtSvc(t, ctx, me, "np", 3, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		np := s.nodePort(t, "tcp")
		x := extClient(t, ctx, c, 0)
		want := s.dep.PodNames()
		for _, n := range me.Nodes {
			addr := extHostPort(n.IP, np)
			row.Note("off-cluster client → " + addr)
			got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("NodePort %s (node %s) from off-cluster %s: want exactly %v, last probe %v: %v", addr, n.Name, x.IP, want, got, err)
			}
			t.Logf("NodePort %s from off-cluster %s: %v", addr, x.IP, got)
		}
		// A pod on node 1 reaching node 0's NodePort: the packet crosses
		// node 1 untouched and is translated on node 0.
		client, err := me.Nodes[1].NewPod(ctx, "np-client")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = client.Delete() })
		addr := extHostPort(me.Nodes[0].IP, np)
		row.Note("pod on " + me.Nodes[1].Name + " → " + addr)
		got, err := extWaitExactly(ctx, client.NS, addr, want, 60*time.Second)
		if err != nil {
			t.Fatalf("NodePort %s from pod %s on %s: want exactly %v, last probe %v: %v", addr, client.Name, client.Node.Name, want, got, err)
		}
		t.Logf("NodePort %s from pod on %s: %v", addr, me.Nodes[1].Name, got)
		row.Note("")
	})
}

// TestNodePortAddresses: with --nodeport-addresses set to the underlay CIDR,
// or to "primary" (the Node object's InternalIP), a node serves NodePorts on
// its underlay address but not on its pod-bridge address; a node with the
// default flags serves both (so the negative check could fail).
func TestNodePortAddresses(t *testing.T) {
	suite.ForEachMode(t, "NodePort only on --nodeport-addresses (CIDR, primary)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		s := newExtSvc(t, ctx, me, "npa", 2, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		np := s.nodePort(t, "tcp")
		x := extClient(t, ctx, c, 0)
		want := s.dep.PodNames()

		ref := me.Nodes[0]
		extRoute(t, ctx, x, ref.BridgeIP(), ref)
		row.Note("control: default-flag node serves its bridge address")
		refAddr := extHostPort(ref.BridgeIP(), np)
		if got, err := extWaitExactly(ctx, x.NS, refAddr, want, 60*time.Second); err != nil {
			t.Fatalf("control: NodePort %s on %s's pod bridge (default nodeport addresses = all): want exactly %v, last %v: %v", refAddr, ref.Name, want, got, err)
		}

		for _, flag := range []string{framework.UnderlayPrefix, "primary"} {
			row.Note("starting a node with --nodeport-addresses " + flag)
			nodes, err := c.AddNodes(ctx, fmt.Sprintf("%s-npa-%s", me.Mode[:3], extRand()), 1)
			if err != nil {
				t.Fatal(err)
			}
			node := nodes[0]
			p, err := c.StartProxy(ctx, node, framework.ProxyOptions{Mode: me.Mode, Extra: []string{"--nodeport-addresses", flag}})
			if p != nil {
				t.Cleanup(func() { _ = p.Stop() })
				t.Cleanup(func() {
					if t.Failed() {
						t.Logf("--- miniproxy on %s (--nodeport-addresses %s) ---\n%s", node.Name, flag, p.Logs())
						rules, err := node.Rules(context.Background(), me.Mode)
						t.Logf("--- rules on %s (err=%v) ---\n%s", node.Name, err, rules)
					}
				})
			}
			if err != nil {
				t.Fatal(err)
			}
			extRoute(t, ctx, x, node.BridgeIP(), node)

			row.Note(fmt.Sprintf("--nodeport-addresses %s: underlay address of %s", flag, node.Name))
			addr := extHostPort(node.IP, np)
			if got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second); err != nil {
				t.Fatalf("NodePort %s on %s (selected by --nodeport-addresses %s): want exactly %v, last %v: %v", addr, node.Name, flag, want, got, err)
			}
			row.Note(fmt.Sprintf("--nodeport-addresses %s: excluded address must not answer", flag))
			// The underlay address already works, so the rules are in
			// place; the bridge address is local to the node and nothing
			// listens on the NodePort, so the kernel refuses it.
			excluded := extHostPort(node.BridgeIP(), np)
			extExpectAll(t, ctx, x.NS, excluded, framework.Rejected, 2*time.Second,
				fmt.Sprintf("NodePort on %s (not selected by --nodeport-addresses %s)", excluded, flag))
			t.Logf("--nodeport-addresses %s on %s: %s answers, %s refused", flag, node.Name, addr, excluded)
			_ = p.Stop()
		}
		row.Note("")
	})
}

// TestNodePortLocalhost: in iptables mode a NodePort answers on 127.0.0.1
// from the node itself, with kube-proxy's guard (route_localnet inside the
// node namespace and the martian drop in miniproxy's MINIPROXY-LOCALNET,
// CVE-2020-8558; kubelet's KUBE-FIREWALL is not miniproxy's).
// nftables mode has no localhost NodePorts, like kube-proxy's nftables mode.
func TestNodePortLocalhost(t *testing.T) {
	suite.ForEachMode(t, "NodePort on 127.0.0.1 from the node (route_localnet guard)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		s := newExtSvc(t, ctx, me, "nplo", 2, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		np := s.nodePort(t, "tcp")
		node := me.Nodes[0]
		lo := extHostPort(netip.MustParseAddr("127.0.0.1"), np)
		want := s.dep.PodNames()
		if me.Mode != "iptables" {
			// Prove the documented difference holds before recording it: the
			// NodePort works on the node address, not on loopback.
			if got, err := extWaitExactly(ctx, node.NS, extHostPort(node.IP, np), want, 60*time.Second); err != nil {
				t.Fatalf("NodePort on %s from the node: want %v, last %v: %v", node.IP, want, got, err)
			}
			extExpectAll(t, ctx, node.NS, lo, framework.Rejected, 2*time.Second, "NodePort on 127.0.0.1 in "+me.Mode+" mode")
			row.Skip(me.Mode + " mode serves no NodePorts on 127.0.0.1 (as kube-proxy's nftables mode; needs route_localnet, which only iptables mode sets); verified: loopback refuses, node address answers")
		}
		row.Note("127.0.0.1:NodePort from the node")
		got, err := extWaitExactly(ctx, node.NS, lo, want, 60*time.Second)
		if err != nil {
			t.Fatalf("NodePort %s from node %s: want exactly %v, last %v: %v", lo, node.Name, want, got, err)
		}
		t.Logf("NodePort %s from node %s: %v", lo, node.Name, got)

		row.Note("route_localnet inside the node namespace")
		if v, err := framework.Sysctl(ctx, node.NS, "net.ipv4.conf.all.route_localnet"); err != nil || v != "1" {
			t.Errorf("node %s: net.ipv4.conf.all.route_localnet = %q (err %v), want 1", node.Name, v, err)
		}
		row.Note("martian guard rule")
		rules, err := node.Rules(ctx, me.Mode)
		if err != nil {
			t.Fatal(err)
		}
		var guard, hook bool
		for _, l := range strings.Split(rules, "\n") {
			if strings.HasPrefix(l, "-A MINIPROXY-LOCALNET ") && strings.Contains(l, "-d 127.0.0.0/8") && strings.Contains(l, "! -s 127.0.0.0/8") &&
				strings.Contains(l, "! --ctstate RELATED,ESTABLISHED,DNAT") && strings.HasSuffix(strings.TrimSpace(l), "-j DROP") {
				guard = true
			}
			if strings.HasPrefix(l, "-A INPUT ") && strings.HasSuffix(strings.TrimSpace(l), "-j MINIPROXY-LOCALNET") {
				hook = true
			}
		}
		if !guard || !hook {
			t.Errorf("node %s: martian guard missing (MINIPROXY-LOCALNET drop of 127/8 from non-loopback sources: %v; INPUT → MINIPROXY-LOCALNET: %v)", node.Name, guard, hook)
		}
		row.Note("")
	})
}

// TestExternalIPs: spec.externalIPs answer on a node that the address is
// routed to, from an off-cluster client, on every node.
func TestExternalIPs(t *testing.T) {
	suite.ForEachMode(t, "externalIPs", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		eip := extTestIP(me.Mode, netip.MustParseAddr("192.0.2.10"), 0)
		s := newExtSvc(t, ctx, me, "eip", 3, me.Nodes, func(svc *corev1.Service) { svc.Spec.ExternalIPs = []string{eip.String()} })
		x := extClient(t, ctx, c, 0)
		want := s.dep.PodNames()
		addr := extHostPort(eip, framework.SvcPort)
		for _, n := range me.Nodes {
			extRoute(t, ctx, x, eip, n)
			row.Note(fmt.Sprintf("%s routed via %s", addr, n.Name))
			got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("externalIP %s via %s from %s: want exactly %v, last %v: %v", addr, n.Name, x.IP, want, got, err)
			}
			t.Logf("externalIP %s via %s: %v", addr, n.Name, got)
		}
		row.Note("")
	})
}

// TestLoadBalancerIngress: status.loadBalancer.ingress[].ip answers (ipMode
// unset = VIP); switching the same IP to ipMode: Proxy removes it from the
// rules and traffic to it is no longer captured.
func TestLoadBalancerIngress(t *testing.T) {
	suite.ForEachMode(t, "LoadBalancer ingress IP, ipMode: Proxy not captured", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		lbIP := extTestIP(me.Mode, netip.MustParseAddr("198.51.100.10"), 0)
		s := newExtSvc(t, ctx, me, "lb", 2, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeLoadBalancer })
		extUpstream(t, ctx, c, lbIP, me.Nodes...)
		if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, nil, lbIP); err != nil {
			t.Fatal(err)
		}
		x := extClient(t, ctx, c, 0)
		want := s.dep.PodNames()
		addr := extHostPort(lbIP, framework.SvcPort)
		for _, n := range me.Nodes {
			extRoute(t, ctx, x, lbIP, n)
			row.Note(fmt.Sprintf("LB IP %s via %s", addr, n.Name))
			got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("LB IP %s via %s from %s: want exactly %v, last %v: %v", addr, n.Name, x.IP, want, got, err)
			}
			t.Logf("LB IP %s via %s: %v", addr, n.Name, got)
		}

		row.Note("ipMode: Proxy")
		proxyMode := corev1.LoadBalancerIPModeProxy
		if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, &proxyMode, lbIP); err != nil {
			t.Fatal(err)
		}
		for _, n := range me.Nodes {
			if rules, err := extRulesMention(ctx, n, me.Mode, lbIP.String(), false, 60*time.Second); err != nil {
				t.Fatalf("node %s still has rules for LB IP %s after ipMode: Proxy: %v\n%s", n.Name, lbIP, err, rules)
			}
		}
		// The client's route still points at the last node, which routes the
		// IP on to its real owner: uncaptured traffic must arrive there.
		last := me.Nodes[len(me.Nodes)-1]
		if got, err := extWaitExactly(ctx, x.NS, addr, []string{extUpstreamName}, 30*time.Second); err != nil {
			t.Fatalf("LB IP %s with ipMode: Proxy via %s: want every connection to reach the real load balancer (%s) untouched, last %v: %v", addr, last.Name, extUpstreamName, got, err)
		}
		row.Note("")
	})
}

// TestLoadBalancerSourceRanges: with loadBalancerSourceRanges, an allowed
// client reaches the LB IP and a disallowed one is dropped (no answer, not a
// reject); the disallowed client still reaches the NodePort, which source
// ranges do not cover.
func TestLoadBalancerSourceRanges(t *testing.T) {
	suite.ForEachMode(t, "loadBalancerSourceRanges allow + deny", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		allowed, denied := extClient(t, ctx, c, 0), extClient(t, ctx, c, 1)
		lbIP := extTestIP(me.Mode, netip.MustParseAddr("198.51.100.10"), 1)
		s := newExtSvc(t, ctx, me, "lbsr", 2, me.Nodes, func(svc *corev1.Service) {
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.LoadBalancerSourceRanges = []string{netip.PrefixFrom(allowed.IP, 32).String()}
		})
		if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, nil, lbIP); err != nil {
			t.Fatal(err)
		}
		want := s.dep.PodNames()
		addr := extHostPort(lbIP, framework.SvcPort)
		node := me.Nodes[0]
		// Without a drop, the denied client's packets would go on to the
		// LB IP's owner and be answered by it.
		extUpstream(t, ctx, c, lbIP, node)
		extRoute(t, ctx, allowed, lbIP, node)
		extRoute(t, ctx, denied, lbIP, node)

		row.Note("allowed source " + allowed.IP.String())
		got, err := extWaitExactly(ctx, allowed.NS, addr, want, 60*time.Second)
		if err != nil {
			t.Fatalf("LB IP %s from allowed %s: want exactly %v, last %v: %v", addr, allowed.IP, want, got, err)
		}
		t.Logf("allowed %s → %s: %v", allowed.IP, addr, got)

		row.Note("disallowed source " + denied.IP.String())
		extExpectAll(t, ctx, denied.NS, addr, framework.Dropped, 1500*time.Millisecond,
			fmt.Sprintf("LB IP %s from %s (outside loadBalancerSourceRanges %v)", addr, denied.IP, s.svc.Spec.LoadBalancerSourceRanges))

		row.Note("disallowed source on the NodePort")
		npAddr := extHostPort(node.IP, s.nodePort(t, "tcp"))
		if got, err := extWaitExactly(ctx, denied.NS, npAddr, want, 60*time.Second); err != nil {
			t.Fatalf("NodePort %s from %s (source ranges apply to the LB IP only): want exactly %v, last %v: %v", npAddr, denied.IP, want, got, err)
		}
		row.Note("")
	})
}
