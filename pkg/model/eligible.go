package model

import (
	"net/netip"
	"sort"
)

// Eligibility is the answer to "which endpoints may serve this service port on
// this node", per kind of traffic. Every backend programs exactly these sets.
type Eligibility struct {
	// Cluster is used for traffic under the Cluster traffic policy: ready
	// endpoints (filtered by topology), or serving-but-terminating endpoints
	// when none is ready.
	Cluster []Endpoint
	// Local is used under the Local traffic policy: ready endpoints on this
	// node, or serving-but-terminating local endpoints when none is ready.
	Local []Endpoint
	// Internal is what traffic from inside the cluster (ClusterIP) may reach:
	// Local if internalTrafficPolicy is Local, else Cluster.
	Internal []Endpoint
	// External is what NodePort / externalIP / load-balancer traffic may reach:
	// Local if externalTrafficPolicy is Local, else Cluster.
	External []Endpoint
	// All is the union of Internal and External without duplicates, in
	// endpoint order: the endpoints a backend must create a target for.
	All []Endpoint
}

// Eligible computes the endpoint sets for sp on node. It follows kube-proxy's
// rules: terminating endpoints are a fallback only when no endpoint is ready
// (KEP-1669), topology hints apply only to Cluster traffic and only when every
// candidate carries hints and at least one matches this node's zone (KEP-2433),
// and the Local policies never fall back to remote endpoints.
func (sp *ServicePort) Eligible(node Node) Eligibility {
	var e Eligibility
	e.Cluster = pick(sp.Endpoints, func(ep Endpoint) bool { return true })
	e.Cluster = filterTopologyPerFamily(sp, node, e.Cluster)
	e.Local = pick(sp.Endpoints, func(ep Endpoint) bool { return ep.NodeName != "" && ep.NodeName == node.Name })

	e.Internal, e.External = e.Cluster, e.Cluster
	if sp.InternalPolicyLocal {
		e.Internal = e.Local
	}
	if sp.ExternalPolicyLocal && sp.HasExternal() {
		e.External = e.Local
	}
	if !sp.HasExternal() {
		e.External = nil
	}
	e.All = union(e.Internal, e.External)
	return e
}

// pick returns the ready endpoints accepted by keep and, for an IP family
// with none ready, that family's serving-and-terminating ones.
func pick(eps []Endpoint, keep func(Endpoint) bool) []Endpoint {
	// Commonly every endpoint is kept and ready: share eps instead of
	// copying it (once per service port per render). The capacity is cut to
	// the length, so an append by any caller copies instead of writing
	// into the snapshot's array.
	all := len(eps) > 0
	for i := range eps {
		if !eps[i].Ready || !keep(eps[i]) {
			all = false
			break
		}
	}
	if all {
		return eps[:len(eps):len(eps)]
	}
	// The terminating fallback is decided per IP family, as kube-proxy's
	// per-family proxiers do: a ready IPv6 endpoint must not hide the
	// serving-but-terminating IPv4 ones from the IPv4 rules (found by
	// FuzzIPTablesRender: the NodePort was neither served nor rejected).
	var ready4, ready6 bool
	for _, ep := range eps {
		if ep.Ready && keep(ep) {
			if FamilyOf(ep.IP) == IPv4 {
				ready4 = true
			} else {
				ready6 = true
			}
		}
	}
	var out []Endpoint
	for _, ep := range eps {
		if !keep(ep) {
			continue
		}
		hasReady := ready6
		if FamilyOf(ep.IP) == IPv4 {
			hasReady = ready4
		}
		switch {
		case ep.Ready:
			out = append(out, ep)
		case !hasReady && ep.Serving && ep.Terminating:
			out = append(out, ep)
		}
	}
	return out
}

// filterTopologyPerFamily applies filterTopology to each IP family's
// endpoints on its own, as kube-proxy's per-family proxiers do: same-zone
// IPv4 endpoints must not remove every IPv6 endpoint from the IPv6 rules.
func filterTopologyPerFamily(sp *ServicePort, node Node, eps []Endpoint) []Endpoint {
	var v4, v6 []Endpoint
	for _, ep := range eps {
		if FamilyOf(ep.IP) == IPv4 {
			v4 = append(v4, ep)
		} else {
			v6 = append(v6, ep)
		}
	}
	if len(v4) == 0 || len(v6) == 0 {
		return filterTopology(sp, node, eps)
	}
	return append(filterTopology(sp, node, v4), filterTopology(sp, node, v6)...)
}

func filterTopology(sp *ServicePort, node Node, eps []Endpoint) []Endpoint {
	if node.Zone == "" || len(eps) == 0 {
		return eps
	}
	allHinted, anyHinted, match := true, false, false
	for _, ep := range eps {
		if len(ep.ZoneHints) == 0 {
			allHinted = false
			continue
		}
		anyHinted = true
		for _, z := range ep.ZoneHints {
			if z == node.Zone {
				match = true
			}
		}
	}
	var out []Endpoint
	switch {
	case anyHinted:
		// Hints are all-or-nothing: a partially hinted slice set means the
		// controller is mid-update, so use every endpoint (as kube-proxy does).
		if !allHinted || !match {
			return eps
		}
		for _, ep := range eps {
			for _, z := range ep.ZoneHints {
				if z == node.Zone {
					out = append(out, ep)
					break
				}
			}
		}
	case sp.PreferClose:
		// No hints published (no EndpointSlice controller, or an older one):
		// honour PreferClose from the endpoints' own zones.
		for _, ep := range eps {
			if ep.Zone == node.Zone {
				out = append(out, ep)
			}
		}
		if len(out) == 0 {
			return eps
		}
	default:
		return eps
	}
	return out
}

func union(a, b []Endpoint) []Endpoint {
	if len(b) == 0 {
		return a
	}
	seen := make(map[netip.AddrPort]bool, len(a)+len(b))
	out := make([]Endpoint, 0, len(a)+len(b))
	for _, list := range [][]Endpoint{a, b} {
		for _, ep := range list {
			if k := ep.AddrPort(); !seen[k] {
				seen[k] = true
				out = append(out, ep)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].AddrPort().Compare(out[j].AddrPort()) < 0 })
	return out
}

// NoLocalEndpoints counts the service ports of s with a cluster IP of
// family f whose Local traffic policy leaves them nothing on this node
// while the Service has usable endpoints of f elsewhere: internal counts
// internalTrafficPolicy: Local, external externalTrafficPolicy: Local on
// externally reachable ports. These are kube-proxy's
// kubeproxy_sync_proxy_rules_no_local_endpoints_total (traffic_policy
// "internal" / "external"), counted as its proxiers count them: "usable"
// is ready, or serving and terminating (the fallback), and a Service
// without any usable endpoint is not counted (it rejects instead).
func (s *Snapshot) NoLocalEndpoints(f Family) (internal, external int) {
	usable := func(ep Endpoint) bool { return ep.Ready || (ep.Serving && ep.Terminating) }
	for _, sp := range s.Services {
		ext := sp.ExternalPolicyLocal && sp.HasExternal()
		if !sp.InternalPolicyLocal && !ext {
			continue
		}
		if _, ok := sp.ClusterIP(f); !ok {
			continue
		}
		any, local := false, false
		for _, ep := range sp.Endpoints {
			if FamilyOf(ep.IP) != f || !usable(ep) {
				continue
			}
			any = true
			if ep.NodeName != "" && ep.NodeName == s.Node.Name {
				local = true
				break
			}
		}
		if !any || local {
			continue
		}
		if sp.InternalPolicyLocal {
			internal++
		}
		if ext {
			external++
		}
	}
	return internal, external
}
