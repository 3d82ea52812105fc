package e2e

// The drift fault row (issue 15): someone flushes miniproxy's rules, deletes
// one of its chains, removes a map element or changes a DNAT address. Each
// must be repaired by the next full sync, so within --sync-period, and be
// counted in miniproxy_sync_drift_repairs_total{mode}. Other software's
// objects (a CNI-like nft table hooked where miniproxy hooks, foreign
// iptables chains and rules) stay untouched throughout.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// driftFault is one way of damaging miniproxy's rules on a node.
type driftFault struct {
	name string
	// apply damages the rules and says what it did.
	apply func(ctx context.Context) (string, error)
	// decoy: the damage sends connections to the decoy pod (otherwise
	// the Service stops answering).
	decoy bool
}

const driftRepairsMetric = "miniproxy_sync_drift_repairs_total"

func TestDriftFaults(t *testing.T) {
	const period = 5 * time.Second
	// A full sync starts at most one period after the previous one; the
	// repair is in place when it commits. The slack covers that sync's own
	// time and the probe's polling.
	const slack = 3 * time.Second
	suite.ForEachMode(t, "fault: rules flushed, chain deleted, map element removed, DNAT changed → repaired within sync-period, counted", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		if me.Mode != "iptables" && me.Mode != "nftables" {
			row.Skip("the drift faults are iptables and nftables cases")
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		row.Note("starting a node with --sync-period 5s")
		x, p := extraNode(t, ctx, me, "dfault", "--sync-period", period.String())
		client := newClient(t, ctx, x, "dfault-client")
		_, svc, dep := deployService(t, ctx, me, "dfault", 2)
		_, _, decoyDep := deployService(t, ctx, me, "dfault-decoy", 1)
		decoy := decoyDep.Pods()[0]
		addr := framework.VIP(svc, "tcp")
		want := dep.PodNames()
		if got, err := waitExactly(ctx, "tcp", client, addr, want, 60*time.Second); err != nil {
			t.Fatalf("VIP %s never worked from %s: %v: %v", addr, x.Name, got, err)
		}
		list := foreign(t, ctx, x)
		cni := cniLikeTable(t, ctx, x)
		before := list() + cni()

		target := dep.Pods()[0].IP.String()
		var faults []driftFault
		switch me.Mode {
		case "iptables":
			faults = iptablesFaults(x, svc.Spec.ClusterIP, target, decoy.IP.String())
		case "nftables":
			faults = nftablesFaults(x, svc.Namespace, svc.Name, svc.Spec.ClusterIP, target, decoy.IP.String())
		}
		var report strings.Builder
		fmt.Fprintf(&report, "# Drift faults, %s mode\n\nNode %s, --sync-period %v; repair = first probe after the damage in which every connection to %s reached exactly the Service's endpoints.\n\n| fault | what was done | repaired after | %s before → after |\n|---|---|---|---|\n",
			me.Mode, x.Name, period, addr, driftRepairsMetric)
		for _, f := range faults {
			row.Note("fault: " + f.name)
			count0 := driftRepairs(t, ctx, p, me.Mode)
			// A full sync may land between the damage and the check
			// that it took effect: retry a few times.
			var what string
			var at time.Time
			effective := false
			for attempt := 0; attempt < 4 && !effective; attempt++ {
				var err error
				if what, err = f.apply(ctx); err != nil {
					t.Fatalf("%s: %v", f.name, err)
				}
				at = time.Now()
				if f.decoy {
					got, err := client.TCPCounts(ctx, addr, 20)
					effective = err == nil && got.ByName[decoy.Name] > 0
				} else {
					effective = !client.Answers(ctx, addr, 500*time.Millisecond)
				}
			}
			if !effective {
				t.Fatalf("%s: the damage never showed in traffic to %s (4 tries; last: %s)", f.name, addr, what)
			}
			err := framework.WaitFor(ctx, period+slack, 100*time.Millisecond, func() (bool, error) {
				got, err := client.TCPCounts(ctx, addr, 24)
				return err == nil && got.Errors == 0 && slices.Equal(got.Names(), want), nil
			})
			took := time.Since(at)
			if err != nil {
				t.Fatalf("%s (%s): %s not repaired within sync-period %v + %v: %v", f.name, what, addr, period, slack, err)
			}
			var count1 float64
			if err := framework.WaitFor(ctx, 5*time.Second, 100*time.Millisecond, func() (bool, error) {
				count1 = driftRepairs(t, ctx, p, me.Mode)
				return count1 > count0, nil
			}); err != nil {
				t.Fatalf("%s: repaired after %v but %s{mode=%q} stayed %v", f.name, took.Round(time.Millisecond), driftRepairsMetric, me.Mode, count0)
			}
			t.Logf("%s: %s; repaired after %v; %s %v → %v", f.name, what, took.Round(time.Millisecond), driftRepairsMetric, count0, count1)
			fmt.Fprintf(&report, "| %s | %s | %v | %v → %v |\n", f.name, what, took.Round(10*time.Millisecond), count0, count1)
		}
		if after := list() + cni(); after != before {
			t.Fatalf("foreign objects changed:\n--- before ---\n%s\n--- after ---\n%s", before, after)
		}
		report.WriteString("\nForeign objects on the node (iptables chain and rule, an `ip` nft table, a CNI-like `inet` table with base chains at miniproxy's hooks and priorities) were identical before and after.\n")
		if err := os.MkdirAll(suite.ResultsDir, 0o755); err == nil {
			_ = os.WriteFile(filepath.Join(suite.ResultsDir, "drift-faults-"+me.Mode+".md"), []byte(report.String()), 0o644)
		}
		row.Note("")
	})
}

// driftRepairs reads miniproxy_sync_drift_repairs_total{mode} from the
// proxy's /metrics.
func driftRepairs(t *testing.T, ctx context.Context, p *framework.Proxy, mode string) float64 {
	t.Helper()
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	key := fmt.Sprintf("%s{mode=%q}", driftRepairsMetric, mode)
	v, ok := m[key]
	if !ok {
		t.Fatalf("metrics on %s lack %s", p.Node.Name, key)
	}
	return v
}

// cniLikeTable creates a table like a CNI's (inet family, base chains at the
// hooks and priorities miniproxy uses, a set) and returns a function
// listing it.
func cniLikeTable(t *testing.T, ctx context.Context, n *framework.Node) func() string {
	t.Helper()
	if err := n.NS.RunAll(ctx,
		[]string{"nft", "add", "table", "inet", "e2e-cni"},
		[]string{"nft", "add", "chain", "inet", "e2e-cni", "pre", "{ type nat hook prerouting priority -100 ; policy accept ; }"},
		[]string{"nft", "add", "rule", "inet", "e2e-cni", "pre", "ip", "daddr", "192.0.2.1", "counter"},
		[]string{"nft", "add", "chain", "inet", "e2e-cni", "out", "{ type nat hook output priority -100 ; policy accept ; }"},
		[]string{"nft", "add", "rule", "inet", "e2e-cni", "out", "ip", "daddr", "192.0.2.1", "counter"},
		[]string{"nft", "add", "chain", "inet", "e2e-cni", "post", "{ type nat hook postrouting priority 100 ; policy accept ; }"},
		[]string{"nft", "add", "rule", "inet", "e2e-cni", "post", "ip", "saddr", "192.0.2.0/24", "masquerade"},
		[]string{"nft", "add", "chain", "inet", "e2e-cni", "filt", "{ type filter hook forward priority -110 ; policy accept ; }"},
		[]string{"nft", "add", "rule", "inet", "e2e-cni", "filt", "ip", "saddr", "192.0.2.55", "drop"},
		[]string{"nft", "add", "set", "inet", "e2e-cni", "blocked", "{ type ipv4_addr ; }"},
		[]string{"nft", "add", "element", "inet", "e2e-cni", "blocked", "{ 192.0.2.9 }"},
	); err != nil {
		t.Fatal(err)
	}
	return func() string {
		out, err := n.NS.Run(ctx, "nft", "list", "table", "inet", "e2e-cni")
		if err != nil {
			out = "ERROR " + err.Error()
		}
		return "### nft list table inet e2e-cni\n" + strings.TrimSpace(out) + "\n"
	}
}

// iptablesFaults: KUBE-SERVICES flushed, the Service's KUBE-SVC chain
// deleted, the DNAT of one endpoint moved to the decoy.
func iptablesFaults(n *framework.Node, vip, target, decoy string) []driftFault {
	svcChain := func(ctx context.Context) (string, []string, error) {
		save, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
		if err != nil {
			return "", nil, err
		}
		chain := ""
		var refs []string
		for _, l := range strings.Split(save, "\n") {
			if strings.HasPrefix(l, "-A KUBE-SERVICES ") && strings.Contains(l, "-d "+vip+"/32") && strings.Contains(l, "-p tcp") && strings.Contains(l, "--dport 80 ") {
				if i := strings.Index(l, "-j KUBE-SVC-"); i >= 0 {
					chain = strings.Fields(l[i+3:])[0]
				}
			}
		}
		for _, l := range strings.Split(save, "\n") {
			if chain != "" && strings.HasPrefix(l, "-A ") && strings.HasSuffix(l, "-j "+chain) {
				refs = append(refs, l)
			}
		}
		if chain == "" {
			return "", nil, fmt.Errorf("no KUBE-SERVICES rule for %s:80 jumping to a KUBE-SVC chain in:\n%s", vip, save)
		}
		return chain, refs, nil
	}
	return []driftFault{
		{name: "KUBE-SERVICES flushed", apply: func(ctx context.Context) (string, error) {
			_, err := n.NS.Run(ctx, "iptables", "-w", "-t", "nat", "-F", "KUBE-SERVICES")
			return "iptables -t nat -F KUBE-SERVICES", err
		}},
		{name: "KUBE-SVC chain deleted", apply: func(ctx context.Context) (string, error) {
			chain, refs, err := svcChain(ctx)
			if err != nil {
				return "", err
			}
			// The jumps to it go first: a referenced chain cannot be deleted.
			var script []string
			for _, r := range refs {
				script = append(script, "iptables -w -t nat -D "+strings.TrimPrefix(r, "-A "))
			}
			script = append(script, "iptables -w -t nat -F "+chain, "iptables -w -t nat -X "+chain)
			_, err = n.NS.Run(ctx, "sh", "-c", strings.Join(script, " && "))
			return fmt.Sprintf("deleted %s and the %d rules jumping to it", chain, len(refs)), err
		}},
		{name: "DNAT address changed", decoy: true, apply: func(ctx context.Context) (string, error) {
			save, err := n.NS.Run(ctx, "iptables-save", "-t", "nat")
			if err != nil {
				return "", err
			}
			for _, l := range strings.Split(save, "\n") {
				if !strings.HasPrefix(l, "-A KUBE-SEP-") || !strings.Contains(l, "-p tcp") || !strings.HasSuffix(l, "-j DNAT --to-destination "+target+":8080") {
					continue
				}
				chain := strings.Fields(l)[1]
				rules, err := n.NS.Run(ctx, "iptables", "-w", "-t", "nat", "-S", chain)
				if err != nil {
					return "", err
				}
				idx := 0
				for _, r := range strings.Split(rules, "\n") {
					if strings.HasPrefix(r, "-A ") {
						idx++
						if strings.HasSuffix(r, "-j DNAT --to-destination "+target+":8080") {
							break
						}
					}
				}
				spec := strings.TrimPrefix(strings.Replace(l, "--to-destination "+target+":", "--to-destination "+decoy+":", 1), "-A "+chain+" ")
				_, err = n.NS.Run(ctx, "sh", "-c", fmt.Sprintf("iptables -w -t nat -R %s %d %s", chain, idx, spec))
				return fmt.Sprintf("%s rule %d: DNAT to %s instead of %s", chain, idx, decoy, target), err
			}
			return "", fmt.Errorf("no KUBE-SEP DNAT to %s:8080 in:\n%s", target, save)
		}},
	}
}

// nftablesFaults: the Service's chain flushed, the chain deleted, its
// dispatch map element removed, one endpoint's DNAT moved to the decoy.
// Each finds the table (main or shard) holding the Service.
func nftablesFaults(n *framework.Node, ns, name, vip, target, decoy string) []driftFault {
	find := func(ctx context.Context) (table, chain string, err error) {
		out, err := n.NS.Run(ctx, "nft", "list", "ruleset", "ip")
		if err != nil {
			return "", "", err
		}
		cur := ""
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) == 4 && f[0] == "table" && f[1] == "ip" {
				cur = f[2]
			}
			if len(f) == 3 && f[0] == "chain" && strings.HasPrefix(f[1], "service-") && strings.HasSuffix(f[1], "-"+ns+"/"+name+"/tcp/tcp") {
				return cur, f[1], nil
			}
		}
		return "", "", fmt.Errorf("no service chain of %s/%s in:\n%s", ns, name, out)
	}
	nft := func(ctx context.Context, script string) error {
		_, err := n.NS.Run(ctx, "nft", script)
		return err
	}
	elem := fmt.Sprintf("{ %s . tcp . 80 }", vip)
	return []driftFault{
		{name: "service chain flushed", apply: func(ctx context.Context) (string, error) {
			table, chain, err := find(ctx)
			if err != nil {
				return "", err
			}
			return "flush chain ip " + table + " " + chain, nft(ctx, "flush chain ip "+table+" "+chain)
		}},
		{name: "service chain deleted", apply: func(ctx context.Context) (string, error) {
			table, chain, err := find(ctx)
			if err != nil {
				return "", err
			}
			// The map element refers to the chain: it goes first.
			s := fmt.Sprintf("delete element ip %s service-ips %s; flush chain ip %s %s; delete chain ip %s %s", table, elem, table, chain, table, chain)
			return s, nft(ctx, s)
		}},
		{name: "map element removed", apply: func(ctx context.Context) (string, error) {
			table, _, err := find(ctx)
			if err != nil {
				return "", err
			}
			s := fmt.Sprintf("delete element ip %s service-ips %s", table, elem)
			return s, nft(ctx, s)
		}},
		{name: "DNAT address changed", decoy: true, apply: func(ctx context.Context) (string, error) {
			table, chain, err := find(ctx)
			if err != nil {
				return "", err
			}
			out, err := n.NS.Run(ctx, "nft", "-a", "list", "chain", "ip", table, chain)
			if err != nil {
				return "", err
			}
			re := regexp.MustCompile(`^(.*dnat to )` + regexp.QuoteMeta(target) + `(:8080.*) # handle (\d+)$`)
			for _, l := range strings.Split(out, "\n") {
				if m := re.FindStringSubmatch(strings.TrimSpace(l)); m != nil {
					s := fmt.Sprintf("replace rule ip %s %s handle %s %s%s%s", table, chain, m[3], m[1], decoy, m[2])
					return s, nft(ctx, s)
				}
			}
			return "", fmt.Errorf("no DNAT to %s:8080 in:\n%s", target, out)
		}},
	}
}
