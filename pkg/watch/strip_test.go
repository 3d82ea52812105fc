package watch

import (
	"fmt"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestStripForCacheKeepsWhatTheProxyReads(t *testing.T) {
	sl := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: "s-1", Namespace: "ns",
			Labels:          map[string]string{discovery.LabelServiceName: "s"},
			Annotations:     map[string]string{AnnotationTriggerTime: "2026-01-01T00:00:00Z", "big": "x"},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "m"}},
			OwnerReferences: []metav1.OwnerReference{{Name: "s"}},
		},
		Endpoints: []discovery.Endpoint{{Addresses: []string{"10.0.0.1"}, TargetRef: &v1.ObjectReference{Name: "pod"}}},
	}
	if _, err := newInterner().stripForCache(sl); err != nil {
		t.Fatal(err)
	}
	if got := sl.Annotations; len(got) != 1 || got[AnnotationTriggerTime] == "" {
		t.Errorf("annotations = %v, want only the trigger time", got)
	}
	if sl.ManagedFields != nil || sl.OwnerReferences != nil || sl.Endpoints[0].TargetRef != nil {
		t.Errorf("managedFields/ownerReferences/targetRef kept: %+v", sl)
	}
	if sl.Labels[discovery.LabelServiceName] != "s" || sl.Endpoints[0].Addresses[0] != "10.0.0.1" {
		t.Errorf("stripped what the proxy reads: %+v", sl)
	}

	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{
		Labels:      map[string]string{LabelServiceProxyName: "other"},
		Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
	}}
	if _, err := newInterner().stripForCache(svc); err != nil {
		t.Fatal(err)
	}
	if svc.Annotations != nil || svc.Labels[LabelServiceProxyName] != "other" {
		t.Errorf("service meta after strip: labels %v annotations %v", svc.Labels, svc.Annotations)
	}
	if why := Ignored(svc, ""); why == "" {
		t.Error("a Service for another proxy is no longer ignored after stripping")
	}
}

func TestStripForCacheSharesRepeatedValues(t *testing.T) {
	in := newInterner()
	yes, node, zone, proto := true, "node-a", "zone-a", v1.ProtocolTCP
	mk := func(name string) *discovery.EndpointSlice {
		y, n, z, p := yes, node, zone, proto // distinct allocations, as decoding makes
		return &discovery.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: "u",
				Labels: map[string]string{discovery.LabelServiceName: "s", "endpointslice.kubernetes.io/managed-by": "x"}},
			AddressType: discovery.AddressTypeIPv4,
			Endpoints: []discovery.Endpoint{{Addresses: []string{"10.0.0.1"}, Conditions: discovery.EndpointConditions{Ready: &y},
				NodeName: &n, Zone: &z}},
			Ports: []discovery.EndpointPort{{Protocol: &p}},
		}
	}
	a, b := mk("a"), mk("b")
	for _, sl := range []*discovery.EndpointSlice{a, b} {
		if _, err := in.stripForCache(sl); err != nil {
			t.Fatal(err)
		}
	}
	ea, eb := a.Endpoints[0], b.Endpoints[0]
	if ea.Conditions.Ready != eb.Conditions.Ready || ea.NodeName != eb.NodeName || ea.Zone != eb.Zone {
		t.Errorf("repeated endpoint values not shared: %p/%p %p/%p %p/%p",
			ea.Conditions.Ready, eb.Conditions.Ready, ea.NodeName, eb.NodeName, ea.Zone, eb.Zone)
	}
	if !*ea.Conditions.Ready || *eb.NodeName != node || *eb.Zone != zone || *b.Ports[0].Protocol != proto {
		t.Errorf("values changed by sharing: %+v", eb)
	}
	if len(b.Labels) != 1 || b.Labels[discovery.LabelServiceName] != "s" || b.UID != "" {
		t.Errorf("slice meta after strip: labels %v uid %q", b.Labels, b.UID)
	}
	// The table stops growing at its bound; values past it are kept as they are.
	for i := 0; i < maxInterned+10; i++ {
		s := fmt.Sprint("node-", i)
		in.strp(&s)
	}
	if len(in.strs) > maxInterned {
		t.Errorf("interner holds %d strings, bound %d", len(in.strs), maxInterned)
	}
}
