package conntrack

import (
	"net/netip"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func entry(proto uint8, dst, reply string) *Entry {
	return &Entry{Proto: proto, OrigSrc: ap("10.180.0.100:40053"), OrigDst: ap(dst), ReplySrc: ap(reply)}
}

const udpN, tcpN = 17, 6

// node-a's address 192.168.0.1 takes NodePorts; 203.0.113.9 is some
// remote host.
var localAddrs = mt.Addrs("192.168.0.1", "10.180.0.1")

func dnsPort(mod func(*model.ServicePort), eps ...model.Endpoint) *model.ServicePort {
	sp := mt.SP("kube-system", "dns", "", "172.30.0.10", 53, eps...)
	sp.Protocol, sp.Name.Protocol = model.UDP, model.UDP
	sp.NodePort = 30053
	sp.ExternalIPs = mt.Addrs("203.0.113.7")
	if mod != nil {
		mod(sp)
	}
	return sp
}

func TestPlanStale(t *testing.T) {
	a, b := mt.Ep("10.180.0.5", 53, "node-a"), mt.Ep("10.180.1.6", 53, "node-b")
	term := mt.Terminating("10.180.0.7", 53, "node-a")
	local := func(sp *model.ServicePort) { sp.ExternalPolicyLocal = true }
	cfg := proxy.Config{}
	cases := []struct {
		name  string
		sp    *model.ServicePort
		gone  []*model.ServicePort
		e     *Entry
		stale bool
	}{
		{"eligible endpoint kept (ClusterIP)", dnsPort(nil, a, b), nil, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), false},
		{"eligible endpoint kept (NodePort)", dnsPort(nil, a, b), nil, entry(udpN, "192.168.0.1:30053", "10.180.1.6:53"), false},
		{"eligible endpoint kept (externalIP)", dnsPort(nil, a, b), nil, entry(udpN, "203.0.113.7:53", "10.180.0.5:53"), false},
		{"removed endpoint", dnsPort(nil, b), nil, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), true},
		{"removed endpoint (NodePort)", dnsPort(nil, b), nil, entry(udpN, "192.168.0.1:30053", "10.180.0.5:53"), true},
		{"target port changed", dnsPort(nil, mt.Ep("10.180.0.5", 5353, "node-a")), nil, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), true},
		{"not DNATed (started before the rules)", dnsPort(nil, a), nil, entry(udpN, "172.30.0.10:53", "172.30.0.10:53"), true},
		{"scaled to zero (ClusterIP)", dnsPort(nil), nil, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), true},
		{"scaled to zero (NodePort)", dnsPort(nil), nil, entry(udpN, "10.180.0.1:30053", "10.180.0.5:53"), true},
		{"terminating endpoint keeps its flows while others are ready", dnsPort(nil, a, term), nil, entry(udpN, "172.30.0.10:53", "10.180.0.7:53"), false},
		{"only terminating endpoints: they are eligible", dnsPort(nil, term), nil, entry(udpN, "172.30.0.10:53", "10.180.0.7:53"), false},
		{"Local policy, no local endpoint: external frontend closed", dnsPort(local, b), nil, entry(udpN, "192.168.0.1:30053", "10.180.1.6:53"), true},
		{"Local policy, no local endpoint: ClusterIP keeps the remote one", dnsPort(local, b), nil, entry(udpN, "172.30.0.10:53", "10.180.1.6:53"), false},
		{"Local policy with a local endpoint: remote serving endpoint keeps its flow", dnsPort(local, a, b), nil, entry(udpN, "192.168.0.1:30053", "10.180.1.6:53"), false},
		{"NodePort number on a remote host is not ours", dnsPort(nil), nil, entry(udpN, "203.0.113.9:30053", "203.0.113.9:30053"), false},
		{"NodePort on loopback is not served by default", dnsPort(nil), nil, entry(udpN, "127.0.0.1:30053", "127.0.0.1:30053"), false},
		{"TCP is never touched", dnsPort(nil), nil, entry(tcpN, "172.30.0.10:53", "10.180.0.5:53"), false},
		{"unrelated destination", dnsPort(nil), nil, entry(udpN, "172.30.0.11:53", "10.180.0.5:53"), false},
		{"removed frontend", nil, []*model.ServicePort{dnsPort(nil, a)}, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), true},
		{"removed NodePort", nil, []*model.ServicePort{dnsPort(nil, a)}, entry(udpN, "192.168.0.1:30053", "10.180.0.5:53"), true},
		{"removed frontend claimed again by a current port", dnsPort(nil, a), []*model.ServicePort{dnsPort(nil, b)}, entry(udpN, "172.30.0.10:53", "10.180.0.5:53"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var snap *model.Snapshot
			if tc.sp != nil {
				snap = mt.Snap(tc.sp)
			} else {
				snap = mt.Snap()
			}
			p := NewPlan(snap, tc.gone, NodePortDst(&cfg, snap.Node, localAddrs))
			if got := p.Stale(tc.e); got != tc.stale {
				t.Fatalf("Stale(%s) = %v, want %v", tc.e, got, tc.stale)
			}
		})
	}
}

// TestPlanSharedFrontend: two ports claiming one frontend keep the union,
// so a flow healthy for either survives.
func TestPlanSharedFrontend(t *testing.T) {
	x := dnsPort(nil, mt.Ep("10.180.0.5", 53, "node-a"))
	y := dnsPort(nil)
	y.Name.Name = "other"
	p := NewPlan(mt.Snap(x, y), nil, nil)
	if p.Stale(entry(udpN, "172.30.0.10:53", "10.180.0.5:53")) {
		t.Fatal("a flow to an eligible endpoint of one claimant was marked stale")
	}
	if !p.Stale(entry(udpN, "172.30.0.10:53", "10.180.0.9:53")) {
		t.Fatal("a flow to nobody's endpoint was kept")
	}
}

func TestNodePortDst(t *testing.T) {
	node := model.Node{Name: "node-a", Addresses: mt.Addrs("192.168.0.1")}
	cases := []struct {
		name string
		cfg  proxy.Config
		addr string
		want bool
	}{
		{"any local address", proxy.Config{}, "10.180.0.1", true},
		{"not local", proxy.Config{}, "203.0.113.9", false},
		{"loopback with localhost NodePorts", proxy.Config{LocalhostNodePorts: true}, "127.0.0.1", true},
		{"loopback without", proxy.Config{}, "127.0.0.1", false},
		{"IPv6 loopback never", proxy.Config{LocalhostNodePorts: true}, "::1", false},
		{"primary: the node's address", proxy.Config{NodePortPrimary: true}, "192.168.0.1", true},
		{"primary: another local address", proxy.Config{NodePortPrimary: true}, "10.180.0.1", false},
		{"nodeport-addresses: inside", proxy.Config{NodePortAddresses: mt.Prefixes("192.168.0.0/24")}, "192.168.0.1", true},
		{"nodeport-addresses: outside", proxy.Config{NodePortAddresses: mt.Prefixes("192.168.0.0/24")}, "10.180.0.1", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := NodePortDst(&tc.cfg, node, localAddrs)(netip.MustParseAddr(tc.addr)); got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// TestReconcilerSkip: the dump is skipped only when the last pass completed
// and no UDP port, nor the node, changed; never on a full sync.
func TestReconcilerSkip(t *testing.T) {
	sp := dnsPort(nil, mt.Ep("10.180.0.5", 53, "node-a"))
	web := mt.SP("ns", "web", "", "172.30.0.3", 80)
	s1 := mt.Snap(sp, web)
	r := NewReconciler(quiet, nil, proxy.Config{}, nil)
	cur := udpPorts(s1)
	if r.unchanged(cur, s1.Node, false) {
		t.Fatal("a fresh reconciler (restart) skipped")
	}
	r.complete, r.done, r.node = true, cur, s1.Node
	if !r.unchanged(udpPorts(s1), s1.Node, false) {
		t.Fatal("same UDP ports, partial sync: should skip")
	}
	if r.unchanged(udpPorts(s1), s1.Node, true) {
		t.Fatal("a full sync skipped")
	}
	// A TCP change is irrelevant.
	web2 := mt.SP("ns", "web", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 80, "node-a"))
	if !r.unchanged(udpPorts(mt.Snap(sp, web2)), s1.Node, false) {
		t.Fatal("a TCP-only change forced a dump")
	}
	sp2 := dnsPort(nil)
	if r.unchanged(udpPorts(mt.Snap(sp2, web)), s1.Node, false) {
		t.Fatal("a changed UDP port skipped")
	}
	if r.unchanged(udpPorts(mt.Snap(web)), s1.Node, false) {
		t.Fatal("a removed UDP port skipped")
	}
	if r.unchanged(udpPorts(s1), model.Node{Name: "node-a", Zone: "z2"}, false) {
		t.Fatal("a node zone change skipped")
	}
	r.complete = false
	if r.unchanged(udpPorts(s1), s1.Node, false) {
		t.Fatal("skipped after an incomplete pass")
	}
}
