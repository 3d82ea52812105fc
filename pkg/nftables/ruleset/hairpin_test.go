package ruleset_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

func hairpinSet(rs *ruleset.Ruleset) []string {
	var out []string
	for _, e := range rs.Table(model.IPv4).Elements()[ruleset.SetHairpin] {
		out = append(out, e.Addr.String())
	}
	slices.Sort(out)
	return out
}

// TestHairpinSharedEndpoint: two Services share a pod. The pod's hairpin
// element belongs to neither: removing one Service keeps it, removing the
// other deletes it.
func TestHairpinSharedEndpoint(t *testing.T) {
	cfg := detector()
	a := fixture.SP("ns", "a", 80, "172.30.0.1")
	a.Endpoints = eps(fixture.EP("10.180.0.1", 8080, "node-a"), fixture.EP("10.180.0.2", 8080, "node-a"))
	b := fixture.SP("ns", "b", 80, "172.30.0.2")
	b.Endpoints = eps(fixture.EP("10.180.0.1", 9090, "node-a"))
	for _, shards := range []int{1, 3} {
		r0 := ruleset.RenderSharded(fixture.Snap(a, b), &cfg, nil, shards)
		if got := hairpinSet(r0); !slices.Equal(got, []string{"10.180.0.1", "10.180.0.2"}) {
			t.Fatalf("shards=%d: hairpin set %v", shards, got)
		}
		r1 := ruleset.RenderSharded(fixture.Snap(b), &cfg, r0, shards)
		add, del := r1.Table(model.IPv4).HairpinChanges(r0.Table(model.IPv4))
		if len(add) != 0 || len(del) != 1 || del[0].Addr.String() != "10.180.0.2" {
			t.Errorf("shards=%d: removing a: add %v del %v, want only 10.180.0.2 deleted", shards, add, del)
		}
		r2 := ruleset.RenderSharded(fixture.Snap(), &cfg, r1, shards)
		add, del = r2.Table(model.IPv4).HairpinChanges(r1.Table(model.IPv4))
		if len(add) != 0 || len(del) != 1 || del[0].Addr.String() != "10.180.0.1" {
			t.Errorf("shards=%d: removing b: add %v del %v, want only 10.180.0.1 deleted", shards, add, del)
		}
	}
}

// TestHairpinChangesFollowRandomUpdates applies the changes of a long
// random sequence of incremental renders (from compacted tables, as the
// backend keeps them) to a model of the kernel's set, which must always
// equal the set of a render from scratch: no element deleted while a
// Service still uses it, none left behind, none added twice.
func TestHairpinChangesFollowRandomUpdates(t *testing.T) {
	cfg := detector()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, shards := range []int{1, 4} {
		services := map[model.ServicePortName]*model.ServicePort{}
		var prev *ruleset.Ruleset
		kernel := map[string]bool{}
		for step := range 300 {
			// Change, add or remove one to three Services over a pool
			// of 150 pod addresses, so sharing is common and the counts'
			// overrides outgrow their base now and then (hairpinRefs).
			for range 1 + rng.IntN(3) {
				i := rng.IntN(40)
				sp := fixture.SP("ns", fmt.Sprintf("s%d", i), 80, fmt.Sprintf("172.30.0.%d", i+1))
				if rng.IntN(5) == 0 {
					delete(services, sp.Name)
					continue
				}
				for range rng.IntN(9) {
					sp.Endpoints = append(sp.Endpoints, fixture.EP(fmt.Sprintf("10.180.0.%d", 1+rng.IntN(150)), 8080, "node-a"))
				}
				services[sp.Name] = sp
			}
			snap := fixture.Snap()
			snap.Services = maps.Clone(services)
			next := ruleset.RenderSharded(snap, &cfg, prev, shards)
			var pt *ruleset.Table
			if prev != nil {
				pt = prev.Table(model.IPv4)
			}
			add, del := next.Table(model.IPv4).HairpinChanges(pt)
			for _, e := range del {
				if !kernel[e.Addr.String()] {
					t.Fatalf("shards=%d step %d: deletes %s, which is not in the set", shards, step, e.Addr)
				}
				delete(kernel, e.Addr.String())
			}
			for _, e := range add {
				if kernel[e.Addr.String()] {
					t.Fatalf("shards=%d step %d: adds %s twice", shards, step, e.Addr)
				}
				kernel[e.Addr.String()] = true
			}
			want := hairpinSet(ruleset.RenderSharded(snap, &cfg, nil, shards))
			if got := slices.Sorted(maps.Keys(kernel)); !slices.Equal(got, want) {
				t.Fatalf("shards=%d step %d: set after changes %v, a fresh render has %v", shards, step, got, want)
			}
			for _, tb := range next.Tables {
				tb.Compact()
			}
			prev = next
		}
	}
}
