// Package modeltest builds model values with readable fixed address
// conventions, shared by every backend's golden and tracer tests:
//
//	ClusterIPs      172.30.0.0/16, fd00:30::/64
//	pod endpoints   10.180.0.0/16 (node-a 10.180.0.0/24, node-b 10.180.1.0/24), fd00:180::/64
//	node addresses  192.168.0.2 (this node, "node-a"), 192.168.0.3 ("node-b")
//	external IPs    203.0.113.0/24, load-balancer IPs 198.51.100.0/24
package modeltest

import (
	"net/netip"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Node is the node the rules are rendered for.
var Node = model.Node{
	Name:      "node-a",
	Zone:      "zone-a",
	Addresses: []netip.Addr{netip.MustParseAddr("192.168.0.2")},
	PodCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.180.0.0/24")},
}

// ClusterCIDR is the cluster's pod range.
var ClusterCIDR = netip.MustParsePrefix("10.180.0.0/16")

// Ep returns a ready endpoint on node with the given port.
func Ep(ip string, port int32, node string) model.Endpoint {
	return model.Endpoint{IP: netip.MustParseAddr(ip), Port: port, Ready: true, Serving: true, NodeName: node, Zone: "zone-" + node[len(node)-1:]}
}

// Terminating returns a serving but terminating endpoint.
func Terminating(ip string, port int32, node string) model.Endpoint {
	e := Ep(ip, port, node)
	e.Ready, e.Terminating = false, true
	return e
}

// SP returns a TCP ClusterIP service port.
func SP(ns, name, port string, vip string, svcPort int32, eps ...model.Endpoint) *model.ServicePort {
	return &model.ServicePort{
		Name:       model.ServicePortName{Namespace: ns, Name: name, Port: port, Protocol: model.TCP},
		ClusterIPs: []netip.Addr{netip.MustParseAddr(vip)},
		Port:       svcPort,
		Protocol:   model.TCP,
		Endpoints:  eps,
	}
}

// Snap builds a snapshot of the given ports on Node.
func Snap(ports ...*model.ServicePort) *model.Snapshot {
	s := &model.Snapshot{Node: Node, Services: map[model.ServicePortName]*model.ServicePort{}}
	for _, p := range ports {
		s.Services[p.Name] = p
	}
	return s
}

// Addrs parses addresses.
func Addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, netip.MustParseAddr(x))
	}
	return out
}

// Prefixes parses prefixes.
func Prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}
