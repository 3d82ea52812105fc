package syncer

import (
	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// recordSyncMetrics sets the gauges kube-proxy sets at the end of a
// successful sync: the service ports left without a local endpoint by a
// Local traffic policy, per family, and (iptables mode) the rules per table.
func recordSyncMetrics(m *metrics.Metrics, families []model.Family, snap *model.Snapshot, res proxy.Result) {
	if len(families) == 0 {
		families = []model.Family{model.IPv4}
	}
	for _, f := range families {
		internal, external := snap.NoLocalEndpoints(f)
		m.SetNoLocalEndpoints(conntrack.FamilyLabel(f), internal, external)
	}
	for _, t := range res.TableRules {
		m.SetIPTablesRules(t.Table, conntrack.FamilyLabel(t.Family), t.Total, t.Last)
	}
}
