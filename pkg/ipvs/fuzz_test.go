package ipvs

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior/fuzzcase"
)

// FuzzIPVSPlan: a random snapshot (pkg/proxy/behavior/fuzzcase) planned
// for IPVS must hold exactly the model's frontends as virtual servers, each
// owned by the port the frontend rule picked, with the model's eligible
// endpoints as real servers (Internal for a ClusterIP, External for the
// rest, of the address's family), the affinity timeout as persistence, and
// the filter facts the packet path needs: ClusterIPs for the local-traffic
// masquerade, Cluster-policy external addresses always masqueraded, source
// ranges of the family for restricted load-balancer IPs, and every
// non-NodePort address bound.
//
// The plan is checked rather than traced: an IPVS virtual server has one
// set of real servers for every source, so IPVS mode (like kube-proxy's)
// gives pods and the node the local endpoints of an ETP=Local external
// address instead of the cluster-wide ones, and a virtual server without
// real servers drops rather than rejects; the probes' verdicts
// (fuzzcase.Expect) state the iptables/nftables semantics.
func FuzzIPVSPlan(f *testing.F) {
	nodeIPs := []netip.Addr{fuzzcase.NodeIP}
	f.Fuzz(func(t *testing.T, data []byte) {
		c := fuzzcase.Decode(data)
		p := BuildPlan(c.Snap, &c.Cfg, PlanOptions{}, nodeIPs)
		want := wantPlan(&c.Cfg, c.Snap, nodeIPs)
		if got, w := render(p), render(want); got != w {
			t.Errorf("plan differs from the model\n%s\ngot:\n%s\nwant:\n%s", c.Describe(), got, w)
		}
		owners := func(p *Plan) string {
			var s []string
			for _, vs := range p.VirtualServers {
				s = append(s, fmt.Sprintf("%s %s %s", vs.Key, vs.Kind, vs.Service))
			}
			return strings.Join(s, "\n")
		}
		if got, w := owners(p), owners(want); got != w {
			t.Errorf("virtual servers owned by other ports than the model's\n%s\ngot:\n%s\nwant:\n%s", c.Describe(), got, w)
		}
	})
}

// wantPlan is the plan written from the model alone.
func wantPlan(cfg *proxy.Config, snap *model.Snapshot, nodeIPs []netip.Addr) *Plan {
	p := &Plan{}
	p.Filter.MasqueradeAll = cfg.MasqueradeAll
	p.Filter.MasqMark = cfg.MarkMasq()
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if cfg.HasFamily(f) && cfg.LocalMode != proxy.LocalModeNone {
			p.Filter.LocalCIDRs = append(p.Filter.LocalCIDRs, cfg.LocalPrefixes(f, snap.Node)...)
		}
	}
	for _, sp := range snap.Sorted() {
		el := sp.Eligible(snap.Node)
		add := func(ip netip.Addr, port int32, kind Kind, eps []model.Endpoint) {
			f := model.FamilyOf(ip)
			if _, ok := sp.ClusterIP(f); !ok || !cfg.HasFamily(f) {
				return
			}
			k := Key{IP: ip, Proto: sp.Protocol, Port: uint16(port)}
			vs := VirtualServer{Key: k, Service: sp.Name, Kind: kind, Scheduler: DefaultScheduler, Persistence: uint32(sp.AffinitySeconds)}
			for _, ep := range eps {
				if model.FamilyOf(ep.IP) == f {
					vs.Reals = append(vs.Reals, RealServer{Addr: ep.AddrPort(), Weight: 1})
				}
			}
			p.VirtualServers = append(p.VirtualServers, vs)
			p.Filter.AllVIPs = append(p.Filter.AllVIPs, k)
			switch {
			case kind == KindClusterIP:
				p.Filter.ClusterVIPs = append(p.Filter.ClusterVIPs, k)
			case !sp.ExternalPolicyLocal:
				p.Filter.MasqVIPs = append(p.Filter.MasqVIPs, k)
			}
			if kind == KindLoadBalancer && sp.RestrictsSources() {
				sr := SourceRange{VIP: k}
				for _, r := range sp.LoadBalancerSourceRanges {
					if model.FamilyOf(r.Addr()) == f {
						sr.Allowed = append(sr.Allowed, r)
					}
				}
				p.Filter.SourceRanges = append(p.Filter.SourceRanges, sr)
			}
			if kind != KindNodePort && !slices.Contains(p.BindAddrs, ip) {
				p.BindAddrs = append(p.BindAddrs, ip)
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
		if sp.NodePort != 0 {
			for _, ip := range nodeIPs {
				add(ip, sp.NodePort, KindNodePort, el.External)
			}
		}
	}
	slices.SortFunc(p.BindAddrs, netip.Addr.Compare)
	byKey := func(a, b Key) int {
		if a.less(b) {
			return -1
		}
		if b.less(a) {
			return 1
		}
		return 0
	}
	slices.SortFunc(p.VirtualServers, func(a, b VirtualServer) int { return byKey(a.Key, b.Key) })
	for _, l := range [][]Key{p.Filter.ClusterVIPs, p.Filter.MasqVIPs, p.Filter.AllVIPs} {
		slices.SortFunc(l, byKey)
	}
	slices.SortFunc(p.Filter.SourceRanges, func(a, b SourceRange) int { return byKey(a.VIP, b.VIP) })
	return p
}
