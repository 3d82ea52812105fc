package ruleset

import (
	"maps"
	"net/netip"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// SetHairpin holds "ep . ep" for every endpoint address some service port
// may DNAT to. nat-postrouting marks a DNATed connection whose source and
// new destination are the same address (a pod reaching itself through a
// VIP) for masquerade: without it the pod would answer itself directly and
// the reply would skip conntrack's reverse NAT.
//
// Deciding hairpin here, once, instead of splitting every endpoint's DNAT
// rule on "saddr == ep / != ep" in the service chain halves the rules per
// endpoint; at 10k Services × 5 endpoints that is 50k fewer rules, and the
// kernel spends about 17 µs on each rule it loads (pkg/nftables/README,
// "Sync"). Elements cost almost nothing: they go many to a message.
const SetHairpin = "hairpin-endpoints"

// hairpinRefs counts the service ports that may DNAT to each address (keys
// are netip.Addr.As16, so the maps hold no pointers for the GC to scan).
//
// Every render starts from the previous table's counts, which must stay
// intact (the previous table is what the kernel holds if the commit fails),
// and copying 50k counts on every sync would cost milliseconds. So a table
// shares the previous base and copies only the overrides of the syncs since
// the base was built; when those grow past an eighth of the base they are
// folded into a new base, which keeps the cost per changed address constant.
type hairpinRefs struct {
	base  map[[16]byte]int32 // shared between tables: never written
	delta map[[16]byte]int32 // this table's counts where they differ from base; 0: gone
}

func (h *hairpinRefs) get(a [16]byte) int32 {
	if n, ok := h.delta[a]; ok {
		return n
	}
	return h.base[a]
}

// each calls fn for every address with a count.
func (h *hairpinRefs) each(fn func([16]byte)) {
	for a, n := range h.base {
		if _, over := h.delta[a]; !over && n > 0 {
			fn(a)
		}
	}
	for a, n := range h.delta {
		if n > 0 {
			fn(a)
		}
	}
}

// next returns the counts a new table starts from.
func (h *hairpinRefs) next() *hairpinRefs {
	if len(h.delta) <= len(h.base)/8+64 {
		return &hairpinRefs{base: h.base, delta: maps.Clone(h.delta)}
	}
	base := make(map[[16]byte]int32, len(h.base)+len(h.delta))
	h.each(func(a [16]byte) { base[a] = h.get(a) })
	return &hairpinRefs{base: base, delta: map[[16]byte]int32{}}
}

// hairpinAddrs are the addresses sp contributes to the hairpin set of
// family f: its endpoints of that family, when it has a cluster IP of that
// family (otherwise it renders nothing in f). Any endpoint, eligible or not:
// an element for an address no rule DNATs to never matches, and taking them
// all keeps this cheap enough to run for both the old and the new version
// of every changed service port. It must depend on sp alone, since the
// counts are kept by adding and subtracting it.
func hairpinAddrs(f model.Family, sp *model.ServicePort, visit func([16]byte)) {
	if sp == nil {
		return
	}
	if _, ok := sp.ClusterIP(f); !ok {
		return
	}
	for _, ep := range sp.Endpoints {
		if model.FamilyOf(ep.IP) == f {
			visit(ep.IP.As16())
		}
	}
}

// moveHairpin replaces old's contribution to t's counts with next's (either
// may be nil), recording the addresses touched.
func (t *Table) moveHairpin(f model.Family, old, next *model.ServicePort) {
	if old == next {
		return
	}
	// A render from scratch (t.all) compares every count anyway; keeping
	// 50k touched addresses at a cold start would only cost memory.
	h, note := t.hairpin, !t.all
	hairpinAddrs(f, old, func(a [16]byte) {
		h.delta[a] = max(h.get(a)-1, 0)
		if note {
			t.touched = append(t.touched, a)
		}
	})
	hairpinAddrs(f, next, func(a [16]byte) {
		h.delta[a] = h.get(a) + 1
		if note {
			t.touched = append(t.touched, a)
		}
	})
}

// inheritHairpin starts t's counts from prev's (nil: from scratch).
func (t *Table) inheritHairpin(prev *Table) {
	if prev == nil || prev.hairpin == nil {
		t.hairpin = &hairpinRefs{delta: map[[16]byte]int32{}}
		t.all = true
		return
	}
	t.hairpin = prev.hairpin.next()
}

func addrOf16(f model.Family, a [16]byte) netip.Addr {
	ip := netip.AddrFrom16(a)
	if f == model.IPv4 {
		ip = ip.Unmap()
	}
	return ip
}

// hairpinElements are the elements of SetHairpin in t (nil if t has none).
func (t *Table) hairpinElements() []Element {
	if t.hairpin == nil {
		return nil
	}
	// An upper bound (delta may shadow base): growing 50k elements by
	// doubling was a tenth of a cold start's CPU.
	out := make([]Element, 0, len(t.hairpin.base)+len(t.hairpin.delta))
	t.hairpin.each(func(a [16]byte) { out = append(out, Element{Addr: addrOf16(t.Family, a)}) })
	return out
}

// HairpinChanges returns the elements of SetHairpin to add and delete to
// turn prev's into t's, where t was rendered from prev (as a backend's
// next desired table is from its committed one). Only the addresses the
// render touched are compared, unless it counted from scratch.
func (t *Table) HairpinChanges(prev *Table) (add, del []Element) {
	if t.hairpin == nil {
		return nil, nil
	}
	old := &hairpinRefs{}
	if prev != nil && prev.hairpin != nil {
		old = prev.hairpin
	}
	check := func(a [16]byte) {
		was, is := old.get(a) > 0, t.hairpin.get(a) > 0
		switch {
		case is && !was:
			add = append(add, Element{Addr: addrOf16(t.Family, a)})
		case was && !is:
			del = append(del, Element{Addr: addrOf16(t.Family, a)})
		}
	}
	if t.all || prev == nil {
		t.hairpin.each(check)
		old.each(func(a [16]byte) {
			if t.hairpin.get(a) == 0 {
				check(a)
			}
		})
		return add, del
	}
	seen := make(map[[16]byte]bool, len(t.touched))
	for _, a := range t.touched {
		if !seen[a] {
			seen[a] = true
			check(a)
		}
	}
	return add, del
}
