package e2e

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestTerminatingNotServing: a Service whose every endpoint is terminating
// and no longer serving has nothing usable, so a new TCP connection is
// rejected at once (ECONNREFUSED within 1 s), as kube-proxy does. Before
// issue 20 iptables mode dropped it (as for a Service with endpoints on
// other nodes only) and the connect hung.
func TestTerminatingNotServing(t *testing.T) {
	suite.ForEachMode(t, "all endpoints terminating, none serving: rejected within 1 s", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "termgone")
		if err != nil {
			t.Fatal(err)
		}
		svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, "termgone"))
		if err != nil {
			t.Fatal(err)
		}
		// First one ready endpoint (address A), then two endpoints going
		// away on both nodes (other addresses, which no pod holds: nothing
		// must be sent to them anyway). A leaving the rules shows the second
		// slice is programmed, in every mode.
		addr := func(n *framework.Node, k int) netip.Addr {
			ip := n.PodCIDR.Addr()
			for i := 0; i < k; i++ {
				ip = ip.Next()
			}
			return ip
		}
		a := addr(me.Nodes[0], 240)
		if err := c.PublishSlice(ctx, ns, "termgone", "e2e", []framework.SliceEndpoint{{IP: a, Node: me.Nodes[0], Ready: true, Serving: true}},
			framework.DefaultSlicePorts()); err != nil {
			t.Fatal(err)
		}
		inRules := func(s string, want bool) {
			t.Helper()
			err := framework.WaitFor(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
				rules, err := me.Nodes[0].Rules(ctx, me.Mode)
				return err == nil && strings.Contains(rules, s) == want, nil
			})
			if err != nil {
				t.Fatalf("rules on %s: %s present=%t never: %v", me.Nodes[0].Name, s, want, err)
			}
		}
		row.Note("waiting for the ready endpoint in the rules")
		inRules(a.String()+":", true)
		var eps []framework.SliceEndpoint
		for _, n := range me.Nodes {
			eps = append(eps, framework.SliceEndpoint{IP: addr(n, 250), Node: n, Ready: false, Serving: false, Terminating: true})
		}
		if err := c.PublishSlice(ctx, ns, "termgone", "e2e", eps, framework.DefaultSlicePorts()); err != nil {
			t.Fatal(err)
		}
		row.Note("waiting for the terminating endpoints to replace it")
		inRules(a.String(), false)
		vip := svc.Spec.ClusterIP
		client := newClient(t, ctx, me.Nodes[0], "termgone")
		warmUp(t, ctx, client)
		vaddr := framework.VIP(svc, "tcp")
		row.Note("tcp reject")
		for i := 0; i < 5; i++ {
			took, err := framework.TimedDial(ctx, client.NS, "tcp", vaddr, 5*time.Second)
			t.Logf("%s (%s) attempt %d: %v after %v", vaddr, vip, i, err, took)
			if err == nil {
				t.Fatalf("%s: got an answer from endpoints that are not serving", vaddr)
			}
			if !errors.Is(err, syscall.ECONNREFUSED) || took >= time.Second {
				t.Fatalf("%s: want ECONNREFUSED within 1 s (reject), got %v after %v (a drop)", vaddr, err, took)
			}
		}
		row.Note("")
	})
}
