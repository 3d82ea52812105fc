package ipvs

import (
	"net/netip"
	"testing"

	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// TestPlanSharedFrontend: for the behavior table's shared frontends the
// plan's virtual servers belong to the Service the model's rule picks, not
// to the first in sorted order (shared-a sorts first but is younger), and
// the loser keeps its own address, ClusterIP and NodePort.
func TestPlanSharedFrontend(t *testing.T) {
	cfg := behavior.Config()
	owner := func(snapReal bool) map[string]string {
		snap := behavior.Snapshot()
		if !snapReal {
			snap = mt.Snap(behavior.Declared()...)
		}
		p := BuildPlan(snap, &cfg, PlanOptions{}, []netip.Addr{behavior.NodeIP})
		out := map[string]string{}
		for _, vs := range p.VirtualServers {
			out[vs.Key.String()] = vs.Service.Name
		}
		return out
	}
	got := owner(true)
	for k, want := range map[string]string{
		"198.51.100.70:80/TCP":  "shared-z",
		"203.0.113.70:80/TCP":   "shared-z",
		"203.0.113.71:80/TCP":   "shared-a",
		"172.30.0.71:80/TCP":    "shared-a",
		"192.168.0.2:30071/TCP": "shared-a",
		"172.30.0.3:80/TCP":     "web",
	} {
		if got[k] != want {
			t.Errorf("virtual server %s belongs to %q, want %q", k, got[k], want)
		}
	}
	// Without the rule, IPVS kept the first in sorted order: the younger.
	if old := owner(false); old["198.51.100.70:80/TCP"] != "shared-a" {
		t.Errorf("declared fixture no longer shows the old behaviour: %v", old["198.51.100.70:80/TCP"])
	}
}
