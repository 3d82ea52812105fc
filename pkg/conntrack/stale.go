// Package conntrack removes conntrack entries that keep UDP traffic pinned to
// the wrong place after the Service rules change.
//
// DNAT is decided by the first packet of a flow only: later packets follow the
// conntrack entry, not the rules. A UDP client that keeps its source port
// (DNS resolvers, game and VoIP clients, syslog) therefore keeps sending to an
// endpoint that is gone, or past a Service that did not exist yet, until its
// entry times out — which never happens while it keeps sending. TCP does not
// need this: the dead peer resets or times out and the client reconnects with
// a new source port. SCTP is left alone as kube-proxy does.
//
// The package has a pure half (Stale: which flows are stale, from two
// snapshots) and a kernel half (Cleaner: delete them over netlink).
package conntrack

import (
	"net/netip"
	"slices"
	"sort"
	"strconv"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Frontend is an address a Service port is reached at. An invalid Addr means
// "any address": a NodePort, which the node accepts on every local address (and
// which is what a flow's original destination holds, whatever address the
// client used).
type Frontend struct {
	Addr netip.Addr
	Port uint16
}

// String renders addr:port, or *:port for a NodePort.
func (f Frontend) String() string {
	if !f.Addr.IsValid() {
		return "*:" + strconv.Itoa(int(f.Port))
	}
	return netip.AddrPortFrom(f.Addr, f.Port).String()
}

// GoneEndpoint is case (a): an endpoint that was eligible and no longer is.
// Flows whose original destination is one of Frontends and whose reply comes
// from Endpoint were DNATed to it and must go.
type GoneEndpoint struct {
	Service   model.ServicePortName
	Protocol  model.Protocol
	Endpoint  netip.AddrPort
	Frontends []Frontend
}

// OpenedFrontend is case (b): a frontend that had no eligible endpoint (or did
// not exist) and now has some. Flows to it that were created meanwhile were
// not DNATed (they went to the default route, or were answered by nobody) and
// would keep bypassing the new rules. Flows answered by one of Keep are
// already correctly DNATed and are left alone, so a flow is never cut for
// nothing.
type OpenedFrontend struct {
	Service  model.ServicePortName
	Protocol model.Protocol
	Frontend Frontend
	Keep     []netip.AddrPort
}

// Work is what a Cleaner must delete after a sync from prev to cur.
type Work struct {
	Gone   []GoneEndpoint
	Opened []OpenedFrontend
}

// Empty reports whether there is nothing to clean, so a caller can skip the
// conntrack dump entirely (the common case: most syncs touch no UDP endpoint).
func (w Work) Empty() bool { return len(w.Gone) == 0 && len(w.Opened) == 0 }

// tracked reports whether flows of p need cleaning. Only UDP: it has no
// connection teardown that would make a client pick a new source port.
func tracked(p model.Protocol) bool { return p == model.UDP }

// frontend kinds select which eligible set decides whether a frontend is open.
type kind int

const (
	internal kind = iota // ClusterIP: Eligibility.Internal
	external             // externalIPs, LB IPs, NodePort: Eligibility.External
)

type frontendOf struct {
	Frontend
	kind kind
}

// frontends lists every address sp is reached at, in a stable order.
func frontends(sp *model.ServicePort) []frontendOf {
	var out []frontendOf
	port := uint16(sp.Port)
	for _, ip := range sp.ClusterIPs {
		out = append(out, frontendOf{Frontend{ip, port}, internal})
	}
	for _, ip := range sp.ExternalIPs {
		out = append(out, frontendOf{Frontend{ip, port}, external})
	}
	for _, ip := range sp.LoadBalancerIPs {
		out = append(out, frontendOf{Frontend{ip, port}, external})
	}
	if sp.NodePort != 0 {
		out = append(out, frontendOf{Frontend{Port: uint16(sp.NodePort)}, external})
	}
	return out
}

func addrPorts(eps []model.Endpoint) []netip.AddrPort {
	out := make([]netip.AddrPort, 0, len(eps))
	for _, ep := range eps {
		out = append(out, ep.AddrPort())
	}
	return out
}

// forKind returns the endpoints that serve a frontend of kind k.
func forKind(e model.Eligibility, k kind) []model.Endpoint {
	if k == internal {
		return e.Internal
	}
	return e.External
}

// Stale computes the conntrack work for a sync from prev to cur. prev may be
// nil (first sync after start): then nothing is known to be gone, and every
// frontend with endpoints counts as opened, which only removes flows that are
// not DNATed to a current endpoint — exactly the ones that are wrong.
func Stale(prev, cur *model.Snapshot) Work {
	var w Work
	var prevSvcs map[model.ServicePortName]*model.ServicePort
	if prev != nil {
		prevSvcs = prev.Services
	}
	var curSvcs map[model.ServicePortName]*model.ServicePort
	if cur != nil {
		curSvcs = cur.Services
	}
	// Eligibility depends on the port and on the node's name and zone; a
	// shared pointer proves the port unchanged, the node must be checked too.
	sameNode := prev != nil && cur != nil && prev.Node.Name == cur.Node.Name && prev.Node.Zone == cur.Node.Zone

	// (a) endpoints eligible before and not now, for every port that existed
	// before (also ports removed entirely: their endpoints are all gone).
	for name, p := range prevSvcs {
		if !tracked(p.Protocol) {
			continue
		}
		c := curSvcs[name]
		if c == p && sameNode {
			continue // same pointer: unchanged, nothing to do
		}
		before := p.Eligible(prev.Node).All
		var now map[netip.AddrPort]bool
		var fes []Frontend
		seen := map[Frontend]bool{}
		add := func(sp *model.ServicePort) {
			for _, f := range frontends(sp) {
				if !seen[f.Frontend] {
					seen[f.Frontend] = true
					fes = append(fes, f.Frontend)
				}
			}
		}
		add(p)
		if c != nil && tracked(c.Protocol) {
			now = map[netip.AddrPort]bool{}
			for _, ep := range c.Eligible(cur.Node).All {
				now[ep.AddrPort()] = true
			}
			// Flows were created against prev's frontends; cur's are
			// added in case a frontend was renumbered in the same sync.
			add(c)
		}
		for _, ep := range before {
			if !now[ep.AddrPort()] {
				w.Gone = append(w.Gone, GoneEndpoint{Service: name, Protocol: p.Protocol, Endpoint: ep.AddrPort(), Frontends: slices.Clone(fes)})
			}
		}
	}

	// (b) frontends that have endpoints now and had none (or did not exist).
	for name, c := range curSvcs {
		if !tracked(c.Protocol) {
			continue
		}
		p := prevSvcs[name]
		if p == c && sameNode {
			continue
		}
		ce := c.Eligible(cur.Node)
		// open[f] is whether frontend f had endpoints before.
		open := map[Frontend]bool{}
		if p != nil && tracked(p.Protocol) {
			pe := p.Eligible(prev.Node)
			for _, f := range frontends(p) {
				if len(forKind(pe, f.kind)) > 0 {
					open[f.Frontend] = true
				}
			}
		}
		for _, f := range frontends(c) {
			eps := forKind(ce, f.kind)
			if len(eps) == 0 || open[f.Frontend] {
				continue
			}
			w.Opened = append(w.Opened, OpenedFrontend{Service: name, Protocol: c.Protocol, Frontend: f.Frontend, Keep: addrPorts(eps)})
		}
	}

	sortWork(&w)
	return w
}

// sortWork makes the result deterministic (map iteration is not), for tests
// and for readable logs.
func sortWork(w *Work) {
	sort.Slice(w.Gone, func(i, j int) bool {
		a, b := w.Gone[i], w.Gone[j]
		if a.Service != b.Service {
			return a.Service.Less(b.Service)
		}
		return a.Endpoint.Compare(b.Endpoint) < 0
	})
	sort.Slice(w.Opened, func(i, j int) bool {
		a, b := w.Opened[i], w.Opened[j]
		if a.Service != b.Service {
			return a.Service.Less(b.Service)
		}
		return frontendLess(a.Frontend, b.Frontend)
	})
	for i := range w.Gone {
		slices.SortFunc(w.Gone[i].Frontends, func(a, b Frontend) int {
			if frontendLess(a, b) {
				return -1
			}
			if frontendLess(b, a) {
				return 1
			}
			return 0
		})
	}
}

func frontendLess(a, b Frontend) bool {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c < 0
	}
	return a.Port < b.Port
}
