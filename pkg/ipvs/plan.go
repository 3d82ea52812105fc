// Package ipvs is miniproxy's IPVS backend: every Service address becomes an
// IPVS virtual server whose real servers are the model's eligible endpoints,
// like kube-proxy's IPVS mode.
//
// The backend is split in two. BuildPlan is a pure function from a snapshot
// to the desired virtual servers, the addresses bound to the kube-ipvs0 dummy
// interface, and the few packet-filter facts (which destinations to
// masquerade, which sources a load balancer admits). The apply step (Backend)
// diffs that plan against the kernel and sends the difference through netlink.
//
// Packet filtering uses one nftables table owned by miniproxy (sets instead of
// kube-proxy's ipsets, programmed through netlink), so a node needs no
// iptables or ipset binaries — which also keeps the qemu guest that tests this
// backend down to one static binary.
//
// Ownership: IPVS virtual servers carry no owner or comment, so the table
// keeps a record (the owned-vs sets) of every virtual server miniproxy may
// have created. Sync adds keys to it before creating virtual servers and
// drops them only after deleting them; a restarted process and --cleanup
// read it back. Virtual servers on kube-ipvs0's addresses also count as ours
// (kube-proxy's, or those of a miniproxy older than the record); every other
// virtual server is someone else's and is never touched.
package ipvs

import (
	"fmt"
	"net/netip"
	"sort"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Schedulers miniproxy accepts for --ipvs-scheduler.
var Schedulers = map[string]bool{
	"rr": true, "wrr": true, "lc": true, "wlc": true, "lblc": true, "lblcr": true,
	"sh": true, "dh": true, "sed": true, "nq": true, "mh": true,
}

// DefaultScheduler is kube-proxy's default.
const DefaultScheduler = "rr"

// Key identifies a virtual server.
type Key struct {
	IP    netip.Addr
	Proto model.Protocol
	Port  uint16
}

func (k Key) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.IP, k.Port), k.Proto)
}

func (k Key) less(o Key) bool {
	if c := k.IP.Compare(o.IP); c != 0 {
		return c < 0
	}
	if k.Proto != o.Proto {
		return k.Proto < o.Proto
	}
	return k.Port < o.Port
}

// Kind says which Service address a virtual server serves.
type Kind string

// The kinds of virtual servers.
const (
	KindClusterIP    Kind = "ClusterIP"
	KindNodePort     Kind = "NodePort"
	KindExternalIP   Kind = "ExternalIP"
	KindLoadBalancer Kind = "LoadBalancer"
)

// RealServer is one destination of a virtual server.
type RealServer struct {
	Addr   netip.AddrPort
	Weight int
}

// VirtualServer is one desired IPVS service.
type VirtualServer struct {
	Key       Key
	Service   model.ServicePortName
	Kind      Kind
	Scheduler string
	// Persistence is the ClientIP affinity timeout in seconds (0: none).
	Persistence uint32
	// Reals are sorted by address.
	Reals []RealServer
}

// SourceRange restricts who may reach a load-balancer address.
type SourceRange struct {
	VIP     Key
	Allowed []netip.Prefix
}

// Filter is what the nftables table must express.
type Filter struct {
	// ClusterVIPs are ClusterIP virtual servers; traffic to them is
	// masqueraded unless it comes from a local pod (LocalCIDRs), or always
	// with MasqueradeAll. With no detector and no MasqueradeAll, never.
	ClusterVIPs   []Key
	LocalCIDRs    []netip.Prefix
	MasqueradeAll bool
	// MasqVIPs are always masqueraded: NodePort, externalIP and
	// load-balancer addresses under the Cluster external traffic policy.
	MasqVIPs []Key
	// SourceRanges drop sources outside loadBalancerSourceRanges.
	SourceRanges []SourceRange
	// AllVIPs is every virtual server; together with the addresses on
	// kube-ipvs0 it lets the filter reject new connections to a service
	// address on a port that is not a service port (else the node's own
	// sockets would answer there). Ownership is recorded apart from it
	// (the owned-vs sets, see nft.go), since a virtual server must be
	// recorded before it is created.
	AllVIPs []Key
	// MasqMark is the fwmark bit that flags a packet for masquerading.
	MasqMark uint32
}

// Plan is the complete desired state.
type Plan struct {
	VirtualServers []VirtualServer
	// BindAddrs go on the kube-ipvs0 dummy interface.
	BindAddrs []netip.Addr
	Filter    Filter
}

// PlanOptions are the IPVS-specific settings.
type PlanOptions struct {
	// Scheduler for every virtual server (default rr).
	Scheduler string
}

// BuildPlan computes the desired state for snap. nodeIPs are the node's local
// addresses (not the ones on kube-ipvs0); NodePort virtual servers are created
// on those selected by cfg. It never decides endpoint eligibility itself: the
// ClusterIP uses the model's Internal set, every other address its External set.
func BuildPlan(snap *model.Snapshot, cfg *proxy.Config, opts PlanOptions, nodeIPs []netip.Addr) *Plan {
	sched := opts.Scheduler
	if sched == "" {
		sched = DefaultScheduler
	}
	p := &Plan{}
	p.Filter.MasqueradeAll = cfg.MasqueradeAll
	p.Filter.MasqMark = cfg.MarkMasq()
	npIPs := nodePortIPs(cfg, snap.Node, nodeIPs)
	bind := map[netip.Addr]bool{}
	seen := map[Key]bool{}
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if cfg.HasFamily(f) && cfg.LocalMode != proxy.LocalModeNone {
			p.Filter.LocalCIDRs = append(p.Filter.LocalCIDRs, cfg.LocalPrefixes(f, snap.Node)...)
		}
	}
	for _, sp := range snap.Sorted() {
		el := sp.Eligible(snap.Node)
		add := func(ip netip.Addr, port int32, kind Kind, eps []model.Endpoint) {
			ip = ip.Unmap()
			if !ip.IsValid() || !cfg.HasFamily(model.FamilyOf(ip)) || port <= 0 || port > 65535 {
				return
			}
			// Nothing of a family without a ClusterIP of it (as in the
			// model and the other backends): a single-stack IPv6 Service's
			// NodePort gets no virtual server on the node's IPv4 addresses,
			// where it could have no real server.
			if _, ok := sp.ClusterIP(model.FamilyOf(ip)); !ok {
				return
			}
			k := Key{IP: ip, Proto: sp.Protocol, Port: uint16(port)}
			if seen[k] {
				// Two Services claiming one address:port is a user error
				// the apiserver mostly prevents; the first (sorted) wins.
				return
			}
			seen[k] = true
			vs := VirtualServer{Key: k, Service: sp.Name, Kind: kind, Scheduler: sched}
			if sp.AffinitySeconds > 0 {
				vs.Persistence = uint32(sp.AffinitySeconds)
			}
			for _, ep := range eps {
				if model.FamilyOf(ep.IP) != model.FamilyOf(ip) {
					continue
				}
				vs.Reals = append(vs.Reals, RealServer{Addr: netip.AddrPortFrom(ep.IP.Unmap(), uint16(ep.Port)), Weight: 1})
			}
			sort.Slice(vs.Reals, func(i, j int) bool { return vs.Reals[i].Addr.Compare(vs.Reals[j].Addr) < 0 })
			p.VirtualServers = append(p.VirtualServers, vs)
			p.Filter.AllVIPs = append(p.Filter.AllVIPs, k)
			switch {
			case kind == KindClusterIP:
				p.Filter.ClusterVIPs = append(p.Filter.ClusterVIPs, k)
			case !sp.ExternalPolicyLocal:
				// Local policy keeps the client's source address; the
				// Cluster policy must masquerade so replies come back here.
				p.Filter.MasqVIPs = append(p.Filter.MasqVIPs, k)
			}
			// RestrictsSources, not the list's length: a Service whose ranges
			// all failed to parse must admit nobody, not everybody.
			if kind == KindLoadBalancer && sp.RestrictsSources() {
				var allowed []netip.Prefix
				for _, r := range sp.LoadBalancerSourceRanges {
					if model.FamilyOf(r.Addr()) == model.FamilyOf(ip) {
						allowed = append(allowed, r.Masked())
					}
				}
				p.Filter.SourceRanges = append(p.Filter.SourceRanges, SourceRange{VIP: k, Allowed: allowed})
			}
			if kind != KindNodePort {
				bind[ip] = true
			}
		}
		for _, ip := range sp.ClusterIPs {
			add(ip, sp.Port, KindClusterIP, el.Internal)
		}
		for _, ip := range sp.ExternalIPs {
			add(ip, sp.Port, KindExternalIP, el.External)
		}
		for _, ip := range sp.LoadBalancerIPs {
			add(ip, sp.Port, KindLoadBalancer, el.External)
		}
		if sp.NodePort > 0 {
			for _, ip := range npIPs {
				add(ip, sp.NodePort, KindNodePort, el.External)
			}
		}
	}
	for ip := range bind {
		p.BindAddrs = append(p.BindAddrs, ip)
	}
	sort.Slice(p.BindAddrs, func(i, j int) bool { return p.BindAddrs[i].Less(p.BindAddrs[j]) })
	sort.Slice(p.VirtualServers, func(i, j int) bool { return p.VirtualServers[i].Key.less(p.VirtualServers[j].Key) })
	for _, l := range [][]Key{p.Filter.ClusterVIPs, p.Filter.MasqVIPs, p.Filter.AllVIPs} {
		sort.Slice(l, func(i, j int) bool { return l[i].less(l[j]) })
	}
	sort.Slice(p.Filter.SourceRanges, func(i, j int) bool { return p.Filter.SourceRanges[i].VIP.less(p.Filter.SourceRanges[j].VIP) })
	return p
}

// nodePortIPs selects the addresses NodePorts listen on. Loopback is never
// used: IPVS cannot serve 127.0.0.1 safely (kube-proxy's IPVS mode does not
// either), and link-local IPv6 addresses are skipped.
func nodePortIPs(cfg *proxy.Config, node model.Node, local []netip.Addr) []netip.Addr {
	cand := local
	if cfg.NodePortPrimary {
		cand = node.Addresses
	}
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, ip := range cand {
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || seen[ip] {
			continue
		}
		if !cfg.HasFamily(model.FamilyOf(ip)) {
			continue
		}
		if !cfg.NodePortPrimary && len(cfg.NodePortAddresses) > 0 {
			ok := false
			for _, pfx := range cfg.NodePortAddresses {
				if pfx.Contains(ip) {
					ok = true
					break
				}
			}
			if !ok {
				continue
			}
		}
		seen[ip] = true
		out = append(out, ip)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}
