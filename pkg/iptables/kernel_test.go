package iptables

import (
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// lab is a node namespace with routed pod namespaces, the smallest topology
// where DNAT to pods and masquerade can be observed with real connections.
type lab struct {
	node    *netnstest.NS
	pods    map[string]*netnstest.Pod
	client  *netnstest.Pod
	backend *Backend
}

func newLab(t *testing.T, podIPs ...string) *lab {
	t.Helper()
	netnstest.RequireRoot(t, "iptables-restore", "iptables-save", "sysctl")
	n := netnstest.NewNode(t, podIPs...)
	l := &lab{node: n.NS, pods: n.Pods, client: n.Client}
	b, err := New(slog.New(slog.NewTextHandler(os.Stderr, nil)), l.cfg(), nil)
	if err != nil {
		t.Fatal(err)
	}
	l.backend = b
	return l
}

// cfg is the tests' configuration, programming the lab's node namespace.
func (l *lab) cfg() proxy.Config {
	c := cfg()
	c.NetNS = proxy.NetNS(l.node.Path())
	return c
}

func (l *lab) sync(t *testing.T, snap *model.Snapshot, full bool) {
	t.Helper()
	if _, err := l.backend.Sync(context.Background(), snap, full); err != nil {
		t.Fatal(err)
	}
}

// counts makes n connections from the client to addr and counts answers by pod name.
func (l *lab) counts(t *testing.T, network, addr string, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for i := 0; i < n; i++ {
		name, _, err := l.client.Ask(network, addr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d to %s: %v", i, addr, err)
		}
		got[name]++
	}
	return got
}

func TestKernelClusterIPSpreads(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	sp := mt.SP("ns", "web", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.0.6", 8080, "node-a"))
	l.sync(t, mt.Snap(sp), true)

	got := l.counts(t, "tcp", "172.30.0.3:80", 200)
	if len(got) != 2 || got["poda"]+got["podb"] != 200 {
		t.Fatalf("want answers from both pods only, got %v", got)
	}
	t.Logf("200 connections: %v", got)

	// Read back what the kernel holds: the chains and the DNAT targets.
	save := l.node.MustRun(t, "iptables-save", "-t", "nat")
	for _, want := range []string{"-A KUBE-SERVICES", "--to-destination 10.180.0.5:8080", "--to-destination 10.180.0.6:8080", "-j KUBE-SERVICES"} {
		if !strings.Contains(save, want) {
			t.Errorf("iptables-save lacks %q:\n%s", want, save)
		}
	}
}

func TestKernelPartialSyncAndCleanup(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	// Someone else's rule in the same table must survive everything we do.
	l.node.MustRun(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.99.0.0/16", "-j", "RETURN")

	a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	b := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	s1 := mt.Snap(a, b)
	l.sync(t, s1, true)

	// Change only b: the partial restore must not mention a.
	var text string
	l.backend.OnRestore = func(_ model.Family, s string) { text = s }
	b2 := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	s2 := mt.Snap(a, b2)
	s2.Services[a.Name] = a // same pointer: unchanged
	res, err := l.backend.Sync(context.Background(), s2, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Full || res.Changed != 1 {
		t.Fatalf("want a partial sync of 1 service, got %+v", res)
	}
	if strings.Contains(text, "ns/a:") || !strings.Contains(text, "ns/b:") {
		t.Fatalf("partial restore should touch only ns/b:\n%s", text)
	}
	if got := l.counts(t, "tcp", "172.30.0.4:80", 20); got["poda"] != 20 {
		t.Fatalf("after partial sync ns/b should reach poda only, got %v", got)
	}
	if got := l.counts(t, "tcp", "172.30.0.3:80", 5); got["poda"] != 5 {
		t.Fatalf("ns/a should be untouched, got %v", got)
	}

	// Remove a: its VIP rejects at once (no service rule left means the packet is
	// routed nowhere; with the service gone entirely we only check the chain is gone).
	s3 := mt.Snap(b2)
	if _, err := l.backend.Sync(context.Background(), s3, false); err != nil {
		t.Fatal(err)
	}
	save := l.node.MustRun(t, "iptables-save", "-t", "nat")
	if strings.Contains(save, "ns/a:") {
		t.Fatalf("chains of removed service remain:\n%s", save)
	}

	if err := l.backend.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, table := range []string{"nat", "filter"} {
		save := l.node.MustRun(t, "iptables-save", "-t", table)
		if strings.Contains(save, "KUBE-") {
			t.Fatalf("cleanup left KUBE- chains in %s:\n%s", table, save)
		}
	}
	if save := l.node.MustRun(t, "iptables-save", "-t", "nat"); !strings.Contains(save, "-s 10.99.0.0/16 -j RETURN") {
		t.Fatalf("cleanup removed someone else's rule:\n%s", save)
	}
}

func TestKernelRejectWithoutEndpoints(t *testing.T) {
	l := newLab(t, "10.180.0.5")
	l.sync(t, mt.Snap(mt.SP("ns", "empty", "", "172.30.0.9", 80)), true)
	start := time.Now()
	_, _, err := l.client.Ask("tcp", "172.30.0.9:80", 3*time.Second)
	if err == nil {
		t.Fatal("connection to a service without endpoints succeeded")
	}
	if !strings.Contains(err.Error(), "refused") && !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("want an immediate reject, got %v after %v", err, time.Since(start))
	}
}

func TestKernelDriftRepair(t *testing.T) {
	l := newLab(t, "10.180.0.5")
	sp := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	snap := mt.Snap(sp)
	l.sync(t, snap, true)
	// An operator flushes our dispatch chain and deletes the hook.
	l.node.MustRun(t, "iptables", "-t", "nat", "-F", "KUBE-SERVICES")
	l.node.MustRun(t, "iptables", "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
	l.node.MustRun(t, "iptables", "-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
	if _, _, err := l.client.Ask("tcp", "172.30.0.3:80", 500*time.Millisecond); err == nil {
		t.Fatal("VIP still answers after the rules were removed; the test proves nothing")
	}
	l.sync(t, snap, true) // the periodic full sync
	if got := l.counts(t, "tcp", "172.30.0.3:80", 5); got["poda"] != 5 {
		t.Fatalf("full sync did not repair: %v", got)
	}
}

// TestKernelChunkedFullSync: a full sync larger than one chunk still programs
// every Service, including the last one, and a second full sync (chains now
// exist and are refilled) keeps them working.
func TestKernelChunkedFullSync(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	snap := scaleSnapshot(2*coldChunk+50, 2)
	last := mt.SP("zz", "last", "", "172.31.255.1", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.0.6", 8080, "node-a"))
	snap.Services[last.Name] = last
	var restores int
	l.backend.OnRestore = func(model.Family, string) { restores++ }
	l.sync(t, snap, true)
	if restores < 3 {
		t.Fatalf("want the full sync split into chunks, got %d restores", restores)
	}
	if got := l.counts(t, "tcp", "172.31.255.1:80", 20); got["poda"]+got["podb"] != 20 || len(got) != 2 {
		t.Fatalf("last service after a chunked sync: %v", got)
	}
	l.sync(t, snap, true)
	if got := l.counts(t, "tcp", "172.31.255.1:80", 10); got["poda"]+got["podb"] != 10 {
		t.Fatalf("after a second full sync: %v", got)
	}
}

// TestKernelDriftCheckGeneration: a periodic full sync after only our own
// commits is settled by the nf_tables generation and rewrites nothing; one
// commit by anyone else makes it rewrite everything, and repair.
func TestKernelDriftCheckGeneration(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	if l.backend.generation == nil {
		t.Skip("skipping: iptables here is not the nf_tables variant; drift checks always rewrite")
	}
	var restores int
	l.backend.OnRestore = func(model.Family, string) { restores++ }
	a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	l.sync(t, mt.Snap(a), true)
	// A partial sync of our own keeps the kernel known.
	a2 := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	l.sync(t, mt.Snap(a2), false)
	restores = 0
	l.sync(t, mt.Snap(a2), true)
	if restores != 0 {
		t.Fatalf("periodic full sync with only our own commits since: %d restores, want 0", restores)
	}
	if got := l.counts(t, "tcp", "172.30.0.3:80", 3); got["podb"] != 3 {
		t.Fatalf("after the skipped full sync: %v", got)
	}
	// Someone else deletes our service's rule: their commit bumps the generation.
	l.node.MustRun(t, "iptables", "-t", "nat", "-F", "KUBE-SERVICES")
	l.node.MustRun(t, "iptables", "-t", "nat", "-N", "OTHER-AGENT")
	if _, _, err := l.client.Ask("tcp", "172.30.0.3:80", 500*time.Millisecond); err == nil {
		t.Fatal("VIP still answers after KUBE-SERVICES was flushed; the test proves nothing")
	}
	l.sync(t, mt.Snap(a2), true)
	if restores == 0 {
		t.Fatal("full sync after a foreign commit rewrote nothing")
	}
	if got := l.counts(t, "tcp", "172.30.0.3:80", 3); got["podb"] != 3 {
		t.Fatalf("after the repairing full sync: %v", got)
	}
	if !strings.Contains(l.node.MustRun(t, "iptables-save", "-t", "nat"), ":OTHER-AGENT") {
		t.Fatal("the full sync removed another agent's chain")
	}
	restores = 0
	l.sync(t, mt.Snap(a2), true)
	if restores != 0 {
		t.Fatalf("full sync right after a repair: %d restores, want 0", restores)
	}
}

// TestKernelFullSyncDropsStaleChains: the backend keeps no chain names, so a
// full sync finds stale chains by rendering what it committed, and a new
// process by listing what a previous one left. Both must delete the chains
// of a Service that is gone, and only those.
func TestKernelFullSyncDropsStaleChains(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	b := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	c := mt.SP("ns", "c", "", "172.30.0.5", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	l.sync(t, mt.Snap(a, b, c), true)
	for _, svc := range []string{"ns/a:", "ns/b:", "ns/c:"} {
		if strings.Count(l.node.MustRun(t, "iptables-save", "-t", "nat"), svc) == 0 {
			t.Fatalf("%s not programmed", svc)
		}
	}

	// Same process: a forced rewrite (someone else committed) of {a, c}.
	l.node.MustRun(t, "iptables", "-t", "nat", "-N", "SOMEONE-ELSE")
	l.sync(t, mt.Snap(a, c), true)
	save := l.node.MustRun(t, "iptables-save", "-t", "nat")
	if strings.Contains(save, "ns/b:") || !strings.Contains(save, "ns/a:") || !strings.Contains(save, "ns/c:") {
		t.Fatalf("full sync of {a, c} in the same process:\n%s", save)
	}
	if !strings.Contains(save, ":SOMEONE-ELSE") {
		t.Fatalf("full sync deleted a chain that is not ours")
	}

	// A new process (restart) with only {a}: c's chains are a previous
	// run's leftovers.
	b2, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), l.cfg(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b2.Sync(context.Background(), mt.Snap(a), true); err != nil {
		t.Fatal(err)
	}
	save = l.node.MustRun(t, "iptables-save", "-t", "nat")
	if strings.Contains(save, "ns/c:") || !strings.Contains(save, "ns/a:") {
		t.Fatalf("first sync of a new process with {a}:\n%s", save)
	}
	if got := l.counts(t, "tcp", "172.30.0.3:80", 5); got["poda"] != 5 {
		t.Fatalf("ns/a after the restart: %v", got)
	}
}
