// Package fuzzcase turns fuzz bytes into a random but valid behaviour case:
// a config, a snapshot as pkg/watch would build it (a handful of Services
// with ClusterIPs, NodePorts, externalIPs and load-balancer IPs; endpoints
// ready, serving-terminating or neither, on this node or another; traffic
// policies, affinity, source ranges, topology; TCP and UDP; the model's
// frontend rule applied), and probe packets aimed at every frontend from a
// local pod, a remote pod, the node itself, outside clients and the
// endpoint itself (hairpin).
//
// The expected verdict of each probe is computed here, once, from the model
// (ServicePort.Eligible) and the semantics the behaviour table states
// (pkg/proxy/behavior): every backend's fuzz target renders the snapshot,
// traces the probes through its own tracer and must agree. Addresses follow
// pkg/model/modeltest.
//
// The byte format is not a contract: bytes are read one at a time and an
// exhausted input reads as zeros, so every input decodes, and short inputs
// give small snapshots.
package fuzzcase

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// Case is one decoded input.
type Case struct {
	Cfg proxy.Config
	// Declared are the service ports before the frontend rule, as
	// converted from the API; Snap is what a backend renders.
	Declared []*model.ServicePort
	Snap     *model.Snapshot
	Probes   []Probe
}

// Probe is one packet and what the model says must happen to it.
type Probe struct {
	Packet behavior.Packet
	Want   behavior.Verdict
	// Also is a second acceptable verdict, where two refusals are
	// equally right (see Expect); zero when only Want is.
	Also behavior.Verdict
	// Kind is the frontend the packet is aimed at (0: none, the packet
	// should be left alone) and Service its owner.
	Kind    model.FrontendKind
	Service model.ServicePortName
	// Why explains Want, for failure messages.
	Why string
}

// Sources the probes come from (besides the node itself and the hairpin
// endpoint). Outside is inside the 203.0.113.0/25 source range the decoder
// may give a load balancer, Disallowed outside it.
var (
	LocalPod   = netip.MustParseAddr("10.180.0.100")
	RemotePod  = netip.MustParseAddr("10.180.1.100")
	Outside    = behavior.Outside
	Disallowed = behavior.Disallowed
	NodeIP     = behavior.NodeIP
)

// IPv6 addresses for dual-stack cases (modeltest's v6 ranges; modeltest
// names no v6 external ranges, so documentation space is used).
var (
	clusterCIDR6 = netip.MustParsePrefix("fd00:180::/64")
	localPod6    = netip.MustParseAddr("fd00:180::100")
	outside6     = netip.MustParseAddr("2001:db8::10")
)

// sourceRangePool are the loadBalancerSourceRanges a Service may list (a
// bit each): outside clients (half of them), the local pods, the node, and
// one of the other family only.
var sourceRangePool = mt.Prefixes("203.0.113.0/25", "10.180.0.0/24", "192.168.0.2/32", "2001:db8::/64")

type reader struct{ b []byte }

func (r *reader) byte() byte {
	if len(r.b) == 0 {
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *reader) n(k int) int { return int(r.byte()) % k }

// Decode builds the case data describes. It never fails.
func Decode(data []byte) *Case {
	r := &reader{b: data}
	c := &Case{Cfg: behavior.Config()}
	cfgBits := r.byte()
	c.Cfg.MasqueradeAll = cfgBits&1 != 0
	c.Cfg.LocalMode = []proxy.LocalMode{proxy.LocalModeClusterCIDR, proxy.LocalModeNodeCIDR, proxy.LocalModeNone}[int(cfgBits>>1)%3]
	dual := cfgBits&0x80 != 0
	if dual {
		c.Cfg.Families = []model.Family{model.IPv4, model.IPv6}
		c.Cfg.ClusterCIDRs = append(c.Cfg.ClusterCIDRs, clusterCIDR6)
	}

	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 1 + r.n(5)
	for i := 0; i < n; i++ {
		c.Declared = append(c.Declared, decodePort(r, i, dual, t0))
	}
	ports, _ := model.Resolve(c.Declared...)
	c.Snap = mt.Snap(ports...)
	c.Probes = probes(&c.Cfg, c.Snap)
	return c
}

func decodePort(r *reader, i int, dual bool, t0 time.Time) *model.ServicePort {
	flags, flags2 := r.byte(), r.byte()
	sp := &model.ServicePort{
		Name:     model.ServicePortName{Namespace: "ns", Name: fmt.Sprintf("svc-%d", i), Protocol: model.TCP},
		Port:     []int32{80, 443, 53, 80}[flags2&3],
		Protocol: model.TCP,
		Created:  t0.Add(time.Duration(r.n(3)) * time.Second),
	}
	if flags&1 != 0 {
		sp.Protocol, sp.Name.Protocol = model.UDP, model.UDP
	}
	// ClusterIP: its own, or (rarely) an earlier Service's, which the
	// apiserver prevents but the frontend rule still has to settle.
	own := i
	if b := r.byte(); b%8 == 7 && i > 0 {
		own = int(b>>3) % i
	}
	sp.ClusterIPs = []netip.Addr{netip.AddrFrom4([4]byte{172, 30, 0, byte(10 + own)})}
	if dual && flags2&4 != 0 {
		sp.ClusterIPs = append(sp.ClusterIPs, netip.MustParseAddr(fmt.Sprintf("fd00:30::%x", 10+own)))
	}
	if flags&2 != 0 {
		sp.NodePort = 30000 + int32(r.n(6))
	}
	if flags&4 != 0 {
		for k := 1 + r.n(2); k > 0; k-- {
			b := r.byte()
			switch {
			case b%8 == 7: // another Service's ClusterIP
				sp.ExternalIPs = append(sp.ExternalIPs, netip.AddrFrom4([4]byte{172, 30, 0, byte(10 + int(b>>3)%5)}))
			case dual && b%8 == 6:
				sp.ExternalIPs = append(sp.ExternalIPs, netip.MustParseAddr(fmt.Sprintf("2001:db8:113::%d", 1+int(b>>3)%3)))
			default:
				sp.ExternalIPs = append(sp.ExternalIPs, netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + int(b>>3)%4)}))
			}
		}
	}
	if flags&8 != 0 {
		for k := 1 + r.n(2); k > 0; k-- {
			b := r.byte()
			if dual && b%4 == 3 {
				sp.LoadBalancerIPs = append(sp.LoadBalancerIPs, netip.MustParseAddr(fmt.Sprintf("2001:db8:51::%d", 1+int(b>>2)%3)))
			} else {
				sp.LoadBalancerIPs = append(sp.LoadBalancerIPs, netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + int(b>>2)%4)}))
			}
		}
		ranges := r.byte()
		for k, p := range sourceRangePool {
			if ranges&(1<<k) != 0 {
				sp.LoadBalancerSourceRanges = append(sp.LoadBalancerSourceRanges, p)
			}
		}
		// Ranges listed, none readable (pkg/watch sets this only then).
		if ranges&0x10 != 0 && len(sp.LoadBalancerSourceRanges) == 0 {
			sp.LoadBalancerSourceRangesInvalid = true
		}
	}
	sp.ExternalPolicyLocal = flags&0x10 != 0
	sp.InternalPolicyLocal = flags&0x20 != 0
	if flags&0x40 != 0 {
		sp.AffinitySeconds = 10800
	}
	sp.PreferClose = flags&0x80 != 0
	if sp.ExternalPolicyLocal && sp.HasExternal() {
		sp.HealthCheckNodePort = 32000 + int32(i)
	}

	nodes := []string{"node-a", "node-b", ""}
	seen := map[netip.AddrPort]bool{}
	for k := r.n(6); k > 0; k-- {
		b, st := r.byte(), r.byte()
		node := int(b&3) % 3
		host := 1 + int(b>>2)%4
		ep := model.Endpoint{Port: 8080 + int32(b>>4&1), NodeName: nodes[node]}
		if node < 2 {
			ep.Zone = "zone-" + nodes[node][5:]
		}
		// Same family as a ClusterIP only, as pkg/watch converts them.
		if b&0x80 != 0 && len(sp.ClusterIPs) > 1 {
			ep.IP = netip.MustParseAddr(fmt.Sprintf("fd00:180::%x:%d", node, host))
		} else {
			ep.IP = netip.AddrFrom4([4]byte{10, 180, byte(node), byte(host)})
		}
		switch st & 3 {
		case 0:
			ep.Ready, ep.Serving = true, true
		case 1:
			ep.Serving, ep.Terminating = true, true
		case 2:
			ep.Terminating = true
		}
		switch st >> 2 & 3 {
		case 1:
			ep.ZoneHints = []string{"zone-a"}
		case 2:
			ep.ZoneHints = []string{"zone-b"}
		}
		if !seen[ep.AddrPort()] {
			seen[ep.AddrPort()] = true
			sp.Endpoints = append(sp.Endpoints, ep)
		}
	}
	slices.SortFunc(sp.Endpoints, func(a, b model.Endpoint) int { return a.AddrPort().Compare(b.AddrPort()) })
	return sp
}

// probes aims packets at every frontend of snap from every kind of source,
// plus one at a ClusterIP on a port no Service uses.
func probes(cfg *proxy.Config, snap *model.Snapshot) []Probe {
	var pkts []behavior.Packet
	add := func(proto model.Protocol, dst netip.Addr, port int32, hairpin []model.Endpoint) {
		srcs := []netip.Addr{LocalPod, RemotePod, Outside, Disallowed}
		if dst.Is6() {
			srcs = []netip.Addr{localPod6, outside6}
		}
		for _, ep := range hairpin {
			if ep.IP.Is6() == dst.Is6() {
				srcs = append(srcs, ep.IP)
				break
			}
		}
		for _, s := range srcs {
			pkts = append(pkts, behavior.Packet{Src: s, Proto: proto, Dst: dst, Port: uint16(port)})
		}
		if dst.Is4() {
			pkts = append(pkts, behavior.Packet{Src: NodeIP, Proto: proto, Dst: dst, Port: uint16(port), FromNode: true})
		}
	}
	for _, sp := range snap.Sorted() {
		for _, ip := range sp.ClusterIPs {
			add(sp.Protocol, ip, sp.Port, sp.Endpoints)
		}
		for _, ip := range append(slices.Clone(sp.ExternalIPs), sp.LoadBalancerIPs...) {
			add(sp.Protocol, ip, sp.Port, sp.Endpoints)
		}
		if sp.NodePort != 0 {
			add(sp.Protocol, NodeIP, sp.NodePort, sp.Endpoints)
		}
	}
	for _, sp := range snap.Sorted() {
		if len(sp.ClusterIPs) > 0 {
			pkts = append(pkts, behavior.Packet{Src: LocalPod, Proto: sp.Protocol, Dst: sp.ClusterIPs[0], Port: 8})
			break
		}
	}
	out := make([]Probe, 0, len(pkts))
	for _, p := range pkts {
		out = append(out, Expect(cfg, snap, p))
	}
	return out
}

// owner finds the service port and frontend kind pkt is aimed at. A
// Snapshot built with the frontend rule holds each frontend once.
func owner(cfg *proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (*model.ServicePort, model.FrontendKind) {
	f := model.FamilyOf(pkt.Dst)
	if !cfg.HasFamily(f) {
		return nil, 0
	}
	for _, sp := range snap.Sorted() {
		if sp.Protocol != pkt.Proto {
			continue
		}
		// Nothing of a family is programmed without a ClusterIP of it.
		if _, ok := sp.ClusterIP(f); !ok {
			continue
		}
		if int32(pkt.Port) == sp.Port {
			switch {
			case slices.Contains(sp.ClusterIPs, pkt.Dst):
				return sp, model.ClusterIPFrontend
			case slices.Contains(sp.LoadBalancerIPs, pkt.Dst):
				return sp, model.LoadBalancerFrontend
			case slices.Contains(sp.ExternalIPs, pkt.Dst):
				return sp, model.ExternalIPFrontend
			}
		}
		// NodePorts are served on the node's non-loopback addresses (the
		// probes use no --nodeport-addresses).
		if sp.NodePort != 0 && int32(pkt.Port) == sp.NodePort && slices.Contains(snap.Node.Addresses, pkt.Dst) {
			return sp, model.NodePortFrontend
		}
	}
	return nil, 0
}

// Expect is the model's verdict for pkt, in the behaviour table's terms:
//
//   - A packet aimed at no frontend is left alone.
//   - ClusterIP: no usable endpoint anywhere (the model's Cluster set is
//     empty) rejects; internalTrafficPolicy Local without a local endpoint
//     drops; otherwise the Internal set, masqueraded with --masquerade-all
//     or when the local-traffic detector of the family says the source is
//     not a local pod (no detector: never).
//   - Load-balancer IPs whose Service restricts sources drop every source
//     outside the ranges of the packet's family (none readable: every
//     source), before anything else.
//   - External addresses (NodePort, externalIP, LB IP) with no usable
//     endpoint anywhere reject. Under externalTrafficPolicy Cluster they
//     forward to the External set, always masqueraded. Under Local a local
//     pod (per the detector) gets the Cluster set unmasqueraded, the node
//     itself the Cluster set masqueraded, and everyone else the External
//     (local) set with its source kept, or a drop when there is none.
//   - A packet from an endpoint that may be sent to itself is
//     masqueraded (hairpin).
func Expect(cfg *proxy.Config, snap *model.Snapshot, pkt behavior.Packet) Probe {
	p := Probe{Packet: pkt}
	sp, kind := owner(cfg, snap, pkt)
	if sp == nil {
		p.Want, p.Why = behavior.Verdict{Outcome: behavior.Untouched}, "no frontend"
		return p
	}
	p.Kind, p.Service = kind, sp.Name
	f := model.FamilyOf(pkt.Dst)
	el := sp.Eligible(snap.Node)
	cluster, internal, external := ofFamily(f, el.Cluster), ofFamily(f, el.Internal), ofFamily(f, el.External)
	local := cfg.LocalPrefixes(f, snap.Node)
	fromLocalPod := cfg.LocalMode != proxy.LocalModeNone && slices.ContainsFunc(local, func(pf netip.Prefix) bool { return pf.Contains(pkt.Src) })
	fromNode := pkt.FromNode || slices.Contains(behavior.LocalAddrs(), pkt.Src)
	forward := func(eps []model.Endpoint, masq bool, why string) {
		v := behavior.Verdict{Outcome: behavior.Forward, Masquerade: masq}
		for _, ep := range eps {
			v.Endpoints = append(v.Endpoints, ep.AddrPort())
			if ep.IP == pkt.Src {
				v.Masquerade = true
				why += ", hairpin"
			}
		}
		p.Want, p.Why = v.Normalize(), why
	}
	refuse := func(o behavior.Outcome, why string) { p.Want, p.Why = behavior.Verdict{Outcome: o}, why }

	if kind == model.ClusterIPFrontend {
		switch {
		case len(cluster) == 0:
			refuse(behavior.Reject, "ClusterIP, no usable endpoint")
		case len(internal) == 0:
			refuse(behavior.Drop, "ClusterIP, internalTrafficPolicy Local, no local endpoint")
		default:
			masq := cfg.MasqueradeAll || (len(local) > 0 && cfg.LocalMode != proxy.LocalModeNone && !fromLocalPod)
			forward(internal, masq, fmt.Sprintf("ClusterIP, Internal set, masquerade-all=%v detector=%s local-pod=%v", cfg.MasqueradeAll, cfg.LocalMode, fromLocalPod))
		}
		return p
	}

	if kind == model.LoadBalancerFrontend && sp.RestrictsSources() {
		allowed := slices.ContainsFunc(sp.LoadBalancerSourceRanges, func(pf netip.Prefix) bool {
			return model.FamilyOf(pf.Addr()) == f && pf.Contains(pkt.Src)
		})
		if !allowed {
			refuse(behavior.Drop, "LB IP, source outside loadBalancerSourceRanges")
			if len(cluster) == 0 {
				// Two refusals apply; which comes first is not part of
				// the contract (kube-proxy has no firewall chain for a
				// Service without endpoints, so it rejects).
				p.Also = behavior.Verdict{Outcome: behavior.Reject}
				p.Why += " and no usable endpoint"
			}
			return p
		}
	}
	switch {
	case len(cluster) == 0:
		refuse(behavior.Reject, fmt.Sprintf("%s, no usable endpoint", kind))
	case !sp.ExternalPolicyLocal:
		forward(external, true, fmt.Sprintf("%s, externalTrafficPolicy Cluster", kind))
	case fromLocalPod:
		forward(cluster, false, fmt.Sprintf("%s, externalTrafficPolicy Local, from a local pod: Cluster set", kind))
	case fromNode:
		forward(cluster, true, fmt.Sprintf("%s, externalTrafficPolicy Local, from the node: Cluster set", kind))
	case len(external) == 0:
		refuse(behavior.Drop, fmt.Sprintf("%s, externalTrafficPolicy Local, no local endpoint", kind))
	default:
		forward(external, false, fmt.Sprintf("%s, externalTrafficPolicy Local, source kept", kind))
	}
	return p
}

func ofFamily(f model.Family, eps []model.Endpoint) []model.Endpoint {
	var out []model.Endpoint
	for _, ep := range eps {
		if model.FamilyOf(ep.IP) == f {
			out = append(out, ep)
		}
	}
	return out
}

// Run decodes data and checks every probe against trace. On a
// disagreement it prints the config, the snapshot and each failing probe
// with the reason for its expectation: enough to write a unit test from.
func Run(t *testing.T, data []byte, trace behavior.Tracer) {
	t.Helper()
	c := Decode(data)
	var bad []string
	for _, p := range c.Probes {
		got, err := trace(c.Cfg, c.Snap, p.Packet)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: tracer error: %v", p.Packet, err))
			continue
		}
		got = got.Normalize()
		if got.String() == p.Want.String() || (p.Also.Outcome != "" && got.String() == p.Also.String()) {
			continue
		}
		bad = append(bad, fmt.Sprintf("%s (%s of %s):\n    got  %s\n    want %s (%s)", p.Packet, p.Kind, p.Service, got, p.Want, p.Why))
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d probes disagree with the model\n%s\nprobes:\n  %s", len(bad), len(c.Probes), c.Describe(), strings.Join(bad, "\n  "))
	}
}

// Describe renders the config and snapshot readably.
func (c *Case) Describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config: families=%v detect-local=%s cluster-cidrs=%v masquerade-all=%v\n", c.Cfg.Families, c.Cfg.LocalMode, c.Cfg.ClusterCIDRs, c.Cfg.MasqueradeAll)
	fmt.Fprintf(&b, "node: %s zone %s addresses %v podCIDRs %v\n", c.Snap.Node.Name, c.Snap.Node.Zone, c.Snap.Node.Addresses, c.Snap.Node.PodCIDRs)
	for _, sp := range c.Snap.Sorted() {
		fmt.Fprintf(&b, "%s port %d cluster %v nodePort %d external %v lb %v ranges %v invalid=%v etpLocal=%v itpLocal=%v affinity=%d preferClose=%v created %s\n",
			sp.Name, sp.Port, sp.ClusterIPs, sp.NodePort, sp.ExternalIPs, sp.LoadBalancerIPs, sp.LoadBalancerSourceRanges,
			sp.LoadBalancerSourceRangesInvalid, sp.ExternalPolicyLocal, sp.InternalPolicyLocal, sp.AffinitySeconds, sp.PreferClose, sp.Created.Format(time.TimeOnly))
		for _, ep := range sp.Endpoints {
			fmt.Fprintf(&b, "    %s node=%q zone=%q ready=%v serving=%v terminating=%v hints=%v\n", ep, ep.NodeName, ep.Zone, ep.Ready, ep.Serving, ep.Terminating, ep.ZoneHints)
		}
		el := sp.Eligible(c.Snap.Node)
		fmt.Fprintf(&b, "    eligible: cluster %v local %v internal %v external %v\n", eps(el.Cluster), eps(el.Local), eps(el.Internal), eps(el.External))
	}
	return b.String()
}

func eps(es []model.Endpoint) string {
	var s []string
	for _, e := range es {
		s = append(s, e.String())
	}
	return "{" + strings.Join(s, ",") + "}"
}
