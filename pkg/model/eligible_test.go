package model

import (
	"net/netip"
	"reflect"
	"testing"
)

func ep(ip string, node string, ready, serving, terminating bool) Endpoint {
	return Endpoint{IP: netip.MustParseAddr(ip), Port: 8080, NodeName: node, Ready: ready, Serving: serving, Terminating: terminating}
}

// TestEligibleReadyAndFallback pins the endpoint choice the backends share:
// ready endpoints, terminating-but-serving ones only when none is ready, and
// Local never falling back to another node.
func TestEligibleReadyAndFallback(t *testing.T) {
	node := Node{Name: "n1"}
	for _, c := range []struct {
		name           string
		eps            []Endpoint
		cluster, local []string
	}{
		{name: "all ready", eps: []Endpoint{ep("10.0.0.1", "n1", true, true, false), ep("10.0.0.2", "n2", true, true, false)},
			cluster: []string{"10.0.0.1", "10.0.0.2"}, local: []string{"10.0.0.1"}},
		{name: "one not ready", eps: []Endpoint{ep("10.0.0.1", "n1", false, false, false), ep("10.0.0.2", "n2", true, true, false)},
			cluster: []string{"10.0.0.2"}},
		{name: "only terminating", eps: []Endpoint{ep("10.0.0.1", "n1", false, true, true), ep("10.0.0.2", "n2", false, false, true)},
			cluster: []string{"10.0.0.1"}, local: []string{"10.0.0.1"}},
		{name: "ready wins over terminating", eps: []Endpoint{ep("10.0.0.1", "n1", false, true, true), ep("10.0.0.2", "n2", true, true, false)},
			cluster: []string{"10.0.0.2"}, local: []string{"10.0.0.1"}},
		{name: "none", eps: nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			sp := &ServicePort{Endpoints: c.eps}
			el := sp.Eligible(node)
			if got := ips(el.Cluster); !reflect.DeepEqual(got, c.cluster) {
				t.Errorf("Cluster = %v, want %v", got, c.cluster)
			}
			if got := ips(el.Local); !reflect.DeepEqual(got, c.local) {
				t.Errorf("Local = %v, want %v", got, c.local)
			}
		})
	}
}

// TestEligibleSharesButNeverExposesTheSnapshot: when every endpoint is
// chosen the result shares the ServicePort's array, so an append by a
// consumer must copy rather than write past it into the snapshot.
func TestEligibleSharesButNeverExposesTheSnapshot(t *testing.T) {
	backing := make([]Endpoint, 2, 4) // spare capacity an append could use
	backing[0], backing[1] = ep("10.0.0.1", "n2", true, true, false), ep("10.0.0.2", "n2", true, true, false)
	sp := &ServicePort{Endpoints: backing}
	el := sp.Eligible(Node{Name: "n1"})
	if len(el.Cluster) != 2 || &el.Cluster[0] != &backing[0] {
		t.Fatalf("Cluster should share the endpoints array: %v", el.Cluster)
	}
	grown := append(el.Cluster, ep("10.9.9.9", "n1", true, true, false))
	if &grown[0] == &backing[0] {
		t.Fatal("append wrote into the snapshot's array")
	}
	if got := backing[:3][2]; got.IP.IsValid() {
		t.Fatalf("snapshot array changed past its length: %v", got)
	}
}

func ips(eps []Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.IP.String())
	}
	return out
}

// A ready endpoint of one family does not hide the other family's
// serving-but-terminating endpoints: each family's rules fall back on their
// own (kube-proxy's proxiers are per family).
func TestTerminatingFallbackPerFamily(t *testing.T) {
	v4 := Endpoint{IP: netip.MustParseAddr("10.180.0.1"), Port: 8081, Serving: true, Terminating: true, NodeName: "node-a"}
	v6 := Endpoint{IP: netip.MustParseAddr("fd00:180::1:1"), Port: 8080, Ready: true, Serving: true, NodeName: "node-b"}
	v4old := Endpoint{IP: netip.MustParseAddr("10.180.0.2"), Port: 8081, NodeName: "node-a"} // neither ready nor serving
	sp := &ServicePort{Endpoints: []Endpoint{v4, v4old, v6}}
	got := sp.Eligible(Node{Name: "node-a"}).Cluster
	if len(got) != 2 || got[0].IP != v4.IP || got[1].IP != v6.IP {
		t.Fatalf("cluster = %v, want [%v %v]", got, v4, v6)
	}
}
