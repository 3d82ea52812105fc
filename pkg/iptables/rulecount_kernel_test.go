package iptables

import (
	"context"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// ownedRules counts the rules iptables-save lists in our chains of table.
func ownedRules(save string, table Table) int {
	n := 0
	for _, line := range strings.Split(save, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "-A" && ownedChain(table, f[1]) {
			n++
		}
	}
	return n
}

// The rule counts behind kubeproxy_sync_proxy_rules_iptables_total and
// _last follow the kernel through full and partial syncs: total is what
// iptables-save lists in our chains, last what the sync's restores wrote.
func TestKernelRuleCounts(t *testing.T) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	var written map[Table]int
	l.backend.OnRestore = func(_ model.Family, text string) {
		table := Table("")
		for _, line := range strings.Split(text, "\n") {
			switch {
			case strings.HasPrefix(line, "*"):
				table = Table(line[1:])
			case strings.HasPrefix(line, "-A "):
				written[table]++
			}
		}
	}
	check := func(step string, snap *model.Snapshot, full bool) {
		t.Helper()
		written = map[Table]int{}
		res, err := l.backend.Sync(context.Background(), snap, full)
		if err != nil {
			t.Fatal(err)
		}
		got := map[Table]proxy.TableRules{}
		for _, tr := range res.TableRules {
			if tr.Family == model.IPv4 {
				got[Table(tr.Table)] = tr
			}
		}
		for _, table := range []Table{NAT, Filter} {
			save := l.node.MustRun(t, "iptables-save", "-t", string(table))
			if want := ownedRules(save, table); got[table].Total != want {
				t.Errorf("%s: %s total %d, iptables-save lists %d rules in our chains", step, table, got[table].Total, want)
			}
			if got[table].Last != written[table] {
				t.Errorf("%s: %s last %d, the restores wrote %d", step, table, got[table].Last, written[table])
			}
		}
		t.Logf("%s: %+v", step, res.TableRules)
	}
	a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.0.6", 8080, "node-a"))
	b := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	check("cold full sync", mt.Snap(a, b), true)

	b2 := mt.SP("ns", "b", "", "172.30.0.4", 80) // no endpoints: a filter reject instead of nat chains
	s := mt.Snap(a, b2)
	s.Services[a.Name] = a
	check("partial: b loses its endpoints", s, false)

	c := mt.SP("ns", "c", "", "172.30.0.5", 53, mt.Ep("10.180.0.5", 5353, "node-a"))
	s2 := mt.Snap(a, b2, c)
	s2.Services[a.Name], s2.Services[b2.Name] = a, b2
	check("partial: c added", s2, false)

	s3 := mt.Snap(c)
	s3.Services[c.Name] = c
	check("partial: a and b removed", s3, false)

	check("full sync again", s3, true)
}
