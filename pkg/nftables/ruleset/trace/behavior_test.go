package trace

import (
	"fmt"
	"strings"

	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// TestSharedBehaviorTable runs the table every backend shares through this
// tracer of the rendered nftables ruleset.
func TestSharedBehaviorTable(t *testing.T) {
	for _, shards := range []int{1, 3} {
		t.Run(fmt.Sprintf("shards=%d", shards), func(t *testing.T) { runBehavior(t, shards) })
	}
}

// runBehavior: with 3 shards the fixture's Services land in different shard
// tables, so dispatch, the main table's filter checks and masquerading, and
// the skip of later nat chains once one has NATed are all on the path.
func runBehavior(t *testing.T, shards int) {
	behavior.Run(t, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		rs := ruleset.RenderSharded(snap, &cfg, nil, shards)
		v := Trace(rs, Packet{Src: pkt.Src, Dst: pkt.Dst, Proto: pkt.Proto, Port: pkt.Port, LocalOrigin: pkt.FromNode, LocalAddrs: behavior.LocalAddrs()})
		if len(v.Problems) > 0 {
			return behavior.Verdict{}, fmt.Errorf("tracer problems: %s", strings.Join(v.Problems, "; "))
		}
		switch {
		case v.Reject:
			return behavior.Verdict{Outcome: behavior.Reject}, nil
		case v.Drop:
			return behavior.Verdict{Outcome: behavior.Drop}, nil
		case len(v.Endpoints) == 0:
			return behavior.Verdict{Outcome: behavior.Untouched}, nil
		}
		out := behavior.Verdict{Outcome: behavior.Forward}
		for _, e := range v.Endpoints {
			out.Endpoints = append(out.Endpoints, e.Endpoint)
			out.Masquerade = out.Masquerade || e.Masquerade
		}
		return out, nil
	})
}
