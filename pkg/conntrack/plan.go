// Package conntrack removes conntrack entries that keep UDP traffic pinned to
// the wrong place after the Service rules change.
//
// DNAT is decided by the first packet of a flow only: later packets follow the
// conntrack entry, not the rules. A UDP client that keeps its source port
// (DNS resolvers, statsd and syslog senders, game and VoIP clients) therefore
// keeps sending to an endpoint that is gone, or past a Service that did not
// exist yet, until its entry times out — which never happens while it keeps
// sending. TCP does not need this: the dead peer resets or times out and the
// client reconnects with a new source port. SCTP is left alone, as kube-proxy
// v1.37 does (its reconciler cleans UDP only).
//
// It is a reconciler, not a diff: after a sync the kernel's UDP entries are
// compared with the model that was just programmed, so what a previous
// process or a failed cleanup left behind is found too (kubernetes #126130).
// The package has a pure half (Plan: which entries are stale, from one
// snapshot) and a kernel half (Reconciler: dump over ctnetlink, delete).
package conntrack

import (
	"net/netip"
	"syscall"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// tracked reports whether flows of p are reconciled. Only UDP: it has no
// connection teardown that would make a client pick a new source port.
func tracked(p model.Protocol) bool { return p == model.UDP }

// protoNumber maps the model's protocols to IP protocol numbers.
func protoNumber(p model.Protocol) uint8 {
	switch p {
	case model.TCP:
		return syscall.IPPROTO_TCP
	case model.UDP:
		return syscall.IPPROTO_UDP
	case model.SCTP:
		return syscall.IPPROTO_SCTP
	}
	return 0
}

// Entry is what the reconciler needs of one conntrack entry: where the
// client sent it (the original destination) and who answers (the reply
// source, which is the endpoint when the flow was DNATed).
type Entry struct {
	Proto    uint8
	OrigSrc  netip.AddrPort
	OrigDst  netip.AddrPort
	ReplySrc netip.AddrPort
	// ID and Zone identify the entry for deletion: with the ID the kernel
	// refuses to delete a new entry that reuses the tuple meanwhile.
	ID   uint32
	Zone uint16
}

// key is a frontend with its protocol; for a NodePort addr is invalid (the
// destination address is checked against the node's addresses instead).
type key struct {
	proto uint8
	addr  netip.Addr
	port  uint16
}

// keepSet holds the reply sources whose flows to a frontend are healthy. An
// empty set means every flow to the frontend goes.
type keepSet map[netip.AddrPort]struct{}

// Plan says which entries are stale for one snapshot. Build it with NewPlan;
// it is immutable afterwards, so one plan serves both families.
type Plan struct {
	vips      map[key]keepSet
	nodePorts map[key]keepSet
	// nodePortDst reports whether an address receives NodePort traffic on
	// this node; nil means none does.
	nodePortDst func(netip.Addr) bool
}

// keepFor is the heart of the reconciler: which reply sources a frontend of
// sp keeps, given the endpoints eligible for that frontend's kind of traffic.
//
//   - No eligible endpoint (scaled to zero, or a Local policy with nothing
//     on this node): the backends reject or drop the frontend, so every flow
//     to it goes and the client's next datagram meets that rule, or a new
//     endpoint when one appears. kube-proxy v1.37 does the same for
//     ClusterIP/external/LB IPs (kubernetes #139628), and skips NodePorts only
//     because it matches them on the port alone; here they are matched on
//     the node's addresses, so they are cleaned too.
//   - Otherwise every serving endpoint of the port is kept (ready, or
//     terminating but still serving). Eligibility is a subset of that, so a
//     flow answered by an eligible endpoint is never cut; a terminating
//     endpoint or one outside this node's topology keeps its established
//     flows while it serves, as TCP connections do and as kube-proxy does.
//     Everything else — a removed endpoint, a changed target port, a flow
//     that was never DNATed because it started before the rules — goes.
func keepFor(sp *model.ServicePort, eligible []model.Endpoint) keepSet {
	ks := keepSet{}
	if len(eligible) == 0 {
		return ks
	}
	for _, ep := range sp.Endpoints {
		if ep.Ready || ep.Serving {
			ks[ep.AddrPort()] = struct{}{}
		}
	}
	// Eligible endpoints are serving by construction; adding them again
	// keeps the guarantee even if that ever changes.
	for _, ep := range eligible {
		ks[ep.AddrPort()] = struct{}{}
	}
	return ks
}

// merge adds keep to m[k]. Two service ports sharing a frontend (a conflict
// the model may still carry) keep the union: a flow healthy for either stays.
func merge(m map[key]keepSet, k key, keep keepSet) {
	cur, ok := m[k]
	if !ok {
		m[k] = keep
		return
	}
	if len(keep) == 0 {
		return
	}
	u := make(keepSet, len(cur)+len(keep))
	for a := range cur {
		u[a] = struct{}{}
	}
	for a := range keep {
		u[a] = struct{}{}
	}
	m[k] = u
}

// NewPlan builds the plan for snap. gone lists service ports that existed at
// the last completed reconcile and are gone now (or no longer UDP): flows
// still pointing through their frontends go, unless a current port serves
// the same frontend. nodePortDst reports whether an address is one the node
// accepts NodePorts on (see NodePortDst).
func NewPlan(snap *model.Snapshot, gone []*model.ServicePort, nodePortDst func(netip.Addr) bool) *Plan {
	p := &Plan{vips: map[key]keepSet{}, nodePorts: map[key]keepSet{}, nodePortDst: nodePortDst}
	if snap != nil {
		for _, sp := range snap.Services {
			if !tracked(sp.Protocol) {
				continue
			}
			e := sp.Eligible(snap.Node)
			internal, external := keepFor(sp, e.Internal), keepFor(sp, e.External)
			proto, port := protoNumber(sp.Protocol), uint16(sp.Port)
			for _, ip := range sp.ClusterIPs {
				merge(p.vips, key{proto, ip.Unmap(), port}, internal)
			}
			for _, ips := range [][]netip.Addr{sp.ExternalIPs, sp.LoadBalancerIPs} {
				for _, ip := range ips {
					merge(p.vips, key{proto, ip.Unmap(), port}, external)
				}
			}
			if sp.NodePort != 0 {
				merge(p.nodePorts, key{proto: proto, port: uint16(sp.NodePort)}, external)
			}
		}
	}
	// Removed frontends last, and only where no current port claims them.
	for _, sp := range gone {
		proto, port := protoNumber(sp.Protocol), uint16(sp.Port)
		for _, ips := range [][]netip.Addr{sp.ClusterIPs, sp.ExternalIPs, sp.LoadBalancerIPs} {
			for _, ip := range ips {
				if k := (key{proto, ip.Unmap(), port}); p.vips[k] == nil {
					p.vips[k] = keepSet{}
				}
			}
		}
		if sp.NodePort != 0 {
			if k := (key{proto: proto, port: uint16(sp.NodePort)}); p.nodePorts[k] == nil {
				p.nodePorts[k] = keepSet{}
			}
		}
	}
	return p
}

// Empty reports whether no entry can be stale (no UDP frontend at all), so
// the dump can be skipped.
func (p *Plan) Empty() bool { return len(p.vips) == 0 && len(p.nodePorts) == 0 }

// Stale reports whether e must be deleted: its original destination is a
// frontend and its reply source is not one the frontend keeps. A frontend
// IP:port decides first; a NodePort counts only on the node's NodePort
// addresses, so a flow to some remote host that happens to use the same
// port number is never touched (kube-proxy matches NodePorts on the port
// alone).
func (p *Plan) Stale(e *Entry) bool {
	dst := e.OrigDst.Addr().Unmap()
	reply := netip.AddrPortFrom(e.ReplySrc.Addr().Unmap(), e.ReplySrc.Port())
	if keep, ok := p.vips[key{e.Proto, dst, e.OrigDst.Port()}]; ok {
		_, healthy := keep[reply]
		return !healthy
	}
	keep, ok := p.nodePorts[key{proto: e.Proto, port: e.OrigDst.Port()}]
	if !ok || p.nodePortDst == nil || !p.nodePortDst(dst) {
		return false
	}
	_, healthy := keep[reply]
	return !healthy
}

// NodePortDst returns the predicate "addr receives NodePort traffic on this
// node", mirroring the backends' NodePort address selection: local holds the
// namespace's addresses now. Loopback counts only where iptables mode serves
// it (IPv4, --iptables-localhost-nodeports, no --nodeport-addresses); pass a
// cfg with LocalhostNodePorts false for the other modes.
func NodePortDst(cfg *proxy.Config, node model.Node, local []netip.Addr) func(netip.Addr) bool {
	set := make(map[netip.Addr]bool, len(local))
	for _, a := range local {
		set[a.Unmap()] = true
	}
	primary := map[netip.Addr]bool{}
	for _, a := range node.Addresses {
		primary[a.Unmap()] = true
	}
	return func(a netip.Addr) bool {
		a = a.Unmap()
		if a.IsLoopback() {
			// 127.0.0.0/8 is local as a whole, not only 127.0.0.1.
			return a.Is4() && cfg.LocalhostNodePorts && !cfg.NodePortPrimary && len(cfg.NodePortAddresses) == 0
		}
		if !set[a] {
			return false
		}
		switch {
		case cfg.NodePortPrimary:
			return primary[a]
		case len(cfg.NodePortAddresses) > 0:
			for _, pfx := range cfg.NodePortAddresses {
				if pfx.Contains(a) {
					return true
				}
			}
			return false
		}
		return true
	}
}
