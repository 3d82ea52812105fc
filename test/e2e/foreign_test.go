package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// foreignSetup is what kubelet and Docker leave in a node's iptables before
// the proxy starts: kubelet's localnet guard KUBE-FIREWALL jumped to from
// INPUT and OUTPUT (kube-proxy writes the same chain) and its canary, and
// Docker's chains jumped to from FORWARD.
var foreignSetup = [][]string{
	{"-t", "filter", "-N", "KUBE-FIREWALL"},
	{"-t", "filter", "-A", "KUBE-FIREWALL", "!", "-s", "127.0.0.0/8", "-d", "127.0.0.0/8", "-m", "comment", "--comment", "block incoming localnet connections", "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"},
	{"-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL"},
	{"-t", "filter", "-A", "OUTPUT", "-j", "KUBE-FIREWALL"},
	{"-t", "nat", "-N", "KUBE-KUBELET-CANARY"},
	{"-t", "filter", "-N", "DOCKER-USER"},
	{"-t", "filter", "-A", "DOCKER-USER", "-j", "RETURN"},
	{"-t", "filter", "-A", "FORWARD", "-j", "DOCKER-USER"},
}

// foreignLines are the iptables-save lines of the objects foreignSetup made.
func foreignLines(ctx context.Context, node *framework.Node) (string, error) {
	out, err := node.NS.Run(ctx, "iptables-save")
	if err != nil {
		return "", err
	}
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		for _, name := range []string{"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "DOCKER-USER"} {
			if strings.HasPrefix(l, ":"+name+" ") || strings.HasPrefix(l, "-A "+name+" ") || strings.HasSuffix(l, "-j "+name) {
				keep = append(keep, l)
				break
			}
		}
	}
	return strings.Join(keep, "\n"), nil
}

// TestForeignKubeFirewall (issue 15, defect 2): a node where kubelet's
// KUBE-FIREWALL is jumped to from INPUT and OUTPUT runs miniproxy with
// --nodeport-addresses (localhost NodePorts off). NodePorts answer, and
// kubelet's and Docker's chains survive the syncs and --cleanup unchanged.
func TestForeignKubeFirewall(t *testing.T) {
	suite.ForEachMode(t, "foreign KUBE-FIREWALL / DOCKER-USER + --nodeport-addresses: served, untouched by syncs and --cleanup", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		s := newExtSvc(t, ctx, me, "fkf", 2, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		np := s.nodePort(t, "tcp")
		x := extClient(t, ctx, c, 0)
		want := s.dep.PodNames()

		row.Note("node with kubelet's KUBE-FIREWALL and Docker's DOCKER-USER")
		nodes, err := c.AddNodes(ctx, fmt.Sprintf("%s-fkf-%s", me.Mode[:3], extRand()), 1)
		if err != nil {
			t.Fatal(err)
		}
		node := nodes[0]
		for _, args := range foreignSetup {
			if _, err := node.NS.Run(ctx, append([]string{"iptables", "-w", "5"}, args...)...); err != nil {
				t.Fatal(err)
			}
		}
		before, err := foreignLines(ctx, node)
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.StartProxy(ctx, node, framework.ProxyOptions{Mode: me.Mode, Extra: []string{"--nodeport-addresses", framework.UnderlayPrefix}})
		if p != nil {
			t.Cleanup(func() { _ = p.Stop() })
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("--- miniproxy on %s ---\n%s", node.Name, p.Logs())
					rules, err := node.Rules(context.Background(), me.Mode)
					t.Logf("--- rules on %s (err=%v) ---\n%s", node.Name, err, rules)
				}
			})
		}
		if err != nil {
			t.Fatal(err)
		}
		extRoute(t, ctx, x, node.BridgeIP(), node)

		row.Note("NodePort on the node's underlay address")
		addr := extHostPort(node.IP, np)
		if got, err := extWaitExactly(ctx, x.NS, addr, want, 60*time.Second); err != nil {
			t.Fatalf("NodePort %s on %s (KUBE-FIREWALL present, --nodeport-addresses %s): want exactly %v, last %v: %v", addr, node.Name, framework.UnderlayPrefix, want, got, err)
		}
		row.Note("foreign chains after the syncs")
		if after, err := foreignLines(ctx, node); err != nil || after != before {
			t.Fatalf("kubelet's / Docker's chains changed by miniproxy (err %v):\nbefore:\n%s\nafter:\n%s", err, before, after)
		}

		row.Note("miniproxy --cleanup")
		if err := p.Stop(); err != nil {
			t.Logf("stop: %v", err)
		}
		bin, err := c.Env.MiniproxyBin()
		if err != nil {
			t.Fatal(err)
		}
		if out, err := node.NS.Run(ctx, bin, "--cleanup", "--proxy-mode", me.Mode); err != nil {
			t.Fatalf("--cleanup: %v\n%s", err, out)
		}
		if after, err := foreignLines(ctx, node); err != nil || after != before {
			t.Fatalf("kubelet's / Docker's chains changed by --cleanup (err %v):\nbefore:\n%s\nafter:\n%s", err, before, after)
		}
		if rules, err := node.Rules(ctx, me.Mode); err != nil || strings.Contains(rules, ":KUBE-SERVICES") || strings.Contains(rules, "MINIPROXY-LOCALNET") {
			t.Errorf("--cleanup left miniproxy's chains (err %v):\n%s", err, rules)
		}
		row.Note("")
	})
}
