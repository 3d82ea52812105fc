package e2e

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

func etpLocal(svc *corev1.Service) {
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
}

// TestExternalTrafficPolicyLocal: NodePort traffic from outside reaches only
// the endpoints on the node it arrived at, and the server sees the real
// client address (no SNAT).
func TestExternalTrafficPolicyLocal(t *testing.T) {
	suite.ForEachMode(t, "externalTrafficPolicy: Local: local endpoints only, client IP kept", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		// 3 pods round robin over 2 nodes: two on node 0, one on node 1.
		s := newExtSvc(t, ctx, me, "etp", 3, me.Nodes, etpLocal)
		np := s.nodePort(t, "tcp")
		x := extClient(t, ctx, c, 0)
		for _, n := range me.Nodes {
			addr := extHostPort(n.IP, np)
			want := s.podsOn(n)
			row.Note(fmt.Sprintf("%s → %s: only %v", x.IP, addr, want))
			got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("eTP Local NodePort %s on %s from %s: want exactly the local endpoints %v, last %v: %v", addr, n.Name, x.IP, want, got, err)
			}
			t.Logf("eTP Local %s on %s: %v", addr, n.Name, got)

			row.Note("client address seen by the server via " + n.Name)
			conn, err := framework.DialFrom(ctx, x.NS, addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			name, err := conn.Ask(2 * time.Second)
			if err != nil {
				conn.Close()
				t.Fatalf("ask over %s: %v", addr, err)
			}
			pod := s.pod(name)
			if pod == nil {
				conn.Close()
				t.Fatalf("answer from %q, not a pod of %v", name, s.dep.PodNames())
			}
			peers, err := pod.Peers(ctx, framework.PodPort)
			conn.Close()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(peers, conn.Local) {
				t.Errorf("eTP Local via %s: pod %s sees peers %v, want the client's own address %s (source not preserved)", n.Name, name, peers, conn.Local)
			}
			t.Logf("eTP Local via %s: client %s, pod %s sees peers %v", n.Name, conn.Local, name, peers)
		}

		// Control: the same check on a Cluster-policy NodePort must see the
		// node's address instead (masqueraded), so the check above is able
		// to tell the difference.
		row.Note("control: eTP Cluster is masqueraded")
		cs := newExtSvc(t, ctx, me, "etp-cluster", 1, me.Nodes[1:2], func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		addr := extHostPort(me.Nodes[0].IP, cs.nodePort(t, "tcp"))
		if got, err := extWaitExactly(ctx, x.NS, addr, cs.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("eTP Cluster NodePort %s: last %v: %v", addr, got, err)
		}
		conn, err := framework.DialFrom(ctx, x.NS, addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Ask(2 * time.Second); err != nil {
			t.Fatalf("ask over %s: %v", addr, err)
		}
		peers, err := cs.dep.Pods()[0].Peers(ctx, framework.PodPort)
		if err != nil {
			t.Fatal(err)
		}
		if len(peers) != 1 || peers[0].Addr() != me.Nodes[0].IP {
			t.Errorf("control: eTP Cluster via %s: pod sees peers %v, want exactly one from the node address %s (masqueraded)", me.Nodes[0].Name, peers, me.Nodes[0].IP)
		}
		row.Note("")
	})
}

// TestExternalTrafficPolicyLocalNoEndpoint: on a node without a local
// endpoint, external NodePort traffic is dropped (no answer within the
// bound, no reject), while the node with the endpoint serves it.
func TestExternalTrafficPolicyLocalNoEndpoint(t *testing.T) {
	suite.ForEachMode(t, "externalTrafficPolicy: Local: no local endpoint drops", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		with, without := me.Nodes[1], me.Nodes[0]
		s := newExtSvc(t, ctx, me, "etp-none", 1, []*framework.Node{with}, etpLocal)
		np := s.nodePort(t, "tcp")
		x := extClient(t, ctx, c, 0)
		row.Note("node with the endpoint answers")
		addr := extHostPort(with.IP, np)
		if got, err := extWaitExactly(ctx, x.NS, addr, s.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("eTP Local NodePort %s on %s (has the endpoint): last %v: %v", addr, with.Name, got, err)
		}
		// The node without the endpoint must have the Service programmed
		// before its silence means anything.
		row.Note("rules on " + without.Name)
		if rules, err := extRulesMention(ctx, without, me.Mode, strconv.Itoa(np), true, 60*time.Second); err != nil {
			t.Fatalf("rules on %s never mention NodePort %d: %v\n%s", without.Name, np, err, rules)
		}
		row.Note("node without endpoint drops")
		addr = extHostPort(without.IP, np)
		// The rules can mention the NodePort before this node's proxy has
		// seen the EndpointSlice: until then the Service has no endpoints at
		// all and is rightly rejected. Wait (bounded) for the switch to drop.
		if got, err := extWaitOutcome(ctx, x.NS, addr, framework.Dropped, 1500*time.Millisecond, 30*time.Second); err != nil {
			t.Fatalf("eTP Local NodePort %s on %s never started dropping: last %v: %v", addr, without.Name, got, err)
		}
		extExpectAll(t, ctx, x.NS, addr, framework.Dropped, 1500*time.Millisecond,
			fmt.Sprintf("eTP Local NodePort %s on %s (no local endpoint)", addr, without.Name))
		row.Note("")
	})
}

// TestHealthCheckNodePort: the healthCheckNodePort answers 200 with the
// local endpoint count on a node with endpoints and 503 with 0 on a node
// without, in kube-proxy's JSON shape.
func TestHealthCheckNodePort(t *testing.T) {
	suite.ForEachMode(t, "healthCheckNodePort 200/503 with localEndpoints", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		with, without := me.Nodes[0], me.Nodes[1]
		// Both pods on the same node: localEndpoints must count them (2),
		// not just say "some".
		s := newExtSvc(t, ctx, me, "hcnp", 2, []*framework.Node{with}, func(svc *corev1.Service) {
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		})
		hcnp := int(s.svc.Spec.HealthCheckNodePort)
		if hcnp == 0 {
			t.Fatalf("apiserver allocated no healthCheckNodePort for %s/%s", s.ns, s.svc.Name)
		}
		x := extClient(t, ctx, c, 0)
		for _, tc := range []struct {
			node  *framework.Node
			code  int
			local int
		}{{with, http.StatusOK, 2}, {without, http.StatusServiceUnavailable, 0}} {
			addr := extHostPort(tc.node.IP, hcnp)
			row.Note(fmt.Sprintf("GET %s on %s, want %d", addr, tc.node.Name, tc.code))
			var last framework.HealthCheck
			var lastErr error
			err := framework.WaitFor(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
				last, lastErr = framework.GetHealthCheck(ctx, x.NS, addr)
				return lastErr == nil && last.Code == tc.code && last.Body.LocalEndpoints == tc.local, nil
			})
			if err != nil {
				t.Fatalf("healthCheckNodePort %s on %s: want %d with localEndpoints %d, last %d %s (err %v): %v", addr, tc.node.Name, tc.code, tc.local, last.Code, last.Raw, lastErr, err)
			}
			if last.Body.Service.Namespace != s.ns || last.Body.Service.Name != s.svc.Name {
				t.Errorf("healthCheckNodePort %s: service %+v, want %s/%s", addr, last.Body.Service, s.ns, s.svc.Name)
			}
			if !last.Body.ServiceProxyHealthy {
				t.Errorf("healthCheckNodePort %s: serviceProxyHealthy false on a healthy proxy: %s", addr, last.Raw)
			}
			t.Logf("healthCheckNodePort %s on %s: %d %s", addr, tc.node.Name, last.Code, last.Raw)
		}
		row.Note("")
	})
}

// TestInternalTrafficPolicyLocal: a ClusterIP with internalTrafficPolicy:
// Local sends pod traffic only to endpoints on the client's node; with none
// there, the traffic is dropped.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	suite.ForEachMode(t, "internalTrafficPolicy: Local", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		local := corev1.ServiceInternalTrafficPolicyLocal
		itp := func(svc *corev1.Service) { svc.Spec.InternalTrafficPolicy = &local }
		s := newExtSvc(t, ctx, me, "itp", 3, me.Nodes, itp)
		var clients []*framework.Pod
		for i, n := range me.Nodes {
			p, err := n.NewPod(ctx, fmt.Sprintf("itp-client-%d", i))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = p.Delete() })
			clients = append(clients, p)
		}
		addr := framework.VIP(s.svc, "tcp")
		for _, cl := range clients {
			want := s.podsOn(cl.Node)
			row.Note(fmt.Sprintf("%s on %s → %s: only %v", cl.Name, cl.Node.Name, addr, want))
			got, err := extWaitExactly(ctx, cl.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("iTP Local %s from %s on %s: want exactly the same-node endpoints %v, last %v: %v", addr, cl.Name, cl.Node.Name, want, got, err)
			}
			t.Logf("iTP Local %s from %s: %v", addr, cl.Node.Name, got)
		}

		with, without := me.Nodes[1], me.Nodes[0]
		none := newExtSvc(t, ctx, me, "itp-none", 1, []*framework.Node{with}, itp)
		addr = framework.VIP(none.svc, "tcp")
		// Send the VIP on to a real owner from the node without endpoints:
		// were the packet not dropped, it would be answered from there.
		extUpstream(t, ctx, c, netip.MustParseAddr(none.svc.Spec.ClusterIP), without)
		row.Note("client on the endpoint's node")
		if got, err := extWaitExactly(ctx, clients[1].NS, addr, none.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("iTP Local %s from %s: last %v: %v", addr, with.Name, got, err)
		}
		row.Note("rules on " + without.Name)
		if rules, err := extRulesMention(ctx, without, me.Mode, none.svc.Spec.ClusterIP, true, 60*time.Second); err != nil {
			t.Fatalf("rules on %s never mention %s: %v\n%s", without.Name, none.svc.Spec.ClusterIP, err, rules)
		}
		row.Note("client on a node without endpoint is dropped")
		// As for eTP above: the rules mention the VIP as soon as this node's
		// proxy has the Service, and until it has the EndpointSlice too the
		// Service has no endpoints at all and is rightly rejected (seen in
		// CI). Wait, bounded, for the switch to drop.
		if got, err := extWaitOutcome(ctx, clients[0].NS, addr, framework.Dropped, 1500*time.Millisecond, 30*time.Second); err != nil {
			t.Fatalf("iTP Local %s from %s never started dropping: last %v: %v", addr, without.Name, got, err)
		}
		extExpectAll(t, ctx, clients[0].NS, addr, framework.Dropped, 1500*time.Millisecond,
			fmt.Sprintf("iTP Local %s from %s on %s (no endpoint on that node)", addr, clients[0].Name, without.Name))
		row.Note("")
	})
}

// TestExternalTrafficPolicyLocalLBIP: through a LoadBalancer IP, eTP Local
// also means node-local endpoints only and the real client address; a pod
// using the same LB IP is treated as internal and reaches every endpoint
// (kube-proxy short-circuits pod → LB IP traffic to the cluster endpoints).
func TestExternalTrafficPolicyLocalLBIP(t *testing.T) {
	suite.ForEachMode(t, "externalTrafficPolicy: Local via LB IP (+ pods get all endpoints)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		lbIP := extTestIP(me.Mode, netip.MustParseAddr("198.51.100.10"), 2)
		s := newExtSvc(t, ctx, me, "etplb", 3, me.Nodes, func(svc *corev1.Service) {
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		})
		if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, nil, lbIP); err != nil {
			t.Fatal(err)
		}
		x := extClient(t, ctx, c, 0)
		addr := extHostPort(lbIP, framework.SvcPort)
		for _, n := range me.Nodes {
			extRoute(t, ctx, x, lbIP, n)
			want := s.podsOn(n)
			row.Note(fmt.Sprintf("LB IP %s via %s: only %v", addr, n.Name, want))
			got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second)
			if err != nil {
				t.Fatalf("eTP Local LB IP %s via %s: want exactly the local endpoints %v, last %v: %v", addr, n.Name, want, got, err)
			}
			conn, err := framework.DialFrom(ctx, x.NS, addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			name, err := conn.Ask(2 * time.Second)
			if err != nil {
				conn.Close()
				t.Fatalf("ask over %s: %v", addr, err)
			}
			pod := s.pod(name)
			if pod == nil {
				conn.Close()
				t.Fatalf("answer from %q, not a pod of %v", name, s.dep.PodNames())
			}
			peers, err := pod.Peers(ctx, framework.PodPort)
			conn.Close()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(peers, conn.Local) {
				t.Errorf("eTP Local LB IP via %s: pod %s sees peers %v, want the client's own address %s", n.Name, name, peers, conn.Local)
			}
			t.Logf("eTP Local LB IP via %s: %v; pod %s sees %v", n.Name, got, name, peers)
		}

		row.Note("pod → LB IP gets every endpoint")
		client, err := me.Nodes[1].NewPod(ctx, "etplb-client")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = client.Delete() })
		want := s.dep.PodNames()
		if got, err := extWaitExactly(ctx, client.NS, addr, want, 60*time.Second); err != nil {
			t.Fatalf("eTP Local LB IP %s from pod %s on %s: want every endpoint %v (pod traffic is internal), last %v: %v", addr, client.Name, client.Node.Name, want, got, err)
		}
		row.Note("")
	})
}
