// Package model is miniproxy's backend-neutral view of the cluster: an immutable
// snapshot of service ports and their endpoints, plus the one place that decides
// which endpoints are eligible for which traffic on this node.
//
// Everything here is plain data. Nothing talks to the apiserver or the kernel, so
// every backend renders from the same answers and the modes cannot drift apart.
//
// Frontends are owned by one service port each. A frontend is what a backend
// dispatches on (address . protocol . port, or protocol . NodePort). Two
// Services may list the same externalIP or load-balancer IP on the same port
// and protocol, or one Service may list another's ClusterIP; rendered as is,
// that is two map elements with one key, which the kernel refuses for the
// whole nftables batch, and "the first rule wins" in iptables and IPVS. The
// Frontends index decides, before any backend renders: a ClusterIP always
// wins, otherwise the older Service (creationTimestamp), ties by namespace,
// name, port name. The loser's port is copied without the lost address and
// keeps everything else; the conflicts come back as data for the caller to
// report. A Snapshot built by pkg/watch therefore never holds a frontend twice.
package model

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"
)

// Protocol is an L4 protocol a Service port can use.
type Protocol string

// The protocols kube-proxy supports.
const (
	TCP  Protocol = "TCP"
	UDP  Protocol = "UDP"
	SCTP Protocol = "SCTP"
)

// Lower returns the protocol as iptables and nft spell it.
func (p Protocol) Lower() string { return strings.ToLower(string(p)) }

// Family is an IP family.
type Family int

// The two IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// FamilyOf returns the family of an address.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() || a.Is4In6() {
		return IPv4
	}
	return IPv6
}

// ServicePortName identifies one port of one Service. It is the key of the model.
type ServicePortName struct {
	Namespace string
	Name      string
	Port      string // the port's name; empty for single-port Services
	Protocol  Protocol
}

// String renders the name the way kube-proxy logs and comments it:
// namespace/name:port (protocol is appended because one port name can carry TCP and UDP).
func (n ServicePortName) String() string {
	return fmt.Sprintf("%s/%s:%s/%s", n.Namespace, n.Name, n.Port, n.Protocol)
}

// Less orders names for deterministic rendering.
func (n ServicePortName) Less(o ServicePortName) bool {
	if n.Namespace != o.Namespace {
		return n.Namespace < o.Namespace
	}
	if n.Name != o.Name {
		return n.Name < o.Name
	}
	if n.Port != o.Port {
		return n.Port < o.Port
	}
	return n.Protocol < o.Protocol
}

// Endpoint is one backend address of a service port.
type Endpoint struct {
	IP          netip.Addr
	Port        int32
	Ready       bool
	Serving     bool
	Terminating bool
	NodeName    string
	Zone        string
	// ZoneHints are the zones the EndpointSlice controller asked this endpoint to
	// serve (topology-aware routing). Empty means no hint.
	ZoneHints []string
}

// AddrPort returns ip:port.
func (e Endpoint) AddrPort() netip.AddrPort { return netip.AddrPortFrom(e.IP, uint16(e.Port)) }

// String returns ip:port.
func (e Endpoint) String() string { return e.AddrPort().String() }

// ServicePort is one port of one Service with everything a backend needs to
// program it. Values are never mutated after they are put in a Snapshot.
type ServicePort struct {
	Name ServicePortName
	// ClusterIPs holds at most one address per family.
	ClusterIPs []netip.Addr
	Port       int32
	Protocol   Protocol
	NodePort   int32
	// ExternalIPs are spec.externalIPs; LoadBalancerIPs are status ingress IPs
	// whose ipMode is VIP (or unset). Ingress with ipMode Proxy is left to the
	// load balancer and is not programmed, as kube-proxy does.
	ExternalIPs              []netip.Addr
	LoadBalancerIPs          []netip.Addr
	LoadBalancerSourceRanges []netip.Prefix
	// LoadBalancerSourceRangesInvalid is set when the Service lists source
	// ranges but none of them could be read: the load-balancer IPs then
	// admit no source at all (fail closed), where an empty list admits all.
	LoadBalancerSourceRangesInvalid bool
	// ExternalPolicyLocal is externalTrafficPolicy: Local (only meaningful for
	// NodePort / LoadBalancer / externalIPs traffic).
	ExternalPolicyLocal bool
	// InternalPolicyLocal is internalTrafficPolicy: Local.
	InternalPolicyLocal bool
	HealthCheckNodePort int32
	// AffinitySeconds > 0 means sessionAffinity: ClientIP with that timeout.
	AffinitySeconds int32
	// PreferClose is trafficDistribution: PreferClose (or PreferSameZone).
	PreferClose bool
	// Endpoints are sorted by IP then port and deduplicated.
	Endpoints []Endpoint
	// Created is the Service's creationTimestamp: when two Services claim
	// one frontend, the older one wins (see Frontends).
	Created time.Time
}

// HasExternal reports whether the port receives traffic from outside the
// cluster (NodePort, externalIPs or load-balancer IPs).
func (sp *ServicePort) HasExternal() bool {
	return sp.NodePort != 0 || len(sp.ExternalIPs) > 0 || len(sp.LoadBalancerIPs) > 0
}

// RestrictsSources reports whether load-balancer traffic is limited to
// LoadBalancerSourceRanges (which may hold nothing of a family, or nothing
// at all: then that traffic is dropped). Every backend decides on this, not
// on the length of the list.
func (sp *ServicePort) RestrictsSources() bool {
	return len(sp.LoadBalancerSourceRanges) > 0 || sp.LoadBalancerSourceRangesInvalid
}

// ClusterIP returns the cluster IP of the given family, if any.
func (sp *ServicePort) ClusterIP(f Family) (netip.Addr, bool) {
	for _, ip := range sp.ClusterIPs {
		if FamilyOf(ip) == f {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// Node is what the model needs to know about the node miniproxy runs on.
type Node struct {
	Name string
	Zone string
	// Addresses are the node's IPs, used for NodePort when
	// --nodeport-addresses is "primary" and for the local-traffic detector.
	Addresses []netip.Addr
	// PodCIDRs is spec.podCIDRs, used by --detect-local-mode=NodeCIDR.
	PodCIDRs []netip.Prefix
}

// Snapshot is an immutable view of every service port programmed on this node.
type Snapshot struct {
	Node Node
	// Services maps every port to its data. Unchanged entries are shared
	// (same pointer) between consecutive snapshots, so a backend can find
	// what changed with a pointer comparison.
	Services map[ServicePortName]*ServicePort
	// Generation increases with every snapshot built.
	Generation uint64
}

// Sorted returns the service ports in a stable order.
func (s *Snapshot) Sorted() []*ServicePort {
	out := make([]*ServicePort, 0, len(s.Services))
	for _, sp := range s.Services {
		out = append(out, sp)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name.Less(out[j].Name) })
	return out
}

// Diff returns the names whose ServicePort differs (added, changed or removed)
// between prev and s. prev may be nil, in which case every name is returned.
func (s *Snapshot) Diff(prev *Snapshot) []ServicePortName {
	var out []ServicePortName
	if prev == nil {
		for n := range s.Services {
			out = append(out, n)
		}
	} else {
		for n, sp := range s.Services {
			if prev.Services[n] != sp {
				out = append(out, n)
			}
		}
		for n := range prev.Services {
			if _, ok := s.Services[n]; !ok {
				out = append(out, n)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}

// ShortHash returns a stable 16-character hash of the given parts, in the style
// of kube-proxy's chain names (base32 of a SHA-256, upper case).
func ShortHash(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return base32.StdEncoding.EncodeToString(h[:])[:16]
}
