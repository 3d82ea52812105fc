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
	"github.com/miniproxy/miniproxy/pkg/trace/tracetest"
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

// TestBehaviorTable runs the shared table through iptrace on the rendered
// rules, as iptables-save would show them.
func TestBehaviorTable(t *testing.T) {
	behavior.Run(t, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		rs, err := iptrace.Parse(savedText(cfg, snap, model.FamilyOf(pkt.Dst)))
		if err != nil {
			return behavior.Verdict{}, err
		}
		res := iptrace.Trace(rs, tracetest.Packet(pkt), iptrace.Options{})
		return tracetest.ToBehavior(res)
	}, behavior.LocalhostCase())
}
