package nftables

import (
	"bytes"
	"net/netip"
	"testing"

	gnft "github.com/google/nftables"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// TestRuleEncoderMatchesLibrary checks that every rule of the rich fixture
// (both families, every expression kind) is encoded byte for byte as
// google/nftables' Conn.AddRule encodes it, including rules whose
// expressions come from the encoder's cache.
func TestRuleEncoderMatchesLibrary(t *testing.T) {
	cfg := richConfig()
	// Sharded, so the table name in the message varies too.
	rs := ruleset.RenderSharded(fixture.Rich(), &cfg, nil, 2)
	n := 0
	for _, tb := range rs.Tables {
		enc := newRuleEncoder(tb.Family, tb.Name)
		for pass := 0; pass < 2; pass++ { // the second pass hits the cache
			for _, ch := range tb.AllChains() {
				for _, r := range ch.Rules {
					got, err := enc.rule(ch.Name, r)
					if err != nil {
						t.Fatal(err)
					}
					c, err := newCapture()
					if err != nil {
						t.Fatal(err)
					}
					ex, err := ruleExprs(tb.Family, r)
					if err != nil {
						t.Fatal(err)
					}
					gt := &gnft.Table{Name: tb.Name, Family: tableFamily(tb.Family)}
					c.conn.AddRule(&gnft.Rule{Table: gt, Chain: &gnft.Chain{Name: ch.Name, Table: gt}, Exprs: ex})
					want, err := c.messages()
					if err != nil {
						t.Fatal(err)
					}
					if len(want) != 1 || want[0].Header.Type != got.Header.Type ||
						want[0].Header.Flags != got.Header.Flags || !bytes.Equal(want[0].Data, got.Data) {
						t.Fatalf("chain %s rule %v:\n got %x %v\nwant %x %v", ch.Name, r,
							got.Data, got.Header, want[0].Data, want[0].Header)
					}
					n++
				}
			}
		}
	}
	if n < 50 {
		t.Fatalf("only %d rules compared; the fixture should exercise more", n)
	}
	t.Logf("%d rules identical", n)
}

// TestDNATTemplateMatchesLibrary: DNATs are encoded by patching one
// template; every address and port must come out as the library encodes it,
// including values that contain the template's own sentinel bytes.
func TestDNATTemplateMatchesLibrary(t *testing.T) {
	ports := []uint16{0, 1, 80, 0xe77e, 0x7ee7, 0xa55a, 65535}
	v4 := []string{"10.244.0.5", "0.0.0.0", "255.255.255.255", "165.90.195.60", "126.231.165.90"}
	v6 := []string{"fd00::1", "::", "a55a:c33c:a55a:c33c:a55a:c33c:a55a:c33c", "2001:db8::e77e"}
	for _, c := range []struct {
		f     model.Family
		addrs []string
	}{{model.IPv4, v4}, {model.IPv6, v6}} {
		enc := newRuleEncoder(c.f, "miniproxy")
		n := 0
		for _, a := range c.addrs {
			for _, p := range ports {
				x := ruleset.DNAT{To: netip.AddrPortFrom(netip.MustParseAddr(a), p)}
				got, err := enc.appendExpr(nil, x)
				if err != nil {
					t.Fatal(err)
				}
				want, err := enc.marshalExpr(nil, x)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%v: template encoding\n %x\nlibrary\n %x", x, got, want)
				}
				n++
			}
		}
		if enc.dnat == nil || !enc.dnat.ok {
			t.Fatalf("%v: the template was not used (sentinel not unique?)", c.f)
		}
		t.Logf("%v: %d DNATs identical", c.f, n)
	}
}
