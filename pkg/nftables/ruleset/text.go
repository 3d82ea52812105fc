package ruleset

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
)

func famWord(f model.Family) string {
	if f == model.IPv6 {
		return "ip6"
	}
	return "ip"
}

func addrType(f model.Family) string {
	if f == model.IPv6 {
		return "ipv6_addr"
	}
	return "ipv4_addr"
}

func prefixString(p netip.Prefix) string {
	if p.Bits() == p.Addr().BitLen() {
		return p.Addr().String()
	}
	return p.Masked().String()
}

func (m MatchAddr) nft(f model.Family) string {
	dir := "daddr"
	if m.Src {
		dir = "saddr"
	}
	op := ""
	if m.Neg {
		op = "!= "
	}
	return fmt.Sprintf("%s %s %s%s", famWord(f), dir, op, prefixString(m.Prefix))
}

func (m MatchFibLocal) nft(model.Family) string {
	if m.Src {
		return "fib saddr type local"
	}
	return "fib daddr type local"
}

func (m MatchL4Proto) nft(model.Family) string { return "meta l4proto " + m.Proto.Lower() }
func (MatchCtNew) nft(model.Family) string     { return "ct state new" }
func (m MatchMarkClear) nft(model.Family) string {
	return fmt.Sprintf("meta mark & 0x%08x == 0x00000000", m.Bits)
}
func (m MatchNumgen) nft(model.Family) string { return fmt.Sprintf("numgen random mod %d 0", m.Mod) }
func (m MatchSaddrInSet) nft(f model.Family) string {
	return fmt.Sprintf("%s saddr @%s", famWord(f), m.Set)
}

func (m MatchKeyInSet) nft(f model.Family) string {
	return fmt.Sprintf("%s @%s", keyExpr(f, m.Key), m.Set)
}
func (MatchCtDNAT) nft(model.Family) string { return "ct status dnat" }

func keyExpr(f model.Family, k KeyKind) string {
	switch k {
	case KeyAddr:
		return famWord(f) + " saddr"
	case KeyDaddrProtoPort:
		return famWord(f) + " daddr . meta l4proto . th dport"
	case KeyProtoPort:
		return "meta l4proto . th dport"
	case KeySaddrDaddr:
		return famWord(f) + " saddr . " + famWord(f) + " daddr"
	}
	return "?"
}

func keyType(f model.Family, k KeyKind) string {
	switch k {
	case KeyAddr:
		return addrType(f)
	case KeyDaddrProtoPort:
		return addrType(f) + " . inet_proto . inet_service"
	case KeyProtoPort:
		return "inet_proto . inet_service"
	case KeySaddrDaddr:
		return addrType(f) + " . " + addrType(f)
	}
	return "?"
}

func (v VMap) nft(f model.Family) string { return fmt.Sprintf("%s vmap @%s", keyExpr(f, v.Key), v.Map) }

func (v Verdict) nft(model.Family) string {
	if v.Chain != "" {
		return string(v.Kind) + " " + v.Chain
	}
	return string(v.Kind)
}

func (s SetMark) nft(model.Family) string {
	op := "|"
	if s.Xor {
		op = "^"
	}
	return fmt.Sprintf("meta mark set meta mark %s 0x%08x", op, s.Bits)
}

func (Masquerade) nft(model.Family) string { return "masquerade fully-random" }

func (d DNAT) nft(model.Family) string {
	return fmt.Sprintf("dnat to %s", d.To)
}

func (r Reject) nft(model.Family) string {
	if r.TCPReset {
		return "reject with tcp reset"
	}
	return "reject"
}

func (u UpdateSaddr) nft(f model.Family) string {
	return fmt.Sprintf("update @%s { %s saddr }", u.Set, famWord(f))
}

// String renders the rule in nft syntax.
func (r Rule) String(f model.Family) string {
	parts := make([]string, len(r))
	for i, e := range r {
		parts[i] = e.nft(f)
	}
	return strings.Join(parts, " ")
}

// Dump renders the whole ruleset as nft syntax, with sets, maps and chains
// sorted by name and elements sorted by key, so two equal rulesets always dump
// to the same text (golden tests compare this).
func (rs *Ruleset) Dump() string {
	var b strings.Builder
	for _, t := range rs.Tables {
		t.dump(&b, false)
	}
	return b.String()
}

// DumpServices is Dump without the static chains and without empty maps: the
// part of the ruleset that depends on the Services, for focused goldens.
func (rs *Ruleset) DumpServices() string {
	var b strings.Builder
	for _, t := range rs.Tables {
		t.dump(&b, true)
	}
	return b.String()
}

// AllChains returns the static chains followed by every service's chains.
func (t *Table) AllChains() []*Chain {
	out := append([]*Chain(nil), t.Chains...)
	for _, so := range t.Services {
		out = append(out, t.full(so).Chains...)
	}
	return out
}

// AllSets returns the static sets followed by every service's sets.
func (t *Table) AllSets() []*Set {
	out := append([]*Set(nil), t.Sets...)
	for _, so := range t.Services {
		out = append(out, t.full(so).Sets...)
	}
	return out
}

// Elements returns every element of every set and map, grouped by name.
func (t *Table) Elements() map[string][]Element {
	out := map[string][]Element{}
	if es := t.hairpinElements(); es != nil {
		out[SetHairpin] = es
	}
	for _, so := range t.Services {
		for _, me := range t.full(so).Elements {
			out[me.Map] = append(out[me.Map], me.Element)
		}
	}
	return out
}

func (t *Table) dump(b *strings.Builder, servicesOnly bool) {
	fmt.Fprintf(b, "table %s %s {\n", famWord(t.Family), t.Name)
	sets := t.AllSets()
	elems := t.Elements()
	chains := t.AllChains()
	if servicesOnly {
		sets, chains = nil, nil
		for _, s := range t.Sets {
			if len(elems[s.Name]) > 0 {
				sets = append(sets, s)
			}
		}
		for _, so := range t.Services {
			so = t.full(so)
			sets = append(sets, so.Sets...)
			chains = append(chains, so.Chains...)
		}
	}
	sort.Slice(sets, func(i, j int) bool { return sets[i].Name < sets[j].Name })
	for _, s := range sets {
		kind := "set"
		if s.Verdict {
			kind = "map"
		}
		fmt.Fprintf(b, "\t%s %s {\n\t\ttype %s", kind, s.Name, keyType(t.Family, s.Key))
		if s.Verdict {
			b.WriteString(" : verdict")
		}
		b.WriteString("\n")
		if s.Timeout > 0 {
			fmt.Fprintf(b, "\t\tflags dynamic,timeout\n\t\ttimeout %s\n", s.Timeout)
		}
		if es := elems[s.Name]; len(es) > 0 {
			lines := make([]string, len(es))
			for i, e := range es {
				lines[i] = e.KeyString(s.Key)
				if s.Verdict {
					lines[i] += " : " + e.Verdict.nft(t.Family)
				}
			}
			sort.Strings(lines)
			fmt.Fprintf(b, "\t\telements = {\n")
			for _, l := range lines {
				fmt.Fprintf(b, "\t\t\t%s,\n", l)
			}
			b.WriteString("\t\t}\n")
		}
		b.WriteString("\t}\n")
	}
	sort.SliceStable(chains, func(i, j int) bool {
		// Base chains first: they are the entry points a reader starts from.
		if (chains[i].Base != nil) != (chains[j].Base != nil) {
			return chains[i].Base != nil
		}
		return chains[i].Name < chains[j].Name
	})
	for _, c := range chains {
		fmt.Fprintf(b, "\tchain %s {\n", c.Name)
		if c.Base != nil {
			fmt.Fprintf(b, "\t\ttype %s hook %s priority %d; policy accept;\n", c.Base.Type, c.Base.Hook, c.Base.Priority)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(b, "\t\t%s\n", r.String(t.Family))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
}
