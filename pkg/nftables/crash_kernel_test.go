package nftables

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/test/crashtest"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// crashShards is cmd/miniproxy's default --nftables-shards.
const crashShards = 16

// crashSnapshots are A (the scale benchmarks' Services) and B = crashtest.Change(A).
func crashSnapshots(p crashtest.Params) (a, b *model.Snapshot) {
	a = scaleSnap(p.Services, p.Endpoints)
	return a, crashtest.Change(a, p.Changed)
}

// TestKernelCrashChild is the process TestKernelCrash kills: started by it
// inside a namespace, it runs the backend as cmd/miniproxy does (16 shards,
// netlink in the namespace it runs in). Run on its own it does nothing.
func TestKernelCrashChild(t *testing.T) {
	crashtest.Child(t, crashSnapshots, func() (crashtest.SyncFunc, error) {
		b, err := New(scaleConfig(), WithShards(crashShards))
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, snap *model.Snapshot, full bool) error {
			_, err := b.Sync(ctx, snap, full)
			return err
		}, nil
	})
}

// TestKernelCrash SIGKILLs the nftables backend at random points of large
// syncs and checks atomicity right after each kill and convergence after a
// restart (package crashtest). MINIPROXY_CRASH_SERVICES sets the size
// (default 1000; `make e2e` runs 10000); results go to
// e2e-results/crash-nftables.md.
func TestKernelCrash(t *testing.T) {
	netnstest.RequireRoot(t, "nft")
	p := crashtest.Load(t)
	m := crashtest.Mode{
		Name: "nftables", Column: "nftables",
		Foreign: func(t testing.TB, ns *netnstest.NS) {
			// A CNI's and a Docker-like table, with hooks at the
			// priorities ours use.
			if _, err := ns.Run(context.Background(), `
table inet cni-like {
	set pods { type ipv4_addr; elements = { 10.88.0.2, 10.88.0.3 } }
	chain forward { type filter hook forward priority 0; policy accept; ip saddr @pods accept; }
	chain postrouting { type nat hook postrouting priority 100; ip saddr 10.88.0.0/16 oifname != "cni0" masquerade; }
}
table ip docker-like {
	chain prerouting { type nat hook prerouting priority -100; fib daddr type local tcp dport 8080 dnat to 172.17.0.2:80; }
}
`, "nft", "-f", "-"); err != nil {
				t.Fatal(err)
			}
		},
		Dump: func(ctx context.Context, ns *netnstest.NS) (crashtest.State, error) {
			// Table by table: the kernel's rule dump grows faster
			// than linearly with a table's rules, so one dump of the
			// whole ruleset takes tens of seconds at 10k Services.
			out, err := ns.Run(ctx, "", "nft", "-j", "list", "tables")
			if err != nil {
				return nil, err
			}
			var doc struct {
				Nftables []map[string]map[string]any `json:"nftables"`
			}
			if err := json.Unmarshal([]byte(out), &doc); err != nil {
				return nil, fmt.Errorf("parse nft -j list tables: %w", err)
			}
			st := crashtest.State{}
			for _, obj := range doc.Nftables {
				t, ok := obj["table"]
				if !ok {
					continue
				}
				family, _ := t["family"].(string)
				name, _ := t["name"].(string)
				out, err := ns.Run(ctx, "", "nft", "-j", "list", "table", family, name)
				if err != nil {
					return nil, err
				}
				units, err := nftUnits(out)
				if err != nil {
					return nil, err
				}
				for k, v := range units {
					st[k] = v
				}
			}
			return st, nil
		},
		Group: func(phase crashtest.Phase, u string) (string, bool) {
			if phase == crashtest.Partial {
				return "the one batch", true
			}
			return u, true
		},
		Guarantee: "each table (the main table and each of the " + fmt.Sprint(crashShards) + " shards) is either as before the killed sync or as it " +
			"wanted it; with a partial sync (one netlink batch), the whole ruleset is. A process's first sync replaces every table, " +
			"one batch per table, so a kill between two batches leaves tables of both generations, each complete.",
	}
	var rep *crashtest.Report
	defer func() {
		if rep != nil {
			crashtest.Write(t, "nftables", rep)
		}
	}()
	rep = crashtest.Run(t, m, p, crashSnapshots)
}

// nftUnits reduces `nft -j list ruleset` to one unit per table ("<family>
// <name>"): its chains (sorted by name) with their rules in order, and its
// sets and maps with their elements sorted (the kernel lists hash sets in
// an order that differs between namespaces). Handles and counter values
// are left out.
func nftUnits(js string) (crashtest.State, error) {
	var doc struct {
		Nftables []map[string]map[string]any `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(js), &doc); err != nil {
		return nil, fmt.Errorf("parse nft -j output: %w", err)
	}
	type table struct {
		attrs  string
		chains map[string]string
		rules  map[string][]string
		sets   map[string]string
	}
	tables := map[string]*table{}
	get := func(family, name string) *table {
		k := family + " " + name
		if tables[k] == nil {
			tables[k] = &table{chains: map[string]string{}, rules: map[string][]string{}, sets: map[string]string{}}
		}
		return tables[k]
	}
	enc := func(v any) string {
		b, err := json.Marshal(zeroCounters(v))
		if err != nil {
			return fmt.Sprintf("%v", v)
		}
		return string(b)
	}
	for _, obj := range doc.Nftables {
		for kind, body := range obj {
			if kind == "metainfo" {
				continue
			}
			delete(body, "handle")
			family, _ := body["family"].(string)
			switch kind {
			case "table":
				name, _ := body["name"].(string)
				get(family, name).attrs = enc(body)
			case "chain":
				tn, _ := body["table"].(string)
				name, _ := body["name"].(string)
				get(family, tn).chains[name] = enc(body)
			case "rule":
				tn, _ := body["table"].(string)
				chain, _ := body["chain"].(string)
				t := get(family, tn)
				t.rules[chain] = append(t.rules[chain], enc(body))
			case "set", "map":
				tn, _ := body["table"].(string)
				name, _ := body["name"].(string)
				var elems []string
				if es, ok := body["elem"].([]any); ok {
					for _, e := range es {
						elems = append(elems, enc(e))
					}
				}
				delete(body, "elem")
				sort.Strings(elems)
				get(family, tn).sets[name] = kind + " " + enc(body) + "\n" + strings.Join(elems, "\n")
			default:
				tn, _ := body["table"].(string)
				name, _ := body["name"].(string)
				get(family, tn).sets[kind+" "+name] = kind + " " + enc(body)
			}
		}
	}
	st := crashtest.State{}
	for k, t := range tables {
		var b strings.Builder
		b.WriteString("table " + t.attrs + "\n")
		for _, n := range crashKeys(t.chains) {
			b.WriteString("chain " + t.chains[n] + "\n")
			for _, r := range t.rules[n] {
				b.WriteString("  " + r + "\n")
			}
		}
		for _, n := range crashKeys(t.sets) {
			b.WriteString(t.sets[n] + "\n")
		}
		for n := range t.rules {
			if _, ok := t.chains[n]; !ok {
				return nil, fmt.Errorf("table %s: rules of an unlisted chain %q", k, n)
			}
		}
		st[k] = b.String()
	}
	return st, nil
}

func crashKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// zeroCounters drops counter values, which traffic changes.
func zeroCounters(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if k == "counter" {
				x[k] = nil
				continue
			}
			x[k] = zeroCounters(e)
		}
	case []any:
		for i, e := range x {
			x[i] = zeroCounters(e)
		}
	}
	return v
}
