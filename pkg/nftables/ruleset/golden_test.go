package ruleset_test

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func detector() proxy.Config {
	return proxy.Config{ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16")}}
}

func eps(list ...model.Endpoint) []model.Endpoint { return list }

func TestGolden(t *testing.T) {
	ep := fixture.EP
	cases := []struct {
		name string
		cfg  proxy.Config
		sps  func() []*model.ServicePort
		// static includes the static chains and maps in the golden.
		static bool
		// shards > 1 renders the sharded layout.
		shards int
	}{
		{name: "sharded-2-rich", cfg: detector(), static: true, shards: 2,
			sps: func() []*model.ServicePort {
				var out []*model.ServicePort
				for _, sp := range fixture.Rich().Services {
					out = append(out, sp)
				}
				return out
			}},
		{name: "static-default", cfg: proxy.Config{}, static: true,
			sps: func() []*model.ServicePort { return nil }},
		{name: "static-nodeport-cidrs-masqall", static: true,
			cfg: proxy.Config{MasqueradeAll: true, MasqueradeBit: 5,
				NodePortAddresses: []netip.Prefix{netip.MustParsePrefix("192.168.0.0/24")}},
			sps: func() []*model.ServicePort { return nil }},
		{name: "static-nodeport-primary", static: true, cfg: proxy.Config{NodePortPrimary: true},
			sps: func() []*model.ServicePort { return nil }},
		{name: "clusterip-0-endpoints", cfg: detector(), sps: func() []*model.ServicePort {
			return []*model.ServicePort{fixture.SP("ns1", "none", 80, "172.30.0.10")}
		}},
		{name: "clusterip-1-endpoint", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns1", "one", 80, "172.30.0.11")
			sp.Endpoints = eps(ep("10.180.0.5", 8080, "node-a"))
			return []*model.ServicePort{sp}
		}},
		{name: "clusterip-3-endpoints", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns1", "three", 80, "172.30.0.12")
			sp.Endpoints = eps(ep("10.180.0.1", 80, "node-a"), ep("10.180.1.1", 80, "node-b"), ep("10.180.2.1", 80, "node-c"))
			return []*model.ServicePort{sp}
		}},
		{name: "tcp-udp-two-ports", cfg: detector(), sps: func() []*model.ServicePort {
			tcp := fixture.SP("kube-system", "dns", 53, "172.30.0.53")
			tcp.Name.Port = "dns-tcp"
			tcp.Endpoints = eps(ep("10.180.0.53", 53, "node-a"))
			udp := fixture.SP("kube-system", "dns", 53, "172.30.0.53")
			udp.Name.Port, udp.Name.Protocol, udp.Protocol = "dns", model.UDP, model.UDP
			udp.Endpoints = tcp.Endpoints
			metrics := fixture.SP("kube-system", "dns", 9153, "172.30.0.53")
			metrics.Name.Port = "metrics"
			metrics.Endpoints = eps(ep("10.180.0.53", 9153, "node-a"))
			return []*model.ServicePort{tcp, udp, metrics}
		}},
		{name: "nodeport-externalip", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns2", "web", 80, "172.30.0.20")
			sp.NodePort = 30080
			sp.ExternalIPs = []netip.Addr{fixture.A("203.0.113.7")}
			sp.Endpoints = eps(ep("10.180.0.20", 8080, "node-a"), ep("10.180.1.20", 8080, "node-b"))
			return []*model.ServicePort{sp}
		}},
		{name: "nodeport-no-endpoints", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns2", "web", 80, "172.30.0.20")
			sp.NodePort = 30080
			sp.ExternalIPs = []netip.Addr{fixture.A("203.0.113.7")}
			return []*model.ServicePort{sp}
		}},
		{name: "loadbalancer-source-ranges", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns3", "lb", 443, "172.30.0.30")
			sp.NodePort = 31443
			sp.LoadBalancerIPs = []netip.Addr{fixture.A("198.51.100.1")}
			sp.LoadBalancerSourceRanges = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("192.0.2.0/25")}
			sp.Endpoints = eps(ep("10.180.1.30", 443, "node-b"))
			return []*model.ServicePort{sp}
		}},
		{name: "loadbalancer-source-ranges-none-valid", cfg: detector(), sps: func() []*model.ServicePort {
			// Source ranges listed, none readable: the LB IP admits nobody.
			sp := fixture.SP("ns3", "lb", 443, "172.30.0.30")
			sp.NodePort = 31443
			sp.LoadBalancerIPs = []netip.Addr{fixture.A("198.51.100.1")}
			sp.LoadBalancerSourceRangesInvalid = true
			sp.Endpoints = eps(ep("10.180.1.30", 443, "node-b"))
			return []*model.ServicePort{sp}
		}},
		{name: "etp-local", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns3", "etp", 80, "172.30.0.31")
			sp.NodePort = 31080
			sp.LoadBalancerIPs = []netip.Addr{fixture.A("198.51.100.2")}
			sp.ExternalPolicyLocal = true
			sp.Endpoints = eps(ep("10.180.0.31", 80, "node-a"), ep("10.180.1.31", 80, "node-b"))
			none := fixture.SP("ns3", "etp-nolocal", 80, "172.30.0.32")
			none.NodePort = 31081
			none.ExternalPolicyLocal = true
			none.Endpoints = eps(ep("10.180.1.32", 80, "node-b"))
			return []*model.ServicePort{sp, none}
		}},
		{name: "itp-local", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns4", "itp", 80, "172.30.0.40")
			sp.InternalPolicyLocal = true
			sp.Endpoints = eps(ep("10.180.0.40", 80, "node-a"), ep("10.180.1.40", 80, "node-b"))
			none := fixture.SP("ns4", "itp-nolocal", 80, "172.30.0.41")
			none.InternalPolicyLocal = true
			none.Endpoints = eps(ep("10.180.1.41", 80, "node-b"))
			both := fixture.SP("ns4", "itp-etp", 80, "172.30.0.42")
			both.InternalPolicyLocal, both.ExternalPolicyLocal, both.NodePort = true, true, 31082
			both.Endpoints = eps(ep("10.180.0.42", 80, "node-a"), ep("10.180.1.42", 80, "node-b"))
			return []*model.ServicePort{sp, none, both}
		}},
		{name: "affinity", cfg: detector(), sps: func() []*model.ServicePort {
			sp := fixture.SP("ns5", "sticky", 80, "172.30.0.50")
			sp.AffinitySeconds = 60
			sp.Endpoints = eps(ep("10.180.0.50", 80, "node-a"), ep("10.180.1.50", 80, "node-b"))
			return []*model.ServicePort{sp}
		}},
		{name: "no-detector", cfg: proxy.Config{LocalMode: proxy.LocalModeNone}, sps: func() []*model.ServicePort {
			sp := fixture.SP("ns1", "one", 80, "172.30.0.11")
			sp.Endpoints = eps(ep("10.180.0.5", 8080, "node-a"))
			return []*model.ServicePort{sp}
		}},
		{name: "masquerade-all", cfg: proxy.Config{MasqueradeAll: true}, sps: func() []*model.ServicePort {
			sp := fixture.SP("ns1", "one", 80, "172.30.0.11")
			sp.Endpoints = eps(ep("10.180.0.5", 8080, "node-a"))
			return []*model.ServicePort{sp}
		}},
		{name: "nodecidr-detector", cfg: proxy.Config{LocalMode: proxy.LocalModeNodeCIDR}, sps: func() []*model.ServicePort {
			sp := fixture.SP("ns1", "one", 80, "172.30.0.11")
			sp.Endpoints = eps(ep("10.180.0.5", 8080, "node-a"))
			return []*model.ServicePort{sp}
		}},
		{name: "ipv6-dual-stack",
			cfg: proxy.Config{Families: []model.Family{model.IPv4, model.IPv6},
				ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16"), netip.MustParsePrefix("fd00:180::/64")}},
			sps: func() []*model.ServicePort {
				dual := fixture.SP("ns6", "dual", 80, "172.30.0.60", "fd00:30::60")
				dual.NodePort = 30060
				dual.Endpoints = eps(ep("10.180.0.60", 80, "node-a"), ep("fd00:180::60", 80, "node-a"), ep("fd00:180::1:60", 80, "node-b"))
				v6 := fixture.SP("ns6", "v6only", 80, "fd00:30::61")
				v6.Endpoints = eps(ep("fd00:180::61", 80, "node-a"))
				return []*model.ServicePort{dual, v6}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rs := ruleset.RenderSharded(fixture.Snap(tc.sps()...), &tc.cfg, nil, max(tc.shards, 1))
			got := rs.DumpServices()
			if tc.static {
				got = rs.Dump()
			}
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if d := cmp.Diff(string(want), got); d != "" {
				t.Errorf("%s differs (-want +got):\n%s", path, d)
			}
		})
	}
}

// TestIncrementalRenderReuses checks that an unchanged *ServicePort keeps its
// rendered objects (same pointer) and a changed one gets new ones.
func TestIncrementalRenderReuses(t *testing.T) {
	cfg := detector()
	snap := fixture.Rich()
	prev := ruleset.Render(snap, &cfg, nil)
	next := fixture.Snap()
	var changed model.ServicePortName
	for n, sp := range snap.Services {
		next.Services[n] = sp
		if n.Name == "three" {
			cp := *sp
			cp.Endpoints = cp.Endpoints[:2]
			next.Services[n] = &cp
			changed = n
		}
	}
	cur := ruleset.Render(next, &cfg, prev)
	for n := range next.Services {
		same := cur.Tables[0].Services[n] == prev.Tables[0].Services[n]
		if same == (n == changed) {
			t.Errorf("%v: reused=%v, want %v", n, same, n != changed)
		}
	}
	if strings.Contains(cur.Dump(), "10.180.2.1") {
		t.Errorf("removed endpoint still rendered")
	}
}

// TestShardedRenderSplitsAndReuses: every service port's dispatch lives in
// exactly one shard table, its main-table share (no-endpoint, firewall) in
// the main one; an unchanged port keeps both shares' pointers.
func TestShardedRenderSplitsAndReuses(t *testing.T) {
	cfg := detector()
	snap := fixture.Rich()
	prev := ruleset.RenderSharded(snap, &cfg, nil, 4)
	if got := len(prev.Tables); got != 5 {
		t.Fatalf("4 shards: %d tables, want main + 4", got)
	}
	main := prev.Tables[0]
	if main.Name != ruleset.TableName {
		t.Fatalf("first table %q, want the main one", main.Name)
	}
	used := map[string]bool{}
	for n := range snap.Services {
		in := 0
		for _, tb := range prev.Tables[1:] {
			so := tb.Services[n]
			if so == nil {
				continue
			}
			in++
			used[tb.Name] = true
			for _, e := range so.Elements {
				if e.Map == ruleset.MapNoEndpointIPs || e.Map == ruleset.MapFirewallIPs {
					t.Errorf("%v: element of main-only map %s in shard %s", n, e.Map, tb.Name)
				}
			}
		}
		if in > 1 {
			t.Errorf("%v is in %d shards", n, in)
		}
	}
	if len(used) < 2 {
		t.Errorf("the fixture's Services all landed in one shard (%v); the split is untested", used)
	}
	for _, tb := range prev.Tables[1:] {
		for _, c := range tb.Chains {
			if c.Name == ruleset.ChainNatPostrouting || c.Name == ruleset.ChainFilterInput {
				t.Errorf("shard %s carries main-table chain %s", tb.Name, c.Name)
			}
		}
	}
	for _, c := range main.Chains {
		if c.Name == ruleset.ChainNatPrerouting || c.Name == ruleset.ChainServices {
			t.Errorf("sharded main table still dispatches Services (%s)", c.Name)
		}
	}
	cur := ruleset.RenderSharded(snap, &cfg, prev, 4)
	for i, tb := range cur.Tables {
		for n, so := range tb.Services {
			if prev.Tables[i].Services[n] != so {
				t.Errorf("%s %v: unchanged Service re-rendered", tb.Name, n)
			}
		}
	}
}
