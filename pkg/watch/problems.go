package watch

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Reasons classify what the conversion left out or worked around. They are
// the values of the reason label of miniproxy_ignored_objects_total, so the
// set is closed and small.
const (
	// ReasonMalformedService: the whole Service was skipped (a cluster IP
	// that does not parse).
	ReasonMalformedService = "malformed-service"
	// ReasonInvalidField: one field or endpoint was dropped (an address,
	// port or protocol that does not parse or is not supported).
	ReasonInvalidField = "invalid-field"
	// ReasonSourceRange: a loadBalancerSourceRanges entry does not parse; it
	// admits nobody (and if none parses, the load balancer admits nobody).
	ReasonSourceRange = "invalid-source-range"
	// ReasonFamilyMismatch: a slice or endpoint of an IP family the Service
	// has no cluster IP of (an IPv6 slice of an IPv4-only Service).
	ReasonFamilyMismatch = "family-mismatch"
	// ReasonAddressType: a slice whose addressType is not IPv4 or IPv6 (FQDN).
	ReasonAddressType = "unsupported-address-type"
	// ReasonDuplicateEndpoint: an address listed in more than one slice of
	// the Service; one copy is kept (ready before serving before neither).
	ReasonDuplicateEndpoint = "duplicate-endpoint"
	// ReasonUnmatchedPort: a slice port (name, protocol) that no port of the
	// Service has, so its endpoints serve nothing through it.
	ReasonUnmatchedPort = "unmatched-slice-port"
	// ReasonTopologyHints: endpoints carry zone hints but none for this
	// node's zone (or only some endpoints are hinted), so every endpoint is
	// used, as kube-proxy does.
	ReasonTopologyHints = "unusable-topology-hints"
)

// Problem is one odd or malformed part of a Service or its slices. The rest
// of the Service is still programmed.
type Problem struct {
	Reason string
	Detail string
}

func (p Problem) String() string { return p.Detail }

// familySet is the set of IP families a Service has cluster IPs of.
type familySet uint8

func (s *familySet) add(ip netip.Addr) {
	if ip.IsUnspecified() {
		// Not a real cluster IP: callers converting a Service without one
		// (grpcresolver for headless Services) use 0.0.0.0 and mean "any".
		*s |= 1<<model.IPv4 | 1<<model.IPv6
		return
	}
	*s |= 1 << model.FamilyOf(ip)
}

func (s familySet) has(f model.Family) bool { return s&(1<<f) != 0 }

func (s familySet) admitsSlice(t discovery.AddressType) bool {
	switch t {
	case discovery.AddressTypeIPv4:
		return s.has(model.IPv4)
	case discovery.AddressTypeIPv6:
		return s.has(model.IPv6)
	}
	return false
}

// sliceProblems reports what endpointsFor leaves out of svc's slices: slices
// of an address type or family the Service cannot use, endpoints of the
// wrong family or with unreadable addresses, slice ports no Service port
// matches, and addresses listed in more than one slice. It runs once per
// Service rebuild, so a problem shared by every port is reported once.
func sliceProblems(svc *v1.Service, slices []*Slice, families familySet) []Problem {
	var out []Problem
	var dupes, admitted int
	var dupeExample string
	for _, sl := range slices {
		switch {
		case sl.AddressType != discovery.AddressTypeIPv4 && sl.AddressType != discovery.AddressTypeIPv6:
			out = append(out, Problem{ReasonAddressType, fmt.Sprintf("slice %s: addressType %q is not proxied", sl.Name, sl.AddressType)})
			continue
		case !families.admitsSlice(sl.AddressType):
			out = append(out, Problem{ReasonFamilyMismatch, fmt.Sprintf("slice %s: %s endpoints for a Service with cluster IPs %v", sl.Name, sl.AddressType, svc.Spec.ClusterIPs)})
			continue
		}
		admitted++
		for _, p := range sl.Problems {
			out = append(out, Problem{ReasonInvalidField, p})
		}
		wrong := 0
		for _, e := range sl.Endpoints {
			if !families.has(model.FamilyOf(e.IP)) {
				wrong++
			}
		}
		if wrong > 0 {
			out = append(out, Problem{ReasonFamilyMismatch, fmt.Sprintf("slice %s: %d endpoints of a family the Service has no cluster IP of", sl.Name, wrong)})
		}
		for _, p := range sl.Ports {
			if p.Port < 0 || p.Port > 65535 {
				out = append(out, Problem{ReasonInvalidField, fmt.Sprintf("slice %s: port %q: invalid port %d", sl.Name, p.Name, p.Port)})
				continue
			}
			if !serviceHasPort(svc, p.Name, p.Protocol) {
				out = append(out, Problem{ReasonUnmatchedPort, fmt.Sprintf("slice %s: port %q/%s matches no port of the Service", sl.Name, p.Name, p.Protocol)})
			}
		}
	}
	// Duplicates need more than one slice; the common single-slice Service
	// pays for no map. An address is a duplicate where two slices list it
	// for the same port: the same address in slices of disjoint ports (a
	// Service with more ports than one slice may hold) is not.
	if admitted > 1 {
		type dupKey struct {
			ip    netip.Addr
			name  string
			proto model.Protocol
		}
		seen := map[dupKey]string{}
		for _, sl := range slices {
			if !families.admitsSlice(sl.AddressType) {
				continue
			}
			for _, e := range sl.Endpoints {
				for _, p := range sl.Ports {
					k := dupKey{e.IP, p.Name, p.Protocol}
					if other, ok := seen[k]; ok && other != sl.Name {
						dupes++
						if dupeExample == "" {
							dupeExample = fmt.Sprintf("%s port %q in slices %s and %s", e.IP, p.Name, other, sl.Name)
						}
						continue
					}
					seen[k] = sl.Name
				}
			}
		}
	}
	if dupes > 0 {
		out = append(out, Problem{ReasonDuplicateEndpoint, fmt.Sprintf("%d endpoints listed in more than one slice (e.g. %s); one copy kept", dupes, dupeExample)})
	}
	return out
}

func serviceHasPort(svc *v1.Service, name string, proto model.Protocol) bool {
	for _, p := range svc.Spec.Ports {
		pp := model.Protocol(p.Protocol)
		if pp == "" {
			pp = model.TCP
		}
		if p.Name == name && pp == proto {
			return true
		}
	}
	return false
}

// hintProblems reports service ports whose endpoints carry zone hints that
// this node cannot use: hints on only some endpoints, or none naming zone.
// Eligibility then falls back to every endpoint (model.Eligible), which is
// safe but not what the hints asked for. Nodes without a zone ignore hints
// by design and report nothing.
func hintProblems(ports []*model.ServicePort, zone string) []Problem {
	if zone == "" {
		return nil
	}
	for _, sp := range ports {
		hinted, match := 0, false
		for _, ep := range sp.Endpoints {
			if len(ep.ZoneHints) == 0 {
				continue
			}
			hinted++
			match = match || slices.Contains(ep.ZoneHints, zone)
		}
		if hinted == 0 || (hinted == len(sp.Endpoints) && match) {
			continue
		}
		why := fmt.Sprintf("no endpoint is hinted for this node's zone %q", zone)
		if hinted < len(sp.Endpoints) {
			why = fmt.Sprintf("%d of %d endpoints are hinted", hinted, len(sp.Endpoints))
		}
		// One report per Service: the ports share their slices.
		return []Problem{{ReasonTopologyHints, fmt.Sprintf("port %s: %s; using every endpoint", portLabel(sp), why)}}
	}
	return nil
}

func portLabel(sp *model.ServicePort) string {
	if sp.Name.Port != "" {
		return sp.Name.Port
	}
	return strings.ToLower(fmt.Sprintf("%d/%s", sp.Port, sp.Protocol))
}
