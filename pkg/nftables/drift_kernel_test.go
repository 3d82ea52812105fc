package nftables

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// serviceChain returns the name of the service chain of ns1/<name> in the
// listing of table ip miniproxy.
func serviceChain(t *testing.T, listing, name string) string {
	t.Helper()
	for _, l := range strings.Split(listing, "\n") {
		if s := strings.TrimSpace(l); strings.HasPrefix(s, "chain service-") && strings.Contains(s, "ns1/"+name+"/") {
			return strings.TrimSuffix(strings.TrimPrefix(s, "chain "), " {")
		}
	}
	t.Fatalf("no service chain for ns1/%s in:\n%s", name, listing)
	return ""
}

// ruleHandle returns the handle of the first rule of chain (table ip
// miniproxy) whose text contains substr.
func ruleHandle(t *testing.T, ns *netnstest.NS, chain, substr string) string {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "ip", "miniproxy", chain)
	re := regexp.MustCompile(`# handle (\d+)$`)
	for _, l := range strings.Split(out, "\n") {
		if m := re.FindStringSubmatch(strings.TrimSpace(l)); m != nil && strings.Contains(l, substr) {
			return m[1]
		}
	}
	t.Fatalf("no rule with %q in chain %s:\n%s", substr, chain, out)
	return ""
}

// TestKernelDriftKinds tampers with miniproxy's table in one way at a time,
// as an operator or another program might, and checks that one full sync
// puts back exactly what was there, reports the drift, that traffic follows
// the Service again, and that another table is untouched. The changes that
// keep a rule's expression sequence (a DNAT address or port, a map lookup,
// a numgen modulus) or only touch a base chain's policy went unseen before
// the read-back compared values.
func TestKernelDriftKinds(t *testing.T) {
	// Each kind of damage gets its own namespace, so one that is not
	// repaired cannot spoil the next.
	setup := func(t *testing.T) (ns *netnstest.NS, b *Backend, fd int, want, two, other string) {
		ns, b, fd = setupTraffic(t)
		mustSync(t, b, trafficSnap(), false)
		ns.MustRun(t, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
		want = ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")
		return ns, b, fd, want, serviceChain(t, want, "two"), serviceChain(t, want, "other")
	}
	for _, c := range []struct {
		name string
		// script returns the nft commands.
		script func(ns *netnstest.NS, two, other string) string
		// served: endpoints that may answer 172.30.0.12:80 while the
		// damage is in place (nil: not checked).
		served []string
	}{
		{"rules flushed", func(ns *netnstest.NS, two, other string) string { return "flush chain ip miniproxy " + two }, nil},
		{"chain deleted", func(ns *netnstest.NS, two, other string) string {
			return fmt.Sprintf("delete element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 }\nflush chain ip miniproxy %s\ndelete chain ip miniproxy %s", two, two)
		}, nil},
		{"map element removed", func(ns *netnstest.NS, two, other string) string {
			return "delete element ip miniproxy service-ips { 172.30.0.13 . tcp . 80 }"
		}, nil},
		{"map element port changed", func(ns *netnstest.NS, two, other string) string {
			return fmt.Sprintf("delete element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 }\nadd element ip miniproxy service-ips { 172.30.0.12 . tcp . 81 : goto %s }", two)
		}, nil},
		{"map element retargeted", func(ns *netnstest.NS, two, other string) string {
			return fmt.Sprintf("delete element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 }\nadd element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 : goto %s }", other)
		}, []string{"10.180.0.3:8080"}},
		{"DNAT address changed", func(ns *netnstest.NS, two, other string) string {
			h := ruleHandle(t, ns, two, "dnat to 10.180.0.1:8080")
			return fmt.Sprintf("replace rule ip miniproxy %s handle %s meta l4proto tcp numgen random mod 2 0 dnat to 10.180.0.4:8080", two, h)
		}, []string{"10.180.0.2:8080", "10.180.0.4:8080"}},
		{"DNAT port changed", func(ns *netnstest.NS, two, other string) string {
			h := ruleHandle(t, ns, two, "dnat to 10.180.0.2:8080")
			return fmt.Sprintf("replace rule ip miniproxy %s handle %s meta l4proto tcp dnat to 10.180.0.2:9999", two, h)
		}, nil},
		{"numgen modulus changed", func(ns *netnstest.NS, two, other string) string {
			h := ruleHandle(t, ns, two, "dnat to 10.180.0.1:8080")
			return fmt.Sprintf("replace rule ip miniproxy %s handle %s meta l4proto tcp numgen random mod 3 0 dnat to 10.180.0.1:8080", two, h)
		}, nil},
		{"dispatch looks up another map", func(ns *netnstest.NS, two, other string) string {
			h := ruleHandle(t, ns, "services", "vmap @service-ips")
			return fmt.Sprintf("replace rule ip miniproxy services handle %s ip daddr . meta l4proto . th dport vmap @no-endpoint-services", h)
		}, nil},
		{"base chain policy drop", func(ns *netnstest.NS, two, other string) string {
			return "chain ip miniproxy filter-output { type filter hook output priority -110; policy drop; }"
		}, nil},
		{"rule added", func(ns *netnstest.NS, two, other string) string { return "add rule ip miniproxy services counter" }, nil},
		{"foreign chain in our table", func(ns *netnstest.NS, two, other string) string { return "add chain ip miniproxy bogus" }, nil},
	} {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			ns, b, fd, want, two, other := setup(t)
			snap := trafficSnap()
			if out, err := ns.Run(context.Background(), c.script(ns, two, other)+"\n", "nft", "-f", "-"); err != nil {
				t.Fatalf("%s: %v: %s", c.name, err, out)
			}
			if got, _ := ns.Run(context.Background(), "", "nft", "list", "table", "ip", "miniproxy"); len(diffLines(got, want)) == 0 {
				t.Fatalf("%s: the damage had no effect", c.name)
			}
			if c.served != nil {
				got := hits(t, fd, "172.30.0.12:80", 30)
				var names []string
				for k := range got {
					names = append(names, k)
				}
				slices.Sort(names)
				if !slices.Equal(names, c.served) {
					t.Fatalf("%s: before the repair 172.30.0.12:80 answered by %v, want %v (the damage is not what the test thinks)", c.name, got, c.served)
				}
			}
			res := mustSync(t, b, snap, true)
			got, _ := ns.Run(context.Background(), "", "nft", "list", "table", "ip", "miniproxy")
			if d := diffLines(want, got); len(d) != 0 {
				t.Errorf("%s: not repaired by a full sync (%+v); differences: %q", c.name, res, d)
			}
			if res.Drift == 0 {
				t.Errorf("%s: repaired, but the sync reports no drift: %+v", c.name, res)
			}
			if h := hits(t, fd, "172.30.0.12:80", 20); h["10.180.0.1:8080"] == 0 || h["10.180.0.2:8080"] == 0 || len(h) != 2 {
				t.Errorf("%s: after the repair 172.30.0.12:80 answered by %v, want .1 and .2", c.name, h)
			}
			if out := ns.MustRun(t, "nft", "list", "table", "ip", "other"); !strings.Contains(out, "counter") {
				t.Errorf("other table changed: %s", out)
			}
			// Nothing drifted any more: after a foreign commit the
			// read-back finds nothing and sends nothing.
			ns.MustRun(t, "nft", "add", "table", "ip", "other2")
			if res := mustSync(t, b, snap, true); res.Rules != 0 || res.Drift != 0 {
				t.Errorf("full sync with nothing drifted: %+v, want nothing sent and no drift", res)
			}
		})
	}
}

// TestKernelDriftRichReadback: every expression kind of the rich fixture
// (both families, affinity, reject, firewall, ETP Local, NodePorts) reads
// back equal to what was sent, and a changed value in any service chain is
// found: the DNAT target of every endpoint rule is moved in turn.
func TestKernelDriftRichReadback(t *testing.T) {
	ns, b := newNSBackend(t, richConfig())
	snap := fixture.Rich()
	mustSync(t, b, snap, false)
	ns.MustRun(t, "nft", "add", "table", "ip", "other")
	if res := mustSync(t, b, snap, true); res.Rules != 0 || res.Drift != 0 {
		t.Fatalf("full sync of an unchanged rich ruleset: %+v, want nothing", res)
	}
	want := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")
	re := regexp.MustCompile(`^(.*dnat to )10\.180\.(\d+)\.(\d+):(\d+)(.*) # handle (\d+)$`)
	n := 0
	for ; ; n++ {
		// The n-th DNAT rule of the table; handles change with every
		// repair, so the table is listed again each time.
		out := ns.MustRun(t, "nft", "-a", "list", "table", "ip", "miniproxy")
		chain, k, script := "", 0, ""
		for _, l := range strings.Split(out, "\n") {
			s := strings.TrimSpace(l)
			if strings.HasPrefix(s, "chain ") {
				chain = strings.Fields(s)[1]
				continue
			}
			if m := re.FindStringSubmatch(s); m != nil {
				if k == n {
					port, _ := strconv.Atoi(m[4])
					script = fmt.Sprintf("replace rule ip miniproxy %s handle %s %s10.180.%s.%s:%d%s", chain, m[6], m[1], m[2], m[3], port+1, m[5])
					break
				}
				k++
			}
		}
		if script == "" {
			break
		}
		if out, err := ns.Run(context.Background(), script+"\n", "nft", "-f", "-"); err != nil {
			t.Fatalf("%s: %v: %s", script, err, out)
		}
		res := mustSync(t, b, snap, true)
		if res.Drift == 0 {
			t.Errorf("not found: %s", script)
		}
		if got := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy"); len(diffLines(want, got)) != 0 {
			t.Errorf("not repaired: %s: %q", script, diffLines(want, got))
		}
	}
	if n < 5 {
		t.Fatalf("only %d DNAT rules found in:\n%s", n, want)
	}
	t.Logf("%d DNAT rules tampered with and repaired one at a time", n)
}

// TestKernelDriftEveryChain: with more chains than the old read-back's
// 4,000-chain window, a chain sorted last is checked on the first full sync
// too.
func TestKernelDriftEveryChain(t *testing.T) {
	ns, b := newNSBackend(t, scaleConfig())
	snap := scaleSnap(4500, 1)
	mustSync(t, b, snap, false)
	var last string
	for _, c := range b.committed.Tables[0].Expanded().AllChains() {
		if strings.HasPrefix(c.Name, "service-") && c.Name > last {
			last = c.Name
		}
	}
	before := ns.MustRun(t, "nft", "list", "chain", "ip", "miniproxy", last)
	ns.MustRun(t, "nft", "flush", "chain", "ip", "miniproxy", last)
	res := mustSync(t, b, snap, true)
	if res.Drift == 0 {
		t.Errorf("flushed chain %s (sorted last of %d) not found by the first full sync: %+v", last, len(snap.Services), res)
	}
	if got := ns.MustRun(t, "nft", "list", "chain", "ip", "miniproxy", last); got != before {
		t.Errorf("chain %s not repaired:\n%s\nwant\n%s", last, got, before)
	}
}

// TestKernelForeignTablesUntouched: a CNI-like inet table with base chains
// at miniproxy's hooks and priorities, and tables whose names are close to
// miniproxy's (a shard's neighbour, another family's "miniproxy") survive
// cold start, incremental and full syncs, drift repair of our own tables and
// Cleanup, rule for rule.
func TestKernelForeignTablesUntouched(t *testing.T) {
	ns, b, fd := setupTraffic(t, WithShards(2))
	foreign := `add table inet cni-foo
add chain inet cni-foo pre { type nat hook prerouting priority -100; policy accept; }
add rule inet cni-foo pre ip daddr 192.0.2.1 counter
add chain inet cni-foo out { type nat hook output priority -100; policy accept; }
add rule inet cni-foo out ip daddr 192.0.2.1 counter
add chain inet cni-foo post { type nat hook postrouting priority 100; policy accept; }
add rule inet cni-foo post ip saddr 10.99.0.0/16 counter masquerade
add chain inet cni-foo fw { type filter hook forward priority -110; policy accept; }
add rule inet cni-foo fw ct state new counter
add set inet cni-foo blocked { type ipv4_addr; elements = { 192.0.2.9 }; }
`
	for _, tb := range []string{"ip miniproxy-shard-00-backup", "ip miniproxy-shard-7", "ip miniproxy-shards",
		"ip miniproxy2", "inet miniproxy", "ip6 miniproxy-shard-x", "inet miniproxy-shard-01", "ip6 miniproxy-shard-001"} {
		foreign += fmt.Sprintf("add table %s\nadd chain %s c\nadd rule %s c counter\n", tb, tb, tb)
	}
	if out, err := ns.Run(context.Background(), foreign, "nft", "-f", "-"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	ours := regexp.MustCompile(`^miniproxy(-shard-[0-9][0-9])?$`)
	listForeign := func() string {
		var keep []string
		out := ns.MustRun(t, "nft", "list", "ruleset")
		for _, blk := range strings.Split(out, "\ntable ") {
			head := strings.SplitN(strings.TrimPrefix(blk, "table "), " {", 2)[0]
			f := strings.Fields(head)
			if len(f) == 2 && (f[0] == "ip" || f[0] == "ip6") && ours.MatchString(f[1]) {
				continue
			}
			keep = append(keep, strings.TrimSpace(blk))
		}
		return strings.Join(keep, "\ntable ")
	}
	before := listForeign()
	for _, want := range []string{"cni-foo", "miniproxy-shard-00-backup", "miniproxy-shard-7", "miniproxy-shards", "miniproxy2", "inet miniproxy", "miniproxy-shard-x", "inet miniproxy-shard-01"} {
		if !strings.Contains(before, want) {
			t.Fatalf("foreign listing lacks %s:\n%s", want, before)
		}
	}
	check := func(when string) {
		t.Helper()
		if after := listForeign(); after != before {
			t.Fatalf("%s: foreign tables changed:\n--- before ---\n%s\n--- after ---\n%s", when, before, after)
		}
	}
	snap := trafficSnap()
	mustSync(t, b, snap, false)
	check("cold start")
	if h := hits(t, fd, "172.30.0.12:80", 20); h["10.180.0.1:8080"]+h["10.180.0.2:8080"] != 20 {
		t.Errorf("traffic with the CNI-like table at the same hooks: %v", h)
	}
	mustSync(t, b, changeTwo(snap), false)
	check("incremental sync")
	ns.MustRun(t, "nft", "flush", "table", "ip", "miniproxy")
	mustSync(t, b, changeTwo(snap), true)
	check("drift repair")
	// A new run (first sync removes stale tables of ours).
	cfg2 := trafficConfig()
	cfg2.NetNS = proxy.NetNS(ns.Path())
	b2, err := New(cfg2, WithShards(1))
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	mustSync(t, b2, snap, false)
	check("restart with another shard count")
	if err := b2.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	check("cleanup")
	if got := ourTables(t, ns); len(got) != 0 {
		t.Errorf("cleanup left %v", got)
	}
}

// changeTwo returns snap with ns1/two's endpoints changed.
func changeTwo(snap *model.Snapshot) *model.Snapshot {
	next := fixture.Snap()
	for n, sp := range snap.Services {
		next.Services[n] = sp
	}
	name := model.ServicePortName{Namespace: "ns1", Name: "two", Protocol: model.TCP}
	cp := *snap.Services[name]
	cp.Endpoints = cp.Endpoints[:1]
	next.Services[name] = &cp
	return next
}
