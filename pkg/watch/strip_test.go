package watch

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

func TestStripForCacheKeepsWhatTheProxyReads(t *testing.T) {
	yes, no := true, false
	sl := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: "s-1", Namespace: "ns", ResourceVersion: "7",
			Labels:          map[string]string{discovery.LabelServiceName: "s"},
			Annotations:     map[string]string{AnnotationTriggerTime: "2026-01-01T00:00:00Z", "big": "x"},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "m"}},
			OwnerReferences: []metav1.OwnerReference{{Name: "s"}},
		},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}},
		Endpoints: []discovery.Endpoint{
			{Addresses: []string{"10.0.0.1"}, TargetRef: &v1.ObjectReference{Name: "pod"}},
			{Addresses: []string{"not-an-ip"}},
			{Addresses: []string{"10.0.0.2"}, Conditions: discovery.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes},
				Hints: &discovery.EndpointHints{ForZones: []discovery.ForZone{{Name: "zone-a"}}}},
		},
	}
	obj, err := newInterner().stripForCache(sl)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := obj.(*Slice)
	if !ok {
		t.Fatalf("transform returned %T, want *Slice", obj)
	}
	want := &Slice{
		Name:        "s-1",
		Namespace:   "ns",
		Service:     "s",
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []SlicePort{{Name: "http", Protocol: "TCP", Port: 8080}},
		Endpoints: []SliceEndpoint{
			{IP: netip.MustParseAddr("10.0.0.1"), Ready: true, Serving: true},
			{IP: netip.MustParseAddr("10.0.0.2"), Serving: true, Terminating: true, ZoneHints: []string{"zone-a"}},
		},
		TriggerTime: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
	}
	if len(got.Problems) != 1 || !strings.Contains(got.Problems[0], "not-an-ip") {
		t.Errorf("problems = %q, want the unparsable address", got.Problems)
	}
	got.Problems = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("converted slice:\n got %+v\nwant %+v", got, want)
	}
	// A relist may hand the transform its own output again.
	if again, _ := newInterner().stripForCache(got); again != got {
		t.Errorf("transforming a *Slice again gave %v", again)
	}
	// The informer keys and copies what it caches.
	if k, err := cache.MetaNamespaceKeyFunc(got); err != nil || k != "ns/s-1" {
		t.Errorf("cache key %q, %v", k, err)
	}
	if cp := got.DeepCopyObject().(*Slice); !reflect.DeepEqual(cp, got) || &cp.Endpoints[0] == &got.Endpoints[0] {
		t.Errorf("DeepCopyObject: equal %v, shares endpoints %v", reflect.DeepEqual(cp, got), &cp.Endpoints[0] == &got.Endpoints[0])
	}

	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{
		Labels:      map[string]string{LabelServiceProxyName: "other"},
		Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
	}}
	obj, err = newInterner().stripForCache(svc)
	if err != nil {
		t.Fatal(err)
	}
	svc = obj.(*v1.Service)
	if svc.Annotations != nil || svc.Labels[LabelServiceProxyName] != "other" {
		t.Errorf("service meta after strip: labels %v annotations %v", svc.Labels, svc.Annotations)
	}
	if why := Ignored(svc, ""); why == "" {
		t.Error("a Service for another proxy is no longer ignored after stripping")
	}
}

func TestStripForCacheSharesRepeatedValues(t *testing.T) {
	in := newInterner()
	node, zone, proto, port := "node-a", "zone-a", v1.ProtocolUDP, "dns"
	mk := func(name string) *discovery.EndpointSlice {
		n, z, p, pn := node, zone, proto, port // distinct allocations, as decoding makes
		return &discovery.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: "u",
				Labels: map[string]string{discovery.LabelServiceName: "s", "endpointslice.kubernetes.io/managed-by": "x"}},
			AddressType: discovery.AddressTypeIPv4,
			Endpoints:   []discovery.Endpoint{{Addresses: []string{"10.0.0.1"}, NodeName: &n, Zone: &z}},
			Ports:       []discovery.EndpointPort{{Name: &pn, Protocol: &p}},
		}
	}
	var out []*Slice
	for _, sl := range []*discovery.EndpointSlice{mk("a"), mk("b")} {
		obj, err := in.stripForCache(sl)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, obj.(*Slice))
	}
	ea, eb := out[0].Endpoints[0], out[1].Endpoints[0]
	same := func(a, b string) bool { return unsafe.StringData(a) == unsafe.StringData(b) }
	if !same(ea.NodeName, eb.NodeName) || !same(ea.Zone, eb.Zone) || !same(out[0].Ports[0].Name, out[1].Ports[0].Name) ||
		!same(string(out[0].Ports[0].Protocol), string(out[1].Ports[0].Protocol)) {
		t.Errorf("repeated values not shared between the two slices")
	}
	if eb.NodeName != node || eb.Zone != zone || out[1].Ports[0].Protocol != "UDP" || out[1].Ports[0].Name != port {
		t.Errorf("values changed by sharing: %+v %+v", eb, out[1].Ports[0])
	}
	if out[1].Name != "b" || out[1].Namespace != "ns" || out[1].Service != "s" {
		t.Errorf("slice meta after conversion: %s/%s service %q", out[1].Namespace, out[1].Name, out[1].Service)
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
