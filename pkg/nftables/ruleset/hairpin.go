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

// hairpinRefs counts the service ports that may DNAT to each address (the
// key is netip.Addr.As16, so the map holds no pointers for the GC to scan).
// Counts are never zero: an address leaves the map with its last user.
type hairpinRefs map[[16]byte]int32

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
	hairpinAddrs(f, old, func(a [16]byte) {
		if n := t.hairpin[a] - 1; n > 0 {
			t.hairpin[a] = n
		} else {
			delete(t.hairpin, a)
		}
		t.touched = append(t.touched, a)
	})
	hairpinAddrs(f, next, func(a [16]byte) {
		t.hairpin[a]++
		t.touched = append(t.touched, a)
	})
}

// inheritHairpin starts t's counts from prev's (nil: from scratch).
func (t *Table) inheritHairpin(prev *Table) {
	if prev == nil || prev.hairpin == nil {
		t.hairpin, t.all = hairpinRefs{}, true
		return
	}
	t.hairpin = maps.Clone(prev.hairpin)
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
	if len(t.hairpin) == 0 {
		return nil
	}
	out := make([]Element, 0, len(t.hairpin))
	for a := range t.hairpin {
		out = append(out, Element{Addr: addrOf16(t.Family, a)})
	}
	return out
}

// HairpinChanges returns the elements of SetHairpin to add and delete to
// turn prev's into t's, where t was rendered from prev (as a backend's
// next desired table is from its committed one). Only the addresses the
// render touched are compared, unless it counted from scratch.
func (t *Table) HairpinChanges(prev *Table) (add, del []Element) {
	var old hairpinRefs
	if prev != nil {
		old = prev.hairpin
	}
	check := func(a [16]byte) {
		was, is := old[a] > 0, t.hairpin[a] > 0
		switch {
		case is && !was:
			add = append(add, Element{Addr: addrOf16(t.Family, a)})
		case was && !is:
			del = append(del, Element{Addr: addrOf16(t.Family, a)})
		}
	}
	if t.all || prev == nil {
		for a := range t.hairpin {
			check(a)
		}
		for a := range old {
			if t.hairpin[a] == 0 {
				check(a)
			}
		}
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
