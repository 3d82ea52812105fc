package ruleset_test

import (
	"maps"
	"reflect"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// TestCompactRendersTheSameObjects: a compacted table gives back, through
// Objects and the Dump, exactly what the full render held, for the main table
// and every shard; and an incremental render from a compacted previous one
// re-renders only the changed service port.
func TestCompactRendersTheSameObjects(t *testing.T) {
	cfg := detector()
	for _, shards := range []int{1, 3} {
		snap := fixture.Rich()
		full := ruleset.RenderSharded(snap, &cfg, nil, shards)
		compacted := ruleset.RenderSharded(snap, &cfg, nil, shards)
		for _, tb := range compacted.Tables {
			tb.Compact()
		}
		if d := cmp.Diff(full.Dump(), compacted.Dump()); d != "" {
			t.Fatalf("shards=%d: compacted dump differs (-full +compacted):\n%s", shards, d)
		}
		for i, tb := range compacted.Tables {
			for n, so := range tb.Services {
				if len(so.Chains)+len(so.Sets)+len(so.Elements) != 0 {
					t.Errorf("shards=%d %s %v: compacted entry still holds objects", shards, tb.Name, n)
				}
				if got, want := tb.Objects(n), full.Tables[i].Services[n]; !reflect.DeepEqual(got, want) {
					t.Errorf("shards=%d %s %v: Objects after Compact differ from the render", shards, tb.Name, n)
				}
			}
		}

		// Change one service port; render incrementally from the compacted ruleset.
		next := &model.Snapshot{Node: snap.Node, Services: maps.Clone(snap.Services)}
		var victim model.ServicePortName
		for n, sp := range next.Services {
			if len(sp.Endpoints) > 1 {
				victim = n
				break
			}
		}
		cp := *next.Services[victim]
		cp.Endpoints = cp.Endpoints[:1]
		next.Services[victim] = &cp
		inc := ruleset.RenderSharded(next, &cfg, compacted, shards)
		want := ruleset.RenderSharded(next, &cfg, nil, shards)
		if d := cmp.Diff(want.Dump(), inc.Dump()); d != "" {
			t.Fatalf("shards=%d: incremental render from a compacted ruleset differs (-want +got):\n%s", shards, d)
		}
		for i, tb := range inc.Tables {
			for n, so := range tb.Services {
				if shared := compacted.Tables[i].Services[n] == so; shared == (n == victim) {
					t.Errorf("shards=%d %s %v: shared with the previous render = %v", shards, tb.Name, n, shared)
				}
			}
		}
		// A removed service port disappears from an incremental render.
		delete(next.Services, victim)
		gone := ruleset.RenderSharded(next, &cfg, inc, shards)
		for _, tb := range gone.Tables {
			if tb.Services[victim] != nil {
				t.Errorf("shards=%d %s: removed %v still rendered", shards, tb.Name, victim)
			}
		}
	}
}
