// Package trace follows a packet through a rendered ruleset, without root,
// to tell which endpoints may answer, or whether it is rejected or dropped,
// and whether it is masqueraded.
package trace

import (
	"fmt"
	"net/netip"
	"sort"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// Packet is the first packet of a connection, as the tracer follows it.
type Packet struct {
	Src, Dst netip.Addr
	Proto    model.Protocol
	Port     uint16
	// LocalOrigin means a process on the node sends it (output hook);
	// otherwise it arrives from a pod or another host (prerouting).
	LocalOrigin bool
	// LocalAddrs are the node's own addresses: what `fib … type local`
	// matches (loopback addresses always count).
	LocalAddrs []netip.Addr
}

// Target is one endpoint that may receive the connection.
type Target struct {
	Endpoint netip.AddrPort
	// Masquerade means the source is rewritten to the node's address.
	Masquerade bool
}

// Verdict is everything that may happen to a packet: the possible endpoints
// (numgen makes several paths possible), and whether some path rejects,
// drops, or lets it through untouched.
type Verdict struct {
	Endpoints []Target
	Reject    bool
	Drop      bool
	// Accept means some path reaches the end without DNAT: the packet goes
	// on to its original destination (e.g. not a service address).
	Accept bool
	// Problems lists what the tracer could not follow (a jump to a chain
	// that does not exist, a loop); a correct ruleset has none.
	Problems []string
}

type fate int

const (
	cont fate = iota // fell off a chain or returned
	accept
	drop
	reject
)

type tstate struct {
	dst   netip.Addr
	port  uint16
	mark  uint32
	dnat  bool
	masq  bool
	fate  fate
	depth int
}

type tracer struct {
	t        *rs.Table
	pkt      Packet
	chains   map[string]*rs.Chain
	sets     map[string]*rs.Set
	elems    map[string]map[string]rs.Element
	problems map[string]bool
}

// Trace follows pkt through the rendered ruleset: the base chains of each hook
// on its path in priority order (across all tables of the packet's family,
// main and shards), every branch of every numgen, and returns what may happen.
// Dynamic affinity sets are taken as empty (a first connection).
func Trace(set *rs.Ruleset, pkt Packet) Verdict {
	var v Verdict
	tables := set.Family(model.FamilyOf(pkt.Dst))
	if len(tables) == 0 {
		v.Accept = true
		return v
	}
	problems := map[string]bool{}
	var trs []*tracer
	for _, t := range tables {
		trs = append(trs, newTracer(t, pkt, problems))
	}
	tr := trs[0]

	states := []tstate{{dst: pkt.Dst, port: pkt.Port}}
	hooks := []rs.Hook{rs.HookPrerouting, ""}
	if pkt.LocalOrigin {
		hooks = []rs.Hook{rs.HookOutput}
	}
	hooks = append(hooks, rs.HookPostrouting)
	for _, h := range hooks {
		var next []tstate
		for _, st := range states {
			hook := h
			if hook == "" { // routing decision after prerouting
				hook = rs.HookForward
				if tr.local(st.dst) {
					hook = rs.HookInput
				}
			}
			next = append(next, runHook(trs, hook, st)...)
		}
		states = next
	}

	seen := map[Target]bool{}
	for _, st := range states {
		switch {
		case st.fate == drop:
			v.Drop = true
		case st.fate == reject:
			v.Reject = true
		case st.dnat:
			tg := Target{Endpoint: netip.AddrPortFrom(st.dst, st.port), Masquerade: st.masq}
			if !seen[tg] {
				seen[tg] = true
				v.Endpoints = append(v.Endpoints, tg)
			}
		default:
			v.Accept = true
		}
	}
	sort.Slice(v.Endpoints, func(i, j int) bool {
		if c := v.Endpoints[i].Endpoint.Compare(v.Endpoints[j].Endpoint); c != 0 {
			return c < 0
		}
		return !v.Endpoints[i].Masquerade && v.Endpoints[j].Masquerade
	})
	for p := range problems {
		v.Problems = append(v.Problems, p)
	}
	sort.Strings(v.Problems)
	return v
}

// newTracer indexes one table's chains, sets and elements; names resolve
// within the table, as in the kernel.
func newTracer(t *rs.Table, pkt Packet, problems map[string]bool) *tracer {
	tr := &tracer{t: t, pkt: pkt, chains: map[string]*rs.Chain{}, sets: map[string]*rs.Set{},
		elems: map[string]map[string]rs.Element{}, problems: problems}
	for _, c := range t.AllChains() {
		tr.chains[c.Name] = c
	}
	for _, s := range t.AllSets() {
		tr.sets[s.Name] = s
	}
	for m, es := range t.Elements() {
		s := tr.sets[m]
		if s == nil {
			tr.problems["elements for unknown map "+m] = true
			continue
		}
		tr.elems[m] = map[string]rs.Element{}
		for _, e := range es {
			tr.elems[m][e.KeyString(s.Key)] = e
		}
	}
	return tr
}

func (tr *tracer) local(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	for _, l := range tr.pkt.LocalAddrs {
		if l == a {
			return true
		}
	}
	return false
}

// runHook runs the base chains of hook in every table in priority order; a
// drop or reject ends the packet, accept only ends that base chain. Once a
// connection has its NAT binding, the kernel skips the remaining nat chains
// of the hook (nf_nat runs them only until one sets it up), which is what
// lets several shard tables share the dstnat priority.
func runHook(trs []*tracer, h rs.Hook, st tstate) []tstate {
	type base struct {
		tr *tracer
		c  *rs.Chain
	}
	var bases []base
	for _, tr := range trs {
		for _, c := range tr.chains {
			if c.Base != nil && c.Base.Hook == h {
				bases = append(bases, base{tr, c})
			}
		}
	}
	sort.Slice(bases, func(i, j int) bool {
		bi, bj := bases[i], bases[j]
		if bi.c.Base.Priority != bj.c.Base.Priority {
			return bi.c.Base.Priority < bj.c.Base.Priority
		}
		if bi.tr.t.Name != bj.tr.t.Name {
			return bi.tr.t.Name < bj.tr.t.Name
		}
		return bi.c.Name < bj.c.Name
	})
	states := []tstate{st}
	for _, b := range bases {
		var next []tstate
		for _, s := range states {
			if s.fate == drop || s.fate == reject {
				next = append(next, s)
				continue
			}
			if b.c.Base.Type == rs.TypeNAT && ((h == rs.HookPostrouting && s.masq) || (h != rs.HookPostrouting && s.dnat)) {
				next = append(next, s)
				continue
			}
			for _, r := range b.tr.evalFrom(b.c, 0, s) {
				if r.fate == accept || r.fate == cont {
					r.fate = cont
				}
				next = append(next, r)
			}
		}
		states = next
	}
	return states
}

func (tr *tracer) chain(name string) *rs.Chain {
	c := tr.chains[name]
	if c == nil {
		tr.problems[fmt.Sprintf("jump to missing chain %q", name)] = true
	}
	return c
}

func (tr *tracer) evalFrom(c *rs.Chain, ri int, st tstate) []tstate {
	if ri >= len(c.Rules) {
		st.fate = cont
		return []tstate{st}
	}
	return tr.evalExprs(c, ri, 0, st)
}

func (tr *tracer) evalExprs(c *rs.Chain, ri, ei int, st tstate) []tstate {
	r := c.Rules[ri]
	if ei == len(r) {
		return tr.evalFrom(c, ri+1, st)
	}
	next := func(s tstate) []tstate { return tr.evalExprs(c, ri, ei+1, s) }
	cond := func(ok bool) []tstate {
		if ok {
			return next(st)
		}
		return tr.evalFrom(c, ri+1, st)
	}
	switch e := r[ei].(type) {
	case rs.MatchAddr:
		a := st.dst
		if e.Src {
			a = tr.pkt.Src
		}
		return cond(e.Prefix.Contains(a) != e.Neg)
	case rs.MatchFibLocal:
		a := st.dst
		if e.Src {
			a = tr.pkt.Src
		}
		return cond(tr.local(a))
	case rs.MatchL4Proto:
		return cond(tr.pkt.Proto == e.Proto)
	case rs.MatchCtNew:
		return cond(true)
	case rs.MatchMarkClear:
		return cond(st.mark&e.Bits == 0)
	case rs.MatchNumgen:
		if e.Mod <= 1 {
			return next(st)
		}
		return append(next(st), tr.evalFrom(c, ri+1, st)...)
	case rs.MatchSaddrInSet:
		if tr.sets[e.Set] == nil {
			tr.problems["lookup in missing set "+e.Set] = true
		}
		return cond(false)
	case rs.MatchCtDNAT:
		return cond(st.dnat)
	case rs.MatchKeyInSet:
		if tr.sets[e.Set] == nil {
			tr.problems["lookup in missing set "+e.Set] = true
			return cond(false)
		}
		switch e.Key {
		case rs.KeySaddrDaddr:
			// Elements hold the same address twice (see Element.KeyString).
			_, ok := tr.elems[e.Set][rs.Element{Addr: st.dst}.KeyString(e.Key)]
			return cond(ok && tr.pkt.Src == st.dst)
		case rs.KeyDaddrProtoPort:
			_, ok := tr.elems[e.Set][rs.Element{Addr: st.dst, Proto: tr.pkt.Proto, Port: st.port}.KeyString(e.Key)]
			return cond(ok)
		}
		tr.problems[fmt.Sprintf("set lookup with key kind %d", e.Key)] = true
		return cond(false)
	case rs.VMap:
		s := tr.sets[e.Map]
		if s == nil {
			tr.problems["lookup in missing map "+e.Map] = true
			return cond(false)
		}
		k := rs.Element{Addr: st.dst, Proto: tr.pkt.Proto, Port: st.port}.KeyString(e.Key)
		el, ok := tr.elems[e.Map][k]
		if !ok {
			return cond(false)
		}
		return tr.verdict(c, ri, el.Verdict, st)
	case rs.Verdict:
		return tr.verdict(c, ri, e, st)
	case rs.SetMark:
		if e.Xor {
			st.mark ^= e.Bits
		} else {
			st.mark |= e.Bits
		}
		return next(st)
	case rs.Masquerade:
		st.masq, st.fate = true, accept
		return []tstate{st}
	case rs.DNAT:
		st.dst, st.port, st.dnat, st.fate = e.To.Addr(), e.To.Port(), true, accept
		return []tstate{st}
	case rs.Reject:
		st.fate = reject
		return []tstate{st}
	case rs.UpdateSaddr:
		return next(st)
	}
	tr.problems[fmt.Sprintf("unknown expression %T", r[ei])] = true
	return nil
}

func (tr *tracer) verdict(c *rs.Chain, ri int, v rs.Verdict, st tstate) []tstate {
	switch v.Kind {
	case rs.Jump, rs.Goto:
		if st.depth > 64 {
			tr.problems["chain depth over 64 (loop?) at "+c.Name] = true
			return nil
		}
		target := tr.chain(v.Chain)
		if target == nil {
			return nil
		}
		st.depth++
		res := tr.evalFrom(target, 0, st)
		if v.Kind == rs.Goto {
			return res
		}
		var out []tstate
		for _, r := range res {
			r.depth--
			if r.fate == cont {
				out = append(out, tr.evalFrom(c, ri+1, r)...)
			} else {
				out = append(out, r)
			}
		}
		return out
	case rs.Return:
		st.fate = cont
		return []tstate{st}
	case rs.Drop:
		st.fate = drop
		return []tstate{st}
	}
	st.fate = accept
	return []tstate{st}
}
