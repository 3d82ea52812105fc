package conntrack

import (
	"fmt"
	"net/netip"
	"reflect"
	"testing"

	ct "github.com/ti-mo/conntrack"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
)

func udp(sp *model.ServicePort) *model.ServicePort {
	sp.Protocol = model.UDP
	sp.Name.Protocol = model.UDP
	return sp
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
func fe(s string) Frontend {
	a := ap(s)
	return Frontend{a.Addr(), a.Port()}
}
func np(port uint16) Frontend { return Frontend{Port: port} }

func TestStale(t *testing.T) {
	ep5, ep6 := mt.Ep("10.180.0.5", 53, "node-a"), mt.Ep("10.180.0.6", 53, "node-a")
	remote := mt.Ep("10.180.1.7", 53, "node-b")
	dns := func(eps ...model.Endpoint) *model.ServicePort {
		return udp(mt.SP("kube-system", "dns", "", "172.30.0.10", 53, eps...))
	}
	name := dns().Name
	ext := func(eps ...model.Endpoint) *model.ServicePort {
		sp := dns(eps...)
		sp.NodePort = 30053
		sp.ExternalIPs = mt.Addrs("203.0.113.7")
		sp.LoadBalancerIPs = mt.Addrs("198.51.100.7")
		return sp
	}
	// Sorted order used by Stale: invalid (NodePort) Addr sorts first.
	allExtSorted := []Frontend{np(30053), fe("172.30.0.10:53"), fe("198.51.100.7:53"), fe("203.0.113.7:53")}

	cases := []struct {
		name      string
		prev, cur *model.Snapshot
		want      Work
	}{
		{
			name: "no change",
			prev: mt.Snap(dns(ep5, ep6)), cur: mt.Snap(dns(ep5, ep6)),
		},
		{
			name: "endpoint removed",
			prev: mt.Snap(dns(ep5, ep6)), cur: mt.Snap(dns(ep6)),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53")}}}},
		},
		{
			name: "endpoint not ready any more",
			prev: mt.Snap(dns(ep5, ep6)),
			cur:  mt.Snap(dns(func() model.Endpoint { e := ep5; e.Ready = false; return e }(), ep6)),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53")}}}},
		},
		{
			name: "endpoint port changed counts as gone",
			prev: mt.Snap(dns(ep5)), cur: mt.Snap(dns(mt.Ep("10.180.0.5", 5353, "node-a"))),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53")}}}},
		},
		{
			name: "TCP is ignored",
			prev: mt.Snap(mt.SP("ns", "web", "", "172.30.0.3", 80, ep5)),
			cur:  mt.Snap(mt.SP("ns", "web", "", "172.30.0.3", 80)),
		},
		{
			name: "service removed: all its endpoints gone, on every frontend",
			prev: mt.Snap(ext(ep5)), cur: mt.Snap(),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), allExtSorted}}},
		},
		{
			name: "last endpoint removed: gone, nothing opened",
			prev: mt.Snap(dns(ep5)), cur: mt.Snap(dns()),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53")}}}},
		},
		{
			name: "first endpoint added: frontend opened",
			prev: mt.Snap(dns()), cur: mt.Snap(dns(ep5)),
			want: Work{Opened: []OpenedFrontend{{name, model.UDP, fe("172.30.0.10:53"), []netip.AddrPort{ap("10.180.0.5:53")}}}},
		},
		{
			name: "second endpoint added: nothing (frontend was open)",
			prev: mt.Snap(dns(ep5)), cur: mt.Snap(dns(ep5, ep6)),
		},
		{
			name: "new service with endpoints: every frontend opened",
			prev: mt.Snap(), cur: mt.Snap(ext(ep5)),
			want: Work{Opened: []OpenedFrontend{
				{name, model.UDP, np(30053), []netip.AddrPort{ap("10.180.0.5:53")}},
				{name, model.UDP, fe("172.30.0.10:53"), []netip.AddrPort{ap("10.180.0.5:53")}},
				{name, model.UDP, fe("198.51.100.7:53"), []netip.AddrPort{ap("10.180.0.5:53")}},
				{name, model.UDP, fe("203.0.113.7:53"), []netip.AddrPort{ap("10.180.0.5:53")}},
			}},
		},
		{
			name: "new service without endpoints: nothing to do yet",
			prev: mt.Snap(), cur: mt.Snap(dns()),
		},
		{
			name: "first sync (prev nil) opens frontends with endpoints",
			prev: nil, cur: mt.Snap(dns(ep5)),
			want: Work{Opened: []OpenedFrontend{{name, model.UDP, fe("172.30.0.10:53"), []netip.AddrPort{ap("10.180.0.5:53")}}}},
		},
		{
			name: "externalIP added to a serving service: only the new frontend opens",
			prev: mt.Snap(dns(ep5)),
			cur: mt.Snap(func() *model.ServicePort {
				sp := dns(ep5)
				sp.ExternalIPs = mt.Addrs("203.0.113.7")
				return sp
			}()),
			want: Work{Opened: []OpenedFrontend{{name, model.UDP, fe("203.0.113.7:53"), []netip.AddrPort{ap("10.180.0.5:53")}}}},
		},
		{
			// externalTrafficPolicy Local with only a remote endpoint: the
			// NodePort and external IP have nothing; when a local endpoint
			// appears they open (Keep = local only), the ClusterIP was open.
			name: "ETP Local: external frontends open when a local endpoint appears",
			prev: mt.Snap(func() *model.ServicePort { sp := ext(remote); sp.ExternalPolicyLocal = true; return sp }()),
			cur:  mt.Snap(func() *model.ServicePort { sp := ext(remote, ep5); sp.ExternalPolicyLocal = true; return sp }()),
			want: Work{Opened: []OpenedFrontend{
				{name, model.UDP, np(30053), []netip.AddrPort{ap("10.180.0.5:53")}},
				{name, model.UDP, fe("198.51.100.7:53"), []netip.AddrPort{ap("10.180.0.5:53")}},
				{name, model.UDP, fe("203.0.113.7:53"), []netip.AddrPort{ap("10.180.0.5:53")}},
			}},
		},
		{
			name: "terminating fallback: ready endpoint replaced by terminating one is still served",
			prev: mt.Snap(dns(ep5, mt.Terminating("10.180.0.6", 53, "node-a"))),
			cur:  mt.Snap(dns(mt.Terminating("10.180.0.6", 53, "node-a"))),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53")}}}},
		},
		{
			name: "cluster IP renumbered: flows to the old and new VIP are matched",
			prev: mt.Snap(dns(ep5)),
			cur:  mt.Snap(udp(mt.SP("kube-system", "dns", "", "172.30.0.11", 53))),
			want: Work{Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53"), fe("172.30.0.11:53")}}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Stale(tc.prev, tc.cur)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Stale:\n got %+v\nwant %+v", got, tc.want)
			}
			if got.Empty() != (len(tc.want.Gone)+len(tc.want.Opened) == 0) {
				t.Fatal("Empty disagrees with content")
			}
		})
	}
}

// TestStaleSharedPointerSkipped shows that an unchanged port (same pointer in
// both snapshots, as the model shares them) is not examined: the renderer and
// the cleaner agree on what changed.
func TestStaleSharedPointerSkipped(t *testing.T) {
	sp := udp(mt.SP("ns", "d", "", "172.30.0.10", 53, mt.Ep("10.180.0.5", 53, "node-a")))
	if w := Stale(mt.Snap(sp), mt.Snap(sp)); !w.Empty() {
		t.Fatalf("want no work, got %+v", w)
	}
	// Same pointer but the node moved zone: eligibility can change, so the
	// port is examined (here it stays the same, so still no work).
	cur := mt.Snap(sp)
	cur.Node.Zone = "zone-b"
	if w := Stale(mt.Snap(sp), cur); !w.Empty() {
		t.Fatalf("want no work, got %+v", w)
	}
}

func flow(proto uint8, src, dst, replySrc, replyDst string) ct.Flow {
	s, d, rs, rd := ap(src), ap(dst), ap(replySrc), ap(replyDst)
	var f ct.Flow
	f.TupleOrig.IP = ct.IPTuple{SourceAddress: s.Addr(), DestinationAddress: d.Addr()}
	f.TupleOrig.Proto = ct.ProtoTuple{Protocol: proto, SourcePort: s.Port(), DestinationPort: d.Port()}
	f.TupleReply.IP = ct.IPTuple{SourceAddress: rs.Addr(), DestinationAddress: rd.Addr()}
	f.TupleReply.Proto = ct.ProtoTuple{Protocol: proto, SourcePort: rs.Port(), DestinationPort: rd.Port()}
	return f
}

// TestMatch checks the in-memory matching Clean applies to dumped flows.
func TestMatch(t *testing.T) {
	name := model.ServicePortName{Namespace: "ns", Name: "d", Protocol: model.UDP}
	w := Work{
		Gone: []GoneEndpoint{{name, model.UDP, ap("10.180.0.5:53"), []Frontend{fe("172.30.0.10:53"), np(30053)}}},
		Opened: []OpenedFrontend{{name, model.UDP, fe("172.30.0.20:53"), []netip.AddrPort{ap("10.180.0.6:53")}},
			{name, model.UDP, np(30054), []netip.AddrPort{ap("10.180.0.6:53")}}},
	}
	idx := index(w)
	const u, tcp = 17, 6
	cases := []struct {
		name string
		f    ct.Flow
		want bool
	}{
		{"DNATed to gone endpoint via VIP", flow(u, "10.180.0.100:4000", "172.30.0.10:53", "10.180.0.5:53", "10.180.0.100:4000"), true},
		{"DNATed to gone endpoint via NodePort on any address", flow(u, "192.0.2.1:4000", "192.168.0.2:30053", "10.180.0.5:53", "10.180.0.1:61000"), true},
		{"DNATed to live endpoint via VIP", flow(u, "10.180.0.100:4000", "172.30.0.10:53", "10.180.0.6:53", "10.180.0.100:4000"), false},
		{"gone endpoint's own traffic, not via a frontend", flow(u, "10.180.0.100:4000", "10.180.0.5:53", "10.180.0.5:53", "10.180.0.100:4000"), false},
		{"gone endpoint IP, other port", flow(u, "10.180.0.100:4000", "172.30.0.10:53", "10.180.0.5:54", "10.180.0.100:4000"), false},
		{"TCP to the same frontend", flow(tcp, "10.180.0.100:4000", "172.30.0.10:53", "10.180.0.5:53", "10.180.0.100:4000"), false},
		{"opened frontend, flow not DNATed", flow(u, "10.180.0.100:4000", "172.30.0.20:53", "172.30.0.20:53", "10.180.0.100:4000"), true},
		{"opened frontend, flow already DNATed to a current endpoint", flow(u, "10.180.0.100:4000", "172.30.0.20:53", "10.180.0.6:53", "10.180.0.100:4000"), false},
		{"opened NodePort, any address, not DNATed", flow(u, "192.0.2.1:4000", "192.168.0.2:30054", "192.168.0.2:30054", "192.0.2.1:4000"), true},
		{"unrelated port", flow(u, "10.180.0.100:4000", "172.30.0.20:54", "172.30.0.20:54", "10.180.0.100:4000"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := stale(idx, &tc.f); got != tc.want {
				t.Fatalf("stale = %v, want %v", got, tc.want)
			}
		})
	}
}

// BenchmarkMatch measures the in-memory pass of Clean: 100,000 dumped UDP
// flows against the work of 1,000 gone endpoints and 1,000 opened frontends.
func BenchmarkMatch(b *testing.B) {
	name := model.ServicePortName{Namespace: "ns", Name: "d", Protocol: model.UDP}
	var w Work
	for i := 0; i < 1000; i++ {
		vip := netip.AddrFrom4([4]byte{172, 30, byte(i >> 8), byte(i)})
		ep := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 180, byte(i >> 8), byte(i)}), 53)
		w.Gone = append(w.Gone, GoneEndpoint{name, model.UDP, ep, []Frontend{{vip, 53}, {Port: uint16(30000 + i)}}})
		w.Opened = append(w.Opened, OpenedFrontend{name, model.UDP, Frontend{vip, 54}, []netip.AddrPort{ep}})
	}
	flows := make([]ct.Flow, 100000)
	for i := range flows {
		flows[i] = flow(17, fmt.Sprintf("10.181.%d.%d:%d", i/250%250, i%250, 1024+i%60000), fmt.Sprintf("172.30.%d.%d:53", i/256%4, i%256),
			fmt.Sprintf("10.180.%d.%d:53", i/256%8, i%256), "10.181.0.1:1024")
	}
	b.ReportAllocs()
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		idx := index(w)
		hits := 0
		for i := range flows {
			if stale(idx, &flows[i]) {
				hits++
			}
		}
		if hits == 0 {
			b.Fatal("no flow matched")
		}
	}
}
