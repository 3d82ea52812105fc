package iptables

import (
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior/fuzzcase"
	"github.com/miniproxy/miniproxy/pkg/trace/tracetest"
)

// FuzzIPTablesRender: a random snapshot (pkg/proxy/behavior/fuzzcase)
// rendered to iptables-restore input, then every probe traced through the
// rules as iptables-save shows them (pkg/iptables/iptrace): the possible endpoints, the refusals and the
// masquerading must be the model's. Without -fuzz it runs over the seeds in
// testdata/fuzz/FuzzIPTablesRender.
func FuzzIPTablesRender(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzcase.Run(t, data, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
			rs, err := iptrace.Parse(savedText(cfg, snap, model.FamilyOf(pkt.Dst)))
			if err != nil {
				return behavior.Verdict{}, err
			}
			return tracetest.ToBehavior(iptrace.Trace(rs, tracetest.Packet(pkt), iptrace.Options{}))
		})
	})
}
