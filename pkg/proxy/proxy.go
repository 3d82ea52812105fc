// Package proxy defines the contract between miniproxy's sync loop and its
// dataplane backends (iptables, nftables, ipvs), and the settings they share.
package proxy

import (
	"context"
	"fmt"
	"net/netip"
	"os"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/netnsrun"
)

// Backend programs a model snapshot into the kernel.
type Backend interface {
	// Sync makes the kernel match snap. When full is false the backend may
	// send only what changed since its last successful Sync; when full is
	// true it must reconcile against what is really in the kernel (drift
	// repair) and rewrite everything that differs. A failed Sync must leave
	// the previously committed rules in place (apply is atomic).
	Sync(ctx context.Context, snap *model.Snapshot, full bool) (Result, error)
	// Cleanup removes everything this backend ever created, and nothing else.
	Cleanup(ctx context.Context) error
	// Close releases the backend's handles (netlink sockets, the namespace
	// file). It changes nothing in the kernel: rules stay in place when the
	// agent stops. The backend is not used after Close.
	Close() error
}

// Result describes one sync, for metrics and logs.
type Result struct {
	Full bool
	// Changed is how many service ports were (re)written.
	Changed int
	// Rules is a backend-defined size of what was sent (lines, netlink
	// messages, IPVS calls).
	Rules int
	// Drift is non-zero when a full sync found the kernel changed by
	// someone else and repaired it: the number of objects repaired, or 1
	// from a backend that rewrites everything without comparing.
	Drift int
	// TableRules counts rules per family and table, for kube-proxy's
	// kubeproxy_sync_proxy_rules_iptables_total / _last (iptables mode
	// only; nil otherwise).
	TableRules []TableRules
}

// TableRules is the number of rules in the chains a backend owns in one
// table of one family (Total) and how many of them the last sync wrote (Last).
type TableRules struct {
	Family      model.Family
	Table       string
	Total, Last int
}

// NetNS names a network namespace by the path of its namespace file
// (/run/netns/NAME, /proc/PID/ns/net). The zero value is the caller's own
// namespace, which is what the agent programs.
type NetNS string

// Own reports whether n is the caller's own namespace.
func (n NetNS) Own() bool { return n == "" }

// Open opens the namespace file, for sockets that must act inside it
// (netlink.Config.NetNS, nftables.WithNetNSFd) and for setns. A backend keeps
// the file open for its lifetime, so it reaches the same namespace even if
// the name is removed meanwhile, and closes it in Close. For the caller's own
// namespace Open returns nil, nil.
func (n NetNS) Open() (*os.File, error) {
	if n.Own() {
		return nil, nil
	}
	f, err := os.Open(string(n))
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", string(n), err)
	}
	return f, nil
}

// Do runs fn inside the namespace (on a thread switched into it; sockets fn
// creates stay there), or directly for the caller's own namespace.
func (n NetNS) Do(fn func() error) error {
	if n.Own() {
		return fn()
	}
	return netnsrun.Path(string(n), fn)
}

// LocalMode is --detect-local-mode.
type LocalMode string

// The local-traffic detectors miniproxy supports.
const (
	LocalModeClusterCIDR LocalMode = "ClusterCIDR"
	LocalModeNodeCIDR    LocalMode = "NodeCIDR"
	LocalModeNone        LocalMode = "None"
)

// Config holds the settings every backend honours. The zero value is usable
// (the caller's namespace, no local-traffic detector, NodePorts on every
// local address).
type Config struct {
	// NetNS is the network namespace to program. Every backend (and the
	// conntrack cleaner) takes it here, so tests and the lab point a backend
	// at a node namespace the same way whatever the mode.
	NetNS NetNS
	// Families lists the IP families to program. Empty means IPv4 only.
	Families []model.Family
	// ClusterCIDRs are --cluster-cidr (at most one per family).
	ClusterCIDRs []netip.Prefix
	// LocalMode selects how "traffic from a local pod" is recognised.
	LocalMode LocalMode
	// MasqueradeAll masquerades all traffic to service IPs (--masquerade-all).
	MasqueradeAll bool
	// MasqueradeBit is the fwmark bit used to flag packets for SNAT (kube-proxy's default is 14).
	MasqueradeBit int
	// NodePortAddresses restricts NodePorts to local addresses in these CIDRs.
	// Empty means every local address.
	NodePortAddresses []netip.Prefix
	// NodePortPrimary means --nodeport-addresses=primary: only the node's
	// addresses from its Node object.
	NodePortPrimary bool
	// LocalhostNodePorts allows NodePorts on 127.0.0.1 (iptables mode, IPv4).
	LocalhostNodePorts bool
}

// HasFamily reports whether f is programmed.
func (c *Config) HasFamily(f model.Family) bool {
	if len(c.Families) == 0 {
		return f == model.IPv4
	}
	for _, x := range c.Families {
		if x == f {
			return true
		}
	}
	return false
}

// LocalPrefixes returns the source prefixes that count as "from a local pod"
// for family f under the configured detector, or nil when there is no detector.
func (c *Config) LocalPrefixes(f model.Family, node model.Node) []netip.Prefix {
	var src []netip.Prefix
	switch c.LocalMode {
	case LocalModeClusterCIDR, "":
		src = c.ClusterCIDRs
	case LocalModeNodeCIDR:
		src = node.PodCIDRs
	}
	var out []netip.Prefix
	for _, p := range src {
		if model.FamilyOf(p.Addr()) == f {
			out = append(out, p)
		}
	}
	return out
}

// MarkMasq returns the fwmark value of the masquerade bit.
func (c *Config) MarkMasq() uint32 {
	bit := c.MasqueradeBit
	if bit == 0 {
		bit = 14
	}
	return 1 << uint(bit)
}

// Validate checks the settings before anything touches the kernel.
func (c *Config) Validate() error {
	if c.MasqueradeBit < 0 || c.MasqueradeBit > 31 {
		return fmt.Errorf("masquerade bit %d out of range [0,31]", c.MasqueradeBit)
	}
	switch c.LocalMode {
	case "", LocalModeClusterCIDR, LocalModeNodeCIDR, LocalModeNone:
	default:
		return fmt.Errorf("unsupported detect-local-mode %q (want ClusterCIDR, NodeCIDR or None)", c.LocalMode)
	}
	return nil
}
