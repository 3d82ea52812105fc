package nftables

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// TestValidateCost measures what small batches cost the kernel on top of a
// programmed table of 10k Services × 3: which kinds of change make
// nf_tables re-validate the whole table at commit (see README, Known
// limits). CPU time of the commit, median of 7; it runs only with
// MINIPROXY_BENCH=1 and prints, it asserts only that every batch commits.
func TestValidateCost(t *testing.T) {
	if os.Getenv("MINIPROXY_BENCH") == "" {
		t.Skip("skipping: set MINIPROXY_BENCH=1 to run the validation cost measurements")
	}
	_, be := newNSBackend(t, scaleConfig())
	snap := scaleSnap(10000, 3)
	if _, err := be.Sync(context.Background(), snap, false); err != nil {
		t.Fatal(err)
	}
	svc := be.committed.Table(model.IPv4).Services[model.ServicePortName{Namespace: "scale", Name: "svc-7", Protocol: model.TCP}]
	tb := &gnft.Table{Name: rs.TableName, Family: gnft.TableFamilyIPv4}
	chain := &gnft.Chain{Table: tb, Name: svc.Chains[0].Name}
	noep := setSpec(tb, model.IPv4, &rs.Set{Name: rs.MapNoEndpointIPs, Key: rs.KeyDaddrProtoPort, Verdict: true})
	key := []gnft.SetElement{{Key: elementKey(rs.KeyDaddrProtoPort,
		rs.Element{Addr: netip.MustParseAddr("192.0.2.1"), Proto: model.TCP, Port: 1})}}
	withVerdict := func(v *expr.Verdict) []gnft.SetElement {
		e := key[0]
		e.VerdictData = v
		return []gnft.SetElement{e}
	}
	send := func(build func(c *gnft.Conn)) time.Duration {
		c, err := newCapture()
		if err != nil {
			t.Fatal(err)
		}
		build(c.conn)
		msgs, err := c.messages()
		if err != nil {
			t.Fatal(err)
		}
		bs := &batchSender{netns: be.netns, sndbuf: 1 << 20, rcvbuf: 1 << 20}
		c0 := cpuTime()
		if err := bs.send(msgs); err != nil {
			t.Fatal(err)
		}
		return cpuTime() - c0
	}
	rewrite := func(rules ...rs.Rule) func(c *gnft.Conn) {
		return func(c *gnft.Conn) {
			c.FlushChain(chain)
			for _, r := range rules {
				ex, err := ruleExprs(model.IPv4, r)
				if err != nil {
					t.Fatal(err)
				}
				c.AddRule(&gnft.Rule{Table: tb, Chain: chain, Exprs: ex})
			}
		}
	}
	ep := netip.MustParseAddrPort("10.99.0.1:8080")
	// A second, tiny table with its own nat base chain: whether validation
	// is per table (what a sharded ruleset would rely on) or per namespace.
	other := &gnft.Table{Name: "validate-probe", Family: gnft.TableFamilyIPv4}
	otherChain := &gnft.Chain{Table: other, Name: "c"}
	send(func(c *gnft.Conn) {
		c.AddTable(other)
		prio := gnft.ChainPriority(-99)
		c.AddChain(&gnft.Chain{Table: other, Name: "pre", Type: gnft.ChainTypeNAT, Hooknum: gnft.ChainHookPrerouting, Priority: &prio})
		c.AddChain(otherChain)
	})
	otherDNAT := func(c *gnft.Conn) {
		c.FlushChain(otherChain)
		ex, err := ruleExprs(model.IPv4, rs.Rule{rs.MatchNumgen{Mod: 3}, rs.MatchL4Proto{Proto: model.TCP}, rs.DNAT{To: ep}})
		if err != nil {
			t.Fatal(err)
		}
		c.AddRule(&gnft.Rule{Table: other, Chain: otherChain, Exprs: ex})
	}
	for _, c := range []struct {
		name  string
		build func(c *gnft.Conn)
		undo  func(c *gnft.Conn)
	}{
		{"add verdict-map element drop", func(c *gnft.Conn) { _ = c.SetAddElements(noep, withVerdict(&expr.Verdict{Kind: expr.VerdictDrop})) },
			func(c *gnft.Conn) { _ = c.SetDeleteElements(noep, key) }},
		{"add verdict-map element goto", func(c *gnft.Conn) {
			_ = c.SetAddElements(noep, withVerdict(&expr.Verdict{Kind: expr.VerdictGoto, Chain: rs.ChainReject}))
		}, func(c *gnft.Conn) { _ = c.SetDeleteElements(noep, key) }},
		{"flush chain", func(c *gnft.Conn) { c.FlushChain(chain) }, nil},
		{"flush + rule numgen (match only)", rewrite(rs.Rule{rs.MatchNumgen{Mod: 3}}), nil},
		{"flush + rule numgen dnat", rewrite(rs.Rule{rs.MatchNumgen{Mod: 3}, rs.MatchL4Proto{Proto: model.TCP}, rs.DNAT{To: ep}}), nil},
		{"flush + rule numgen mark", rewrite(rs.Rule{rs.MatchNumgen{Mod: 3}, rs.SetMark{Bits: 0x4000}}), nil},
		{"flush + rule numgen goto", rewrite(rs.Rule{rs.MatchNumgen{Mod: 3}, rs.Verdict{Kind: rs.Goto, Chain: rs.ChainReject}}), nil},
		{"dnat rule in a second, small table", otherDNAT, nil},
	} {
		var ds []time.Duration
		for i := 0; i < 7; i++ {
			ds = append(ds, send(c.build))
			if c.undo != nil {
				send(c.undo)
			}
		}
		t.Logf("%-36s commit CPU median %v", c.name, median(ds).Round(10*time.Microsecond))
	}
}
