package nftables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"sort"
	"strings"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nfgen"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// observed is what the kernel really holds in one of our tables, read only on
// full syncs. Rules are compared by fingerprint (the sequence of expression
// names per rule): cheap to read in one dump for the whole table, and enough
// to notice rules deleted, added or replaced by hand.
type observed struct {
	exists bool
	chains map[string][]string
	// checked marks the chains whose rules were read (see chainsToCheck).
	checked map[string]bool
	sets    map[string]bool
	// elems: map name → element key bytes → verdict ("goto chain").
	elems map[string]map[string]string
}

func (b *Backend) observe(f model.Family, desired *rs.Table) (*observed, error) {
	c, err := b.conn()
	if err != nil {
		return nil, err
	}
	obs := &observed{chains: map[string][]string{}, checked: map[string]bool{}, sets: map[string]bool{},
		elems: map[string]map[string]string{}}
	tables, err := c.ListTablesOfFamily(tableFamily(f))
	if err != nil {
		return nil, fmt.Errorf("listing tables: %w", err)
	}
	var t *gnft.Table
	for _, x := range tables {
		if x.Name == desired.Name {
			t = x
		}
	}
	if t == nil {
		return obs, nil
	}
	obs.exists = true
	chains, err := c.ListChainsOfTableFamily(tableFamily(f))
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == desired.Name {
			obs.chains[ch.Name] = nil
		}
	}
	rules, err := b.dumpRules(f, desired.Name, b.chainsToCheck(desired, obs.chains))
	if err != nil {
		return nil, err
	}
	for ch, fps := range rules {
		obs.chains[ch] = fps
		obs.checked[ch] = true
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	for _, s := range sets {
		obs.sets[s.Name] = true
		if s.HasTimeout || s.Dynamic {
			continue // affinity sets hold dynamic state, not ours to compare
		}
		els, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("listing elements of %s: %w", s.Name, err)
		}
		m := make(map[string]string, len(els))
		for _, e := range els {
			m[string(e.Key)] = elemVerdict(e)
		}
		obs.elems[s.Name] = m
	}
	return obs, nil
}

// elemVerdict decodes a verdict map element's value. google/nftables leaves
// it as the raw NFTA_DATA_VERDICT attributes in Val when listing.
func elemVerdict(e gnft.SetElement) string {
	if e.VerdictData != nil {
		return verdictString(e.VerdictData.Kind, e.VerdictData.Chain)
	}
	ad, err := netlink.NewAttributeDecoder(e.Val)
	if err != nil {
		return ""
	}
	ad.ByteOrder = binary.BigEndian
	var code int32
	chain := ""
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			code = int32(ad.Uint32())
		case unix.NFTA_VERDICT_CHAIN:
			chain = ad.String()
		}
	}
	if ad.Err() != nil {
		return ""
	}
	return verdictString(expr.VerdictKind(code), chain)
}

func verdictString(k expr.VerdictKind, chain string) string {
	return fmt.Sprintf("%d %s", k, chain)
}

// ruleCheckBudget bounds how many chains a full sync reads rules from. The
// kernel's whole-table rule dump restarts its walk for every reply buffer,
// which made a 30k-Service table take minutes to read; per-chain dumps are
// linear but one round trip each. Static chains are read on every full sync,
// service chains in a rotating window, so rule-level drift inside a service
// chain is found within ceil(chains/budget) full syncs. Missing chains, sets
// and map elements are found on every full sync.
const ruleCheckBudget = 4000

// chainsToCheck returns the static chains plus the next window of the other
// chains present in the kernel.
func (b *Backend) chainsToCheck(desired *rs.Table, present map[string][]string) []string {
	static := map[string]bool{}
	var out []string
	for _, c := range desired.Chains {
		if _, ok := present[c.Name]; ok {
			static[c.Name] = true
			out = append(out, c.Name)
		}
	}
	var rest []string
	for name := range present {
		if !static[name] {
			rest = append(rest, name)
		}
	}
	if len(rest) <= ruleCheckBudget {
		return append(out, rest...)
	}
	sort.Strings(rest)
	start := b.rotor[desired.Name] % len(rest)
	for i := 0; i < ruleCheckBudget; i++ {
		out = append(out, rest[(start+i)%len(rest)])
	}
	b.rotor[desired.Name] = (start + ruleCheckBudget) % len(rest)
	return out
}

// dumpRules reads the rules of the given chains of our table and returns
// their fingerprints per chain. google/nftables' GetRules decodes every
// expression; only names and jump targets are needed here.
func (b *Backend) dumpRules(f model.Family, table string, chains []string) (map[string][]string, error) {
	nl, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
	if err != nil {
		return nil, fmt.Errorf("dialing netlink: %w", err)
	}
	defer nl.Close()
	out := make(map[string][]string, len(chains))
	for _, ch := range chains {
		attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
			{Type: unix.NFTA_RULE_TABLE, Data: []byte(table + "\x00")},
			{Type: unix.NFTA_RULE_CHAIN, Data: []byte(ch + "\x00")},
		})
		if err != nil {
			return nil, fmt.Errorf("encoding rule dump request: %w", err)
		}
		msgs, err := nl.Execute(netlink.Message{
			Header: netlink.Header{
				Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
				Flags: netlink.Request | netlink.Dump,
			},
			Data: append([]byte{byte(tableFamily(f)), unix.NFNETLINK_V0, 0, 0}, attrs...),
		})
		if err != nil {
			return nil, fmt.Errorf("dumping rules of %s: %w", ch, err)
		}
		fps := []string{}
		for _, m := range msgs {
			if len(m.Data) < 4 {
				continue
			}
			_, fp, err := parseRuleMsg(m.Data[4:])
			if err != nil {
				return nil, fmt.Errorf("decoding rule of %s: %w", ch, err)
			}
			fps = append(fps, fp)
		}
		out[ch] = fps
	}
	return out, nil
}

func parseRuleMsg(b []byte) (chain, fp string, err error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return "", "", err
	}
	var names []string
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_RULE_CHAIN:
			chain = ad.String()
		case unix.NFTA_RULE_EXPRESSIONS:
			ad.Nested(func(l *netlink.AttributeDecoder) error {
				for l.Next() {
					l.Nested(func(e *netlink.AttributeDecoder) error {
						name, chain := "", ""
						for e.Next() {
							switch e.Type() {
							case unix.NFTA_EXPR_NAME:
								name = e.String()
							case unix.NFTA_EXPR_DATA:
								chain = verdictChain(e.Bytes())
							}
						}
						if name == "immediate" && chain != "" {
							name += ":" + chain
						}
						names = append(names, name)
						return nil
					})
				}
				return nil
			})
		}
	}
	return chain, strings.Join(names, ","), ad.Err()
}

// fingerprint returns the expression-name sequence of a typed rule, as the
// kernel would dump it.
func fingerprint(f model.Family, r rs.Rule) (string, error) {
	ex, err := ruleExprs(f, r)
	if err != nil {
		return "", err
	}
	names := make([]string, 0, len(ex))
	for _, e := range ex {
		b, err := expr.Marshal(byte(tableFamily(f)), e)
		if err != nil {
			return "", fmt.Errorf("encoding %T: %w", e, err)
		}
		ad, err := netlink.NewAttributeDecoder(b)
		if err != nil {
			return "", err
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_EXPR_NAME {
				name := ad.String()
				if v, ok := e.(*expr.Verdict); ok && v.Chain != "" {
					name += ":" + v.Chain
				}
				names = append(names, name)
			}
		}
	}
	return strings.Join(names, ","), nil
}

// verdictChain returns the jump/goto target in an immediate expression's
// data, or "". Including it in the fingerprint catches a retargeted jump.
func verdictChain(b []byte) string {
	chain := ""
	var walk func(b []byte, depth int)
	walk = func(b []byte, depth int) {
		ad, err := netlink.NewAttributeDecoder(b)
		if err != nil {
			return
		}
		for ad.Next() {
			switch {
			case depth == 0 && ad.Type() == unix.NFTA_IMMEDIATE_DATA,
				depth == 1 && ad.Type() == unix.NFTA_DATA_VERDICT:
				walk(ad.Bytes(), depth+1)
			case depth == 2 && ad.Type() == unix.NFTA_VERDICT_CHAIN:
				chain = ad.String()
			}
		}
	}
	walk(b, 0)
	return chain
}

// reconcilePlan compares the desired table with what the kernel holds and
// returns the repairs, which include the changes since the last commit.
func reconcilePlan(committed, desired *rs.Table, obs *observed) *plan {
	// Every object is compared below: render the compacted ones once.
	all := desired.Expanded()
	if !obs.exists {
		return replacePlan(all)
	}
	p := newPlan(desired.Family, desired.Name, desired.Sets)
	// What we committed is what the kernel should hold apart from drift;
	// chains that changed since must be rewritten whatever the kernel
	// shows, since a fingerprint does not see every detail. Objects
	// shared with committed did not change.
	prevChains := map[string]*rs.Chain{}
	for _, c := range committed.Chains {
		prevChains[c.Name] = c
	}
	same := map[string]bool{}
	for name, so := range desired.Services {
		po := committed.Services[name]
		if po == so {
			for _, c := range all.Services[name].Chains {
				same[c.Name] = true
			}
			continue
		}
		p.services++
		if po != nil {
			for _, c := range committed.Objects(name).Chains {
				prevChains[c.Name] = c
			}
		}
	}
	for name := range committed.Services {
		if _, ok := desired.Services[name]; !ok {
			p.services++
		}
	}
	want := map[string]bool{}
	for _, c := range all.AllChains() {
		want[c.Name] = true
		have, ok := obs.chains[c.Name]
		if !ok {
			p.addChains = append(p.addChains, c)
			p.writeChains = append(p.writeChains, c)
			continue
		}
		changed := false
		if !same[c.Name] {
			pc := prevChains[c.Name]
			changed = pc == nil || (pc != c && !reflect.DeepEqual(pc.Rules, c.Rules))
		}
		if changed || (obs.checked[c.Name] && !slices.Equal(fingerprints(desired.Family, c), have)) {
			p.flushChains = append(p.flushChains, c.Name)
			p.writeChains = append(p.writeChains, c)
		}
	}
	for name := range obs.chains {
		if !want[name] {
			p.delChains = append(p.delChains, name)
		}
	}
	wantSet := map[string]bool{}
	for _, s := range all.AllSets() {
		wantSet[s.Name] = true
		if !obs.sets[s.Name] {
			p.addSets = append(p.addSets, s)
		}
	}
	for name := range obs.sets {
		if !wantSet[name] {
			p.delSets = append(p.delSets, name)
		}
	}
	elems := all.Elements()
	for _, s := range desired.Sets {
		if s.Timeout > 0 {
			continue
		}
		have := obs.elems[s.Name]
		seen := map[string]bool{}
		for _, e := range elems[s.Name] {
			k := string(elementKey(s.Key, e))
			seen[k] = true
			v, ok := have[k]
			if ok && (!s.Verdict || v == verdictString(verdictKind(e.Verdict.Kind), e.Verdict.Chain)) {
				continue
			}
			if ok {
				p.delElems[s.Name] = append(p.delElems[s.Name], e)
			}
			p.addElems[s.Name] = append(p.addElems[s.Name], e)
		}
		for k := range have {
			if !seen[k] {
				e, err := decodeKey(s.Key, desired.Family, []byte(k))
				if err != nil {
					// Not something we could have written: the
					// whole map is rewritten from scratch below.
					p.replace = true
					break
				}
				p.delElems[s.Name] = append(p.delElems[s.Name], e)
			}
		}
	}
	if p.replace {
		return replacePlan(all)
	}
	p.sortForDeterminism()
	return p
}

// fingerprints returns the fingerprints of c's rules, comparable with the
// ones dumpRules reads from the kernel.
func fingerprints(f model.Family, c *rs.Chain) []string {
	fp := make([]string, 0, len(c.Rules))
	for _, r := range c.Rules {
		s, err := fingerprint(f, r)
		if err != nil {
			s = "error: " + err.Error() // never equal to a kernel fingerprint
		}
		fp = append(fp, s)
	}
	return fp
}

var errBadKey = errors.New("unexpected element key layout")

// decodeKey turns element key bytes back into an element (only the fields
// needed to delete it).
func decodeKey(k rs.KeyKind, f model.Family, b []byte) (rs.Element, error) {
	alen := 4
	if f == model.IPv6 {
		alen = 16
	}
	protoOf := func(n byte) model.Protocol {
		switch n {
		case 6:
			return model.TCP
		case 17:
			return model.UDP
		case 132:
			return model.SCTP
		}
		return ""
	}
	var e rs.Element
	switch k {
	case rs.KeySaddrDaddr:
		if len(b) != 2*alen || string(b[:alen]) != string(b[alen:]) {
			return e, errBadKey
		}
		e.Addr = addrFrom(b[:alen])
		return e, nil
	case rs.KeyDaddrProtoPort:
		if len(b) != alen+8 {
			return e, errBadKey
		}
		e.Addr = addrFrom(b[:alen])
		b = b[alen:]
		fallthrough
	case rs.KeyProtoPort:
		if len(b) != 8 {
			return e, errBadKey
		}
		e.Proto = protoOf(b[0])
		e.Port = uint16(b[4])<<8 | uint16(b[5])
		if e.Proto == "" {
			return e, errBadKey
		}
		return e, nil
	}
	return e, errBadKey
}

func addrFrom(b []byte) netip.Addr {
	a, _ := netip.AddrFromSlice(b)
	return a
}

// genID returns the nf_tables ruleset generation of the backend's namespace.
func (b *Backend) genID() (uint32, error) { return nfgen.Read(b.netns) }
