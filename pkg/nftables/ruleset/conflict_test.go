package ruleset_test

import (
	"fmt"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// duplicateKeys lists the map elements that share a key within one table's
// map: the kernel refuses a batch holding two ("file exists").
func duplicateKeys(rs *ruleset.Ruleset) []string {
	var out []string
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		for _, t := range rs.Family(f) {
			seen := map[string]bool{}
			for name := range t.Services {
				for _, e := range t.Objects(name).Elements {
					k := fmt.Sprintf("%s %s %v %s %d", t.Name, e.Map, e.Addr, e.Proto, e.Port)
					if seen[k] {
						out = append(out, k)
					}
					seen[k] = true
				}
			}
		}
	}
	return out
}

// TestSharedFrontendRendersUniqueKeys: the behavior table's Services, two of
// which claim one LB IP and one externalIP (and one of them another's
// ClusterIP), render no map key twice once the model's frontend rule has
// been applied, in one table or sharded. Rendered as declared they would.
func TestSharedFrontendRendersUniqueKeys(t *testing.T) {
	cfg := behavior.Config()
	if d := duplicateKeys(ruleset.Render(mt.Snap(behavior.Declared()...), &cfg, nil)); len(d) == 0 {
		t.Fatal("the declared fixture renders no duplicate key; this test would prove nothing")
	}
	for _, shards := range []int{1, 3, 16} {
		if d := duplicateKeys(ruleset.RenderSharded(behavior.Snapshot(), &cfg, nil, shards)); len(d) != 0 {
			t.Errorf("shards=%d: duplicate map keys %v", shards, d)
		}
	}
}
