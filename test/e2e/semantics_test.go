package e2e

// Service semantics beyond plain ClusterIP, each a matrix feature run in every
// enabled mode through the real apiserver: session affinity, terminating
// endpoints, topology (PreferClose), services without endpoints, masquerade
// and hairpin (ClusterCIDR and NodeCIDR local detection), dual-stack, SCTP.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

func ptr[T any](v T) *T { return &v }

// shortID makes names of nodes added by a test unique within one run (a
// test may run more than once with -count).
func shortID() string {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// modePrefix is the short node-name prefix of a mode.
func modePrefix(mode string) string {
	switch mode {
	case "iptables":
		return "ipt"
	case "nftables":
		return "nft"
	}
	return mode
}

// extraNode adds a node whose miniproxy runs with extra flags, stops that
// proxy when t ends, and dumps its log and the node's rules if t failed
// (ModeEnv.DumpOnFailure only knows the shared nodes).
func extraNode(t *testing.T, ctx context.Context, me *framework.ModeEnv, what string, extra ...string) (*framework.Node, *framework.Proxy) {
	t.Helper()
	node, p, err := me.Cluster.AddProxyNode(ctx, modePrefix(me.Mode)+"-"+what+"-"+shortID(), me.Mode, extra...)
	if p != nil {
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- miniproxy %s on %s (%v) ---\n%s", me.Mode, node.Name, p.Args, p.Logs())
				rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				rules, rerr := node.Rules(rctx, me.Mode)
				t.Logf("--- rules on %s (err=%v) ---\n%s", node.Name, rerr, rules)
			}
			_ = p.Stop()
		})
	}
	if err != nil {
		t.Fatalf("extra node with %v: %v", extra, err)
	}
	return node, p
}

// newClient creates a client pod on node, deleted when t ends.
func newClient(t *testing.T, ctx context.Context, node *framework.Node, name string) *framework.Pod {
	t.Helper()
	p, err := node.NewPod(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Delete() })
	return p
}

// waitAnswers polls until one TCP connection from ns to addr is answered and
// returns the answer.
func waitAnswers(t *testing.T, ctx context.Context, ns *framework.NetNS, addr string, timeout time.Duration) string {
	t.Helper()
	var answer string
	var last error
	err := framework.WaitFor(ctx, timeout, 200*time.Millisecond, func() (bool, error) {
		answer, last = framework.AskFrom(ctx, ns, addr, 700*time.Millisecond)
		return last == nil, nil
	})
	if err != nil {
		t.Fatalf("%s never answered from netns %s: %v (last: %v)", addr, ns.Name, err, last)
	}
	return answer
}

// TestAffinity: sessionAffinity ClientIP with a short timeout. 20
// connections in a row from one client stick to one endpoint (without
// affinity, 3 endpoints would all land on one with probability
// 3·(1/3)^20 ≈ 1e-9). After the timeout a new connection is a fresh uniform
// choice among 3 endpoints, so over up to 10 expiry rounds the chance that
// every round picks the first endpoint again is (1/3)^10 ≈ 1.7e-5 — the
// false-failure bound of the "may move" assertion.
func TestAffinity(t *testing.T) {
	const timeout = 4 // seconds; short so expiry rounds are cheap
	suite.ForEachMode(t, "sessionAffinity ClientIP + timeoutSeconds", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "aff")
		if err != nil {
			t.Fatal(err)
		}
		spec := framework.ClusterIPService(ns, "aff")
		spec.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		spec.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(timeout))}}
		svc, err := c.CreateService(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "aff", Replicas: 3, Nodes: me.Nodes})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = dep.Delete() })
		client := newClient(t, ctx, me.Nodes[0], "aff-client")
		addr := framework.VIP(svc, "tcp")
		row.Note("waiting for " + addr + " to answer")
		waitAnswers(t, ctx, client.NS, addr, 60*time.Second)

		row.Note("stickiness")
		got, err := client.TCPCounts(ctx, addr, 20)
		if err != nil {
			t.Fatal(err)
		}
		if got.Errors != 0 || len(got.Names()) != 1 {
			t.Fatalf("20 connections with ClientIP affinity: want all on one endpoint, got %v", got)
		}
		first := got.Names()[0]
		t.Logf("sticky: %v", got)

		row.Note("expiry")
		seen := []string{first}
		for round := 0; round < 10 && len(seen) < 2; round++ {
			// The client must stay idle longer than timeoutSeconds for
			// the affinity entry to expire; this wait is the feature
			// under test, not synchronization.
			time.Sleep(time.Duration(timeout)*time.Second + 1500*time.Millisecond)
			name, err := framework.AskFrom(ctx, client.NS, addr, 2*time.Second)
			if err != nil {
				t.Fatalf("round %d after expiry: %v", round, err)
			}
			t.Logf("round %d after %ds idle: %s", round, timeout, name)
			if !slices.Contains(seen, name) {
				seen = append(seen, name)
			}
		}
		if len(seen) < 2 {
			t.Fatalf("after 10 expiries of a %ds affinity every new connection still went to %s (p≈1.7e-5 if expiry worked)", timeout, first)
		}
		row.Note("")
	})
}

// TestTerminating: EndpointSlice conditions decide which endpoints serve.
// Mixed ready + terminating → only the ready one; all terminating (ready
// false, serving true) → all of them (kube-proxy's fallback); a terminating
// endpoint that is not serving is never used.
func TestTerminating(t *testing.T) {
	suite.ForEachMode(t, "terminating endpoints (fallback, mixed → ready only)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "term", 3)
		addr := framework.VIP(f.svc, "tcp")
		pods := f.dep.Pods()
		publish := func(conds ...[3]bool) {
			t.Helper()
			var eps []framework.SliceEndpoint
			for i, p := range pods {
				eps = append(eps, framework.SliceEndpoint{IP: p.IP, Node: p.Node, Ready: conds[i][0], Serving: conds[i][1], Terminating: conds[i][2]})
			}
			// Same name as the Deployment's slice, so it replaces it.
			if err := me.Cluster.PublishSlice(ctx, f.ns, f.svc.Name, "e2e", eps, framework.DefaultSlicePorts()); err != nil {
				t.Fatal(err)
			}
		}
		ready, term, gone := [3]bool{true, true, false}, [3]bool{false, true, true}, [3]bool{false, false, true}
		steps := []struct {
			what  string
			conds [][3]bool
			want  []string
		}{
			{"mixed: 1 ready + 2 terminating → ready only", [][3]bool{ready, term, term}, []string{pods[0].Name}},
			{"all terminating+serving → all (fallback)", [][3]bool{term, term, term}, []string{pods[0].Name, pods[1].Name, pods[2].Name}},
			{"all terminating, one not serving → the serving ones", [][3]bool{term, term, gone}, []string{pods[0].Name, pods[1].Name}},
		}
		for _, s := range steps {
			row.Note(s.what)
			publish(s.conds...)
			for _, cl := range f.clients {
				got, err := waitExactly(ctx, "tcp", cl, addr, s.want, 60*time.Second)
				if err != nil {
					t.Fatalf("%s, from %s: want exactly %v, last %v: %v", s.what, cl.Name, s.want, got, err)
				}
				t.Logf("%s, from %s: %v", s.what, cl.Name, got)
			}
		}
		row.Note("")
	})
}

// TestTopology: trafficDistribution PreferClose with zone hints (written the
// way the EndpointSlice controller does): a client on a node in zone A
// reaches only zone-A endpoints, and likewise for zone B.
func TestTopology(t *testing.T) {
	suite.ForEachMode(t, "topology: trafficDistribution PreferClose / zone hints", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "topo")
		if err != nil {
			t.Fatal(err)
		}
		spec := framework.ClusterIPService(ns, "topo")
		spec.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferClose)
		svc, err := c.CreateService(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "topo", Replicas: 4, Nodes: me.Nodes, PreferClose: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = dep.Delete() })
		zones := map[string]bool{}
		for _, n := range me.Nodes {
			zones[n.Zone] = true
		}
		if len(zones) < 2 {
			row.Skip("the mode's nodes are all in one zone; topology needs two")
		}
		addr := framework.VIP(svc, "tcp")
		for i, n := range me.Nodes {
			client := newClient(t, ctx, n, fmt.Sprintf("topo-client-%d", i))
			var want []string
			for _, p := range dep.Pods() {
				if p.Node.Zone == n.Zone {
					want = append(want, p.Name)
				}
			}
			row.Note("client in " + n.Zone)
			got, err := waitExactly(ctx, "tcp", client, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("client on %s (%s): want only same-zone %v, last %v: %v", n.Name, n.Zone, want, got, err)
			}
			t.Logf("client on %s (%s): %v", n.Name, n.Zone, got)
		}
		row.Note("")
	})
}

// TestNoEndpoints: a Service whose EndpointSlice is empty rejects at once.
// TCP: the connect fails with ECONNREFUSED (an ICMP port-unreachable or a
// RST) within 1 s — the correctness bound: a hanging connect would
// take the SYN retry schedule (1 s, 3 s, …) or the dial timeout. UDP: a
// connected socket gets ECONNREFUSED from the ICMP reject, also within 1 s.
//
// Each protocol uses its own fresh client pod with 5 attempts: the kernel
// rate-limits ICMP errors per destination host (net.ipv4.icmp_ratelimit
// 1000 ms, burst 6), so a seventh ICMP reject to the same client within a
// few seconds is not sent and that client's connect hangs. iptables mode
// rejects TCP with ICMP port-unreachable (as kube-proxy does), nftables mode
// with a TCP RST, which is not rate-limited.
func TestNoEndpoints(t *testing.T) {
	suite.ForEachMode(t, "no endpoints: TCP and UDP rejected within 1 s", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "noep")
		if err != nil {
			t.Fatal(err)
		}
		svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, "noep"))
		if err != nil {
			t.Fatal(err)
		}
		// The EndpointSlice controller publishes an empty slice for a
		// selector that matches nothing.
		if err := c.PublishSlice(ctx, ns, "noep", "e2e", nil, framework.DefaultSlicePorts()); err != nil {
			t.Fatal(err)
		}
		vip := svc.Spec.ClusterIP
		row.Note("waiting for the VIP in the rules")
		err = framework.WaitFor(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
			rules, err := me.Nodes[0].Rules(ctx, me.Mode)
			return err == nil && strings.Contains(rules, vip), nil
		})
		if err != nil {
			t.Fatalf("rules on %s never mention %s: %v", me.Nodes[0].Name, vip, err)
		}
		for _, proto := range []string{"tcp", "udp"} {
			addr := framework.VIP(svc, proto)
			client := newClient(t, ctx, me.Nodes[0], "noep-"+proto)
			row.Note(proto + " warm-up")
			warmUp(t, ctx, client)
			row.Note(proto + " reject")
			for i := 0; i < 5; i++ {
				var (
					took time.Duration
					err  error
				)
				if proto == "tcp" {
					took, err = framework.TimedDial(ctx, client.NS, "tcp", addr, 5*time.Second)
				} else {
					_, took, err = framework.UDPAskConnected(ctx, client.NS, addr, 3*time.Second)
				}
				t.Logf("%s %s attempt %d: %v after %v", proto, addr, i, err, took)
				if err == nil {
					t.Fatalf("%s %s with no endpoints: got an answer", proto, addr)
				}
				if !errors.Is(err, syscall.ECONNREFUSED) {
					t.Fatalf("%s %s with no endpoints: want ECONNREFUSED (reject), got %v after %v (a drop or no rule)", proto, addr, err, took)
				}
				if took >= time.Second {
					t.Fatalf("%s %s with no endpoints: error arrived after %v, want < 1s", proto, addr, took)
				}
			}
		}
		row.Note("")
	})
}

// warmUp waits until the pod reaches its node (miniproxy's healthz port on
// the pod-bridge address). A freshly created pod's first packets can wait
// about 1 s — an ARP retransmit while the new bridge port comes up — which
// would otherwise be charged to the latency a test measures.
func warmUp(t *testing.T, ctx context.Context, p *framework.Pod) {
	t.Helper()
	addr := netip.AddrPortFrom(gateway(p.Node), 10256).String()
	var last error
	err := framework.WaitFor(ctx, 10*time.Second, 100*time.Millisecond, func() (bool, error) {
		_, last = framework.TimedDial(ctx, p.NS, "tcp", addr, time.Second)
		return last == nil, nil
	})
	if err != nil {
		t.Fatalf("pod %s cannot reach its node at %s: %v (last %v)", p.Name, addr, err, last)
	}
}

// masqCase is one connection to a VIP and the client address the server must
// see.
type masqCase struct {
	what string
	from *framework.NetNS
	want netip.Addr
}

// runMasq creates Service <name> (tcp 80→8080) whose one endpoint is a
// PeerServer pod on srvNode, then checks each case's observed source.
func runMasq(t *testing.T, ctx context.Context, me *framework.ModeEnv, row *framework.Row, name string, srvNode *framework.Node, cases func(srv *framework.Pod) []masqCase) {
	t.Helper()
	c := me.Cluster
	ns, err := c.NewNamespace(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	spec := framework.ClusterIPService(ns, name)
	spec.Spec.Ports = []corev1.ServicePort{{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: framework.SvcPort, TargetPort: intstr.FromInt32(framework.PodPort)}}
	svc, err := c.CreateService(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	srv := newClient(t, ctx, srvNode, name+"-srv")
	ps, err := srv.ServePeer(framework.PodPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	if err := c.PublishSlice(ctx, ns, name, "e2e", []framework.SliceEndpoint{{IP: srv.IP, Node: srvNode, Ready: true, Serving: true}},
		[]discoveryv1.EndpointPort{framework.SlicePort("tcp", corev1.ProtocolTCP, framework.PodPort)}); err != nil {
		t.Fatal(err)
	}
	addr := framework.VIP(svc, "tcp")
	for _, cs := range cases(srv) {
		row.Note(cs.what)
		got := waitAnswers(t, ctx, cs.from, addr, 60*time.Second)
		// Ask a few times: every connection must show the same source.
		for i := 0; i < 3 && got == cs.want.String(); i++ {
			got, err = framework.AskFrom(ctx, cs.from, addr, 2*time.Second)
			if err != nil {
				t.Fatalf("%s: %v", cs.what, err)
			}
		}
		if !cs.want.IsValid() {
			t.Logf("%s: server saw %s (not asserted)", cs.what, got)
			continue
		}
		if got != cs.want.String() {
			t.Errorf("%s via %s: server saw source %s, want %s", cs.what, addr, got, cs.want)
			continue
		}
		t.Logf("%s via %s: server saw %s", cs.what, addr, got)
	}
}

// gateway is the node's pod-bridge address: what a masqueraded connection
// to a pod on that node comes from.
func gateway(n *framework.Node) netip.Addr { return n.PodCIDR.Addr().Next() }

// TestMasquerade (ClusterCIDR local detection, the framework's default):
// pod → VIP keeps the pod's source, for an endpoint on the same node and on
// another node; a host process on the node → VIP is masqueraded (to a local
// endpoint it then comes from the pod bridge address instead of the node's
// underlay address the route picked); a pod reaching itself through its VIP
// (hairpin) is answered.
func TestMasquerade(t *testing.T) {
	suite.ForEachMode(t, "masquerade (detect-local ClusterCIDR) + hairpin", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		n0, n1 := me.Nodes[0], me.Nodes[1]
		c0 := newClient(t, ctx, n0, "masq-c0")
		c1 := newClient(t, ctx, n1, "masq-c1")
		runMasq(t, ctx, me, row, "masq", n0, func(srv *framework.Pod) []masqCase {
			return []masqCase{
				{"pod on another node → VIP: pod source kept", c1.NS, c1.IP},
				{"pod on the endpoint's node → VIP: pod source kept", c0.NS, c0.IP},
				{"host of the endpoint's node → VIP: masqueraded", n0.NS, gateway(n0)},
				{"host of another node → VIP: node source", n1.NS, n1.IP},
				{"hairpin: endpoint pod → its own VIP answers", srv.NS, netip.Addr{}},
			}
		})
		row.Note("")
	})
}

// TestMasqueradeNodeCIDR: on a node whose miniproxy runs with
// --detect-local-mode NodeCIDR and a --cluster-cidr that does NOT contain
// the pods (so ClusterCIDR detection would call them non-local and
// masquerade them), a local pod → VIP keeps its source, and the node's own
// traffic is masqueraded.
func TestMasqueradeNodeCIDR(t *testing.T) {
	suite.ForEachMode(t, "masquerade (detect-local NodeCIDR)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a NodeCIDR node")
		x, _ := extraNode(t, ctx, me, "nc", "--detect-local-mode", "NodeCIDR", "--cluster-cidr", "10.99.0.0/16")
		cx := newClient(t, ctx, x, "nc-client")
		runMasq(t, ctx, me, row, "masq-nc", x, func(srv *framework.Pod) []masqCase {
			return []masqCase{
				{"pod → VIP on a NodeCIDR node: pod source kept", cx.NS, cx.IP},
				{"host → VIP on a NodeCIDR node: masqueraded", x.NS, gateway(x)},
				{"hairpin on a NodeCIDR node", srv.NS, netip.Addr{}},
			}
		})
		row.Note("")
	})
}

// TestDualStack: on a node with IPv6 (node, bridge and pods get the IPv6
// twin of their address plan) whose miniproxy runs with an IPv4 and an IPv6
// --cluster-cidr, a single-stack IPv6 Service answers over IPv6 (TCP and
// UDP) from both endpoints, and a dual-stack Service answers on both its
// ClusterIPs from the endpoints of the matching family's EndpointSlice.
func TestDualStack(t *testing.T) {
	suite.ForEachMode(t, "dual-stack: IPv6 and dual-stack Services", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a dual-stack node")
		x, _ := extraNode(t, ctx, me, "ds", "--cluster-cidr", framework.ClusterCIDR+","+framework.ClusterCIDRv6)
		if err := x.EnableIPv6(ctx); err != nil {
			t.Fatal(err)
		}
		client := newClient(t, ctx, x, "ds-client")
		if _, err := client.EnableIPv6(ctx); err != nil {
			t.Fatal(err)
		}
		var v4, v6 []framework.SliceEndpoint
		var want []string
		for i := 0; i < 2; i++ {
			p := newClient(t, ctx, x, fmt.Sprintf("ds-%d", i))
			if err := p.Serve(ctx, framework.PodPort, framework.PodHTTPPort); err != nil {
				t.Fatal(err)
			}
			ip6, err := p.EnableIPv6(ctx)
			if err != nil {
				t.Fatal(err)
			}
			v4 = append(v4, framework.SliceEndpoint{IP: p.IP, Node: x, Ready: true, Serving: true})
			v6 = append(v6, framework.SliceEndpoint{IP: ip6, Node: x, Ready: true, Serving: true})
			want = append(want, p.Name)
		}
		var failuresBefore []float64
		for _, p := range me.Proxies {
			failuresBefore = append(failuresBefore, syncFailures(t, ctx, p))
		}
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "ds")
		if err != nil {
			t.Fatal(err)
		}
		only6 := framework.ClusterIPService(ns, "only6")
		only6.Spec.IPFamilyPolicy = ptr(corev1.IPFamilyPolicySingleStack)
		only6.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol}
		dual := framework.ClusterIPService(ns, "dual")
		dual.Spec.IPFamilyPolicy = ptr(corev1.IPFamilyPolicyRequireDualStack)
		dual.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
		var checks []struct{ what, proto, addr string }
		for _, spec := range []*corev1.Service{only6, dual} {
			svc, err := c.CreateService(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("Service %s: clusterIPs %v", svc.Name, svc.Spec.ClusterIPs)
			for _, ip := range svc.Spec.ClusterIPs {
				a := netip.MustParseAddr(ip)
				fam := "IPv4"
				if a.Is6() {
					fam = "IPv6"
				}
				for _, proto := range []string{"tcp", "udp"} {
					checks = append(checks, struct{ what, proto, addr string }{
						svc.Name + " " + fam + " " + proto, proto, netip.AddrPortFrom(a, framework.SvcPort).String()})
				}
			}
			if err := c.PublishSlice(ctx, ns, svc.Name, "v6", v6, framework.DefaultSlicePorts()); err != nil {
				t.Fatal(err)
			}
			if svc.Name == "dual" {
				if err := c.PublishSlice(ctx, ns, svc.Name, "v4", v4, framework.DefaultSlicePorts()); err != nil {
					t.Fatal(err)
				}
			}
		}
		if len(checks) != 6 {
			t.Fatalf("want 3 ClusterIPs (1 single-stack IPv6, 2 dual-stack), got checks %v", checks)
		}
		for _, ch := range checks {
			row.Note(ch.what)
			got, err := waitExactly(ctx, ch.proto, client, ch.addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("%s via %s: want exactly %v, last %v: %v", ch.what, ch.addr, want, got, err)
			}
			t.Logf("%s via %s: %v", ch.what, ch.addr, got)
		}
		// The IPv4-only proxies of the shared nodes saw the IPv6 Services
		// too; they must ignore the other family, not fail to sync.
		for i, p := range me.Proxies {
			if after := syncFailures(t, ctx, p); after != failuresBefore[i] {
				t.Errorf("IPv4-only miniproxy on %s: sync failures %v → %v after IPv6 Services appeared", p.Node.Name, failuresBefore[i], after)
			}
		}
		row.Note("")
	})
}

// syncFailures sums miniproxy_sync_failures_total over its labels.
func syncFailures(t *testing.T, ctx context.Context, p *framework.Proxy) float64 {
	t.Helper()
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for k, v := range m {
		if strings.HasPrefix(k, "miniproxy_sync_failures_total") {
			sum += v
		}
	}
	return sum
}

// TestSCTP: an SCTP Service reaches both endpoints, when the kernel can open
// SCTP sockets at all.
func TestSCTP(t *testing.T) {
	suite.ForEachMode(t, "SCTP Service", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		probe := newClient(t, ctx, me.Nodes[0], "sctp-client")
		if err := framework.SCTPSupported(probe.NS); err != nil {
			row.Skip(err.Error())
		}
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "sctp")
		if err != nil {
			t.Fatal(err)
		}
		spec := framework.ClusterIPService(ns, "sctp")
		spec.Spec.Ports = []corev1.ServicePort{{Name: "sctp", Protocol: corev1.ProtocolSCTP, Port: framework.SvcPort, TargetPort: intstr.FromInt32(framework.PodPort)}}
		svc, err := c.CreateService(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		var eps []framework.SliceEndpoint
		var want []string
		for i, n := range me.Nodes {
			p := newClient(t, ctx, n, fmt.Sprintf("sctp-srv-%d", i))
			s, err := p.ServeSCTP(framework.PodPort, p.Name)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close() })
			eps = append(eps, framework.SliceEndpoint{IP: p.IP, Node: n, Ready: true, Serving: true})
			want = append(want, p.Name)
		}
		if err := c.PublishSlice(ctx, ns, "sctp", "e2e", eps, []discoveryv1.EndpointPort{framework.SlicePort("sctp", corev1.ProtocolSCTP, framework.PodPort)}); err != nil {
			t.Fatal(err)
		}
		vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), framework.SvcPort)
		seen := map[string]int{}
		var last error
		row.Note("waiting for both SCTP endpoints")
		err = framework.WaitFor(ctx, 60*time.Second, 200*time.Millisecond, func() (bool, error) {
			name, err := framework.AskSCTP(probe.NS, vip, time.Second)
			if err != nil {
				last = err
				return false, nil
			}
			if !slices.Contains(want, name) {
				return false, fmt.Errorf("SCTP answer from %q, not an endpoint of %v", name, want)
			}
			seen[name]++
			return len(seen) == len(want), nil
		})
		if err != nil {
			t.Fatalf("SCTP %s: saw %v of %v: %v (last error %v)", vip, seen, want, err, last)
		}
		t.Logf("SCTP %s: %v", vip, seen)
		row.Note("")
	})
}
