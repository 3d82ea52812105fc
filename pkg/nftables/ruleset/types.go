// Package ruleset is the pure, typed form of miniproxy's nftables ruleset:
// tables, chains, rules built from a small vocabulary of expressions, and
// sets/maps with their elements. It is rendered from a model.Snapshot without
// touching the kernel, dumped as sorted nft syntax for golden tests, walked by
// a packet tracer, and translated to netlink by the parent package.
//
// Rules use a closed vocabulary on purpose: every expression type has exactly
// one nft spelling, one netlink encoding and one tracer semantics, so the three
// cannot disagree silently and an unknown expression is a compile error.
package ruleset

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// TableName is the name of miniproxy's table in every family. The table is the
// namespace, so object names inside carry no product prefix.
const TableName = "miniproxy"

// Ruleset is everything miniproxy programs: per IP family, the main table
// and, when sharded, the shard tables after it.
type Ruleset struct {
	Tables []*Table
}

// Lookup returns the table of family f called name, or nil.
func (rs *Ruleset) Lookup(f model.Family, name string) *Table {
	for _, t := range rs.Tables {
		if t.Family == f && t.Name == name {
			return t
		}
	}
	return nil
}

// Family returns every table of family f, the main one first.
func (rs *Ruleset) Family(f model.Family) []*Table {
	var out []*Table
	for _, t := range rs.Tables {
		if t.Family == f {
			out = append(out, t)
		}
	}
	return out
}

// Table returns the main table of family f, or nil.
func (rs *Ruleset) Table(f model.Family) *Table {
	for _, t := range rs.Tables {
		if t.Family == f {
			return t
		}
	}
	return nil
}

// Table is one family's table. Static holds the objects that do not depend on
// any Service; Services holds, per service port, the objects it owns, so an
// update can replace exactly one service's share.
type Table struct {
	Family   model.Family
	Name     string
	Chains   []*Chain
	Sets     []*Set
	Services map[model.ServicePortName]*ServiceObjects
	// key records the non-service inputs (node, detector) the objects were
	// rendered from; see tableKey.
	key string
	// in renders this table's share of a service port again (see
	// Compact): the renderer the table was made with, the shard count and
	// which part the table is (0: main table, i+1: shard i).
	in     *renderer
	shards int
	part   int
	// fresh are the names rendered (not reused) for this table.
	fresh []model.ServicePortName
	// hairpin counts, in the table that holds SetHairpin, how many service
	// ports may DNAT to each endpoint address; the set holds an element for
	// every address counted. Several Services often share a pod, so the
	// element belongs to none of them. See Table.HairpinChanges.
	hairpin *hairpinRefs
	// touched are the addresses whose count this render changed, relative
	// to the previous table; all means the counts were built from scratch.
	touched [][16]byte
	all     bool
}

// ServiceObjects are the chains, sets and map elements one service port owns.
type ServiceObjects struct {
	// Source is the model value this was rendered from; an unchanged pointer
	// in the next snapshot means these objects can be reused as they are.
	Source   *model.ServicePort
	Chains   []*Chain
	Sets     []*Set
	Elements []MapElement
	// compact objects hold only Source; Table.Objects renders the rest
	// again when it is needed (see Table.Compact).
	compact bool
}

// Compact drops the chains, sets and elements of the service ports this
// table rendered itself, keeping only their Source. A backend keeps the
// ruleset it committed to find what the next render changes; at 10k
// Services the rules are its largest part, and they are needed again only
// for the few service ports a later sync changes (or for a repair), where
// rendering them again from Source costs microseconds each. Rendering is
// pure, so the objects come back identical.
func (t *Table) Compact() {
	if t.in == nil {
		return
	}
	for _, n := range t.fresh {
		if so := t.Services[n]; so != nil && !so.compact {
			t.Services[n] = &ServiceObjects{Source: so.Source, compact: true}
		}
	}
	t.fresh, t.touched = nil, nil
}

// Expanded returns a copy of t in which every service port's objects are
// present (rendered again where t was compacted), for callers that walk the
// whole table; t is unchanged and the copy shares t's uncompacted objects.
func (t *Table) Expanded() *Table {
	cp := *t
	cp.fresh, cp.touched = nil, nil
	cp.Services = make(map[model.ServicePortName]*ServiceObjects, len(t.Services))
	for n, so := range t.Services {
		cp.Services[n] = t.full(so)
	}
	return &cp
}

// Objects returns the objects of name in t (nil if it has none), rendered
// again if t was compacted.
func (t *Table) Objects(name model.ServicePortName) *ServiceObjects {
	return t.full(t.Services[name])
}

// full returns so with its chains, sets and elements.
func (t *Table) full(so *ServiceObjects) *ServiceObjects {
	if so == nil || !so.compact {
		return so
	}
	all := t.in.service(so.Source)
	var part *ServiceObjects
	switch {
	case all == nil:
	case t.shards == 1:
		part = all
	case t.part == 0:
		part, _ = splitService(all)
	default:
		_, part = splitService(all)
	}
	if part == nil {
		// Not reachable for objects this table rendered; an empty share
		// keeps callers simple.
		part = &ServiceObjects{Source: so.Source}
	}
	return part
}

// Hook is a netfilter hook.
type Hook string

// The hooks miniproxy uses.
const (
	HookPrerouting  Hook = "prerouting"
	HookInput       Hook = "input"
	HookForward     Hook = "forward"
	HookOutput      Hook = "output"
	HookPostrouting Hook = "postrouting"
)

// ChainType is the nft chain type of a base chain.
type ChainType string

// Chain types.
const (
	TypeNAT    ChainType = "nat"
	TypeFilter ChainType = "filter"
)

// BaseChain attaches a chain to a hook.
type BaseChain struct {
	Type     ChainType
	Hook     Hook
	Priority int32
}

// Chain is a named list of rules; Base is nil for regular (jump target) chains.
type Chain struct {
	Name  string
	Base  *BaseChain
	Rules []Rule
}

// Rule is a sequence of expressions evaluated left to right: matches that may
// stop the rule, then statements.
type Rule []Expr

// Expr is one element of the closed expression vocabulary below.
type Expr interface {
	// nft returns the nft syntax of the expression in a table of family f.
	nft(f model.Family) string
}

// KeyKind is the shape of a set key (and the packet fields matched against it).
type KeyKind int

// Key shapes.
const (
	// KeyAddr is ipv4_addr / ipv6_addr (matched against the source address).
	KeyAddr KeyKind = iota
	// KeyDaddrProtoPort is daddr . inet_proto . inet_service.
	KeyDaddrProtoPort
	// KeyProtoPort is inet_proto . inet_service (NodePorts).
	KeyProtoPort
	// KeySaddrDaddr is saddr . daddr; its elements have the same address
	// twice (the hairpin set), so an Element carries it once.
	KeySaddrDaddr
)

// ---- matches ----

// MatchAddr matches the source or destination address against a prefix
// (a full-length prefix is a single address).
type MatchAddr struct {
	Src    bool
	Prefix netip.Prefix
	Neg    bool
}

// MatchFibLocal matches when the source or destination address is local
// (`fib saddr|daddr type local`).
type MatchFibLocal struct{ Src bool }

// MatchL4Proto matches the transport protocol.
type MatchL4Proto struct{ Proto model.Protocol }

// MatchCtNew matches packets of new connections (`ct state new`).
type MatchCtNew struct{}

// MatchMarkClear matches when none of Bits is set in the packet mark.
type MatchMarkClear struct{ Bits uint32 }

// MatchNumgen matches with probability 1/Mod (`numgen random mod Mod 0`).
type MatchNumgen struct{ Mod uint32 }

// MatchSaddrInSet matches when the source address is in the named set.
type MatchSaddrInSet struct{ Set string }

// MatchKeyInSet matches when the packet's key of kind Key is in the named
// set: saddr . daddr for the hairpin set, daddr . proto . port for
// SetClusterIPs.
type MatchKeyInSet struct {
	Key KeyKind
	Set string
}

// MatchCtDNAT matches packets of connections that were DNATed
// (`ct status dnat`).
type MatchCtDNAT struct{}

// ---- statements ----

// VMap looks the packet's key up in a verdict map and applies the verdict
// found; no element means the rule does not match.
type VMap struct {
	Key KeyKind
	Map string
}

// VerdictKind is a verdict.
type VerdictKind string

// Verdicts.
const (
	Jump   VerdictKind = "jump"
	Goto   VerdictKind = "goto"
	Return VerdictKind = "return"
	Drop   VerdictKind = "drop"
	Accept VerdictKind = "accept"
)

// Verdict ends or redirects evaluation.
type Verdict struct {
	Kind  VerdictKind
	Chain string
}

// SetMark ORs Bits into the packet mark, or XORs them when Xor (used to clear
// the masquerade bit once it has done its job).
type SetMark struct {
	Bits uint32
	Xor  bool
}

// Masquerade SNATs to the outgoing interface's address (fully random ports).
type Masquerade struct{}

// DNAT rewrites the destination. It must follow a MatchL4Proto because nft
// needs a known transport protocol to print and parse addr:port.
type DNAT struct{ To netip.AddrPort }

// Reject answers with a TCP reset or ICMP port unreachable.
type Reject struct{ TCPReset bool }

// UpdateSaddr adds or refreshes the source address in a dynamic set.
type UpdateSaddr struct{ Set string }

// ---- sets ----

// Set is a named set or verdict map.
type Set struct {
	Name string
	Key  KeyKind
	// Verdict makes it a verdict map (vmap).
	Verdict bool
	// Timeout > 0 makes it a dynamic set whose elements expire.
	Timeout time.Duration
}

// Element is one element of a set or map. Fields unused by the key kind are zero.
type Element struct {
	Addr    netip.Addr
	Proto   model.Protocol
	Port    uint16
	Verdict Verdict
}

// MapElement is an element destined for a named map.
type MapElement struct {
	Map string
	Element
}

// KeyString renders the element key in nft syntax; it also identifies the
// element inside its map.
func (e Element) KeyString(k KeyKind) string {
	switch k {
	case KeyAddr:
		return e.Addr.String()
	case KeyDaddrProtoPort:
		return fmt.Sprintf("%s . %s . %d", e.Addr, e.Proto.Lower(), e.Port)
	case KeyProtoPort:
		return fmt.Sprintf("%s . %d", e.Proto.Lower(), e.Port)
	case KeySaddrDaddr:
		return fmt.Sprintf("%s . %s", e.Addr, e.Addr)
	}
	return "?"
}

// ProtoNumber returns the IP protocol number of p.
func ProtoNumber(p model.Protocol) uint8 {
	switch p {
	case model.TCP:
		return 6
	case model.UDP:
		return 17
	case model.SCTP:
		return 132
	}
	return 0
}
