// Package nftjson follows the first packet of a connection through an
// nftables ruleset given as `nft -j list ruleset` output: miniproxy's tables,
// kube-proxy's, or anyone's, all tables of the packet's family (and inet)
// together, base chains of each hook in priority order, as the kernel runs
// them. Every branch of every `numgen random mod N` — as a match (cascade) or
// as a verdict map key — is explored with its probability.
//
// Why JSON and not the typed miniproxy ruleset (pkg/nftables/ruleset): that
// vocabulary is closed on purpose and holds only what miniproxy writes, so it
// cannot represent kube-proxy's rules or anyone else's; nft's JSON is a
// stable, documented rendering of whatever the kernel holds.
//
// Supported expressions: payload (ip/ip6 saddr, daddr, protocol/nexthdr;
// th/tcp/udp/sctp dport), meta (l4proto, nfproto, protocol, mark), ct state
// and ct status, fib saddr/daddr type, numgen random, concatenations, the
// binary &, |, ^ operators; right-hand values, prefixes, ranges, anonymous
// and named sets (live elements, so a source already in a ClientIP affinity
// set is pinned as the kernel would pin it); statements counter, mangle of
// meta mark, set add/update, vmap (named or anonymous), jump, goto, return,
// accept, drop, continue, reject, snat, masquerade, and dnat to an address,
// address:port, or a map lookup of them (kube-proxy's
// `dnat ip to numgen random mod N map { 0 : addr . port, … }`).
// Tables that iptables-nft manages (their rules carry xt expressions) are
// left to the iptables tracer. Anything else on a rule the packet reaches
// ends that path as "unsupported: <expression>".
package nftjson

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// Ruleset is a parsed `nft -j list ruleset`.
type Ruleset struct {
	Tables []*Table
}

// Table is one nft table.
type Table struct {
	Family, Name string
	Chains       map[string]*Chain
	Sets         map[string]*Set
	// XT: some rule uses an iptables (xt) expression: the table belongs to
	// iptables-nft.
	XT bool
}

// Chain is one chain; Hook is empty for a regular chain.
type Chain struct {
	Name   string
	Type   string
	Hook   string
	Prio   int
	Policy string
	Rules  []Rule
}

// Rule is one rule's expressions, as decoded JSON values.
type Rule struct {
	Handle int
	Exprs  []any
}

// Set is a named set or map with its elements.
type Set struct {
	Name  string
	Type  []string
	Map   string // "verdict" for a verdict map, "" for a set
	Flags []string
	// Timeout (s) of a dynamic set, for the affinity description.
	Timeout int64
	// Elems are keys (sets) or [key, value] pairs (maps), element wrappers
	// ({"elem": {"val": …}}) removed.
	Elems []any
}

// Parse reads `nft -j list ruleset` output.
func Parse(data []byte) (*Ruleset, error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("decode nft json: %w", err)
	}
	rs := &Ruleset{}
	tables := map[string]*Table{}
	table := func(fam, name string) *Table {
		k := fam + " " + name
		t := tables[k]
		if t == nil {
			t = &Table{Family: fam, Name: name, Chains: map[string]*Chain{}, Sets: map[string]*Set{}}
			tables[k] = t
			rs.Tables = append(rs.Tables, t)
		}
		return t
	}
	decode := func(raw json.RawMessage, v any) error {
		d := json.NewDecoder(bytes.NewReader(raw))
		d.UseNumber()
		return d.Decode(v)
	}
	for _, obj := range doc.Nftables {
		for kind, raw := range obj {
			switch kind {
			case "table":
				var t struct{ Family, Name string }
				if err := decode(raw, &t); err != nil {
					return nil, err
				}
				table(t.Family, t.Name)
			case "chain":
				var c struct {
					Family, Table, Name, Type, Hook, Policy string
					Prio                                    int
				}
				if err := decode(raw, &c); err != nil {
					return nil, err
				}
				t := table(c.Family, c.Table)
				ch := t.Chains[c.Name]
				if ch == nil {
					ch = &Chain{Name: c.Name}
					t.Chains[c.Name] = ch
				}
				ch.Type, ch.Hook, ch.Prio, ch.Policy = c.Type, c.Hook, c.Prio, c.Policy
			case "set", "map":
				var s struct {
					Family, Table, Name string
					Type                any
					Map                 any
					Flags               []string
					Timeout             int64
					Elem                []any
				}
				if err := decode(raw, &s); err != nil {
					return nil, err
				}
				set := &Set{Name: s.Name, Flags: s.Flags, Timeout: s.Timeout}
				switch ty := s.Type.(type) {
				case string:
					set.Type = []string{ty}
				case []any:
					for _, x := range ty {
						set.Type = append(set.Type, fmt.Sprint(x))
					}
				}
				if m, ok := s.Map.(string); ok {
					set.Map = m
				}
				for _, e := range s.Elem {
					if kind == "map" {
						if pair, ok := e.([]any); ok && len(pair) == 2 {
							set.Elems = append(set.Elems, []any{unwrapElem(pair[0]), pair[1]})
						}
						continue
					}
					set.Elems = append(set.Elems, unwrapElem(e))
				}
				table(s.Family, s.Table).Sets[s.Name] = set
			case "rule":
				var r struct {
					Family, Table, Chain string
					Handle               int
					Expr                 []any
				}
				if err := decode(raw, &r); err != nil {
					return nil, err
				}
				t := table(r.Family, r.Table)
				ch := t.Chains[r.Chain]
				if ch == nil {
					ch = &Chain{Name: r.Chain}
					t.Chains[r.Chain] = ch
				}
				for _, e := range r.Expr {
					if m, ok := e.(map[string]any); ok && m["xt"] != nil {
						t.XT = true
					}
				}
				ch.Rules = append(ch.Rules, Rule{Handle: r.Handle, Exprs: r.Expr})
			}
		}
	}
	sort.SliceStable(rs.Tables, func(i, j int) bool {
		return rs.Tables[i].Family+" "+rs.Tables[i].Name < rs.Tables[j].Family+" "+rs.Tables[j].Name
	})
	return rs, nil
}

// unwrapElem removes the {"elem": {"val": X, "timeout": …}} wrapper nft
// puts around elements with timeouts, expiry or comments.
func unwrapElem(e any) any {
	if m, ok := e.(map[string]any); ok {
		if w, ok := m["elem"].(map[string]any); ok {
			return w["val"]
		}
	}
	return e
}

// HasServiceTables reports whether a table of kube-proxy's or miniproxy's
// nftables mode is present.
func (rs *Ruleset) HasServiceTables() bool {
	for _, t := range rs.Tables {
		if !t.XT && (t.Name == "kube-proxy" || strings.HasPrefix(t.Name, "miniproxy")) {
			return true
		}
	}
	return false
}

// HasIPTablesChain reports whether iptables-nft holds a chain called name in
// family fam ("ip" or "ip6"), table tbl.
func (rs *Ruleset) HasIPTablesChain(fam, tbl, name string) bool {
	for _, t := range rs.Tables {
		if t.Family == fam && t.Name == tbl && t.Chains[name] != nil {
			return true
		}
	}
	return false
}
