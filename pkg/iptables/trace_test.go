package iptables

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/trace"
)

// savedText is what iptables-save would print after a full sync of snap:
// the restore text, plus the hooks in the built-in chains in the order
// ensureHooks leaves them (each inserted at the top, last first).
func savedText(cfg proxy.Config, snap *model.Snapshot, fam model.Family) string {
	r := &Renderer{Cfg: cfg, Family: fam}
	base := r.RenderBase(snap.Node)
	var b strings.Builder
	for _, table := range []Table{NAT, Filter} {
		fmt.Fprintf(&b, "*%s\n", table)
		for _, h := range base.Hooks {
			if h.Table != table {
				continue
			}
			b.WriteString("-A " + h.Chain)
			for _, a := range h.Args {
				if strings.ContainsAny(a, " ") {
					a = strconv.Quote(a)
				}
				b.WriteString(" " + a)
			}
			b.WriteString("\n")
		}
		b.WriteString("COMMIT\n")
	}
	b.WriteString(renderFull(r, snap, base, nil, 0).final.String())
	return b.String()
}

// behaviorVerdict turns a trace into the behaviour table's terms; a trace
// that stopped at something it cannot evaluate is an error.
func behaviorVerdict(res *trace.Result) (behavior.Verdict, error) {
	if len(res.Unsupported) > 0 {
		return behavior.Verdict{}, fmt.Errorf("unsupported: %s", strings.Join(res.Unsupported, "; "))
	}
	switch res.Verdict {
	case "DNAT":
		v := behavior.Verdict{Outcome: behavior.Forward}
		for _, e := range res.Endpoints {
			v.Endpoints = append(v.Endpoints, e.Addr)
			v.Masquerade = v.Masquerade || e.Masquerade
		}
		return v, nil
	case string(trace.Reject):
		return behavior.Verdict{Outcome: behavior.Reject}, nil
	case string(trace.Drop):
		return behavior.Verdict{Outcome: behavior.Drop}, nil
	case string(trace.NoMatch):
		return behavior.Verdict{Outcome: behavior.Untouched}, nil
	}
	return behavior.Verdict{}, fmt.Errorf("mixed outcomes for one packet: %+v", res.Paths)
}

// TestBehaviorTable runs the shared table through iptrace on the rendered
// rules, as iptables-save would show them.
func TestBehaviorTable(t *testing.T) {
	behavior.Run(t, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		rs, err := iptrace.Parse(savedText(cfg, snap, model.FamilyOf(pkt.Dst)))
		if err != nil {
			return behavior.Verdict{}, err
		}
		res := iptrace.Trace(rs, trace.Packet{Src: pkt.Src, Dst: pkt.Dst, Proto: pkt.Proto, Port: pkt.Port,
			FromNode: pkt.FromNode, LocalAddrs: behavior.LocalAddrs()}, iptrace.Options{})
		return behaviorVerdict(res)
	}, behavior.LocalhostCase())
}
