package framework

// IPv6 for the namespace cluster, added per node on demand: the IPv6 twins of
// the IPv4 address plan (underlay fd00:250::/64, pods fd00:244:<node>::/64,
// services fd00:96::/112). Only nodes and pods a test enables get IPv6, so
// the IPv4-only nodes and their miniproxy (started with an IPv4
// --cluster-cidr) are unchanged.

import (
	"context"
	"fmt"
	"net/netip"
)

// IPv6 address plan.
const (
	ServiceCIDRv6    = "fd00:96::/112"
	ClusterCIDRv6    = "fd00:244::/48"
	UnderlayPrefixV6 = "fd00:250::/64"
)

// IPv6 is the node's IPv6 underlay address.
func (n *Node) IPv6() netip.Addr {
	b := netip.MustParseAddr("fd00:250::").As16()
	b[15] = byte(10 + n.Index)
	return netip.AddrFrom16(b)
}

// PodCIDRv6 is the node's IPv6 pod prefix.
func (n *Node) PodCIDRv6() netip.Prefix {
	b := netip.MustParseAddr("fd00:244::").As16()
	b[4], b[5] = byte(n.Index>>8), byte(n.Index)
	return netip.PrefixFrom(netip.AddrFrom16(b), 64)
}

// EnableIPv6 gives the node an IPv6 underlay address, the first address of
// its IPv6 pod prefix on the pod bridge, IPv6 forwarding (inside the node
// namespace only) and a route for the IPv6 service range, so host processes
// can reach IPv6 VIPs. Addresses skip DAD so they are usable at once.
func (n *Node) EnableIPv6(ctx context.Context) error {
	gw := n.PodCIDRv6().Addr().Next()
	return n.NS.RunAll(ctx,
		[]string{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
		[]string{"ip", "-6", "addr", "add", netip.PrefixFrom(n.IPv6(), 64).String(), "dev", "eth0", "nodad"},
		[]string{"ip", "-6", "addr", "add", netip.PrefixFrom(gw, 64).String(), "dev", "cbr0", "nodad"},
		[]string{"ip", "-6", "route", "add", ServiceCIDRv6, "dev", "eth0", "src", n.IPv6().String()},
	)
}

// EnableIPv6 gives the pod an IPv6 address in its node's IPv6 pod prefix
// (same host part as its IPv4 address) and a default route via the bridge.
// The node must have EnableIPv6 first. A podserver already listening on
// the wildcard address answers on the new address too.
func (p *Pod) EnableIPv6(ctx context.Context) (netip.Addr, error) {
	b := p.Node.PodCIDRv6().Addr().As16()
	b[15] = p.IP.As4()[3]
	ip := netip.AddrFrom16(b)
	gw := p.Node.PodCIDRv6().Addr().Next()
	if err := p.NS.RunAll(ctx,
		[]string{"ip", "-6", "addr", "add", netip.PrefixFrom(ip, 64).String(), "dev", "eth0", "nodad"},
		[]string{"ip", "-6", "route", "add", "default", "via", gw.String()},
	); err != nil {
		return netip.Addr{}, fmt.Errorf("pod %s: IPv6: %w", p.Name, err)
	}
	return ip, nil
}
