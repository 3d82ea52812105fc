package iptables

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/crashtest"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// crashSnapshots are A (the scale benchmarks' Services) and B = crashtest.Change(A).
func crashSnapshots(p crashtest.Params) (a, b *model.Snapshot) {
	a = scaleSnapshot(p.Services, p.Endpoints)
	return a, crashtest.Change(a, p.Changed)
}

// TestKernelCrashChild is the process TestKernelCrash kills: started by it
// inside a namespace, it runs the backend as cmd/miniproxy does (the
// iptables tools on PATH, in the namespace it runs in). Run on its own it
// does nothing.
func TestKernelCrashChild(t *testing.T) {
	crashtest.Child(t, crashSnapshots, func() (crashtest.SyncFunc, error) {
		b, err := New(slog.New(slog.NewTextHandler(os.Stderr, nil)), cfg(), nil)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, snap *model.Snapshot, full bool) error {
			_, err := b.Sync(ctx, snap, full)
			return err
		}, nil
	})
}

// TestKernelCrash SIGKILLs the iptables backend at random points of large
// syncs, with iptables-nft and with iptables-legacy, and checks atomicity
// right after each kill and convergence after a restart (package crashtest).
// MINIPROXY_CRASH_SERVICES sets the size (default 1000; `make e2e` runs
// 10000); results go to e2e-results/crash-iptables.md.
func TestKernelCrash(t *testing.T) {
	netnstest.RequireRoot(t, "iptables-restore", "iptables-save")
	p := crashtest.Load(t)
	var reps []*crashtest.Report
	defer func() { crashtest.Write(t, "iptables", reps...) }()
	for _, variant := range []string{"nft", "legacy"} {
		t.Run(variant, func(t *testing.T) {
			multi, err := exec.LookPath("xtables-" + variant + "-multi")
			if err != nil {
				t.Skipf("iptables-%s not installed: %v", variant, err)
			}
			reps = append(reps, crashtest.Run(t, crashMode(t, variant, multi), p, crashSnapshots))
		})
	}
}

// crashMode runs the child with a PATH on which iptables, iptables-save and
// iptables-restore are the given variant (as on a node whose alternatives
// select it), so the test does not depend on the host's choice.
func crashMode(t *testing.T, variant, multi string) crashtest.Mode {
	shim := t.TempDir()
	for _, name := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		if err := os.Symlink(multi, filepath.Join(shim, name)); err != nil {
			t.Fatal(err)
		}
	}
	tool := "iptables-" + variant
	guarantee := "every sync is one iptables-restore, and each table (nat, then filter) is either as before the killed sync or as it " +
		"wanted it (iptables-legacy commits each table on its own, as in kube-proxy); the hooks in the built-in chains are inserted " +
		"one at a time after a full sync's restore."
	if variant == "nft" {
		guarantee = "each Service's rules in each table (its lines in the shared chains and every chain reachable from them) are " +
			"either all as before the killed sync or all as it wanted them; with a partial sync (one restore), each whole table is " +
			"(nat and filter are separate commits, as in kube-proxy). A full sync (a process's first) writes the Services' own " +
			"chains in restores of " + fmt.Sprint(coldChunk) + " Services before one restore switches the shared chains, so a kill " +
			"between those restores leaves the old dispatch jumping to complete chains of either generation, and new chains " +
			"nothing jumps to yet (removed by the restart); the hooks are inserted one at a time."
	}
	return crashtest.Mode{
		Name: "iptables (" + tool + ")", Column: "iptables", Variant: legacyVariant(variant),
		Env: []string{"PATH=" + shim + ":" + os.Getenv("PATH")},
		Foreign: func(t testing.TB, ns *netnstest.NS) {
			// Docker's chains and kubelet's canary: other software's.
			for _, r := range [][]string{
				{"-t", "filter", "-N", "DOCKER-USER"},
				{"-t", "filter", "-A", "DOCKER-USER", "-j", "RETURN"},
				{"-t", "filter", "-A", "FORWARD", "-j", "DOCKER-USER"},
				{"-t", "filter", "-N", "DOCKER"},
				{"-t", "filter", "-A", "DOCKER", "-d", "172.17.0.2/32", "!", "-i", "docker0", "-o", "docker0", "-p", "tcp", "--dport", "80", "-j", "ACCEPT"},
				{"-t", "filter", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
				{"-t", "nat", "-N", "DOCKER"},
				{"-t", "nat", "-A", "DOCKER", "-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "172.17.0.2:80"},
				{"-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"},
				{"-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE"},
				{"-t", "nat", "-N", "KUBE-KUBELET-CANARY"},
				{"-t", "filter", "-N", "KUBE-KUBELET-CANARY"},
			} {
				ns.MustRun(t, append([]string{tool, "-w", "5"}, r...)...)
			}
		},
		Dump: func(ctx context.Context, ns *netnstest.NS) (crashtest.State, error) {
			st := crashtest.State{}
			for _, table := range []Table{NAT, Filter} {
				out, err := ns.Run(ctx, "", tool+"-save", "-t", string(table))
				if err != nil {
					return nil, err
				}
				if err := iptablesUnits(st, table, out); err != nil {
					return nil, err
				}
			}
			return st, nil
		},
		Group: func(phase crashtest.Phase, u string) (string, bool) {
			table, _, _ := strings.Cut(strings.TrimPrefix(u, "~"), " ")
			if strings.Contains(u, " hook ") {
				// Inserted one at a time after a full sync's restores.
				return u, true
			}
			if phase == crashtest.Partial || variant == "legacy" {
				// One restore; iptables commits each table on its own.
				return table, true
			}
			// An iptables-nft full sync: the services' chains go in
			// chunks of coldChunk Services, each its own restore, then
			// one restore switches the shared chains. Chains a chunk
			// created that nothing jumps to yet are not checked until
			// the restart.
			return u, !strings.HasPrefix(u, "~")
		},
		Guarantee: guarantee,
	}
}

// legacyVariant names the legacy variant in the matrix; iptables-nft is
// the iptables column's default (Debian's).
func legacyVariant(v string) string {
	if v == "legacy" {
		return "iptables-legacy"
	}
	return ""
}

var (
	reComment = regexp.MustCompile(`--comment (?:"([^"]*)"|(\S+))`)
	reJump    = regexp.MustCompile(`\s-[jg] (\S+)`)
)

// serviceChain reports whether a chain belongs to one service port.
func serviceChain(name string) bool {
	for _, p := range ownedPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// serviceKey is the "ns/name:port/PROTO" a rule's comment names, if any.
func serviceKey(line string) string {
	m := reComment.FindStringSubmatch(line)
	if m == nil {
		return ""
	}
	c := m[1] + m[2]
	first, _, _ := strings.Cut(c, " ")
	if strings.Contains(first, "/") && strings.Contains(first, ":") {
		return first
	}
	return ""
}

// iptablesUnits reduces one table's iptables-save output to units:
//   - "<table> svc <ns/name:port/PROTO>": the service port's lines in the
//     shared chains (sorted: their order never matters) and every service
//     chain reachable from them, with its rules in order;
//   - "<table> chain <NAME>": one of miniproxy's static chains, without the
//     per-service lines;
//   - "<table> hook <builtin> <rule>": one jump from a built-in chain into
//     miniproxy's chains;
//   - "~<table> unreferenced": service chains nothing jumps to;
//   - "<table> foreign": everything else (other software's chains and rules,
//     built-in policies).
func iptablesUnits(st crashtest.State, table Table, save string) error {
	type chain struct {
		policy string
		rules  []string
	}
	chains := map[string]*chain{}
	var order []string
	for _, line := range strings.Split(save, "\n") {
		switch {
		case line == "" || strings.HasPrefix(line, "#") || line == "COMMIT" || strings.HasPrefix(line, "*"):
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) < 2 {
				return fmt.Errorf("%s: bad chain line %q", table, line)
			}
			chains[f[0]] = &chain{policy: f[1]}
			order = append(order, f[0])
		case strings.HasPrefix(line, "-A "):
			name, _, _ := strings.Cut(line[3:], " ")
			c := chains[name]
			if c == nil {
				return fmt.Errorf("%s: rule for undeclared chain: %q", table, line)
			}
			c.rules = append(c.rules, line)
		default:
			return fmt.Errorf("%s: unexpected line %q", table, line)
		}
	}
	sort.Strings(order)
	prefix := string(table) + " "
	var foreign []string
	perSvc := map[string][]string{}
	reached := map[string]bool{}
	for _, name := range order {
		c := chains[name]
		switch {
		case c.policy != "-": // built-in
			foreign = append(foreign, ":"+name+" "+c.policy)
			for _, r := range c.rules {
				if m := reJump.FindStringSubmatch(r); m != nil && ownedChain(table, m[1]) {
					st[prefix+"hook "+r] = r
				} else {
					foreign = append(foreign, r)
				}
			}
		case !ownedChain(table, name):
			foreign = append(foreign, ":"+name)
			foreign = append(foreign, c.rules...)
		case serviceChain(name):
		default:
			static := []string{":" + name}
			for _, r := range c.rules {
				if k := serviceKey(r); k != "" {
					perSvc[k] = append(perSvc[k], r)
				} else {
					static = append(static, r)
				}
			}
			st[prefix+"chain "+name] = strings.Join(static, "\n")
		}
	}
	for k, lines := range perSvc {
		sort.Strings(lines)
		text := append([]string(nil), lines...)
		// Breadth-first through the service chains they reach.
		var queue []string
		seen := map[string]bool{}
		push := func(rules []string) {
			for _, r := range rules {
				if m := reJump.FindStringSubmatch(r); m != nil && serviceChain(m[1]) && !seen[m[1]] {
					seen[m[1]] = true
					queue = append(queue, m[1])
				}
			}
		}
		push(lines)
		var reach []string
		for len(queue) > 0 {
			n := queue[0]
			queue = queue[1:]
			reach = append(reach, n)
			if c := chains[n]; c != nil {
				push(c.rules)
			}
		}
		sort.Strings(reach)
		for _, n := range reach {
			reached[n] = true
			c := chains[n]
			if c == nil {
				text = append(text, ":"+n+" MISSING")
				continue
			}
			text = append(text, ":"+n)
			text = append(text, c.rules...)
		}
		st[prefix+"svc "+k] = strings.Join(text, "\n")
	}
	var unref []string
	for _, name := range order {
		if serviceChain(name) && !reached[name] {
			unref = append(unref, ":"+name)
			unref = append(unref, chains[name].rules...)
		}
	}
	if len(unref) > 0 {
		st["~"+prefix+"unreferenced"] = strings.Join(unref, "\n")
	}
	st[prefix+"foreign"] = strings.Join(foreign, "\n")
	return nil
}

// TestIptablesUnits checks the reduction the crash test compares: a changed
// endpoint changes only its Service's unit, a Service whose dispatch line
// jumps to a chain of the other generation is neither version, and chains
// nothing jumps to, hooks and other software's rules are units of their own.
func TestIptablesUnits(t *testing.T) {
	web := mt.SP("ns", "web", "", "172.30.0.20", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	dns := mt.SP("ns", "dns", "", "172.30.0.10", 53, mt.Ep("10.180.0.9", 53, "node-a"))
	web2 := *web
	web2.Endpoints = []model.Endpoint{mt.Ep("10.180.0.6", 8080, "node-a"), web.Endpoints[1]}
	units := func(text string) crashtest.State {
		t.Helper()
		st := crashtest.State{}
		nat, _, _ := strings.Cut(text, "*filter\n")
		// What iptables-save adds: built-in chains, a hook, someone's rule.
		nat = strings.Replace(nat, "*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -j DOCKER\n", 1)
		if err := iptablesUnits(st, NAT, nat); err != nil {
			t.Fatal(err)
		}
		return st
	}
	a := units(renderText(t, cfg(), model.IPv4, mt.Snap(web, dns)))
	b := units(renderText(t, cfg(), model.IPv4, mt.Snap(&web2, dns)))
	for _, k := range []string{"nat svc ns/web:/TCP", "nat svc ns/dns:/TCP", "nat chain KUBE-SERVICES", "nat foreign",
		`nat hook -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`} {
		if _, ok := a[k]; !ok {
			t.Errorf("no unit %q in %v", k, crashKeys(a))
		}
	}
	if !strings.Contains(a["nat foreign"], "-A PREROUTING -j DOCKER") || !strings.Contains(a["nat foreign"], ":DOCKER") {
		t.Errorf("foreign unit lacks DOCKER: %q", a["nat foreign"])
	}
	for k := range a {
		if (a[k] == b[k]) == (k == "nat svc ns/web:/TCP") {
			t.Errorf("unit %q: equal %v after changing ns/web's endpoint", k, a[k] == b[k])
		}
	}
	// ns/web's service chain with B's rules, but B's new endpoint chain
	// missing: the kernel would refuse that, the reduction must not hide it.
	sepB := regexp.MustCompile(`KUBE-SEP-\w+`).FindAllString(b["nat svc ns/web:/TCP"], -1)
	var newSEP string
	for _, s := range sepB {
		if !strings.Contains(a["nat svc ns/web:/TCP"], s) {
			newSEP = s
		}
	}
	if newSEP == "" {
		t.Fatal("no new endpoint chain in B")
	}
	text := renderText(t, cfg(), model.IPv4, mt.Snap(&web2, dns))
	var kept []string
	for _, l := range strings.Split(text, "\n") {
		if !strings.HasPrefix(l, ":"+newSEP) && !strings.HasPrefix(l, "-A "+newSEP) {
			kept = append(kept, l)
		}
	}
	half := units(strings.Join(kept, "\n"))
	if g := half["nat svc ns/web:/TCP"]; g == a["nat svc ns/web:/TCP"] || g == b["nat svc ns/web:/TCP"] || !strings.Contains(g, newSEP+" MISSING") {
		t.Errorf("half-written Service reads as %q", g)
	}
	// A chain nothing jumps to is its own unit.
	orphan := units(strings.Replace(renderText(t, cfg(), model.IPv4, mt.Snap(web, dns)), "*nat\n", "*nat\n:KUBE-SVC-ORPHAN - [0:0]\n", 1))
	if orphan["~nat unreferenced"] != ":KUBE-SVC-ORPHAN" {
		t.Errorf("unreferenced chain unit = %q", orphan["~nat unreferenced"])
	}
}

// TestKernelLegacyFullSyncIsOneRestore: with iptables-legacy a full sync is
// one restore, not chunks. Legacy reads and writes a whole table per commit,
// so chunks made a 10k-Service cold start five times slower (see coldChunk)
// and left a killed full sync with a mix of chains of two generations.
func TestKernelLegacyFullSyncIsOneRestore(t *testing.T) {
	netnstest.RequireRoot(t, "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")
	ns := netnstest.New(t, "legacy")
	c := cfg()
	c.NetNS = proxy.NetNS(ns.Path())
	inNS := ExecRunner(c.NetNS)
	// The tools the backend runs, as the legacy variant (never in the
	// root namespace: only inside ns).
	run := func(ctx context.Context, stdin, name string, args ...string) ([]byte, error) {
		return inNS(ctx, stdin, strings.Replace(name, "iptables", "iptables-legacy", 1), args...)
	}
	b, err := New(slog.New(slog.NewTextHandler(os.Stderr, nil)), c, run)
	if err != nil {
		t.Fatal(err)
	}
	var restores int
	b.OnRestore = func(model.Family, string) { restores++ }
	snap := scaleSnapshot(3*coldChunk, 2)
	for i, what := range []string{"cold start", "restart's first sync"} {
		if i == 1 {
			// A new process over the rules of the first.
			fresh, err := New(slog.New(slog.NewTextHandler(os.Stderr, nil)), c, run)
			if err != nil {
				t.Fatal(err)
			}
			fresh.OnRestore, b = b.OnRestore, fresh
		}
		restores = 0
		if _, err := b.Sync(context.Background(), snap, true); err != nil {
			t.Fatal(err)
		}
		if restores != 1 {
			t.Errorf("%s: %d restores, want the legacy full sync in one", what, restores)
		}
	}
	save := ns.MustRun(t, "iptables-legacy-save", "-t", "nat")
	if n := strings.Count(save, "-A KUBE-SERVICES "); n != len(snap.Services) {
		t.Fatalf("%d dispatch rules, want %d", n, len(snap.Services))
	}
}

func crashKeys(m crashtest.State) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
