// Package behavior is the one table of Service semantics every backend must
// implement: for a packet (source, protocol, destination, port) arriving at
// this node, which endpoints may answer, or whether it is rejected, dropped or
// left alone, and whether it is masqueraded.
//
// The iptables and nftables backends check the table two ways: a tracer
// walks their rendered rules without root (unit tests), and pkg/trace/live
// traces the ruleset they programmed into a private namespace, read back from
// the kernel (kernel tests). The e2e suite does not run the table; it checks
// the same semantics with real connections, case by case. The addresses
// follow pkg/model/modeltest.
package behavior

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Packet is the first packet of a connection as it reaches the node.
type Packet struct {
	Src   netip.Addr
	Proto model.Protocol
	Dst   netip.Addr
	Port  uint16
	// FromNode means the packet comes from a process on the node itself
	// (the OUTPUT path) rather than from a pod or from outside (PREROUTING).
	FromNode bool
}

func (p Packet) String() string {
	from := "from"
	if p.FromNode {
		from = "from-node"
	}
	return fmt.Sprintf("%s %s %s → %s:%d", p.Proto, from, p.Src, p.Dst, p.Port)
}

// Outcome is what happens to the packet.
type Outcome string

// The outcomes a tracer can report.
const (
	// Forward: DNATed to one of Endpoints.
	Forward Outcome = "forward"
	Reject  Outcome = "reject"
	Drop    Outcome = "drop"
	// Untouched: no service rule applies; the packet is routed as is.
	Untouched Outcome = "untouched"
)

// Verdict is a tracer's answer.
type Verdict struct {
	Outcome Outcome
	// Endpoints that may answer (sorted), for Forward.
	Endpoints []netip.AddrPort
	// Masquerade: the packet leaves with the node's address as source.
	Masquerade bool
}

func (v Verdict) String() string {
	if v.Outcome != Forward {
		return string(v.Outcome)
	}
	var eps []string
	for _, e := range v.Endpoints {
		eps = append(eps, e.String())
	}
	return fmt.Sprintf("forward to {%s} masq=%v", strings.Join(eps, ","), v.Masquerade)
}

// Normalize sorts and dedupes endpoints so verdicts compare with ==.
func (v Verdict) Normalize() Verdict {
	sort.Slice(v.Endpoints, func(i, j int) bool { return v.Endpoints[i].Compare(v.Endpoints[j]) < 0 })
	out := v.Endpoints[:0]
	for i, e := range v.Endpoints {
		if i == 0 || e != v.Endpoints[i-1] {
			out = append(out, e)
		}
	}
	v.Endpoints = out
	return v
}

// Tracer computes the verdict of a backend for pkt under cfg and snap.
type Tracer func(cfg proxy.Config, snap *model.Snapshot, pkt Packet) (Verdict, error)

// Case is one row of the table.
type Case struct {
	Name   string
	Packet Packet
	Want   Verdict
	// Cfg changes the default config for this case.
	Cfg func(*proxy.Config)
}

// Addresses every case uses.
var (
	NodeIP     = netip.MustParseAddr("192.168.0.2")
	OtherNode  = netip.MustParseAddr("192.168.0.3")
	LocalPod   = netip.MustParseAddr("10.180.0.5")
	ClientPod  = netip.MustParseAddr("10.180.0.100")
	Outside    = netip.MustParseAddr("203.0.113.10")  // inside the LB source range
	Disallowed = netip.MustParseAddr("203.0.113.200") // outside it
	Loopback   = netip.MustParseAddr("127.0.0.1")
)

// Config is the default config of the table: ClusterCIDR local detection,
// localhost NodePorts on (only iptables mode implements them; see LocalhostCase).
func Config() proxy.Config {
	return proxy.Config{ClusterCIDRs: []netip.Prefix{mt.ClusterCIDR}, LocalMode: proxy.LocalModeClusterCIDR, LocalhostNodePorts: true}
}

// Snapshot is the cluster state every case runs against: Declared, with the
// model's frontend rule applied as pkg/watch applies it before any backend
// renders.
func Snapshot() *model.Snapshot {
	ports, _ := model.Resolve(Declared()...)
	return mt.Snap(ports...)
}

// Declared are the service ports as converted from the API, before the
// frontend rule: shared-z and shared-a both claim 198.51.100.70 and
// 203.0.113.70 on TCP/80 (shared-z is older but sorts last, so "first rule
// wins" would pick the wrong one), and shared-a also lists web's ClusterIP
// as an externalIP.
func Declared() []*model.ServicePort {
	web := mt.SP("ns", "web", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	web.NodePort, web.ExternalIPs = 30080, mt.Addrs("203.0.113.7")

	empty := mt.SP("ns", "empty", "", "172.30.0.9", 80)
	empty.NodePort = 30090

	local := mt.SP("ns", "local", "", "172.30.0.50", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	local.NodePort, local.ExternalPolicyLocal, local.LoadBalancerIPs = 30050, true, mt.Addrs("198.51.100.5")

	remote := mt.SP("ns", "remote", "", "172.30.0.51", 80, mt.Ep("10.180.1.6", 8080, "node-b"))
	remote.NodePort, remote.ExternalPolicyLocal = 30051, true

	itp := mt.SP("ns", "itp", "", "172.30.0.60", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	itp.InternalPolicyLocal = true
	itpNone := mt.SP("ns", "itp-none", "", "172.30.0.61", 80, mt.Ep("10.180.1.5", 8080, "node-b"))
	itpNone.InternalPolicyLocal = true

	lb := mt.SP("ns", "lb", "", "172.30.0.40", 80, mt.Ep("10.180.1.5", 8080, "node-b"))
	lb.NodePort, lb.LoadBalancerIPs, lb.LoadBalancerSourceRanges = 30040, mt.Addrs("198.51.100.4"), mt.Prefixes("203.0.113.0/25")

	// Source ranges listed but none readable (model.LoadBalancerSourceRangesInvalid):
	// the LB IP admits nobody; kube-proxy would admit everybody.
	closed := mt.SP("ns", "lb-closed", "", "172.30.0.41", 80, mt.Ep("10.180.1.5", 8080, "node-b"))
	closed.NodePort, closed.LoadBalancerIPs, closed.LoadBalancerSourceRangesInvalid = 30041, mt.Addrs("198.51.100.6"), true

	term := mt.SP("ns", "term", "", "172.30.0.80", 80, mt.Terminating("10.180.0.7", 8080, "node-a"), mt.Terminating("10.180.1.7", 8080, "node-b"))
	mixed := mt.SP("ns", "mixed", "", "172.30.0.81", 80, mt.Terminating("10.180.0.7", 8080, "node-a"), mt.Ep("10.180.1.7", 8080, "node-b"))
	// Every endpoint terminating and none serving any more: nothing is
	// usable, so the Service counts as having no endpoints (reject), as in
	// kube-proxy, not as having remote ones (drop).
	gone := mt.SP("ns", "term-gone", "", "172.30.0.82", 80, mt.Terminating("10.180.0.8", 8080, "node-a"), mt.Terminating("10.180.1.8", 8080, "node-b"))
	for i := range gone.Endpoints {
		gone.Endpoints[i].Serving = false
	}
	gone.NodePort = 30082
	// Endpoints that exist but neither are ready nor serve: no usable
	// endpoint, so reject (not drop) like a Service without endpoints.
	unready := mt.SP("ns", "unready", "", "172.30.0.83", 80, mt.Ep("10.180.0.8", 8080, "node-a"))
	unready.Endpoints[0].Ready, unready.Endpoints[0].Serving = false, false

	udp := mt.SP("ns", "dns", "", "172.30.0.10", 53, mt.Ep("10.180.0.9", 5353, "node-a"))
	udp.Name.Protocol, udp.Protocol = model.UDP, model.UDP

	one := mt.SP("ns", "one", "", "172.30.0.2", 80, mt.Ep("10.180.0.5", 8080, "node-a"))

	preferClose := mt.SP("ns", "close", "", "172.30.0.90", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	preferClose.PreferClose = true

	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	sharedZ := mt.SP("ns", "shared-z", "", "172.30.0.70", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	sharedZ.Created, sharedZ.NodePort = t0, 30070
	sharedZ.LoadBalancerIPs, sharedZ.LoadBalancerSourceRanges = mt.Addrs("198.51.100.70"), mt.Prefixes("203.0.113.0/25")
	sharedZ.ExternalIPs = mt.Addrs("203.0.113.70")
	sharedA := mt.SP("ns", "shared-a", "", "172.30.0.71", 80, mt.Ep("10.180.1.5", 8080, "node-b"))
	sharedA.Created, sharedA.NodePort = t0.Add(time.Second), 30071
	sharedA.LoadBalancerIPs, sharedA.LoadBalancerSourceRanges = mt.Addrs("198.51.100.70"), mt.Prefixes("203.0.113.0/25")
	sharedA.ExternalIPs = mt.Addrs("203.0.113.70", "203.0.113.71", "172.30.0.3")

	return []*model.ServicePort{web, empty, local, remote, itp, itpNone, lb, closed, term, mixed, gone, unready, udp, one, preferClose, sharedZ, sharedA}
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func fwd(masq bool, eps ...string) Verdict {
	v := Verdict{Outcome: Forward, Masquerade: masq}
	for _, e := range eps {
		v.Endpoints = append(v.Endpoints, ap(e))
	}
	return v.Normalize()
}

func tcp(src netip.Addr, dst string, port uint16) Packet {
	return Packet{Src: src, Proto: model.TCP, Dst: netip.MustParseAddr(dst), Port: port}
}

// Cases is the table.
func Cases() []Case {
	both := []string{"10.180.0.5:8080", "10.180.1.5:8080"}
	fromNode := func(p Packet) Packet { p.FromNode = true; return p }
	udp := tcp(ClientPod, "172.30.0.10", 53)
	udp.Proto = model.UDP
	return []Case{
		{Name: "clusterip from pod", Packet: tcp(ClientPod, "172.30.0.3", 80), Want: fwd(false, both...)},
		{Name: "clusterip from node process", Packet: fromNode(tcp(NodeIP, "172.30.0.3", 80)), Want: fwd(true, both...)},
		{Name: "clusterip from off-cluster source is masqueraded", Packet: tcp(OtherNode, "172.30.0.3", 80), Want: fwd(true, both...)},
		{Name: "clusterip wrong port untouched", Packet: tcp(ClientPod, "172.30.0.3", 81), Want: Verdict{Outcome: Untouched}},
		{Name: "clusterip udp", Packet: udp, Want: fwd(false, "10.180.0.9:5353")},
		{Name: "clusterip tcp on udp-only port untouched", Packet: tcp(ClientPod, "172.30.0.10", 53), Want: Verdict{Outcome: Untouched}},
		{Name: "hairpin is masqueraded", Packet: tcp(LocalPod, "172.30.0.2", 80), Want: fwd(true, "10.180.0.5:8080")},
		{Name: "no endpoints rejects", Packet: tcp(ClientPod, "172.30.0.9", 80), Want: Verdict{Outcome: Reject}},
		{Name: "no endpoints nodeport rejects", Packet: tcp(Outside, "192.168.0.2", 30090), Want: Verdict{Outcome: Reject}},
		{Name: "nodeport from outside", Packet: tcp(Outside, "192.168.0.2", 30080), Want: fwd(true, both...)},
		// NodePorts on 127.0.0.1 are an iptables-mode feature (route_localnet);
		// with it off every backend must leave loopback alone.
		{Name: "nodeport on localhost off", Packet: fromNode(tcp(Loopback, "127.0.0.1", 30080)), Want: Verdict{Outcome: Untouched},
			Cfg: func(c *proxy.Config) { c.LocalhostNodePorts = false }},
		{Name: "nodeport on a non-node address untouched", Packet: tcp(Outside, "192.168.0.99", 30080), Want: Verdict{Outcome: Untouched}},
		{Name: "externalIP from outside", Packet: tcp(Outside, "203.0.113.7", 80), Want: fwd(true, both...)},
		{Name: "etp local nodeport keeps source, local endpoints only", Packet: tcp(Outside, "192.168.0.2", 30050), Want: fwd(false, "10.180.0.5:8080")},
		{Name: "etp local lb ip keeps source", Packet: tcp(Outside, "198.51.100.5", 80), Want: fwd(false, "10.180.0.5:8080")},
		{Name: "etp local from pod gets cluster endpoints", Packet: tcp(ClientPod, "198.51.100.5", 80), Want: fwd(false, both...)},
		{Name: "etp local clusterip unaffected", Packet: tcp(ClientPod, "172.30.0.50", 80), Want: fwd(false, both...)},
		{Name: "etp local without local endpoint drops external", Packet: tcp(Outside, "192.168.0.2", 30051), Want: Verdict{Outcome: Drop}},
		{Name: "etp local without local endpoint: pods get cluster endpoints", Packet: tcp(ClientPod, "192.168.0.2", 30051), Want: fwd(false, "10.180.1.6:8080")},
		{Name: "etp local without local endpoint: node gets cluster endpoints", Packet: fromNode(tcp(NodeIP, "192.168.0.2", 30051)), Want: fwd(true, "10.180.1.6:8080")},
		{Name: "etp local without local endpoint clusterip works", Packet: tcp(ClientPod, "172.30.0.51", 80), Want: fwd(false, "10.180.1.6:8080")},
		{Name: "itp local uses local endpoints", Packet: tcp(ClientPod, "172.30.0.60", 80), Want: fwd(false, "10.180.0.5:8080")},
		{Name: "itp local from node process is masqueraded", Packet: fromNode(tcp(NodeIP, "172.30.0.60", 80)), Want: fwd(true, "10.180.0.5:8080")},
		{Name: "itp local without local endpoint drops", Packet: tcp(ClientPod, "172.30.0.61", 80), Want: Verdict{Outcome: Drop}},
		{Name: "lb source range allowed", Packet: tcp(Outside, "198.51.100.4", 80), Want: fwd(true, "10.180.1.5:8080")},
		{Name: "lb source range denied", Packet: tcp(Disallowed, "198.51.100.4", 80), Want: Verdict{Outcome: Drop}},
		{Name: "lb source ranges none readable: in-range source dropped", Packet: tcp(Outside, "198.51.100.6", 80), Want: Verdict{Outcome: Drop}},
		{Name: "lb source ranges none readable: any source dropped", Packet: tcp(Disallowed, "198.51.100.6", 80), Want: Verdict{Outcome: Drop}},
		{Name: "lb source ranges none readable: clusterip works", Packet: tcp(ClientPod, "172.30.0.41", 80), Want: fwd(false, "10.180.1.5:8080")},
		{Name: "lb source ranges none readable: nodeport works", Packet: tcp(Disallowed, "192.168.0.2", 30041), Want: fwd(true, "10.180.1.5:8080")},
		{Name: "lb nodeport ignores source ranges", Packet: tcp(Disallowed, "192.168.0.2", 30040), Want: fwd(true, "10.180.1.5:8080")},
		{Name: "terminating endpoints as fallback", Packet: tcp(ClientPod, "172.30.0.80", 80), Want: fwd(false, "10.180.0.7:8080", "10.180.1.7:8080")},
		{Name: "all endpoints terminating, none serving: clusterip rejects", Packet: tcp(ClientPod, "172.30.0.82", 80), Want: Verdict{Outcome: Reject}},
		{Name: "all endpoints terminating, none serving: nodeport rejects", Packet: tcp(Outside, "192.168.0.2", 30082), Want: Verdict{Outcome: Reject}},
		{Name: "endpoints neither ready nor serving reject", Packet: tcp(ClientPod, "172.30.0.83", 80), Want: Verdict{Outcome: Reject}},
		{Name: "ready endpoints preferred over terminating", Packet: tcp(ClientPod, "172.30.0.81", 80), Want: fwd(false, "10.180.1.7:8080")},
		{Name: "prefer close picks same-zone endpoints", Packet: tcp(ClientPod, "172.30.0.90", 80), Want: fwd(false, "10.180.0.5:8080")},
		{Name: "masquerade-all masquerades pod traffic", Packet: tcp(ClientPod, "172.30.0.3", 80), Want: fwd(true, both...),
			Cfg: func(c *proxy.Config) { c.MasqueradeAll = true }},
		{Name: "nodeport-addresses excludes other addresses", Packet: fromNode(tcp(Loopback, "127.0.0.1", 30080)), Want: Verdict{Outcome: Untouched},
			Cfg: func(c *proxy.Config) { c.NodePortAddresses = mt.Prefixes("192.168.0.0/24") }},
		{Name: "nodeport-addresses includes node address", Packet: tcp(Outside, "192.168.0.2", 30080), Want: fwd(true, both...),
			Cfg: func(c *proxy.Config) { c.NodePortAddresses = mt.Prefixes("192.168.0.0/24") }},
		// One frontend, two claims: the model's rule decides for every backend.
		{Name: "shared LB IP served by the older service", Packet: tcp(Outside, "198.51.100.70", 80), Want: fwd(true, "10.180.0.5:8080")},
		{Name: "shared externalIP served by the older service", Packet: tcp(Outside, "203.0.113.70", 80), Want: fwd(true, "10.180.0.5:8080")},
		{Name: "conflict loser keeps its other externalIP", Packet: tcp(Outside, "203.0.113.71", 80), Want: fwd(true, "10.180.1.5:8080")},
		{Name: "conflict loser keeps its ClusterIP", Packet: tcp(ClientPod, "172.30.0.71", 80), Want: fwd(false, "10.180.1.5:8080")},
		{Name: "conflict loser keeps its NodePort", Packet: tcp(Outside, "192.168.0.2", 30071), Want: fwd(true, "10.180.1.5:8080")},
		{Name: "externalIP equal to another Service's ClusterIP goes to the ClusterIP", Packet: tcp(Outside, "172.30.0.3", 80), Want: fwd(true, both...)},
	}
}

// LocalhostCase is the iptables-only case: a NodePort on 127.0.0.1 from the node.
func LocalhostCase() Case {
	p := tcp(Loopback, "127.0.0.1", 30080)
	p.FromNode = true
	return Case{Name: "nodeport on localhost from node", Packet: p, Want: fwd(true, "10.180.0.5:8080", "10.180.1.5:8080")}
}

// Run checks every case against a backend's tracer.
func Run(t *testing.T, trace Tracer, extra ...Case) {
	snap := Snapshot()
	for _, tc := range append(Cases(), extra...) {
		t.Run(tc.Name, func(t *testing.T) {
			cfg := Config()
			if tc.Cfg != nil {
				tc.Cfg(&cfg)
			}
			got, err := trace(cfg, snap, tc.Packet)
			if err != nil {
				t.Fatalf("%s: %v", tc.Packet, err)
			}
			got = got.Normalize()
			if got.String() != tc.Want.String() {
				t.Errorf("%s:\n  got  %s\n  want %s", tc.Packet, got, tc.Want)
			}
		})
	}
}

// LocalAddrs are the addresses the node owns in the table's world (for
// addrtype LOCAL / fib daddr type local).
func LocalAddrs() []netip.Addr { return []netip.Addr{NodeIP, Loopback} }
