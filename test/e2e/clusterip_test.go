package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// fixture is a Service with a Deployment behind it and a client pod on each
// node of a mode.
type fixture struct {
	me      *framework.ModeEnv
	ns      string
	svc     *corev1.Service
	dep     *framework.Deployment
	clients []*framework.Pod // one per node, same order as me.Nodes
}

// newFixture creates namespace, Service and a Deployment of replicas pods
// spread over the mode's nodes, plus one client pod per node.
func newFixture(t *testing.T, ctx context.Context, me *framework.ModeEnv, name string, replicas int) *fixture {
	t.Helper()
	ns, svc, dep := deployService(t, ctx, me, name, replicas)
	f := &fixture{me: me, ns: ns, svc: svc, dep: dep}
	for i, n := range me.Nodes {
		p, err := n.NewPod(ctx, fmt.Sprintf("%s-client-%d", name, i))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Delete() })
		f.clients = append(f.clients, p)
	}
	return f
}

// deployService creates a namespace, a ClusterIP Service and a Deployment of
// replicas pods spread over the mode's nodes (deleted at test end).
func deployService(t *testing.T, ctx context.Context, me *framework.ModeEnv, name string, replicas int) (string, *corev1.Service, *framework.Deployment) {
	t.Helper()
	c := me.Cluster
	ns, err := c.NewNamespace(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, name))
	if err != nil {
		t.Fatal(err)
	}
	dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name, Replicas: replicas, Nodes: me.Nodes})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dep.Delete() })
	return ns, svc, dep
}

// waitExactly polls until connections from client reach exactly want (and
// nothing fails), bounded by timeout. It returns the last counts.
func waitExactly(ctx context.Context, proto string, client *framework.Pod, addr string, want []string, timeout time.Duration) (framework.Counts, error) {
	want = slices.Sorted(slices.Values(want))
	// Enough connections that missing one of len(want) endpoints by chance
	// is below 1e-6 per probe.
	n := 20 + 12*len(want)
	var last framework.Counts
	err := framework.WaitFor(ctx, timeout, 200*time.Millisecond, func() (bool, error) {
		var err error
		if proto == "udp" {
			last, err = client.UDPCounts(ctx, addr, n)
		} else {
			last, err = client.TCPCounts(ctx, addr, n)
		}
		if err != nil {
			return false, err
		}
		return last.Errors == 0 && slices.Equal(last.Names(), want), nil
	})
	return last, err
}

// TestClusterIP: TCP and UDP from client pods on every node reach every
// endpoint (on the same and on the other node), and every answer comes from
// a real endpoint.
func TestClusterIP(t *testing.T) {
	for _, proto := range []string{"tcp", "udp"} {
		t.Run(proto, func(t *testing.T) {
			suite.ForEachMode(t, "ClusterIP "+strings.ToUpper(proto)+" same+other node", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
				defer cancel()
				f := newFixture(t, ctx, me, "cip-"+proto, 3)
				addr := framework.VIP(f.svc, proto)
				want := f.dep.PodNames()
				for _, client := range f.clients {
					row.Note("waiting for " + client.Name + " to reach all endpoints via " + addr)
					got, err := waitExactly(ctx, proto, client, addr, want, 90*time.Second)
					if err != nil {
						t.Fatalf("%s %s from %s (node %s): want exactly %v, last probe %v: %v", proto, addr, client.Name, client.Node.Name, want, got, err)
					}
					// One more full-size round: every answer must be a
					// current endpoint, none may fail.
					got, err = countFrom(ctx, proto, client, addr, 90)
					if err != nil {
						t.Fatal(err)
					}
					if got.Errors != 0 || got.Total() != 90 {
						t.Errorf("%s from %s: %v", proto, client.Name, got)
					}
					for _, name := range got.Names() {
						if !slices.Contains(want, name) {
							t.Errorf("%s from %s: answer from %q, not an endpoint of %v", proto, client.Name, name, want)
						}
					}
					t.Logf("%s %s from %s on %s: %v", proto, addr, client.Name, client.Node.Name, got)
				}
				row.Note("")
			})
		})
	}
}

func countFrom(ctx context.Context, proto string, client *framework.Pod, addr string, n int) (framework.Counts, error) {
	if proto == "udp" {
		return client.UDPCounts(ctx, addr, n)
	}
	return client.TCPCounts(ctx, addr, n)
}

// TestScale: 3 → 1 → 4 endpoints through the API; new connections reach
// exactly the current set within a bounded time.
func TestScale(t *testing.T) {
	suite.ForEachMode(t, "scale 3→1→4 endpoints", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "scale", 3)
		addr := framework.VIP(f.svc, "tcp")
		client := f.clients[0]
		for _, n := range []int{3, 1, 4} {
			row.Note(fmt.Sprintf("scale to %d", n))
			if err := f.dep.Scale(ctx, n); err != nil {
				t.Fatal(err)
			}
			want := f.dep.PodNames()
			got, err := waitExactly(ctx, "tcp", client, addr, want, 90*time.Second)
			if err != nil {
				t.Fatalf("after scaling to %d: want exactly %v, last probe %v: %v", n, want, got, err)
			}
			t.Logf("scaled to %d: %v", n, got)
		}
		row.Note("")
	})
}

// TestDeleteService: after the Service is deleted its VIP stops answering
// and no rule mentions it any more.
func TestDeleteService(t *testing.T) {
	suite.ForEachMode(t, "delete Service removes VIP and rules", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "del", 2)
		addr := framework.VIP(f.svc, "tcp")
		client := f.clients[0]
		row.Note("waiting for the VIP to work")
		if got, err := waitExactly(ctx, "tcp", client, addr, f.dep.PodNames(), 90*time.Second); err != nil {
			t.Fatalf("VIP %s never worked: %v: %v", addr, got, err)
		}
		vip := f.svc.Spec.ClusterIP
		// The VIP answering from one node's client says nothing about the
		// other nodes, whose proxies may be one min-sync-period behind.
		for _, n := range me.Nodes {
			err := framework.WaitFor(ctx, 30*time.Second, 200*time.Millisecond, func() (bool, error) {
				rules, err := n.Rules(ctx, me.Mode)
				return err == nil && strings.Contains(rules, vip), err
			})
			if err != nil {
				t.Fatalf("rules on %s do not mention VIP %s before deletion; the check below would prove nothing: %v", n.Name, vip, err)
			}
		}
		if err := me.Cluster.DeleteService(ctx, f.ns, f.svc.Name); err != nil {
			t.Fatal(err)
		}
		row.Note("waiting for the VIP to stop answering")
		err := framework.WaitFor(ctx, 60*time.Second, 200*time.Millisecond, func() (bool, error) {
			return !client.Answers(ctx, addr, 500*time.Millisecond), nil
		})
		if err != nil {
			t.Fatalf("VIP %s still answers after the Service was deleted: %v", addr, err)
		}
		row.Note("waiting for the rules to go")
		for _, n := range me.Nodes {
			var rules string
			err := framework.WaitFor(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
				var err error
				rules, err = n.Rules(ctx, me.Mode)
				return err == nil && !strings.Contains(rules, vip) && !strings.Contains(rules, f.ns+"/"+f.svc.Name), err
			})
			if err != nil {
				t.Fatalf("rules on %s still mention %s or %s/%s: %v\n%s", n.Name, vip, f.ns, f.svc.Name, err, rules)
			}
		}
		row.Note("")
	})
}

// TestRestart: an established connection survives a miniproxy restart, and
// new connections keep working while it restarts (rules are not flushed at
// startup).
func TestRestart(t *testing.T) {
	suite.ForEachMode(t, "restart keeps connections and rules", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "restart", 2)
		addr := framework.VIP(f.svc, "tcp")
		client := f.clients[0]
		if got, err := waitExactly(ctx, "tcp", client, addr, f.dep.PodNames(), 90*time.Second); err != nil {
			t.Fatalf("VIP %s never worked: %v: %v", addr, got, err)
		}
		conn, err := client.DialTCP(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		first, err := conn.Ask(2 * time.Second)
		if err != nil {
			t.Fatal(err)
		}

		// Probe with new connections for the whole restart.
		probeCtx, stopProbe := context.WithCancel(ctx)
		var wg sync.WaitGroup
		var probes framework.Counts
		wg.Go(func() {
			for probeCtx.Err() == nil {
				c, err := client.TCPCounts(probeCtx, addr, 5)
				if probeCtx.Err() != nil {
					return
				}
				if err != nil {
					probes.Errors++
					continue
				}
				if probes.ByName == nil {
					probes.ByName = map[string]int{}
				}
				for k, v := range c.ByName {
					probes.ByName[k] += v
				}
				probes.Errors += c.Errors
				if probes.FirstErr == nil {
					probes.FirstErr = c.FirstErr
				}
			}
		})
		var proxy *framework.Proxy
		for _, p := range me.Proxies {
			if p.Node == client.Node {
				proxy = p
			}
		}
		row.Note("restarting miniproxy on " + client.Node.Name)
		restartErr := proxy.Restart(ctx)
		stopProbe()
		wg.Wait()
		if restartErr != nil {
			t.Fatal(restartErr)
		}
		again, err := conn.Ask(2 * time.Second)
		if err != nil {
			t.Fatalf("established connection broke across the restart: %v", err)
		}
		if again != first {
			t.Errorf("established connection answered by %q before and %q after the restart", first, again)
		}
		if probes.Errors != 0 {
			t.Errorf("new connections failed while miniproxy restarted: %v", probes)
		}
		if probes.Total() == 0 {
			t.Errorf("no probe completed during the restart")
		}
		t.Logf("probes during restart: %v", probes)
		row.Note("")
	})
}

// TestHairpin: a pod reaches itself through its Service's VIP (needs
// hairpin mode on the bridge port, set by the test bed like a CNI, and
// masquerade of hairpin traffic by the proxy).
func TestHairpin(t *testing.T) {
	suite.ForEachMode(t, "ClusterIP hairpin (pod to itself via VIP)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "hairpin", 1)
		pod := f.dep.Pods()[0]
		for _, proto := range []string{"tcp", "udp"} {
			addr := framework.VIP(f.svc, proto)
			row.Note("waiting for " + pod.Name + " to reach itself via " + addr + "/" + proto)
			got, err := waitExactly(ctx, proto, pod, addr, []string{pod.Name}, 90*time.Second)
			if err != nil {
				t.Fatalf("%s: pod %s via %s: last probe %v: %v", proto, pod.Name, addr, got, err)
			}
		}
		row.Note("")
	})
}
