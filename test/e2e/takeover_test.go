package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// takeoverDone is what miniproxy logs once it has removed kube-proxy's and
// its other modes' leftovers (cmd/miniproxy/takeover.go).
const takeoverDone = "leftovers of kube-proxy and of miniproxy's other modes checked"

// swapFigures are what one proxy swap cost the clients, written to
// e2e-results/takeover/.
type swapFigures struct {
	From, To string
	// NewConns / NewFailedAfterSync: new connections (one per 10 ms) in
	// the whole run, and those that failed once the new proxy reported its
	// first sync (goal 0). NewFailedBeforeSync failed between the old
	// proxy's SIGTERM and that moment (its rules still serve).
	NewConns            int
	NewFailedAfterSync  int
	NewFailedBeforeSync int
	// LongAsks / LongFailed: questions on the long-lived connections and
	// those that failed or reached another endpoint (goal 0).
	LongAsks   int
	LongFailed int
	// ProxyDownSeconds is from the old proxy's SIGTERM to the new one's
	// first sync; the old rules serve meanwhile.
	ProxyDownSeconds float64
	// CleanupSeconds is from the first sync to the log line that the
	// leftovers are gone.
	CleanupSeconds float64
	FirstFailure   string `json:",omitempty"`
}

func writeSwapFigures(t *testing.T, name string, f swapFigures) {
	dir := filepath.Join(suite.ResultsDir, "takeover")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("figures: %v", err)
		return
	}
	b, _ := json.MarshalIndent(f, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, name+".json"), b, 0o644); err != nil {
		t.Logf("figures: %v", err)
	}
	t.Logf("figures %s: %s", name, b)
}

// swap stops old (SIGTERM: its rules stay), starts start() on the same node,
// and waits for the new proxy's first sync and for its takeover log line,
// while the caller's prober runs. It returns the new proxy, the figures so
// far, and when the old proxy was stopped and the new one had synced.
func swap(t *testing.T, ctx context.Context, old *framework.Proxy, start func() (*framework.Proxy, error)) (p *framework.Proxy, f swapFigures, stopAt, synced time.Time) {
	t.Helper()
	time.Sleep(500 * time.Millisecond)
	stopAt = time.Now()
	if err := old.Stop(); err != nil {
		t.Fatalf("stop %s: %v", old.Impl, err)
	}
	// A moment with only the old proxy's rules, as in a DaemonSet swap.
	time.Sleep(time.Second)
	p, err := start()
	if p != nil {
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- miniproxy %s on %s ---\n%s", p.Mode, p.Node.Name, p.Logs())
			}
			_ = p.Stop()
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	synced = time.Now()
	f = swapFigures{ProxyDownSeconds: synced.Sub(stopAt).Seconds()}
	// Not fatal: the checks that follow say what a missing takeover breaks.
	if err := framework.WaitFor(ctx, 30*time.Second, 50*time.Millisecond, func() (bool, error) {
		return strings.Contains(p.Logs(), takeoverDone), nil
	}); err != nil {
		t.Errorf("miniproxy never logged %q: %v", takeoverDone, err)
	}
	f.CleanupSeconds = time.Since(synced).Seconds()
	// Keep probing across the removal and a little after it.
	time.Sleep(2 * time.Second)
	return p, f, stopAt, synced
}

// finish stops the prober and fills in f from what it saw.
func finish(pr *framework.Prober, f *swapFigures, stopAt, synced time.Time) framework.ProbeReport {
	rep := pr.Stop()
	var first *framework.ProbeAttempt
	f.NewFailedAfterSync, _, first = framework.Failed(rep.New, synced, time.Time{})
	f.NewFailedBeforeSync, _, _ = framework.Failed(rep.New, stopAt, synced)
	f.NewConns = len(rep.New)
	var lfirst *framework.ProbeAttempt
	f.LongFailed, f.LongAsks, lfirst = framework.Failed(rep.Long, time.Time{}, time.Time{})
	if first == nil {
		first = lfirst
	}
	if first != nil {
		f.FirstFailure = fmt.Sprintf("%s: %v", first.At.Format("15:04:05.000"), first.Err)
	}
	return rep
}

// waitStopsAnswering polls until ten connections in a row to addr fail;
// it returns the last answer seen if that never happens.
func waitStopsAnswering(ctx context.Context, client *framework.Pod, addr string, timeout time.Duration) (string, bool) {
	fails, last := 0, ""
	err := framework.WaitFor(ctx, timeout, 100*time.Millisecond, func() (bool, error) {
		name, err := framework.AskFrom(ctx, client.NS, addr, 300*time.Millisecond)
		if err != nil {
			fails++
		} else {
			fails, last = 0, name
		}
		return fails >= 10, nil
	})
	return last, err == nil
}

// cniNFT creates a CNI-like nftables table on the node.
var cniNFT = [][]string{
	{"nft", "add", "table", "inet", "cni-e2e"},
	{"nft", "add", "chain", "inet", "cni-e2e", "forward", "{", "type", "filter", "hook", "forward", "priority", "0", ";", "policy", "accept", ";", "}"},
}

// TestTakeoverFromKubeProxy (issue 18, part 1): upstream kube-proxy v1.37.2
// in iptables, then nftables mode programs a node with a Service; it is
// stopped (SIGTERM leaves its rules) and miniproxy started on the node in
// this mode. With a prober running: no new connection fails once miniproxy
// has synced, long-lived connections keep their endpoint; then the
// Service's endpoints change and it is deleted — it must stop answering
// (before the takeover existed, kube-proxy's stale rules kept answering
// it) — a new Service answers, kube-proxy's objects are gone and kubelet's
// chains and a CNI's table are untouched.
func TestTakeoverFromKubeProxy(t *testing.T) {
	for _, kpMode := range []string{"iptables", "nftables"} {
		t.Run("from-kube-proxy-"+kpMode, func(t *testing.T) {
			suite.ForEachMode(t, "takeover from kube-proxy "+kpMode+": no failed connection after the first sync, deleted Service stops answering, kube-proxy's objects gone", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
				takeoverFrom(t, me, row, kpMode)
			})
		})
	}
}

func takeoverFrom(t *testing.T, me *framework.ModeEnv, row *framework.Row, kpMode string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := me.Cluster
	row.Note("node with kubelet's chains and a CNI table")
	nodes, err := c.AddNodes(ctx, fmt.Sprintf("%s-tko-%s", modePrefix(me.Mode), shortID()), 1)
	if err != nil {
		t.Fatal(err)
	}
	node := nodes[0]
	for _, args := range foreignSetup {
		if _, err := node.NS.Run(ctx, append([]string{"iptables", "-w", "5"}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.NS.RunAll(ctx, cniNFT...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			rules, rerr := node.Rules(rctx, "iptables")
			t.Logf("--- rules on %s (err=%v) ---\n%s", node.Name, rerr, rules)
		}
	})

	row.Note("kube-proxy " + kpMode + " programs a Service")
	kp, err := c.StartKubeProxy(ctx, node, kpMode)
	if kp != nil {
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- kube-proxy %s on %s ---\n%s", kpMode, node.Name, kp.Logs())
			}
			_ = kp.Stop()
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	name := "tko-" + kpMode[:3]
	ns, err := c.NewNamespace(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, name))
	if err != nil {
		t.Fatal(err)
	}
	dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name, Replicas: 2, Nodes: []*framework.Node{node, me.Nodes[0]}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dep.Delete() })
	client := newClient(t, ctx, node, name+"-client")
	addr := framework.VIP(svc, "tcp")
	if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 90*time.Second); err != nil {
		t.Fatalf("kube-proxy %s never served %s: last %v: %v\n%s", kpMode, addr, got, err, kp.Logs())
	}
	foreignBefore, err := foreignLines(ctx, node)
	if err != nil {
		t.Fatal(err)
	}

	row.Note("swap kube-proxy → miniproxy with the prober running")
	pr, err := client.StartProber(ctx, addr, 10*time.Millisecond, 3)
	if err != nil {
		t.Fatal(err)
	}
	mp, f, stopAt, synced := swap(t, ctx, kp, func() (*framework.Proxy, error) {
		return c.StartProxy(ctx, node, framework.ProxyOptions{Mode: me.Mode})
	})
	finish(pr, &f, stopAt, synced)
	f.From, f.To = "kube-proxy/"+kpMode, "miniproxy/"+me.Mode
	writeSwapFigures(t, fmt.Sprintf("kube-proxy-%s-to-miniproxy-%s", kpMode, me.Mode), f)
	if f.NewFailedAfterSync != 0 || f.LongFailed != 0 {
		t.Errorf("after miniproxy's first sync %d of the new connections failed, %d of %d questions on long-lived connections failed (first: %s)", f.NewFailedAfterSync, f.LongFailed, f.LongAsks, f.FirstFailure)
	}
	if f.NewConns < 100 {
		t.Errorf("only %d probes completed", f.NewConns)
	}
	t.Logf("objects removed:\n%s", grepLines(mp.Logs(), "removed leftover", "leftovers removed"))

	row.Note("the Service that existed before the swap follows its endpoints")
	if err := dep.Scale(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 30*time.Second); err != nil {
		t.Fatalf("after scaling to 1, %s: want exactly %v, last %v: %v", addr, dep.PodNames(), got, err)
	}
	row.Note("the Service that existed before the swap stops answering once deleted")
	if err := c.DeleteService(ctx, ns, name); err != nil {
		t.Fatal(err)
	}
	if last, ok := waitStopsAnswering(ctx, client, addr, 30*time.Second); !ok {
		t.Errorf("deleted Service %s/%s (%s) still answers %s after 30 s: kube-proxy's %s rules left behind", ns, name, addr, last, kpMode)
	}

	row.Note("a Service created after the swap answers")
	svc2, err := c.CreateService(ctx, framework.ClusterIPService(ns, name+"-new"))
	if err != nil {
		t.Fatal(err)
	}
	dep2, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name + "-new", Replicas: 2, Nodes: []*framework.Node{node, me.Nodes[0]}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dep2.Delete() })
	if got, err := waitExactly(ctx, "tcp", client, framework.VIP(svc2, "tcp"), dep2.PodNames(), 30*time.Second); err != nil {
		t.Fatalf("Service created after the swap: want exactly %v, last %v: %v", dep2.PodNames(), got, err)
	}

	row.Note("kube-proxy's objects gone, kubelet's and the CNI's kept")
	checkNoKubeProxy(t, ctx, node, me.Mode)
	if after, err := foreignLines(ctx, node); err != nil || after != foreignBefore {
		t.Errorf("kubelet's / Docker's chains changed by the takeover (err %v):\nbefore:\n%s\nafter:\n%s", err, foreignBefore, after)
	}
	if _, err := node.NS.Run(ctx, "nft", "list", "table", "inet", "cni-e2e"); err != nil {
		t.Errorf("the CNI's nftables table is gone: %v", err)
	}
	row.Note("")
}

// checkNoKubeProxy fails t if kube-proxy's objects are left on node, given
// the mode miniproxy runs in (in iptables mode the shared names are its own).
func checkNoKubeProxy(t *testing.T, ctx context.Context, node *framework.Node, mode string) {
	t.Helper()
	tables, err := node.NS.Run(ctx, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(tables, "kube-proxy") {
		t.Errorf("kube-proxy's nftables tables left:\n%s", tables)
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := node.NS.Run(ctx, save)
		if err != nil {
			t.Fatal(err)
		}
		gone := []string{":KUBE-FORWARD ", ":KUBE-PROXY-CANARY ", "kubernetes forwarding rules"}
		if mode != "iptables" || save == "ip6tables-save" {
			gone = append(gone, ":KUBE-SERVICES ", ":KUBE-SVC-", ":KUBE-SEP-", ":KUBE-POSTROUTING ", ":KUBE-PROXY-FIREWALL ")
		}
		for _, g := range gone {
			if strings.Contains(out, g) {
				t.Errorf("%s: kube-proxy's %q left:\n%s", save, g, out)
			}
		}
	}
}

// grepLines returns the lines of s containing any of subs.
func grepLines(s string, subs ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, sub := range subs {
			if strings.Contains(l, sub) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// TestModeSwitch (issue 18, part 2): miniproxy restarted on a live node with
// another --proxy-mode, iptables → nftables → iptables, with the prober
// running: no new connection fails, long-lived connections keep their
// endpoint, the old mode's rules are gone after each switch, and a Service
// deleted afterwards stops answering (no old mode's rule keeps it alive).
func TestModeSwitch(t *testing.T) {
	row := suite.Matrix.Track(t, "mode switch iptables → nftables → iptables: no failed connection, old mode's rules gone", framework.ModeIndependent)
	for _, m := range []string{"iptables", "nftables"} {
		if !slices.Contains(suite.Enabled, m) {
			row.Skip("needs iptables and nftables in MINIPROXY_E2E_MODES")
		}
	}
	c := suite.Cluster(t, row)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	nodes, err := c.AddNodes(ctx, "switch-"+shortID(), 1)
	if err != nil {
		t.Fatal(err)
	}
	node := nodes[0]
	row.Note("miniproxy iptables serves a Service")
	p, err := c.StartProxy(ctx, node, framework.ProxyOptions{Mode: "iptables"})
	if p != nil {
		first := p
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- miniproxy iptables on %s ---\n%s", node.Name, first.Logs())
			}
			_ = first.Stop()
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	name := "switch"
	ns, err := c.NewNamespace(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, name))
	if err != nil {
		t.Fatal(err)
	}
	dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: name, Replicas: 2, Nodes: []*framework.Node{node}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dep.Delete() })
	client := newClient(t, ctx, node, name+"-client")
	addr := framework.VIP(svc, "tcp")
	if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 60*time.Second); err != nil {
		t.Fatalf("%s: want exactly %v, last %v: %v", addr, dep.PodNames(), got, err)
	}

	from := "iptables"
	for _, to := range []string{"nftables", "iptables"} {
		row.Note(fmt.Sprintf("switch %s → %s", from, to))
		pr, err := client.StartProber(ctx, addr, 10*time.Millisecond, 3)
		if err != nil {
			t.Fatal(err)
		}
		np, f, stopAt, synced := swap(t, ctx, p, func() (*framework.Proxy, error) {
			return c.StartProxy(ctx, node, framework.ProxyOptions{Mode: to})
		})
		finish(pr, &f, stopAt, synced)
		f.From, f.To = "miniproxy/"+from, "miniproxy/"+to
		writeSwapFigures(t, fmt.Sprintf("miniproxy-%s-to-%s", from, to), f)
		if f.NewFailedAfterSync+f.NewFailedBeforeSync != 0 || f.LongFailed != 0 {
			t.Errorf("%s → %s: %d new connections failed after the new mode's first sync, %d before it (old rules serving), %d of %d long-lived questions failed (first: %s)",
				from, to, f.NewFailedAfterSync, f.NewFailedBeforeSync, f.LongFailed, f.LongAsks, f.FirstFailure)
		}
		// The old mode's objects are gone.
		if to == "nftables" {
			out, err := node.NS.Run(ctx, "iptables-save")
			if err != nil || strings.Contains(out, ":KUBE-SERVICES ") || strings.Contains(out, ":KUBE-SVC-") {
				t.Errorf("iptables mode's chains left after switching to nftables (err %v):\n%s", err, out)
			}
		} else {
			out, err := node.NS.Run(ctx, "nft", "list", "tables")
			if err != nil || strings.Contains(out, "miniproxy") {
				t.Errorf("nftables mode's tables left after switching to iptables (err %v):\n%s", err, out)
			}
		}
		p, from = np, to
	}
	row.Note("a Service deleted after the switches stops answering")
	if err := c.DeleteService(ctx, ns, name); err != nil {
		t.Fatal(err)
	}
	if last, ok := waitStopsAnswering(ctx, client, addr, 30*time.Second); !ok {
		t.Errorf("deleted Service %s still answers %s after two mode switches", addr, last)
	}
	row.Note("")
}
