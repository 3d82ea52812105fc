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
		// The same client with new source ports reaches the survivor. With
		// cleanup off, a new flow whose ephemeral port happens to match an
		// earlier flow's still-live conntrack entry is pinned to the dead pod
		// too (the very effect under test), so retry a bounded number of
		// rounds; an answer from the dead endpoint would fail at once.
		var got framework.Counts
		err := framework.WaitFor(ctx, 15*time.Second, 200*time.Millisecond, func() (bool, error) {
			var err error
			if got, err = client.UDPCounts(ctx, r.addr, 5); err != nil {
				return false, err
			}
			for _, n := range got.Names() {
				if n != r.survivor {
					return false, fmt.Errorf("a new flow reached %s, not the survivor %s", n, r.survivor)
				}
			}
			return got.Errors == 0 && len(got.Names()) == 1, nil
		})
		if err != nil {
			t.Fatalf("new UDP flows after the scale-down: want all on %s, got %v: %v", r.survivor, got, err)
		}
		row.Note("")
	})
}

// Metric sample names (histograms without labels).
const (
	fullSyncCount    = "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
	partialSyncCount = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
)

func syncCounts(t *testing.T, ctx context.Context, p *framework.Proxy) (full, partial float64) {
	t.Helper()
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f, ok1 := m[fullSyncCount]
	pa, ok2 := m[partialSyncCount]
	if !ok1 || !ok2 {
		t.Fatalf("metrics on %s lack %s or %s", p.Node.Name, fullSyncCount, partialSyncCount)
	}
	return f, pa
}

// TestPartialSync: on a node whose miniproxy runs with --sync-period 10s,
// scaling a Deployment three times (each change waited for in the
// dataplane) is programmed by partial syncs; the full-sync count grows only
// with the sync period (at most elapsed/period + 1 during the changes), and
// with no changes at all a full sync still comes within the period.
func TestPartialSync(t *testing.T) {
	const period = 10 * time.Second
	suite.ForEachMode(t, "partial sync on changes, full sync only per sync-period (metrics)", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a node with --sync-period 10s")
		x, p := extraNode(t, ctx, me, "ps", "--sync-period", period.String())
		client := newClient(t, ctx, x, "ps-client")
		_, svc, dep := deployService(t, ctx, me, "ps", 1)
		addr := framework.VIP(svc, "tcp")
		if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("VIP %s never worked from %s: %v: %v", addr, x.Name, got, err)
		}
		f0, p0 := syncCounts(t, ctx, p)
		t0 := time.Now()
		if f0 < 1 {
			t.Fatalf("no full sync counted after the proxy synced (full=%v partial=%v)", f0, p0)
		}
		for _, n := range []int{2, 3, 1} {
			row.Note(fmt.Sprintf("scale to %d", n))
			if err := dep.Scale(ctx, n); err != nil {
				t.Fatal(err)
			}
			if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 60*time.Second); err != nil {
				t.Fatalf("after scaling to %d: %v: %v", n, got, err)
			}
		}
		f1, p1 := syncCounts(t, ctx, p)
		elapsed := time.Since(t0)
		maxFull := float64(int(elapsed/period) + 1)
		t.Logf("over %v with 3 scale steps: full syncs %v→%v (allowed +%v), partial syncs %v→%v", elapsed.Round(time.Millisecond), f0, f1, maxFull, p0, p1)
		if p1-p0 < 1 {
			t.Errorf("no partial sync counted for 3 Deployment changes")
		}
		// Each step was observed in the dataplane before the next, so each
		// needed its own sync; a periodic full sync may have absorbed one.
		if (p1-p0)+(f1-f0) < 3 {
			t.Errorf("3 separately observed changes but only %v partial + %v full syncs", p1-p0, f1-f0)
		}
		if f1-f0 > maxFull {
			t.Errorf("%v full syncs in %v with sync-period %v: changes trigger full syncs", f1-f0, elapsed, period)
		}
		row.Note("waiting for a periodic full sync")
		var f2 float64
		err := framework.WaitFor(ctx, 2*period+5*time.Second, 500*time.Millisecond, func() (bool, error) {
			f2, _ = syncCounts(t, ctx, p)
			return f2 > f1, nil
		})
		if err != nil {
			t.Fatalf("no full sync within 2×sync-period without changes (full count stays %v): %v", f1, err)
		}
		row.Note("")
	})
}

// foreign adds rules that belong to someone else (an iptables chain in nat
// with a rule, a rule in filter INPUT, an nftables table with a base chain)
// and returns a function that lists them again.
func foreign(t *testing.T, ctx context.Context, n *framework.Node) func() string {
	t.Helper()
	if err := n.NS.RunAll(ctx,
		[]string{"iptables", "-w", "-t", "nat", "-N", "E2E-FOREIGN"},
		[]string{"iptables", "-w", "-t", "nat", "-A", "E2E-FOREIGN", "-s", "192.0.2.55/32", "-j", "RETURN"},
		[]string{"iptables", "-w", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.55/32", "-m", "comment", "--comment", "e2e-foreign", "-j", "ACCEPT"},
		[]string{"nft", "add", "table", "ip", "e2e_foreign"},
		[]string{"nft", "add", "chain", "ip", "e2e_foreign", "c", "{ type filter hook input priority 0 ; policy accept ; }"},
		[]string{"nft", "add", "rule", "ip", "e2e_foreign", "c", "ip", "saddr", "192.0.2.55", "accept"},
	); err != nil {
		t.Fatal(err)
	}
	return func() string {
		var b strings.Builder
		for _, c := range [][]string{
			{"iptables", "-w", "-t", "nat", "-S", "E2E-FOREIGN"},
			{"iptables", "-w", "-t", "filter", "-S", "INPUT"},
			{"nft", "list", "table", "ip", "e2e_foreign"},
		} {
			out, err := n.NS.Run(ctx, c...)
			if err != nil {
				out = "ERROR " + err.Error()
			}
			if c[0] == "iptables" && c[len(c)-1] == "INPUT" {
				// Only the foreign line: miniproxy owns its own jumps.
				var keep []string
				for _, l := range strings.Split(out, "\n") {
					if strings.Contains(l, "e2e-foreign") {
						keep = append(keep, l)
					}
				}
				out = strings.Join(keep, "\n")
			}
			fmt.Fprintf(&b, "### %s\n%s\n", strings.Join(c, " "), strings.TrimSpace(out))
		}
		return b.String()
	}
}

// deleteOwnRules removes miniproxy's dispatch by hand: in iptables mode it
// flushes KUBE-SERVICES and deletes the Service's KUBE-SVC chain, in
// nftables mode it deletes the whole `ip miniproxy` table.
func deleteOwnRules(ctx context.Context, mode string, n *framework.Node, vip string) (string, error) {
	switch mode {
	case "iptables":
		save, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
		if err != nil {
			return "", err
		}
		var chain string
		for _, l := range strings.Split(save, "\n") {
			if strings.HasPrefix(l, "-A KUBE-SERVICES ") && strings.Contains(l, "-d "+vip+"/32") && strings.Contains(l, "-p tcp") && strings.Contains(l, "--dport 80 ") {
				if i := strings.Index(l, "-j KUBE-SVC-"); i >= 0 {
					chain = strings.Fields(l[i+3:])[0]
				}
			}
		}
		if chain == "" {
			return "", fmt.Errorf("no KUBE-SERVICES rule for %s:80 jumping to a KUBE-SVC chain in:\n%s", vip, save)
		}
		err = n.NS.RunAll(ctx,
			[]string{"iptables", "-w", "-t", "nat", "-F", "KUBE-SERVICES"},
			[]string{"iptables", "-w", "-t", "nat", "-F", chain},
			[]string{"iptables", "-w", "-t", "nat", "-X", chain},
		)
		return "flushed KUBE-SERVICES, deleted " + chain, err
	case "nftables":
		// The main table and every shard table (--nftables-shards).
		out, err := n.NS.Run(ctx, "nft", "list", "tables", "ip")
		if err != nil {
			return "", err
		}
		var deleted []string
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) != 3 || (f[2] != "miniproxy" && !strings.HasPrefix(f[2], "miniproxy-shard-")) {
				continue
			}
			if _, err := n.NS.Run(ctx, "nft", "delete", "table", "ip", f[2]); err != nil {
				return "", err
			}
			deleted = append(deleted, f[2])
		}
		if len(deleted) == 0 {
			return "", fmt.Errorf("no miniproxy table in:\n%s", out)
		}
		return "deleted tables ip " + strings.Join(deleted, ", "), nil
	}
	return "", fmt.Errorf("no drift recipe for mode %s", mode)
}

// TestDriftRepair: after miniproxy's rules are deleted by hand the VIP stops
// answering, and the periodic full sync (--sync-period 5s) brings it back;
// rules in other tables and chains are untouched.
func TestDriftRepair(t *testing.T) {
	const period = 5 * time.Second
	suite.ForEachMode(t, "drift repair within sync-period; foreign rules untouched", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		row.Note("starting a node with --sync-period 5s")
		x, _ := extraNode(t, ctx, me, "drift", "--sync-period", period.String())
		client := newClient(t, ctx, x, "drift-client")
		_, svc, dep := deployService(t, ctx, me, "drift", 2)
		addr := framework.VIP(svc, "tcp")
		if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("VIP %s never worked from %s: %v: %v", addr, x.Name, got, err)
		}
		list := foreign(t, ctx, x)
		before := list()

		// The outage must be observed before the repair; a full sync may
		// land between the deletion and the probe, so retry a few times.
		row.Note("deleting miniproxy's rules by hand")
		var outage bool
		var deletedAt time.Time
		for attempt := 0; attempt < 4 && !outage; attempt++ {
			what, err := deleteOwnRules(ctx, me.Mode, x, svc.Spec.ClusterIP)
			if err != nil {
				t.Fatalf("delete rules: %v", err)
			}
			deletedAt = time.Now()
			t.Logf("attempt %d: %s", attempt, what)
			outage = !client.Answers(ctx, addr, 500*time.Millisecond)
		}
		if !outage {
			t.Fatalf("VIP %s kept answering right after its rules were deleted (4 tries)", addr)
		}
		row.Note("waiting for the repair")
		err := framework.WaitFor(ctx, 3*period, 200*time.Millisecond, func() (bool, error) {
			return client.Answers(ctx, addr, 500*time.Millisecond), nil
		})
		if err != nil {
			t.Fatalf("VIP %s not repaired within 3×sync-period (%v): %v", addr, 3*period, err)
		}
		t.Logf("VIP answered again %v after the deletion (sync-period %v)", time.Since(deletedAt).Round(time.Millisecond), period)
		if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 30*time.Second); err != nil {
			t.Fatalf("after repair: want %v, got %v: %v", dep.PodNames(), got, err)
		}
		if after := list(); after != before {
			t.Fatalf("foreign rules changed:\n--- before ---\n%s\n--- after ---\n%s", before, after)
		}
		t.Logf("foreign rules untouched:\n%s", before)
		row.Note("")
	})
}
