package trace

import (
	"fmt"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior/fuzzcase"
)

// FuzzNFTablesRender: a random snapshot (pkg/proxy/behavior/fuzzcase),
// rendered in one table and in three shards, then every probe traced
// through the ruleset: the possible endpoints, the refusals and the
// masquerading must be the model's. Without -fuzz it runs over the seeds in
// testdata/fuzz/FuzzNFTablesRender.
func FuzzNFTablesRender(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, shards := range []int{1, 3} {
			fuzzcase.Run(t, data, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
				return traceVerdict(ruleset.RenderSharded(snap, &cfg, nil, shards), pkt)
			})
		}
	})
}

// traceVerdict is the tracer's answer in the behaviour table's terms.
// Unlike the table's adapter it refuses mixed answers (some paths forward,
// some refuse or fall through): one packet has one fate, whichever endpoint
// numgen picks.
func traceVerdict(rs *ruleset.Ruleset, pkt behavior.Packet) (behavior.Verdict, error) {
	v := Trace(rs, Packet{Src: pkt.Src, Dst: pkt.Dst, Proto: pkt.Proto, Port: pkt.Port, LocalOrigin: pkt.FromNode, LocalAddrs: behavior.LocalAddrs()})
	if len(v.Problems) > 0 {
		return behavior.Verdict{}, fmt.Errorf("tracer problems: %s", strings.Join(v.Problems, "; "))
	}
	fates := 0
	for _, b := range []bool{v.Reject, v.Drop, v.Accept && len(v.Endpoints) == 0, len(v.Endpoints) > 0} {
		if b {
			fates++
		}
	}
	if fates > 1 || (v.Accept && len(v.Endpoints) > 0) {
		return behavior.Verdict{}, fmt.Errorf("mixed fates: %+v", v)
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
}
