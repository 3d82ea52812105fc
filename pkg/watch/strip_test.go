package watch

import (
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
	if _, err := stripForCache(sl); err != nil {
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
	if _, err := stripForCache(svc); err != nil {
		t.Fatal(err)
	}
	if svc.Annotations != nil || svc.Labels[LabelServiceProxyName] != "other" {
		t.Errorf("service meta after strip: labels %v annotations %v", svc.Labels, svc.Annotations)
	}
	if why := Ignored(svc, ""); why == "" {
		t.Error("a Service for another proxy is no longer ignored after stripping")
	}
}
