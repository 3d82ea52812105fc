package e2e

import (
	"context"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestPodNetwork checks the test bed itself, without any proxy: pods answer
// direct connections from a pod on the same and on the other node, Node
// objects carry addresses, zones and pod CIDRs, and the EndpointSlice
// describes the pods.
func TestPodNetwork(t *testing.T) {
	row := suite.Matrix.Track(t, "test bed: pod network, Nodes, EndpointSlices", framework.ModeIndependent)
	nodes := suite.PlainNodes(t, row)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := suite.Cluster(t, row)
	ns, err := cl.NewNamespace(ctx, "podnet")
	if err != nil {
		t.Fatal(err)
	}
	dep, err := cl.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "web", Replicas: 3, Nodes: nodes, PreferClose: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dep.Delete() })
	client, err := nodes[0].NewPod(ctx, "podnet-client")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Delete() })

	sameNode, otherNode := 0, 0
	for _, p := range dep.Pods() {
		for _, proto := range []string{"tcp", "udp"} {
			addr := netip.AddrPortFrom(p.IP, framework.PodPort).String()
			var got framework.Counts
			if proto == "tcp" {
				got, err = client.TCPCounts(ctx, addr, 3)
			} else {
				got, err = client.UDPCounts(ctx, addr, 3)
			}
			if err != nil || got.Errors != 0 || got.ByName[p.Name] != 3 {
				t.Errorf("%s %s (pod %s on %s) from %s on %s: %v %v", proto, addr, p.Name, p.Node.Name, client.Name, client.Node.Name, got, err)
			}
		}
		if p.Node == client.Node {
			sameNode++
		} else {
			otherNode++
		}
	}
	if sameNode == 0 || otherNode == 0 {
		t.Errorf("placement: %d pods on the client's node, %d elsewhere; want both", sameNode, otherNode)
	}

	for _, n := range nodes {
		obj, err := cl.Admin.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(obj.Status.Addresses) == 0 || obj.Status.Addresses[0].Address != n.IP.String() {
			t.Errorf("Node %s addresses = %v, want InternalIP %s", n.Name, obj.Status.Addresses, n.IP)
		}
		if obj.Labels["topology.kubernetes.io/zone"] != n.Zone || len(obj.Spec.PodCIDRs) != 1 || obj.Spec.PodCIDRs[0] != n.PodCIDR.String() {
			t.Errorf("Node %s: zone %q podCIDRs %v, want %s %s", n.Name, obj.Labels["topology.kubernetes.io/zone"], obj.Spec.PodCIDRs, n.Zone, n.PodCIDR)
		}
	}
	slice, err := cl.Admin.DiscoveryV1().EndpointSlices(ns).Get(ctx, dep.SliceName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(slice.Endpoints) != 3 {
		t.Fatalf("EndpointSlice has %d endpoints, want 3", len(slice.Endpoints))
	}
	for _, ep := range slice.Endpoints {
		if ep.NodeName == nil || ep.Zone == nil || ep.Hints == nil || len(ep.Hints.ForZones) != 1 || ep.Hints.ForZones[0].Name != *ep.Zone {
			t.Errorf("endpoint %v: want nodeName, zone and a hint for its own zone", ep.Addresses)
		}
		if ep.Conditions.Ready == nil || !*ep.Conditions.Ready {
			t.Errorf("endpoint %v not ready", ep.Addresses)
		}
	}
}
