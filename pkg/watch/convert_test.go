package watch

import (
	"io"
	"log/slog"
	"reflect"
	"sort"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/model"
)

func svc(name string, mut func(*v1.Service)) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeClusterIP, ClusterIP: "172.30.0.1", ClusterIPs: []string{"172.30.0.1"},
			Ports: []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}},
		},
	}
	if mut != nil {
		mut(s)
	}
	return s
}

func slice(name, svcName string, port int32, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discovery.LabelServiceName: svcName}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(port), Protocol: ptr.To(v1.ProtocolTCP)}},
		Endpoints:   eps,
	}
}

func ep(ip string, ready bool, node string) discovery.Endpoint {
	return discovery.Endpoint{Addresses: []string{ip}, Conditions: discovery.EndpointConditions{Ready: ptr.To(ready), Serving: ptr.To(ready), Terminating: ptr.To(!ready)}, NodeName: ptr.To(node)}
}

func TestIgnored(t *testing.T) {
	cases := map[string]struct {
		s    *v1.Service
		want bool
	}{
		"plain":        {svc("a", nil), false},
		"headless":     {svc("a", func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "None", []string{"None"} }), true},
		"externalname": {svc("a", func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeExternalName; s.Spec.ClusterIP = "" }), true},
		"other proxy":  {svc("a", func(s *v1.Service) { s.Labels = map[string]string{LabelServiceProxyName: "cilium"} }), true},
	}
	for name, tc := range cases {
		if got := Ignored(tc.s, "") != ""; got != tc.want {
			t.Errorf("%s: ignored=%v want %v", name, got, tc.want)
		}
	}
}

func TestServicePortsMergesAndDedupes(t *testing.T) {
	s := svc("web", nil)
	// The same endpoint in two slices (mid-rewrite): once not ready, once ready.
	a := slice("web-a", "web", 8080, ep("10.180.0.5", false, "n1"), ep("10.180.0.6", true, "n1"))
	b := slice("web-b", "web", 8080, ep("10.180.0.5", true, "n1"), ep("not-an-ip", true, "n1"))
	ports, warnings, err := ServicePorts(s, []*discovery.EndpointSlice{a, b})
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 1 || len(ports[0].Endpoints) != 2 {
		t.Fatalf("want 1 port with 2 endpoints, got %+v", ports)
	}
	if !ports[0].Endpoints[0].Ready || ports[0].Endpoints[0].IP.String() != "10.180.0.5" {
		t.Errorf("duplicate endpoint must keep its ready copy: %+v", ports[0].Endpoints[0])
	}
	// One warning for the malformed address (once, although the slice is
	// read for every port), one for the address listed in both slices.
	if len(warnings) != 2 || !strings.Contains(warnings[0], "not-an-ip") || !strings.Contains(warnings[1], "more than one slice") {
		t.Errorf("want the malformed address and the duplicate reported once each, got %v", warnings)
	}
}

func TestServicePortsFields(t *testing.T) {
	s := svc("lb", func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.Ports = append(s.Spec.Ports,
			v1.ServicePort{Name: "dns", Port: 53, Protocol: v1.ProtocolUDP, NodePort: 30053},
			v1.ServicePort{Name: "weird", Port: 1, Protocol: "ICMP"})
		s.Spec.Ports[0].NodePort = 30080
		s.Spec.ExternalIPs = []string{"203.0.113.7", "bogus"}
		s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		s.Spec.HealthCheckNodePort = 32000
		s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/25"}
		s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{
			{IP: "198.51.100.4"},
			{IP: "198.51.100.5", IPMode: ptr.To(v1.LoadBalancerIPModeProxy)},
		}
	})
	ports, warnings, err := ServicePorts(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 2 {
		t.Fatalf("the ICMP port must be dropped, the others kept: %d ports", len(ports))
	}
	if len(warnings) != 2 {
		t.Errorf("want warnings for the bad external IP and the bad protocol, got %v", warnings)
	}
	p := ports[0]
	if p.NodePort != 30080 || !p.ExternalPolicyLocal || p.HealthCheckNodePort != 32000 || p.AffinitySeconds != 10800 {
		t.Errorf("fields: %+v", p)
	}
	if len(p.LoadBalancerIPs) != 1 || p.LoadBalancerIPs[0].String() != "198.51.100.4" {
		t.Errorf("ipMode Proxy ingress must not be programmed: %v", p.LoadBalancerIPs)
	}
	if ports[1].Protocol != model.UDP || ports[1].NodePort != 30053 {
		t.Errorf("udp port: %+v", ports[1])
	}
}

func TestTrackerSharesUnchangedPorts(t *testing.T) {
	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	ka, kb := types.NamespacedName{Namespace: "ns", Name: "a"}, types.NamespacedName{Namespace: "ns", Name: "b"}
	a := svc("a", nil)
	b := svc("b", func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "172.30.0.2", []string{"172.30.0.2"} })
	tr.SetService(ka, a)
	tr.SetService(kb, b)
	tr.SetSlice("ns", "a-1", NewSlice(slice("a-1", "a", 8080, ep("10.180.0.5", true, "n1"))), "a")
	s1, p1 := tr.Snapshot()
	if len(s1.Services) != 2 || p1.ServiceChanges != 2 || p1.EndpointChanges != 1 {
		t.Fatalf("snapshot 1: %d services, pending %+v", len(s1.Services), p1)
	}
	tr.SetSlice("ns", "b-1", NewSlice(slice("b-1", "b", 8080, ep("10.180.0.6", true, "n1"))), "b")
	s2, _ := tr.Snapshot()
	if d := s2.Diff(s1); len(d) != 1 || d[0].Name != "b" {
		t.Fatalf("only b should differ, got %v", d)
	}
	// A malformed Service is skipped without hiding the others.
	bad := svc("c", func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "999.1.1.1", []string{"999.1.1.1"} })
	tr.SetService(types.NamespacedName{Namespace: "ns", Name: "c"}, bad)
	s3, _ := tr.Snapshot()
	if len(s3.Services) != 2 {
		t.Fatalf("bad service must be skipped, others kept: %d", len(s3.Services))
	}
	tr.SetService(ka, nil)
	s4, _ := tr.Snapshot()
	if len(s4.Services) != 1 {
		t.Fatalf("deleted service still present: %v", s4.Sorted())
	}
}

func TestStripForCacheDropsManagedFields(t *testing.T) {
	s := svc("a", func(s *v1.Service) {
		s.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	})
	out, err := newInterner().stripForCache(s)
	if err != nil {
		t.Fatal(err)
	}
	got := out.(*v1.Service)
	if len(got.ManagedFields) != 0 || got.Spec.ClusterIP != "172.30.0.1" {
		t.Fatalf("managedFields must go, the spec must stay: %+v", got.ObjectMeta)
	}
}

// TestTrackerSlicesOfOneService: a Service's endpoints are the union of its
// slices through updates, an unchanged update, and deletes in any order.
func TestTrackerSlicesOfOneService(t *testing.T) {
	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	tr.SetService(types.NamespacedName{Namespace: "ns", Name: "a"}, svc("a", nil))
	set := func(name string, ips ...string) {
		var eps []discovery.Endpoint
		for _, ip := range ips {
			eps = append(eps, ep(ip, true, "n1"))
		}
		tr.SetSlice("ns", name, NewSlice(slice(name, "a", 8080, eps...)), "a")
	}
	endpoints := func() string {
		s, _ := tr.Snapshot()
		var out []string
		for _, sp := range s.Services {
			for _, e := range sp.Endpoints {
				out = append(out, e.IP.String())
			}
		}
		sort.Strings(out)
		return strings.Join(out, " ")
	}
	set("a-1", "10.180.0.1")
	set("a-2", "10.180.0.2", "10.180.0.3")
	set("a-3", "10.180.0.4")
	if got := endpoints(); got != "10.180.0.1 10.180.0.2 10.180.0.3 10.180.0.4" {
		t.Fatalf("three slices: %q", got)
	}
	set("a-2", "10.180.0.5")
	if _, p := tr.Snapshot(); p.EndpointChanges != 1 {
		t.Errorf("one slice update counted as %d changes", p.EndpointChanges)
	}
	set("a-3", "10.180.0.4") // unchanged
	if _, p := tr.Snapshot(); p.EndpointChanges != 0 {
		t.Errorf("unchanged slice update counted as %d changes", p.EndpointChanges)
	}
	set("a-2", "10.180.0.6")
	tr.SetSlice("ns", "a-1", nil, "a")
	if got := endpoints(); got != "10.180.0.4 10.180.0.6" {
		t.Fatalf("after update and delete: %q", got)
	}
	tr.SetSlice("ns", "a-1", nil, "a") // deleting twice is harmless
	tr.SetSlice("ns", "a-3", nil, "a")
	tr.SetSlice("ns", "a-2", nil, "a")
	if got := endpoints(); got != "" {
		t.Fatalf("all slices deleted: %q", got)
	}
}

// TestStripForCacheServiceConvertsTheSame: the Service the cache keeps
// converts to exactly the model the decoded one does, for a Service that
// sets every field the conversion reads.
func TestStripForCacheServiceConvertsTheSame(t *testing.T) {
	full := svc("lb", func(s *v1.Service) {
		s.Labels = map[string]string{"app": "x", LabelServiceProxyName: ""}
		s.Annotations = map[string]string{"a": "b"}
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.Selector = map[string]string{"app": "x"}
		s.Spec.ClusterIPs = []string{"172.30.0.1", "fd00:30::1"}
		s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: "dns", Port: 53, Protocol: v1.ProtocolUDP, NodePort: 30053,
			TargetPort: intstr.FromString("dns"), AppProtocol: ptr.To("dns")})
		s.Spec.Ports[0].NodePort = 30080
		s.Spec.ExternalIPs = []string{"203.0.113.7"}
		s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		s.Spec.InternalTrafficPolicy = ptr.To(v1.ServiceInternalTrafficPolicyLocal)
		s.Spec.HealthCheckNodePort = 32000
		s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/25"}
		s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr.To(int32(60))}}
		s.Spec.TrafficDistribution = ptr.To(v1.ServiceTrafficDistributionPreferClose)
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{
			{IP: "198.51.100.4", Hostname: "lb.example"},
			{IP: "198.51.100.5", IPMode: ptr.To(v1.LoadBalancerIPModeProxy)},
		}
		s.Status.Conditions = []metav1.Condition{{Type: "x"}}
	})
	orig := full.DeepCopy()
	obj, err := newInterner().stripForCache(full)
	if err != nil {
		t.Fatal(err)
	}
	kept := obj.(*v1.Service)
	sl := []*discovery.EndpointSlice{slice("lb-1", "lb", 8080, ep("10.180.0.5", true, "n1"))}
	want, _, err1 := ServicePorts(orig, sl)
	got, _, err2 := ServicePorts(kept, sl)
	if err1 != nil || err2 != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("converting the cached Service differs (errors %v, %v):\n got %+v\nwant %+v", err1, err2, got, want)
	}
	if Ignored(kept, "") != Ignored(orig, "") {
		t.Errorf("Ignored differs: %q vs %q", Ignored(kept, ""), Ignored(orig, ""))
	}
	if kept.Spec.Selector != nil || kept.Status.Conditions != nil || kept.Annotations != nil || kept.Labels["app"] != "" {
		t.Errorf("kept what the proxy never reads: %+v", kept)
	}
}
