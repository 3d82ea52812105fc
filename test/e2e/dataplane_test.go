package e2e

// Dataplane maintenance, each a matrix feature per mode: stale UDP conntrack
// cleanup (with a control run proving it matters), partial syncs vs periodic
// full syncs (metrics), and drift repair after someone deletes miniproxy's
// rules by hand.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// pinnedUDPFlow opens UDP flows from client to addr, each from its own fixed
// source port, until one is answered by target (bounded: with 2 endpoints
// 30 flows all missing target has probability 2^-30).
func pinnedUDPFlow(t *testing.T, client *framework.Pod, addr, target string) *framework.UDPFlow {
	t.Helper()
	var seen []string
	for i := 0; i < 30; i++ {
		flow, err := client.NewUDPFlow(addr)
		if err != nil {
			t.Fatal(err)
		}
		var name string
		for try := 0; try < 3 && name == ""; try++ {
			name, _ = flow.Ask(700 * time.Millisecond)
		}
		if name == target {
			return flow
		}
		seen = append(seen, name)
		_ = flow.Close()
	}
	t.Fatalf("no UDP flow to %s landed on %s in 30 tries (answers: %v)", addr, target, seen)
	return nil
}

// staleUDP deploys 2 endpoints, pins a fixed-port UDP flow from client to
// the endpoint that scaling to 1 removes, scales down (the removed pod's
// namespace is deleted: it is really dead), then keeps sending on the same
// flow for up to window.
func staleUDP(t *testing.T, ctx context.Context, me *framework.ModeEnv, row *framework.Row, name string, client *framework.Pod, window time.Duration) staleResult {
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
	dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name, Replicas: 2, Nodes: me.Nodes})
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
	r := staleResult{addr: addr, survivor: survivor}
	row.Note("pinning a UDP flow to " + victim)
	flow := pinnedUDPFlow(t, client, addr, victim)
	defer flow.Close()
	t.Logf("flow from %s:%d pinned to %s", client.IP, flow.LocalPort(), victim)

	row.Note("scaling down, removing " + victim)
	if err := dep.Scale(ctx, 1); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	deadline := start.Add(window)
	// Paced: a datagram every 100 ms (or after each 300 ms read timeout),
	// like a client that keeps talking; every one refreshes the flow.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		<-tick.C
		got, err := flow.Ask(300 * time.Millisecond)
		if err != nil {
			got = "(no answer)"
		}
		r.answers = append(r.answers, got)
		if got == survivor && r.moved == 0 {
			r.moved = time.Since(start)
			// A few more rounds: the flow must stay on the survivor.
			deadline = time.Now().Add(time.Second)
		}
	}
	return r
}

// staleResult is what a stale-flow run observed after the scale-down.
type staleResult struct {
	addr     string   // the UDP VIP
	answers  []string // per datagram: the answering pod or "(no answer)"
	survivor string
	moved    time.Duration // until the survivor first answered; 0: never
}

func summarize(answers []string) string {
	counts := map[string]int{}
	var order []string
	for _, a := range answers {
		if counts[a] == 0 {
			order = append(order, a)
		}
		counts[a]++
	}
	var b strings.Builder
	for _, a := range order {
		fmt.Fprintf(&b, "%s×%d ", a, counts[a])
	}
	return strings.TrimSpace(b.String())
}

// TestStaleUDPConntrack: a UDP client that keeps its source port while its
// endpoint is removed moves to the live endpoint within a bounded time,
// because miniproxy deletes the flow's conntrack entry (otherwise the entry,
// refreshed by every datagram, keeps DNATing to the dead pod).
func TestStaleUDPConntrack(t *testing.T) {
	suite.ForEachMode(t, "stale UDP conntrack cleanup", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		client := newClient(t, ctx, me.Nodes[0], "ct-client")
		r := staleUDP(t, ctx, me, row, "ct", client, 30*time.Second)
		t.Logf("after scale-down: %s", summarize(r.answers))
		if r.moved == 0 {
			t.Fatalf("UDP flow never moved to %s within 30s after its endpoint was removed: %s", r.survivor, summarize(r.answers))
		}
		t.Logf("flow moved to %s %v after the scale-down call returned", r.survivor, r.moved.Round(time.Millisecond))
		if last := r.answers[len(r.answers)-1]; last != r.survivor {
			t.Fatalf("flow answered by %s after moving to %s: %s", last, r.survivor, summarize(r.answers))
		}
		row.Note("")
	})
}

// TestStaleUDPConntrackControl runs the same scenario on a node whose
// miniproxy has --conntrack-cleanup=false: the flow stays stuck on the dead
// endpoint for the whole window, while a new flow reaches the survivor —
// so the rules are right and it is the cleanup that un-sticks flows.
func TestStaleUDPConntrackControl(t *testing.T) {
	suite.ForEachMode(t, "stale UDP conntrack: stuck without cleanup (control)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a node with --conntrack-cleanup=false")
		x, _ := extraNode(t, ctx, me, "noct", "--conntrack-cleanup=false")
		client := newClient(t, ctx, x, "noct-client")
		r := staleUDP(t, ctx, me, row, "noct", client, 12*time.Second)
		t.Logf("after scale-down without cleanup: %s", summarize(r.answers))
		if r.moved != 0 {
			t.Fatalf("with --conntrack-cleanup=false the flow still moved to %s after %v; the cleanup test proves nothing: %s", r.survivor, r.moved, summarize(r.answers))
		}
		// The same client with new source ports reaches the survivor.
		got, err := client.UDPCounts(ctx, r.addr, 5)
		if err != nil {
			t.Fatal(err)
		}
		if got.Errors != 0 || len(got.Names()) != 1 || got.Names()[0] != r.survivor {
			t.Fatalf("new UDP flows after the scale-down: want all on %s, got %v", r.survivor, got)
		}
		row.Note("")
	})
}
