package trace_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset/trace"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// verdictString renders a verdict compactly: "10.0.0.1:80+masq 10.0.0.2:80 REJECT".
func verdictString(v trace.Verdict) string {
	var parts []string
	for _, t := range v.Endpoints {
		s := t.Endpoint.String()
		if t.Masquerade {
			s += "+masq"
		}
		parts = append(parts, s)
	}
	if v.Reject {
		parts = append(parts, "REJECT")
	}
	if v.Drop {
		parts = append(parts, "DROP")
	}
	if v.Accept {
		parts = append(parts, "ACCEPT")
	}
	return strings.Join(parts, " ")
}

// TestTraceBehaviour is the behaviour table for the rich fixture, checked
// against the rendered ruleset through the tracer.
func TestTraceBehaviour(t *testing.T) {
	cfg := proxy.Config{
		Families:     []model.Family{model.IPv4, model.IPv6},
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16"), netip.MustParsePrefix("fd00:180::/64")},
	}
	rs := ruleset.Render(fixture.Rich(), &cfg, nil)
	local := fixture.Node.Addresses
	const (
		pod      = "10.180.0.99"
		outside  = "203.0.113.50"
		node     = "192.168.0.2"
		stranger = "8.8.8.8"
	)
	cases := []struct {
		src, dst string
		proto    model.Protocol
		port     uint16
		fromNode bool
		want     string
	}{
		// ClusterIP: pods keep their source, others are masqueraded.
		{src: pod, dst: "172.30.0.12", port: 80, want: "10.180.0.1:80 10.180.1.1:80 10.180.2.1:80"},
		{src: outside, dst: "172.30.0.12", port: 80, want: "10.180.0.1:80+masq 10.180.1.1:80+masq 10.180.2.1:80+masq"},
		{src: node, dst: "172.30.0.12", port: 80, fromNode: true, want: "10.180.0.1:80+masq 10.180.1.1:80+masq 10.180.2.1:80+masq"},
		{src: pod, dst: "172.30.0.11", port: 80, want: "10.180.0.5:8080"},
		// Hairpin.
		{src: "10.180.0.5", dst: "172.30.0.11", port: 80, want: "10.180.0.5:8080+masq"},
		// No endpoints: reject; unknown port: untouched.
		{src: pod, dst: "172.30.0.10", port: 80, want: "REJECT"},
		{src: pod, dst: "172.30.0.10", port: 80, fromNode: true, want: "REJECT"},
		{src: pod, dst: "172.30.0.11", port: 81, want: "ACCEPT"},
		// TCP and UDP on one port.
		{src: pod, dst: "172.30.0.53", proto: model.UDP, port: 53, want: "10.180.0.53:53 10.180.1.53:53"},
		{src: pod, dst: "172.30.0.53", port: 53, want: "10.180.0.53:53 10.180.1.53:53"},
		{src: pod, dst: "172.30.0.53", proto: model.SCTP, port: 53, want: "ACCEPT"},
		// Two ports of one service.
		{src: pod, dst: "172.30.0.20", port: 443, want: "10.180.0.20:8443 10.180.1.20:8443"},
		// NodePort and externalIP (ETP Cluster): masqueraded.
		{src: outside, dst: node, port: 30080, want: "10.180.0.20:8080+masq 10.180.1.20:8080+masq"},
		{src: outside, dst: "203.0.113.7", port: 80, want: "10.180.0.20:8080+masq 10.180.1.20:8080+masq"},
		{src: outside, dst: "127.0.0.1", port: 30080, fromNode: true, want: "ACCEPT"},
		// LB source ranges: allowed, then refused.
		{src: outside, dst: "198.51.100.1", port: 443, want: "10.180.1.30:443+masq"},
		{src: stranger, dst: "198.51.100.1", port: 443, want: "DROP"},
		{src: stranger, dst: node, port: 31443, want: "10.180.1.30:443+masq"}, // ranges are for LB IPs only
		// ETP Local: outside → local endpoint, source kept; pods and the
		// node → every endpoint.
		{src: outside, dst: "198.51.100.2", port: 80, want: "10.180.0.31:80"},
		{src: outside, dst: node, port: 31080, want: "10.180.0.31:80"},
		{src: pod, dst: "198.51.100.2", port: 80, want: "10.180.0.31:80 10.180.1.31:80"},
		{src: node, dst: "198.51.100.2", port: 80, fromNode: true, want: "10.180.0.31:80+masq 10.180.1.31:80+masq"},
		{src: outside, dst: node, port: 31081, want: "DROP"},
		{src: pod, dst: "172.30.0.32", port: 80, want: "10.180.1.32:80"},
		// ITP Local.
		{src: pod, dst: "172.30.0.40", port: 80, want: "10.180.0.40:80"},
		{src: pod, dst: "172.30.0.41", port: 80, want: "DROP"},
		// Affinity (first connection: any endpoint).
		{src: pod, dst: "172.30.0.50", port: 80, want: "10.180.0.50:80 10.180.1.50:80"},
		// Dual stack.
		{src: "fd00:180::99", dst: "fd00:30::60", port: 80, want: "[fd00:180::60]:80 [fd00:180::1:60]:80"},
		{src: "fd00:99::1", dst: "fd00:30::60", port: 80, want: "[fd00:180::60]:80+masq [fd00:180::1:60]:80+masq"},
		{src: pod, dst: "172.30.0.60", port: 80, want: "10.180.0.60:80"},
	}
	for _, tc := range cases {
		proto := tc.proto
		if proto == "" {
			proto = model.TCP
		}
		name := fmt.Sprintf("%s->%s:%d/%s", tc.src, tc.dst, tc.port, proto)
		t.Run(name, func(t *testing.T) {
			v := trace.Trace(rs, trace.Packet{Src: fixture.A(tc.src), Dst: fixture.A(tc.dst), Proto: proto,
				Port: tc.port, LocalOrigin: tc.fromNode, LocalAddrs: local})
			if len(v.Problems) > 0 {
				t.Errorf("tracer problems: %v", v.Problems)
			}
			if got := verdictString(v); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}
