package ipvs

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

var (
	a   = netip.MustParseAddr
	pfx = netip.MustParsePrefix
)

func ep(ip string, port int32, node string, ready bool) model.Endpoint {
	return model.Endpoint{IP: a(ip), Port: port, Ready: ready, Serving: ready, NodeName: node}
}

func snapshot(sps ...*model.ServicePort) *model.Snapshot {
	s := &model.Snapshot{Node: model.Node{Name: "n1", Addresses: []netip.Addr{a("192.168.50.1")}}, Services: map[model.ServicePortName]*model.ServicePort{}}
	for _, sp := range sps {
		s.Services[sp.Name] = sp
	}
	return s
}

// render prints a plan compactly so table tests can compare whole plans.
func render(p *Plan) string {
	var b strings.Builder
	for _, vs := range p.VirtualServers {
		fmt.Fprintf(&b, "%s %s %s", vs.Kind, vs.Key, vs.Scheduler)
		if vs.Persistence > 0 {
			fmt.Fprintf(&b, " persist=%d", vs.Persistence)
		}
		b.WriteString(" ->")
		for _, r := range vs.Reals {
			fmt.Fprintf(&b, " %s", r.Addr)
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "bind %v\n", p.BindAddrs)
	fmt.Fprintf(&b, "cluster %v masq %v local %v all=%v\n", p.Filter.ClusterVIPs, p.Filter.MasqVIPs, p.Filter.LocalCIDRs, p.Filter.MasqueradeAll)
	for _, sr := range p.Filter.SourceRanges {
		fmt.Fprintf(&b, "ranges %s %v\n", sr.VIP, sr.Allowed)
	}
	return b.String()
}

func TestBuildPlan(t *testing.T) {
	web := func() *model.ServicePort {
		return &model.ServicePort{
			Name:       model.ServicePortName{Namespace: "ns", Name: "web", Protocol: model.TCP},
			ClusterIPs: []netip.Addr{a("10.96.0.10")}, Port: 80, Protocol: model.TCP,
			Endpoints: []model.Endpoint{ep("10.244.1.2", 8080, "n1", true), ep("10.244.2.2", 8080, "n2", true), ep("10.244.3.2", 8080, "n2", false)},
		}
	}
	nodeIPs := []netip.Addr{a("127.0.0.1"), a("192.168.50.1"), a("10.0.0.5"), a("fe80::1"), a("fd00:50::1")}
	cases := []struct {
		name string
		cfg  proxy.Config
		opts PlanOptions
		sp   func() *model.ServicePort
		want string
	}{
		{
			name: "clusterIP ready endpoints only, masquerade non-local sources",
			cfg:  proxy.Config{ClusterCIDRs: []netip.Prefix{pfx("10.244.0.0/16")}},
			sp:   web,
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [] local [10.244.0.0/16] all=false\n",
		},
		{
			name: "scheduler and affinity become persistence",
			opts: PlanOptions{Scheduler: "sh"},
			sp:   func() *model.ServicePort { sp := web(); sp.AffinitySeconds = 10; return sp },
			want: "ClusterIP 10.96.0.10:80/TCP sh persist=10 -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [] local [] all=false\n",
		},
		{
			name: "nodePort on every non-loopback node address, masqueraded under Cluster policy",
			sp:   func() *model.ServicePort { sp := web(); sp.NodePort = 30080; return sp },
			want: "NodePort 10.0.0.5:30080/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"NodePort 192.168.50.1:30080/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [10.0.0.5:30080/TCP 192.168.50.1:30080/TCP] local [] all=false\n",
		},
		{
			name: "nodeport-addresses filter",
			cfg:  proxy.Config{NodePortAddresses: []netip.Prefix{pfx("192.168.0.0/16")}},
			sp:   func() *model.ServicePort { sp := web(); sp.NodePort = 30080; return sp },
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"NodePort 192.168.50.1:30080/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [192.168.50.1:30080/TCP] local [] all=false\n",
		},
		{
			name: "externalTrafficPolicy Local: external addresses get only local endpoints and keep the source",
			cfg:  proxy.Config{NodePortPrimary: true},
			sp: func() *model.ServicePort {
				sp := web()
				sp.NodePort, sp.ExternalPolicyLocal = 30080, true
				sp.ExternalIPs = []netip.Addr{a("203.0.113.7")}
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"NodePort 192.168.50.1:30080/TCP rr -> 10.244.1.2:8080\n" +
				"ExternalIP 203.0.113.7:80/TCP rr -> 10.244.1.2:8080\n" +
				"bind [10.96.0.10 203.0.113.7]\ncluster [10.96.0.10:80/TCP] masq [] local [] all=false\n",
		},
		{
			name: "load balancer with source ranges",
			cfg:  proxy.Config{MasqueradeAll: true},
			sp: func() *model.ServicePort {
				sp := web()
				sp.LoadBalancerIPs = []netip.Addr{a("198.51.100.9")}
				sp.LoadBalancerSourceRanges = []netip.Prefix{pfx("192.168.50.0/25"), pfx("2001:db8::/64")}
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"LoadBalancer 198.51.100.9:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10 198.51.100.9]\ncluster [10.96.0.10:80/TCP] masq [198.51.100.9:80/TCP] local [] all=true\n" +
				"ranges 198.51.100.9:80/TCP [192.168.50.0/25]\n",
		},
		{
			// Source ranges listed, none readable: a filter entry that allows
			// nothing, where no entry would allow everybody.
			name: "load balancer with source ranges none of which parsed",
			cfg:  proxy.Config{MasqueradeAll: true},
			sp: func() *model.ServicePort {
				sp := web()
				sp.LoadBalancerIPs = []netip.Addr{a("198.51.100.9")}
				sp.LoadBalancerSourceRangesInvalid = true
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"LoadBalancer 198.51.100.9:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10 198.51.100.9]\ncluster [10.96.0.10:80/TCP] masq [198.51.100.9:80/TCP] local [] all=true\n" +
				"ranges 198.51.100.9:80/TCP []\n",
		},
		{
			name: "internalTrafficPolicy Local with no local endpoint leaves the VIP with no real server",
			sp: func() *model.ServicePort {
				sp := web()
				sp.Endpoints = sp.Endpoints[1:]
				sp.InternalPolicyLocal = true
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr ->\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [] local [] all=false\n",
		},
		{
			name: "IPv6 cluster IP is skipped unless the family is enabled",
			sp: func() *model.ServicePort {
				sp := web()
				sp.ClusterIPs = append(sp.ClusterIPs, a("fd00::10"))
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"bind [10.96.0.10]\ncluster [10.96.0.10:80/TCP] masq [] local [] all=false\n",
		},
		{
			name: "dual stack: each VIP gets endpoints of its own family",
			cfg:  proxy.Config{Families: []model.Family{model.IPv4, model.IPv6}},
			sp: func() *model.ServicePort {
				sp := web()
				sp.ClusterIPs = append(sp.ClusterIPs, a("fd00::10"))
				sp.Endpoints = append(sp.Endpoints, ep("fd00:244::2", 8080, "n1", true))
				return sp
			},
			want: "ClusterIP 10.96.0.10:80/TCP rr -> 10.244.1.2:8080 10.244.2.2:8080\n" +
				"ClusterIP [fd00::10]:80/TCP rr -> [fd00:244::2]:8080\n" +
				"bind [10.96.0.10 fd00::10]\ncluster [10.96.0.10:80/TCP [fd00::10]:80/TCP] masq [] local [] all=false\n",
		},
		{
			// Found by FuzzIPVSPlan: the NodePort used to get a virtual
			// server on every IPv4 node address too, with no real server.
			name: "single-stack IPv6 Service on a dual-stack node: NodePort on IPv6 addresses only",
			cfg:  proxy.Config{Families: []model.Family{model.IPv4, model.IPv6}},
			sp: func() *model.ServicePort {
				sp := web()
				sp.ClusterIPs, sp.NodePort = []netip.Addr{a("fd00::10")}, 30080
				sp.Endpoints = []model.Endpoint{ep("fd00:244::2", 8080, "n1", true)}
				return sp
			},
			want: "ClusterIP [fd00::10]:80/TCP rr -> [fd00:244::2]:8080\n" +
				"NodePort [fd00:50::1]:30080/TCP rr -> [fd00:244::2]:8080\n" +
				"bind [fd00::10]\ncluster [[fd00::10]:80/TCP] masq [[fd00:50::1]:30080/TCP] local [] all=false\n",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := render(BuildPlan(snapshot(tc.sp()), &tc.cfg, tc.opts, nodeIPs))
			if got != tc.want {
				t.Errorf("plan mismatch\n--- got\n%s--- want\n%s", got, tc.want)
			}
		})
	}
}

func TestVIPKeyRoundTrip(t *testing.T) {
	for _, k := range []Key{{a("10.96.0.10"), model.TCP, 80}, {a("fd00::1"), model.UDP, 53}, {a("1.2.3.4"), model.SCTP, 65535}} {
		b := vipKey(k)
		if len(b)%4 != 0 {
			t.Fatalf("%s: key not register-aligned: %d bytes", k, len(b))
		}
		got, ok := decodeVIPKey(b)
		if !ok || got != k {
			t.Fatalf("%s: round trip gave %v %v", k, got, ok)
		}
	}
}

func TestPrefixElems(t *testing.T) {
	el := prefixElems([]netip.Prefix{pfx("192.168.50.7/25")})
	if len(el) != 2 || netip.AddrFrom4([4]byte(el[0].Key)) != a("192.168.50.0") ||
		netip.AddrFrom4([4]byte(el[1].Key)) != a("192.168.50.128") || !el[1].IntervalEnd {
		t.Fatalf("unexpected interval: %+v", el)
	}
}
