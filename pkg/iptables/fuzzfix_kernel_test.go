package iptables

import (
	"strings"
	"testing"
	"time"

	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
)

// Defects FuzzIPTablesRender found, checked against the kernel.

// TestKernelRejectUnreadyEndpoints: a Service whose only endpoint is
// neither ready nor serving has no usable endpoint, so a client is refused
// at once (it used to be dropped: the client waited for its timeout).
func TestKernelRejectUnreadyEndpoints(t *testing.T) {
	l := newLab(t, "10.180.0.5")
	// A route for the service range, as a real node has (a default route):
	// without one the node answers "network unreachable" before any filter
	// rule sees the packet, and a drop could not be told from a reject.
	// (A veth pair kept inside the node: this kernel has no dummy module.)
	l.node.MustRun(t, "ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1")
	l.node.MustRun(t, "ip", "link", "set", "svc0", "up")
	l.node.MustRun(t, "ip", "link", "set", "svc1", "up")
	l.node.MustRun(t, "ip", "route", "add", "172.30.0.0/16", "dev", "svc0")
	sp := mt.SP("ns", "unready", "", "172.30.0.9", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	sp.Endpoints[0].Ready, sp.Endpoints[0].Serving = false, false
	l.sync(t, mt.Snap(sp), true)
	_, _, err := l.client.Ask("tcp", "172.30.0.9:80", 3*time.Second)
	if err == nil {
		t.Fatal("connection to a service without usable endpoints succeeded")
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("want an immediate reject, got %v", err)
	}
}

// TestKernelETPLocalNoLocalEndpointFromPod: under externalTrafficPolicy
// Local with no endpoint on this node, a pod reaching the externalIP or
// NodePort still gets the cluster-wide endpoints (kube-proxy and nftables
// mode do the same); only outside clients are dropped. It used to be
// dropped for everyone.
func TestKernelETPLocalNoLocalEndpointFromPod(t *testing.T) {
	l := newLab(t, "10.180.0.5")
	// The pod is served from this namespace but belongs to another node
	// as far as the model knows.
	sp := mt.SP("ns", "remote", "", "172.30.0.51", 80, mt.Ep("10.180.0.5", 8080, "node-b"))
	sp.NodePort, sp.ExternalPolicyLocal, sp.ExternalIPs = 30051, true, mt.Addrs("203.0.113.7")
	l.sync(t, mt.Snap(sp), true)
	if got := l.counts(t, "tcp", "203.0.113.7:80", 3); got["poda"] != 3 {
		t.Fatalf("externalIP from a pod: want poda 3 times, got %v", got)
	}
	if got := l.counts(t, "tcp", "10.180.0.1:30051", 3); got["poda"] != 3 {
		t.Fatalf("NodePort from a pod: want poda 3 times, got %v", got)
	}
}
