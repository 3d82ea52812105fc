package nftables

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/watch"
)

// TestKernelSharedFrontend is issue 15's first defect, end to end from API
// objects to the kernel: two LoadBalancer Services with source ranges report
// the same ingress IP (their firewall-ips elements live in the main table,
// whatever the shard count), and a third Service is added afterwards. Every
// batch must commit: the older Service serves the LB IP, the younger keeps
// its ClusterIP, and the third is programmed. Before the frontend rule, the
// duplicate map key made the kernel refuse every batch ("file exists").
func TestKernelSharedFrontend(t *testing.T) {
	ns, b, fd := setupTraffic(t, WithShards(16))
	ns.MustRun(t, "ip", "route", "add", "198.51.100.0/24", "dev", "lo")
	tr := watch.NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	add := func(name, vip, ep string, age int, mutate func(*v1.Service)) {
		svc := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns1", Name: name, CreationTimestamp: metav1.NewTime(t0.Add(time.Duration(age) * time.Second))},
			Spec: v1.ServiceSpec{
				Type: v1.ServiceTypeClusterIP, ClusterIP: vip, ClusterIPs: []string{vip},
				Ports: []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}},
			},
		}
		if mutate != nil {
			mutate(svc)
		}
		tr.SetService(types.NamespacedName{Namespace: "ns1", Name: name}, svc)
		sl := &discovery.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "ns1", Name: name + "-x", Labels: map[string]string{discovery.LabelServiceName: name}},
			AddressType: discovery.AddressTypeIPv4,
			Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
			Endpoints:   []discovery.Endpoint{{Addresses: []string{ep}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To("node-a")}},
		}
		tr.SetSlice("ns1", sl.Name, watch.NewSlice(sl), name)
	}
	lb := func(svc *v1.Service) {
		svc.Spec.Type = v1.ServiceTypeLoadBalancer
		svc.Spec.LoadBalancerSourceRanges = []string{"0.0.0.0/0"}
		svc.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.1"}}
	}
	sync := func(what string) {
		snap, _ := tr.Snapshot()
		if _, err := b.Sync(context.Background(), snap, false); err != nil {
			t.Errorf("sync with %s: %v", what, err)
		}
	}

	// The younger Service is seen first, as after a restart in map order.
	add("young", "172.30.0.22", "10.180.0.2", 10, lb)
	add("old", "172.30.0.21", "10.180.0.1", 0, lb)
	sync("two Services sharing 198.51.100.1:80/TCP")
	add("later", "172.30.0.23", "10.180.0.3", 20, nil)
	sync("a third Service added afterwards")

	for vip, want := range map[string]string{
		"198.51.100.1:80": "10.180.0.1:8080", // the older Service owns the LB IP
		"172.30.0.22:80":  "10.180.0.2:8080", // the younger keeps its ClusterIP
		"172.30.0.23:80":  "10.180.0.3:8080", // the later Service is programmed
	} {
		if h := hits(t, fd, vip, 5); h[want] != 5 {
			t.Errorf("%s: want every connection answered by %s, got %v", vip, want, h)
		}
	}
	if fw := ns.MustRun(t, "nft", "list", "map", "ip", "miniproxy", "firewall-ips"); strings.Count(fw, "198.51.100.1 . tcp . 80") != 1 || !strings.Contains(fw, "ns1/old/") {
		t.Errorf("firewall-ips must hold the LB IP once, for ns1/old:\n%s", fw)
	}
}
