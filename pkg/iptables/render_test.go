package iptables

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

var update = flag.Bool("update", false, "rewrite golden files")

func cfg() proxy.Config {
	return proxy.Config{ClusterCIDRs: []netip.Prefix{mt.ClusterCIDR}, LocalMode: proxy.LocalModeClusterCIDR, LocalhostNodePorts: true}
}

func renderText(t *testing.T, c proxy.Config, fam model.Family, snap *model.Snapshot) string {
	t.Helper()
	r := &Renderer{Cfg: c, Family: fam}
	return renderFull(r, snap, r.RenderBase(snap.Node), nil, 0).final.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create)", err)
	}
	if string(want) != got {
		t.Errorf("%s differs from golden (go test ./pkg/iptables -update to accept):\n%s", name, lineDiff(string(want), got))
	}
}

func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	ws, gs := map[string]bool{}, map[string]bool{}
	for _, l := range w {
		ws[l] = true
	}
	for _, l := range g {
		gs[l] = true
	}
	for _, l := range w {
		if !gs[l] {
			b.WriteString("- " + l + "\n")
		}
	}
	for _, l := range g {
		if !ws[l] {
			b.WriteString("+ " + l + "\n")
		}
	}
	if b.Len() == 0 {
		return "(same lines, different order)"
	}
	return b.String()
}

func TestGolden(t *testing.T) {
	twoPorts := func() []*model.ServicePort {
		a := mt.SP("ns", "web", "http", "172.30.0.20", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
		b := mt.SP("ns", "web", "https", "172.30.0.20", 443, mt.Ep("10.180.0.5", 8443, "node-a"), mt.Ep("10.180.1.5", 8443, "node-b"))
		return []*model.ServicePort{a, b}
	}
	udp := mt.SP("ns", "dns", "dns", "172.30.0.10", 53, mt.Ep("10.180.0.9", 53, "node-a"))
	udp.Name.Protocol, udp.Protocol = model.UDP, model.UDP
	dnsTCP := mt.SP("ns", "dns", "dns-tcp", "172.30.0.10", 53, mt.Ep("10.180.0.9", 53, "node-a"))

	nodePort := mt.SP("ns", "np", "", "172.30.0.30", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	nodePort.NodePort = 30080
	nodePort.ExternalIPs = mt.Addrs("203.0.113.7")

	lb := mt.SP("ns", "lb", "", "172.30.0.40", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	lb.NodePort, lb.LoadBalancerIPs = 30040, mt.Addrs("198.51.100.4")
	lb.LoadBalancerSourceRanges = mt.Prefixes("203.0.113.0/25")

	// Source ranges listed, none readable: the LB IP must admit nobody.
	lbClosed := mt.SP("ns", "lb", "", "172.30.0.40", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	lbClosed.NodePort, lbClosed.LoadBalancerIPs, lbClosed.LoadBalancerSourceRangesInvalid = 30040, mt.Addrs("198.51.100.4"), true

	etpLocal := mt.SP("ns", "local", "", "172.30.0.50", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	etpLocal.NodePort, etpLocal.ExternalPolicyLocal, etpLocal.HealthCheckNodePort = 30050, true, 32000
	etpLocal.LoadBalancerIPs = mt.Addrs("198.51.100.5")

	etpNoLocal := mt.SP("ns", "remote-only", "", "172.30.0.51", 80, mt.Ep("10.180.1.5", 8080, "node-b"))
	etpNoLocal.NodePort, etpNoLocal.ExternalPolicyLocal = 30051, true

	itpLocal := mt.SP("ns", "itp", "", "172.30.0.60", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	itpLocal.InternalPolicyLocal = true

	affinity := mt.SP("ns", "sticky", "", "172.30.0.70", 80, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))
	affinity.AffinitySeconds = 10

	term := mt.SP("ns", "term", "", "172.30.0.80", 80, mt.Terminating("10.180.0.5", 8080, "node-a"), mt.Terminating("10.180.1.5", 8080, "node-b"))
	// Terminating and no longer serving: nothing usable, so REJECT (not DROP).
	termGone := mt.SP("ns", "term-gone", "", "172.30.0.82", 80, mt.Terminating("10.180.0.8", 8080, "node-a"), mt.Terminating("10.180.1.8", 8080, "node-b"))
	termGone.NodePort = 30082
	for i := range termGone.Endpoints {
		termGone.Endpoints[i].Serving = false
	}

	v6 := mt.SP("ns", "v6", "", "fd00:30::10", 80, model.Endpoint{IP: netip.MustParseAddr("fd00:180::5"), Port: 8080, Ready: true, Serving: true, NodeName: "node-a"})
	v6.NodePort = 30060

	cases := []struct {
		name  string
		fam   model.Family
		cfg   func(*proxy.Config)
		ports []*model.ServicePort
	}{
		{name: "clusterip-0-endpoints", ports: []*model.ServicePort{mt.SP("ns", "empty", "", "172.30.0.1", 80)}},
		{name: "clusterip-1-endpoint", ports: []*model.ServicePort{mt.SP("ns", "one", "", "172.30.0.2", 80, mt.Ep("10.180.0.5", 8080, "node-a"))}},
		{name: "clusterip-3-endpoints", ports: []*model.ServicePort{mt.SP("ns", "three", "", "172.30.0.3", 80,
			mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.0.6", 8080, "node-a"), mt.Ep("10.180.1.5", 8080, "node-b"))}},
		{name: "tcp-and-udp", ports: []*model.ServicePort{udp, dnsTCP}},
		{name: "two-ports", ports: twoPorts()},
		{name: "nodeport-externalip", ports: []*model.ServicePort{nodePort}},
		{name: "nodeport-addresses", ports: []*model.ServicePort{nodePort}, cfg: func(c *proxy.Config) {
			c.NodePortAddresses = mt.Prefixes("192.168.0.0/24")
		}},
		{name: "nodeport-primary", ports: []*model.ServicePort{nodePort}, cfg: func(c *proxy.Config) { c.NodePortPrimary = true }},
		{name: "loadbalancer-source-ranges", ports: []*model.ServicePort{lb}},
		{name: "loadbalancer-source-ranges-none-valid", ports: []*model.ServicePort{lbClosed}},
		{name: "etp-local", ports: []*model.ServicePort{etpLocal, etpNoLocal}},
		{name: "itp-local", ports: []*model.ServicePort{itpLocal}},
		{name: "affinity", ports: []*model.ServicePort{affinity}},
		{name: "terminating-fallback", ports: []*model.ServicePort{term}},
		{name: "terminating-not-serving", ports: []*model.ServicePort{termGone}},
		{name: "masquerade-all", ports: []*model.ServicePort{mt.SP("ns", "one", "", "172.30.0.2", 80, mt.Ep("10.180.0.5", 8080, "node-a"))},
			cfg: func(c *proxy.Config) { c.MasqueradeAll = true }},
		{name: "detect-local-nodecidr", ports: []*model.ServicePort{mt.SP("ns", "one", "", "172.30.0.2", 80, mt.Ep("10.180.0.5", 8080, "node-a"))},
			cfg: func(c *proxy.Config) { c.LocalMode = proxy.LocalModeNodeCIDR }},
		{name: "ipv6", fam: model.IPv6, ports: []*model.ServicePort{v6}, cfg: func(c *proxy.Config) {
			c.Families = []model.Family{model.IPv4, model.IPv6}
			c.ClusterCIDRs = append(c.ClusterCIDRs, netip.MustParsePrefix("fd00:180::/64"))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg()
			if tc.cfg != nil {
				tc.cfg(&c)
			}
			fam := tc.fam
			if fam == 0 {
				fam = model.IPv4
			}
			text := renderText(t, c, fam, mt.Snap(tc.ports...))
			golden(t, tc.name, text)
			r := &Renderer{Cfg: c, Family: fam}
			checkOwned(t, text, r.RenderBase(mt.Node).Hooks)
		})
	}
}

// checkOwned holds the renderer to the package doc's ownership list: every
// chain it declares or writes into, and every chain a hook or rule jumps to,
// is one miniproxy owns (or a built-in target).
func checkOwned(t *testing.T, text string, hooks []Hook) {
	t.Helper()
	table := Table("")
	targets := map[string]bool{"ACCEPT": true, "DROP": true, "RETURN": true, "REJECT": true, "DNAT": true, "MARK": true, "MASQUERADE": true}
	jump := func(where string, f []string) {
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && !targets[f[i+1]] && !ownedChain(table, f[i+1]) {
				t.Errorf("%s jumps to %s/%s, which miniproxy does not own", where, table, f[i+1])
			}
		}
	}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0 || line == "COMMIT":
		case strings.HasPrefix(line, "*"):
			table = Table(line[1:])
		case strings.HasPrefix(line, ":"):
			if name := f[0][1:]; !ownedChain(table, name) {
				t.Errorf("declares (flushes) %s/%s, which miniproxy does not own", table, name)
			}
		case f[0] == "-A" || f[0] == "-D" || f[0] == "-X":
			if !ownedChain(table, f[1]) {
				t.Errorf("%s in %s/%s, which miniproxy does not own: %s", f[0], table, f[1], line)
			}
			jump(line, f)
		default:
			t.Errorf("unexpected line %q", line)
		}
	}
	for _, h := range hooks {
		table = h.Table
		jump(fmt.Sprintf("hook %s/%s", h.Table, h.Chain), h.Args)
	}
}

// TestOwnedChain: the ownership list, including the chains other software
// keeps under similar names, which miniproxy must never flush or delete.
func TestOwnedChain(t *testing.T) {
	for _, tc := range []struct {
		table Table
		name  string
		want  bool
	}{
		{NAT, "KUBE-SERVICES", true}, {Filter, "KUBE-SERVICES", true},
		{NAT, "KUBE-SVC-ABC", true}, {NAT, "KUBE-SEP-ABC", true}, {NAT, "KUBE-EXT-ABC", true},
		{NAT, "KUBE-FW-ABC", true}, {NAT, "KUBE-SVL-ABC", true},
		{NAT, "KUBE-NODEPORTS-DISPATCH", true}, {NAT, "KUBE-MARK-MASQ", true}, {NAT, "KUBE-POSTROUTING", true},
		{Filter, "KUBE-PROXY-FIREWALL", true}, {Filter, "KUBE-EXTERNAL-SERVICES", true}, {Filter, "KUBE-NODEPORTS", true},
		{Filter, ChainLocalnetGuard, true},
		// Per-Service chains live in nat only.
		{Filter, "KUBE-SVC-ABC", false}, {Filter, "KUBE-MARK-MASQ", false},
		// Others': kubelet, kube-proxy, Docker, CNIs.
		{Filter, "KUBE-FIREWALL", false}, {NAT, "KUBE-FIREWALL", false},
		{Filter, "KUBE-KUBELET-CANARY", false}, {NAT, "KUBE-KUBELET-CANARY", false}, {NAT, "KUBE-PROXY-CANARY", false},
		{Filter, "KUBE-FORWARD", false}, {NAT, "KUBE-MARK-DROP", false}, {NAT, "KUBE-LOAD-BALANCER", false},
		{Filter, "DOCKER", false}, {Filter, "DOCKER-USER", false}, {NAT, "CNI-0123", false}, {Filter, "INPUT", false},
		{Table("mangle"), "KUBE-SERVICES", false},
	} {
		if got := ownedChain(tc.table, tc.name); got != tc.want {
			t.Errorf("ownedChain(%s, %s) = %v, want %v", tc.table, tc.name, got, tc.want)
		}
	}
}

// TestLocalnetRecord: the guard carries the route_localnet record only when
// miniproxy turned route_localnet on, and stays owned either way.
func TestLocalnetRecord(t *testing.T) {
	for _, set := range []bool{false, true} {
		r := &Renderer{Cfg: cfg(), Family: model.IPv4, RouteLocalnetSet: set}
		base := r.RenderBase(mt.Node)
		text := renderFull(r, mt.Snap(), base, nil, 0).final.String()
		checkOwned(t, text, base.Hooks)
		if got := strings.Contains(text, `-A MINIPROXY-LOCALNET -m comment --comment "`+localnetRecord+`"`); got != set {
			t.Errorf("RouteLocalnetSet=%v: record in the guard %v:\n%s", set, got, text)
		}
	}
}

// TestProbabilities checks the statistic cascade gives every endpoint 1/n.
func TestProbabilities(t *testing.T) {
	for n := 1; n <= 12; n++ {
		var eps []model.Endpoint
		for i := 0; i < n; i++ {
			eps = append(eps, mt.Ep(netip.AddrFrom4([4]byte{10, 180, 0, byte(10 + i)}).String(), 80, "node-a"))
		}
		sp := mt.SP("ns", "s", "", "172.30.0.9", 80, eps...)
		r := &Renderer{Cfg: cfg(), Family: model.IPv4}
		sr := r.RenderService(sp, mt.Node)
		var probs []float64
		for _, c := range sr.Chains {
			if !strings.HasPrefix(c.Name, "KUBE-SVC-") {
				continue
			}
			for _, rule := range c.Rules {
				if !strings.Contains(rule, "KUBE-SEP-") {
					continue
				}
				p := 1.0
				if i := strings.Index(rule, "--probability "); i >= 0 {
					if _, err := fmt.Sscan(rule[i+len("--probability "):], &p); err != nil {
						t.Fatal(err)
					}
				}
				probs = append(probs, p)
			}
		}
		if len(probs) != n {
			t.Fatalf("n=%d: %d endpoint rules", n, len(probs))
		}
		remaining := 1.0
		for i, p := range probs {
			share := remaining * p
			remaining -= share
			if d := share - 1/float64(n); d > 1e-9 || d < -1e-9 {
				t.Errorf("n=%d endpoint %d share %.6f, want %.6f", n, i, share, 1/float64(n))
			}
		}
	}
}
