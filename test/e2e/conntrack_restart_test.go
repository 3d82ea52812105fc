package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestStaleUDPConntrackAfterRestart: the endpoint a fixed-port UDP client is
// pinned to is removed while miniproxy is down (a DaemonSet rollout racing a
// pod reschedule). The new process has no memory of the old endpoints; its
// conntrack reconcile reads the kernel's table after its first sync, finds
// the entry answered by an endpoint that is no longer in the model, and
// deletes it, so the client moves to the survivor.
func TestStaleUDPConntrackAfterRestart(t *testing.T) {
	suite.ForEachMode(t, "stale UDP conntrack after restart", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a node of its own (its miniproxy is restarted)")
		node, p := extraNode(t, ctx, me, "ctrs")
		client := newClient(t, ctx, node, "ctrs-client")
		c := me.Cluster
		ns, err := c.NewNamespace(ctx, "ctrs")
		if err != nil {
			t.Fatal(err)
		}
		svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, "ctrs"))
		if err != nil {
			t.Fatal(err)
		}
		dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "ctrs", Replicas: 2, Nodes: me.Nodes})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = dep.Delete() })
		addr := framework.VIP(svc, "udp")
		pods := dep.PodNames()
		row.Note("waiting for UDP to reach both endpoints")
		if got, err := waitExactly(ctx, "udp", client, addr, pods, 60*time.Second); err != nil {
			t.Fatalf("UDP %s from %s: want %v, last %v: %v", addr, client.Name, pods, got, err)
		}
		victim, survivor := pods[1], pods[0] // Scale(1) keeps the first pod
		flow := pinnedUDPFlow(t, client, addr, victim)
		defer flow.Close()

		row.Note("stopping miniproxy, then removing " + victim)
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := dep.Scale(ctx, 1); err != nil {
			t.Fatal(err)
		}
		// While the proxy is down nothing un-pins the flow: the old rules
		// and the entry stay, and the dead pod answers nothing.
		for i := 0; i < 5; i++ {
			if got, err := flow.Ask(300 * time.Millisecond); err == nil && got == survivor {
				t.Fatalf("the flow reached %s while miniproxy was down; the restart proves nothing", survivor)
			}
		}

		row.Note("restarting miniproxy")
		if err := p.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		var answers []string
		var moved time.Duration
		deadline := start.Add(60 * time.Second)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for time.Now().Before(deadline) {
			<-tick.C
			got, err := flow.Ask(300 * time.Millisecond)
			if err != nil {
				got = "(no answer)"
			}
			answers = append(answers, got)
			if got == survivor && moved == 0 {
				moved = time.Since(start)
				deadline = time.Now().Add(time.Second) // it must stay there
			}
		}
		t.Logf("after the restart: %s", summarize(answers))
		if moved == 0 {
			t.Fatalf("the UDP flow never moved to %s within 60s of the restart: %s\n%s", survivor, summarize(answers), p.Logs())
		}
		if last := answers[len(answers)-1]; last != survivor {
			t.Fatalf("flow answered by %s after moving to %s: %s", last, survivor, summarize(answers))
		}
		t.Logf("flow moved to %s %v after the restart began (includes the cold start)", survivor, moved.Round(time.Millisecond))
		row.Note("")
	})
}
