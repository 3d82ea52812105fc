package watch

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	netutils "k8s.io/utils/net"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Labels and defaults from the Kubernetes API that decide what a proxy handles.
const (
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	LabelHeadless         = "service.kubernetes.io/headless"
	LabelZone             = "topology.kubernetes.io/zone"
	// AnnotationTriggerTime is set by the EndpointSlice controller to the time
	// of the change that caused the slice update; network programming latency
	// is measured from it.
	AnnotationTriggerTime = "endpoints.kubernetes.io/last-change-trigger-time"
	defaultAffinitySecond = 10800
)

// Ignored reports why a Service is not proxied by a proxy named proxyName
// ("" for none), or "" if it is proxied.
func Ignored(svc *v1.Service, proxyName string) string {
	if name, ok := svc.Labels[LabelServiceProxyName]; ok && name != proxyName {
		return fmt.Sprintf("handled by proxy %q", name)
	}
	switch {
	case svc.Spec.Type == v1.ServiceTypeExternalName:
		return "ExternalName service"
	case svc.Spec.ClusterIP == v1.ClusterIPNone:
		return "headless service"
	case svc.Spec.ClusterIP == "":
		return "no cluster IP allocated yet"
	}
	return ""
}

// ServicePorts converts one Service and all its EndpointSlices into model
// service ports. It is pure. Problems that affect the whole Service are
// returned as an error (the caller logs and skips the Service); problems with
// a single field or endpoint are returned as warnings and the bad item is
// dropped, so one malformed entry never hides the rest.
func ServicePorts(svc *v1.Service, endpointSlices []*discovery.EndpointSlice) (ports []*model.ServicePort, warnings []string, err error) {
	slices := make([]*Slice, len(endpointSlices))
	for i, sl := range endpointSlices {
		slices[i] = NewSlice(sl)
	}
	ports, problems, err := servicePorts(svc, slices)
	for _, p := range problems {
		warnings = append(warnings, p.String())
	}
	return ports, warnings, err
}

// servicePorts is ServicePorts over converted slices (what the tracker
// holds), with each problem classified so the tracker can report and count it.
func servicePorts(svc *v1.Service, slices []*Slice) (ports []*model.ServicePort, problems []Problem, err error) {
	var clusterIPs []netip.Addr
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	seenFamily := map[model.Family]bool{}
	var families familySet
	for _, s := range ips {
		ip, perr := netip.ParseAddr(s)
		if perr != nil {
			return nil, nil, fmt.Errorf("service %s/%s: cluster IP %q: %w", svc.Namespace, svc.Name, s, perr)
		}
		ip = ip.Unmap()
		families.add(ip)
		if f := model.FamilyOf(ip); !seenFamily[f] {
			seenFamily[f] = true
			clusterIPs = append(clusterIPs, ip)
		}
	}

	externalIPs, w := parseAddrs("externalIPs", svc.Spec.ExternalIPs)
	problems = append(problems, w...)
	var lbIPs []netip.Addr
	if svc.Spec.Type == v1.ServiceTypeLoadBalancer {
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			if ing.IP == "" {
				continue
			}
			// ipMode Proxy means the load balancer delivers packets addressed
			// to the node, so the ingress IP must not be captured here.
			if ing.IPMode != nil && *ing.IPMode == v1.LoadBalancerIPModeProxy {
				continue
			}
			ip, perr := netip.ParseAddr(ing.IP)
			if perr != nil {
				problems = append(problems, Problem{ReasonInvalidField, fmt.Sprintf("loadBalancer ingress %q: %v", ing.IP, perr)})
				continue
			}
			lbIPs = append(lbIPs, ip.Unmap())
		}
	}
	ranges, rangesInvalid, w := sourceRanges(svc.Spec.LoadBalancerSourceRanges)
	problems = append(problems, w...)

	externalLocal := svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
	var affinity int32
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		affinity = defaultAffinitySecond
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = *c.ClientIP.TimeoutSeconds
		}
	}
	preferClose := svc.Spec.TrafficDistribution != nil &&
		(*svc.Spec.TrafficDistribution == v1.ServiceTrafficDistributionPreferClose || *svc.Spec.TrafficDistribution == "PreferSameZone")
	exposesNodePort := svc.Spec.Type == v1.ServiceTypeNodePort || svc.Spec.Type == v1.ServiceTypeLoadBalancer

	seenPort := map[model.ServicePortName]bool{}
	for _, p := range svc.Spec.Ports {
		proto := model.Protocol(p.Protocol)
		if proto == "" {
			proto = model.TCP
		}
		switch proto {
		case model.TCP, model.UDP, model.SCTP:
		default:
			problems = append(problems, Problem{ReasonInvalidField, fmt.Sprintf("port %q: unsupported protocol %q", p.Name, p.Protocol)})
			continue
		}
		if p.Port <= 0 || p.Port > 65535 {
			problems = append(problems, Problem{ReasonInvalidField, fmt.Sprintf("port %q: invalid port %d", p.Name, p.Port)})
			continue
		}
		name := model.ServicePortName{Namespace: svc.Namespace, Name: svc.Name, Port: p.Name, Protocol: proto}
		if seenPort[name] {
			// The API forbids it; a second port with one name would
			// replace the first in the snapshot, in map order.
			problems = append(problems, Problem{ReasonInvalidField, fmt.Sprintf("port %q/%s listed twice; the first is used", p.Name, proto)})
			continue
		}
		seenPort[name] = true
		sp := &model.ServicePort{
			Name:                     name,
			Created:                  svc.CreationTimestamp.Time,
			ClusterIPs:               clusterIPs,
			Port:                     p.Port,
			Protocol:                 proto,
			ExternalIPs:              externalIPs,
			LoadBalancerIPs:          lbIPs,
			LoadBalancerSourceRanges: ranges,
			// Set when the Service lists source ranges but none could be
			// read: the load balancer must admit nobody rather than everybody.
			LoadBalancerSourceRangesInvalid: rangesInvalid,
			ExternalPolicyLocal:             externalLocal,
			InternalPolicyLocal:             internalLocal,
			AffinitySeconds:                 affinity,
			PreferClose:                     preferClose,
		}
		if exposesNodePort && p.NodePort > 0 && p.NodePort <= 65535 {
			sp.NodePort = p.NodePort
		}
		if externalLocal && svc.Spec.Type == v1.ServiceTypeLoadBalancer {
			sp.HealthCheckNodePort = svc.Spec.HealthCheckNodePort
		}
		sp.Endpoints = endpointsFor(p.Name, proto, slices, families)
		ports = append(ports, sp)
	}
	problems = append(problems, sliceProblems(svc, slices, families)...)
	return ports, problems, nil
}

func parseAddrs(field string, in []string) ([]netip.Addr, []Problem) {
	var out []netip.Addr
	var problems []Problem
	for _, s := range in {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			problems = append(problems, Problem{ReasonInvalidField, fmt.Sprintf("%s %q: %v", field, s, err)})
			continue
		}
		out = append(out, ip.Unmap())
	}
	return out, problems
}

// sourceRanges parses spec.loadBalancerSourceRanges the way kube-proxy and
// the apiserver's validation read it: surrounding spaces are allowed (a
// historical accident the API keeps), and IPv4 octets with leading zeros
// are read as decimal (legacy objects the apiserver still admits). An entry
// that still does not parse admits nobody and is reported. invalid is true
// when the list is not empty but no entry parsed: kube-proxy then treats
// the Service as having no source ranges and opens its load balancer to
// everyone; miniproxy closes it instead.
func sourceRanges(in []string) (ranges []netip.Prefix, invalid bool, problems []Problem) {
	for _, r := range in {
		p, err := parseCIDR(strings.TrimSpace(r))
		if err != nil {
			problems = append(problems, Problem{ReasonSourceRange, fmt.Sprintf("loadBalancerSourceRanges %q: %v (admits nobody)", r, err)})
			continue
		}
		ranges = append(ranges, p)
	}
	if len(in) > 0 && len(ranges) == 0 {
		invalid = true
		problems = append(problems, Problem{ReasonSourceRange, fmt.Sprintf("none of loadBalancerSourceRanges %q parses: the load balancer IPs admit no source", in)})
	}
	return ranges, invalid, problems
}

// parseCIDR parses a CIDR strictly, then as the apiserver's legacy
// validation does (leading zeros in IPv4 octets are decimal). The result is
// masked and unmapped.
func parseCIDR(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p.Addr().Is4In6() {
			bits := p.Bits() - 96
			if bits < 0 {
				return netip.Prefix{}, fmt.Errorf("IPv4-mapped prefix /%d is shorter than /96", p.Bits())
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), bits)
		}
		return p.Masked(), nil
	}
	_, ipnet, err := netutils.ParseCIDRSloppy(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	addr, ok := netip.AddrFromSlice(ipnet.IP)
	if !ok {
		return netip.Prefix{}, fmt.Errorf("CIDR %q: unusable address", s)
	}
	ones, _ := ipnet.Mask.Size()
	return netip.PrefixFrom(addr.Unmap(), ones).Masked(), nil
}

// endpointsFor merges the endpoints of every slice that carries the named
// port. An endpoint listed twice (slices are rewritten non-atomically) is kept
// once, preferring the copy that is ready, then serving. Endpoints of a
// family the Service has no cluster IP of are left out, as kube-proxy's
// per-family endpoint cache does: they could never be reached through the
// Service, and counting them would skew eligibility (a ready IPv6 endpoint
// would hide the terminating fallback of an IPv4-only Service). Problems are
// reported once per Service by sliceProblems, not per port.
func endpointsFor(portName string, proto model.Protocol, slices []*Slice, families familySet) []model.Endpoint {
	byAddr := map[netip.AddrPort]model.Endpoint{}
	for _, sl := range slices {
		if !families.admitsSlice(sl.AddressType) {
			continue
		}
		port, found := slicePort(sl, portName, proto)
		if !found || port <= 0 || port > 65535 {
			continue
		}
		for _, e := range sl.Endpoints {
			if !families.has(model.FamilyOf(e.IP)) {
				continue
			}
			ep := model.Endpoint{IP: e.IP, Port: port, Ready: e.Ready, Serving: e.Serving, Terminating: e.Terminating,
				NodeName: e.NodeName, Zone: e.Zone, ZoneHints: e.ZoneHints}
			k := ep.AddrPort()
			if old, ok := byAddr[k]; ok && rank(old) >= rank(ep) {
				continue
			}
			byAddr[k] = ep
		}
	}
	out := make([]model.Endpoint, 0, len(byAddr))
	for _, ep := range byAddr {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].AddrPort().Compare(out[j].AddrPort()) < 0 })
	return out
}

// slicePort returns the port number sl publishes for the Service port
// (name, protocol); the API leaves it unset (0) for "all ports".
func slicePort(sl *Slice, portName string, proto model.Protocol) (int32, bool) {
	for _, p := range sl.Ports {
		if p.Name == portName && p.Protocol == proto && p.Port != 0 {
			return p.Port, true
		}
	}
	return 0, false
}

func rank(e model.Endpoint) int {
	switch {
	case e.Ready:
		return 2
	case e.Serving:
		return 1
	}
	return 0
}

// NodeInfo converts this node's Node object.
func NodeInfo(n *v1.Node) model.Node {
	out := model.Node{Name: n.Name, Zone: n.Labels[LabelZone]}
	for _, a := range n.Status.Addresses {
		if a.Type != v1.NodeInternalIP && a.Type != v1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			out.Addresses = append(out.Addresses, ip.Unmap())
		}
	}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil {
			out.PodCIDRs = append(out.PodCIDRs, p.Masked())
		}
	}
	return out
}

// TaintToBeDeleted is the taint the cluster autoscaler puts on a node it is
// about to remove.
const TaintToBeDeleted = "ToBeDeletedByClusterAutoscaler"

// NodeIneligible returns why n is going away, or "" if it is not: its
// deletionTimestamp is set, or it carries the cluster autoscaler's
// ToBeDeletedByClusterAutoscaler taint. kube-proxy v1.37's /healthz fails
// for exactly these (healthcheck.ProxyHealthServer.NodeEligible).
func NodeIneligible(n *v1.Node) string {
	if n.DeletionTimestamp != nil {
		return "the Node is being deleted (deletionTimestamp " + n.DeletionTimestamp.UTC().Format(time.RFC3339) + ")"
	}
	for _, t := range n.Spec.Taints {
		if t.Key == TaintToBeDeleted {
			return "the Node has the taint " + TaintToBeDeleted
		}
	}
	return ""
}
