package watch

import (
	"fmt"
	"net/netip"
	"sort"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"

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
	return servicePorts(svc, slices)
}

// servicePorts is ServicePorts over converted slices (what the tracker holds).
func servicePorts(svc *v1.Service, slices []*Slice) (ports []*model.ServicePort, warnings []string, err error) {
	var clusterIPs []netip.Addr
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	seenFamily := map[model.Family]bool{}
	for _, s := range ips {
		ip, perr := netip.ParseAddr(s)
		if perr != nil {
			return nil, nil, fmt.Errorf("service %s/%s: cluster IP %q: %w", svc.Namespace, svc.Name, s, perr)
		}
		ip = ip.Unmap()
		if f := model.FamilyOf(ip); !seenFamily[f] {
			seenFamily[f] = true
			clusterIPs = append(clusterIPs, ip)
		}
	}

	externalIPs, w := parseAddrs("externalIPs", svc.Spec.ExternalIPs)
	warnings = append(warnings, w...)
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
				warnings = append(warnings, fmt.Sprintf("loadBalancer ingress %q: %v", ing.IP, perr))
				continue
			}
			lbIPs = append(lbIPs, ip.Unmap())
		}
	}
	var ranges []netip.Prefix
	for _, r := range svc.Spec.LoadBalancerSourceRanges {
		p, perr := netip.ParsePrefix(r)
		if perr != nil {
			warnings = append(warnings, fmt.Sprintf("loadBalancerSourceRanges %q: %v", r, perr))
			continue
		}
		ranges = append(ranges, p.Masked())
	}

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
			warnings = append(warnings, fmt.Sprintf("port %q: unsupported protocol %q", p.Name, p.Protocol))
			continue
		}
		if p.Port <= 0 || p.Port > 65535 {
			warnings = append(warnings, fmt.Sprintf("port %q: invalid port %d", p.Name, p.Port))
			continue
		}
		name := model.ServicePortName{Namespace: svc.Namespace, Name: svc.Name, Port: p.Name, Protocol: proto}
		if seenPort[name] {
			// The API forbids it; a second port with one name would
			// replace the first in the snapshot, in map order.
			warnings = append(warnings, fmt.Sprintf("port %q/%s listed twice; the first is used", p.Name, proto))
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
			ExternalPolicyLocal:      externalLocal,
			InternalPolicyLocal:      internalLocal,
			AffinitySeconds:          affinity,
			PreferClose:              preferClose,
		}
		if exposesNodePort && p.NodePort > 0 && p.NodePort <= 65535 {
			sp.NodePort = p.NodePort
		}
		if externalLocal && svc.Spec.Type == v1.ServiceTypeLoadBalancer {
			sp.HealthCheckNodePort = svc.Spec.HealthCheckNodePort
		}
		eps, w := endpointsFor(p.Name, proto, slices)
		warnings = append(warnings, w...)
		sp.Endpoints = eps
		ports = append(ports, sp)
	}
	return ports, warnings, nil
}

func parseAddrs(field string, in []string) ([]netip.Addr, []string) {
	var out []netip.Addr
	var warnings []string
	for _, s := range in {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("%s %q: %v", field, s, err))
			continue
		}
		out = append(out, ip.Unmap())
	}
	return out, warnings
}

// endpointsFor merges the endpoints of every slice that carries the named
// port. An endpoint listed twice (slices are rewritten non-atomically) is kept
// once, preferring the copy that is ready, then serving.
func endpointsFor(portName string, proto model.Protocol, slices []*Slice) ([]model.Endpoint, []string) {
	var warnings []string
	byAddr := map[netip.AddrPort]model.Endpoint{}
	for _, sl := range slices {
		if sl.AddressType != discovery.AddressTypeIPv4 && sl.AddressType != discovery.AddressTypeIPv6 {
			continue
		}
		var port int32
		found := false
		for _, p := range sl.Ports {
			if p.Name == portName && p.Protocol == proto && p.Port != 0 {
				port, found = p.Port, true
				break
			}
		}
		if !found {
			continue
		}
		if port <= 0 || port > 65535 {
			warnings = append(warnings, fmt.Sprintf("slice %s: invalid port %d", sl.Name, port))
			continue
		}
		warnings = append(warnings, sl.Problems...)
		for _, e := range sl.Endpoints {
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
	return out, warnings
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
