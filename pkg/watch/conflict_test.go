package watch

import (
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// lbSvc is a LoadBalancer Service with ingress ip, created at t0+age.
func lbSvc(name, vip, ip string, age int) *v1.Service {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	return svc(name, func(s *v1.Service) {
		s.CreationTimestamp = metav1.NewTime(t0.Add(time.Duration(age) * time.Second))
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.ClusterIP, s.Spec.ClusterIPs = vip, []string{vip}
		s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: ip}}
	})
}

// TestTrackerFrontendConflict: two Services report the same ingress IP; the
// older keeps it in every snapshot, the younger keeps its ClusterIP, the
// conflict is handed out once and its end once, and an unrelated Service
// added meanwhile is untouched.
func TestTrackerFrontendConflict(t *testing.T) {
	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	key := func(n string) types.NamespacedName { return types.NamespacedName{Namespace: "ns", Name: n} }
	name := func(n string) model.ServicePortName {
		return model.ServicePortName{Namespace: "ns", Name: n, Port: "http", Protocol: model.TCP}
	}
	lbIP := netip.MustParseAddr("198.51.100.1")
	// The younger one arrives first: the order of events must not matter.
	tr.SetService(key("young"), lbSvc("young", "172.30.0.2", "198.51.100.1", 10))
	s1, p1 := tr.Snapshot()
	if got := s1.Services[name("young")].LoadBalancerIPs; !slices.Equal(got, []netip.Addr{lbIP}) || len(p1.Conflicts.Appeared) != 0 {
		t.Fatalf("alone, young owns the IP: %v %v", got, p1.Conflicts)
	}
	tr.SetService(key("old"), lbSvc("old", "172.30.0.1", "198.51.100.1", 0))
	s2, p2 := tr.Snapshot()
	old, young := s2.Services[name("old")], s2.Services[name("young")]
	if !old.Created.Before(young.Created) {
		t.Fatalf("creationTimestamp not carried into the model: %v %v", old.Created, young.Created)
	}
	if !slices.Equal(old.LoadBalancerIPs, []netip.Addr{lbIP}) || len(young.LoadBalancerIPs) != 0 || len(young.ClusterIPs) != 1 {
		t.Fatalf("older must own the IP, younger keep its ClusterIP: old %v young %+v", old.LoadBalancerIPs, young)
	}
	if young == s1.Services[name("young")] {
		t.Errorf("young's port changed without a new pointer: backends would not re-render it")
	}
	if c := p2.Conflicts; len(c.Appeared) != 1 || c.Appeared[0].Loser != name("young") || c.Appeared[0].Winner != name("old") || c.Current != 1 {
		t.Fatalf("conflicts = %+v", c)
	}

	tr.SetService(key("other"), lbSvc("other", "172.30.0.3", "198.51.100.3", 20))
	s3, p3 := tr.Snapshot()
	if s3.Services[name("old")] != old || s3.Services[name("young")] != young {
		t.Errorf("an unrelated Service changed the conflicting pointers")
	}
	if len(p3.Conflicts.Appeared)+len(p3.Conflicts.Resolved) != 0 || p3.Conflicts.Current != 1 {
		t.Errorf("conflict reported again: %+v", p3.Conflicts)
	}
	if d := s3.Diff(s2); !slices.Equal(d, []model.ServicePortName{name("other")}) {
		t.Errorf("diff = %v, want only other", d)
	}

	tr.SetService(key("old"), nil)
	s4, p4 := tr.Snapshot()
	if got := s4.Services[name("young")].LoadBalancerIPs; !slices.Equal(got, []netip.Addr{lbIP}) {
		t.Errorf("with old gone, young must get the IP: %v", got)
	}
	if c := p4.Conflicts; len(c.Resolved) != 1 || c.Current != 0 {
		t.Errorf("conflicts = %+v", c)
	}
	if tr.Service(key("young")) == nil || tr.Service(key("old")) != nil {
		t.Errorf("Service lookup")
	}
}

func TestServicePortsDuplicatePortName(t *testing.T) {
	s := svc("dup", func(s *v1.Service) {
		s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: "http", Port: 81, Protocol: v1.ProtocolTCP})
	})
	ports, warnings, err := ServicePorts(s, nil)
	if err != nil || len(ports) != 1 || ports[0].Port != 80 || len(warnings) != 1 {
		t.Fatalf("ports %v warnings %v err %v; want the first port only, with a warning", ports, warnings, err)
	}
}

// TestStripForCacheKeepsServiceAge: the informer cache keeps what the
// frontend rule and its Event need (found missing by the e2e test: without
// it every Service had the zero time and the name decided).
func TestStripForCacheKeepsServiceAge(t *testing.T) {
	in := lbSvc("s", "172.30.0.1", "198.51.100.1", 5)
	in.UID = "u-1"
	in.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "m"}}
	obj, err := newInterner().stripForCache(in)
	if err != nil {
		t.Fatal(err)
	}
	out := obj.(*v1.Service)
	if !out.CreationTimestamp.Equal(&in.CreationTimestamp) || out.UID != "u-1" || out.ManagedFields != nil {
		t.Errorf("stripped Service: created %v uid %q managed %v", out.CreationTimestamp, out.UID, out.ManagedFields)
	}
}
