package model

import (
	"net/netip"
	"testing"
)

func TestNoLocalEndpoints(t *testing.T) {
	node := Node{Name: "n1"}
	sp := func(name string, itp, etp, external bool, eps ...Endpoint) *ServicePort {
		p := &ServicePort{Name: ServicePortName{Namespace: "ns", Name: name, Protocol: TCP},
			ClusterIPs:          []netip.Addr{netip.MustParseAddr("172.30.0.1"), netip.MustParseAddr("fd00:30::1")},
			InternalPolicyLocal: itp, ExternalPolicyLocal: etp, Endpoints: eps}
		if external {
			p.NodePort = 30000
		}
		return p
	}
	remote := ep("10.180.1.5", "n2", true, true, false)
	remote6 := ep("fd00:180::5", "n2", true, true, false)
	local := ep("10.180.0.5", "n1", true, true, false)
	localTerm := ep("10.180.0.6", "n1", false, true, true)
	localGone := ep("10.180.0.7", "n1", false, false, true) // terminating, not serving: unusable
	snap := &Snapshot{Node: node, Services: map[ServicePortName]*ServicePort{}}
	for _, p := range []*ServicePort{
		sp("itp-remote-only", true, false, false, remote),               // internal +1
		sp("itp-local", true, false, false, remote, local),              // 0
		sp("itp-local-terminating", true, false, false, localTerm),      // 0: the local fallback serves
		sp("itp-no-endpoints", true, false, false),                      // 0: rejects, not counted
		sp("itp-local-unusable", true, false, false, remote, localGone), // internal +1
		sp("etp-remote-only", false, true, true, remote),                // external +1
		sp("etp-not-external", false, true, false, remote),              // 0: ETP applies to external traffic only
		sp("both-remote-only", true, true, true, remote, remote6),       // internal +1, external +1 (and IPv6 both +1)
		sp("cluster-policies", false, false, true, remote),              // 0
	} {
		snap.Services[p.Name] = p
	}
	if i, e := snap.NoLocalEndpoints(IPv4); i != 3 || e != 2 {
		t.Errorf("IPv4: internal %d external %d, want 3 and 2", i, e)
	}
	if i, e := snap.NoLocalEndpoints(IPv6); i != 1 || e != 1 {
		t.Errorf("IPv6: internal %d external %d, want 1 and 1 (only both-remote-only has IPv6 endpoints)", i, e)
	}
}
