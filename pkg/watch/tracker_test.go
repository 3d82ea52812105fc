package watch

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// endpointsOf returns "service: ip ip …" for every Service in snap, sorted,
// so a test can compare where each endpoint landed at a glance.
func endpointsOf(snap *model.Snapshot) map[string]string {
	out := map[string]string{}
	for _, sp := range snap.Sorted() {
		var ips []string
		for _, e := range sp.Endpoints {
			ips = append(ips, e.IP.String())
		}
		out[sp.Name.Name] = strings.Join(ips, " ")
	}
	return out
}

// TestInformerSliceRelabel drives the real informer path (Start over a fake
// clientset): an EndpointSlice whose kubernetes.io/service-name label is
// changed moves its endpoints from the old Service to the new one, and one
// whose label is removed leaves the old Service. Before the fix the
// endpoints stayed on the old Service (as in kube-proxy v1.37).
func TestInformerSliceRelabel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := svc("a", nil)
	b := svc("b", func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "172.30.0.2", []string{"172.30.0.2"} })
	sl := slice("a-1", "a", 8080, ep("10.180.0.5", true, "n1"))
	client := fake.NewClientset(a, b, sl, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}})

	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	changed := make(chan struct{}, 1)
	onChange := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	if err := Start(ctx, client, "n1", tr, onChange); err != nil {
		t.Fatal(err)
	}
	snap, _ := tr.Snapshot()
	if got := endpointsOf(snap); got["a"] != "10.180.0.5" || got["b"] != "" {
		t.Fatalf("before relabel: %v", got)
	}

	// waitFor consumes change notifications until cond holds for a
	// snapshot; the bound only turns a hang into a failure.
	waitFor := func(what string, cond func(map[string]string) bool) map[string]string {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			snap, _ := tr.Snapshot()
			got := endpointsOf(snap)
			if cond(got) {
				return got
			}
			select {
			case <-changed:
			case <-deadline:
				t.Fatalf("%s: never seen; last snapshot %v", what, got)
			}
		}
	}
	relabel := func(labels map[string]string) {
		t.Helper()
		cur, err := client.DiscoveryV1().EndpointSlices("ns").Get(ctx, "a-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cur.Labels = labels
		if _, err := client.DiscoveryV1().EndpointSlices("ns").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	relabel(map[string]string{discovery.LabelServiceName: "b"})
	got := waitFor("endpoints on b", func(m map[string]string) bool { return m["b"] == "10.180.0.5" })
	if got["a"] != "" {
		t.Errorf("after relabel a → b, a keeps the moved endpoints: %v", got)
	}

	relabel(map[string]string{discovery.LabelServiceName: "a"})
	got = waitFor("endpoints back on a", func(m map[string]string) bool { return m["a"] == "10.180.0.5" })
	if got["b"] != "" {
		t.Errorf("after relabel b → a, b keeps the endpoints: %v", got)
	}

	relabel(nil)
	got = waitFor("label removed", func(m map[string]string) bool { return m["a"] == "" })
	if got["b"] != "" {
		t.Errorf("after the label was removed: %v", got)
	}
}

// TestTrackerUpdateSliceMoves: UpdateSlice moves a slice between Services
// in one step, marks both dirty (a partial sync rewrites both), and a
// label-less slice belongs to nobody.
func TestTrackerUpdateSliceMoves(t *testing.T) {
	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	for i, name := range []string{"a", "b"} {
		ip := fmt.Sprintf("172.30.0.%d", i+1)
		tr.SetService(types.NamespacedName{Namespace: "ns", Name: name}, svc(name, func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = ip, []string{ip} }))
	}
	onA := NewSlice(slice("x", "a", 8080, ep("10.180.0.5", true, "n1")))
	tr.SetSlice("ns", "x", onA, "a")
	s1, _ := tr.Snapshot()

	onB := NewSlice(slice("x", "b", 8080, ep("10.180.0.5", true, "n1")))
	tr.UpdateSlice(onA, onB)
	s2, p := tr.Snapshot()
	if got := endpointsOf(s2); got["a"] != "" || got["b"] != "10.180.0.5" {
		t.Fatalf("after a → b: %v", got)
	}
	if d := s2.Diff(s1); len(d) != 2 {
		t.Errorf("both Services must be re-rendered, diff %v", d)
	}
	if p.EndpointChanges != 2 {
		t.Errorf("a move is a removal and an addition: %d endpoint changes", p.EndpointChanges)
	}

	none := NewSlice(slice("x", "", 8080, ep("10.180.0.5", true, "n1")))
	tr.UpdateSlice(onB, none)
	s3, _ := tr.Snapshot()
	if got := endpointsOf(s3); got["a"] != "" || got["b"] != "" {
		t.Fatalf("after the label was removed: %v", got)
	}
	// Labelled again: an update from a label-less slice adds it.
	tr.UpdateSlice(none, onA)
	s4, _ := tr.Snapshot()
	if got := endpointsOf(s4); got["a"] != "10.180.0.5" {
		t.Fatalf("after labelling again: %v", got)
	}
}

func TestSourceRanges(t *testing.T) {
	cases := []struct {
		name    string
		in      []string
		want    string
		invalid bool
		reports int
	}{
		{"none", nil, "", false, 0},
		{"plain", []string{"203.0.113.0/24", "2001:db8::/64"}, "203.0.113.0/24 2001:db8::/64", false, 0},
		// The API admits padding; kube-proxy trims it. Before, miniproxy
		// dropped such an entry, and the Service was open to everyone.
		{"space padded", []string{" 203.0.113.0/24 "}, "203.0.113.0/24", false, 0},
		{"legacy leading zeros", []string{"010.001.0.0/16"}, "10.1.0.0/16", false, 0},
		{"host bits masked", []string{"203.0.113.7/24"}, "203.0.113.0/24", false, 0},
		{"ipv4-mapped", []string{"::ffff:203.0.113.0/120"}, "203.0.113.0/24", false, 0},
		{"one bad of two", []string{"bogus", "203.0.113.0/24"}, "203.0.113.0/24", false, 1},
		{"all bad: fail closed", []string{"bogus", "300.0.0.0/8", ""}, "", true, 4},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, invalid, problems := sourceRanges(tc.in)
			var s []string
			for _, p := range got {
				s = append(s, p.String())
			}
			if strings.Join(s, " ") != tc.want || invalid != tc.invalid || len(problems) != tc.reports {
				t.Errorf("sourceRanges(%q) = %v invalid=%v problems=%v; want %q invalid=%v %d problems", tc.in, s, invalid, problems, tc.want, tc.invalid, tc.reports)
			}
			for _, p := range problems {
				if p.Reason != ReasonSourceRange {
					t.Errorf("reason %q", p.Reason)
				}
			}
		})
	}
	// Through the whole conversion: every port carries the closed flag.
	s := svc("lb", func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.LoadBalancerSourceRanges = []string{"not-a-cidr"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.4"}}
	})
	ports, _, err := ServicePorts(s, nil)
	if err != nil || len(ports) != 1 {
		t.Fatal(ports, err)
	}
	if !ports[0].LoadBalancerSourceRangesInvalid || !ports[0].RestrictsSources() || len(ports[0].LoadBalancerSourceRanges) != 0 {
		t.Errorf("a Service whose only source range is unreadable must restrict sources to nothing: %+v", ports[0])
	}
}

// captureLog records every log record's reason and service.
type captureLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *captureLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *captureLog) lines(substr string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, l := range strings.Split(c.buf.String(), "\n") {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

// TestTrackerOddObjects feeds odd-but-valid objects next to normal ones: the
// normal Services convert as if the odd ones did not exist, each odd Service
// is reported once per kind of oddity (log and counter), a rebuild does not
// report it again, and a problem that goes away and comes back is reported
// again.
func TestTrackerOddObjects(t *testing.T) {
	logs := &captureLog{}
	tr := NewTracker(slog.New(slog.NewTextHandler(logs, nil)), "")
	counts := map[string]int{}
	tr.CountIgnored(func(reason string) { counts[reason]++ })
	tr.SetNode(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{LabelZone: "zone-a"}}})

	key := func(name string) types.NamespacedName { return types.NamespacedName{Namespace: "ns", Name: name} }
	ipn := 0
	addSvc := func(name string, mut func(*v1.Service)) {
		ipn++
		ip := fmt.Sprintf("172.30.%d.%d", ipn/250, ipn%250+1)
		tr.SetService(key(name), svc(name, func(s *v1.Service) {
			s.Spec.ClusterIP, s.Spec.ClusterIPs = ip, []string{ip}
			if mut != nil {
				mut(s)
			}
		}))
	}
	addSlice := func(sl *discovery.EndpointSlice) {
		tr.SetSlice(sl.Namespace, sl.Name, NewSlice(sl), sl.Labels[discovery.LabelServiceName])
	}

	// Normal Services, before and after the odd ones in name order.
	for _, name := range []string{"aaa-normal", "zzz-normal"} {
		addSvc(name, nil)
		addSlice(slice(name+"-1", name, 8080, ep("10.180.0.5", true, "n1"), ep("10.180.0.6", true, "n1")))
	}
	// Family mismatch: an IPv6 slice for an IPv4-only Service.
	addSvc("v6-slice", nil)
	v6 := slice("v6-slice-1", "v6-slice", 8080, ep("fd00:180::5", true, "n1"))
	v6.AddressType = discovery.AddressTypeIPv6
	addSlice(v6)
	addSlice(slice("v6-slice-2", "v6-slice", 8080, ep("10.180.0.7", true, "n1")))
	// FQDN slice.
	addSvc("fqdn", nil)
	fq := slice("fqdn-1", "fqdn", 8080)
	fq.AddressType = discovery.AddressTypeFQDN
	fq.Endpoints = []discovery.Endpoint{{Addresses: []string{"example.com"}}}
	addSlice(fq)
	// The same endpoints in two slices.
	addSvc("dupes", nil)
	addSlice(slice("dupes-1", "dupes", 8080, ep("10.180.0.8", false, "n1"), ep("10.180.0.9", true, "n1")))
	addSlice(slice("dupes-2", "dupes", 8080, ep("10.180.0.8", true, "n1"), ep("10.180.0.9", true, "n1")))
	// A slice port without a name for a Service whose port is named.
	addSvc("unnamed", nil)
	un := slice("unnamed-1", "unnamed", 8080, ep("10.180.0.10", true, "n1"))
	un.Ports[0].Name = nil
	addSlice(un)
	// 1,000 ports, published over 10 slices of 100 (the API's maximum).
	addSvc("wide", func(s *v1.Service) {
		s.Spec.Ports = nil
		for i := 0; i < 1000; i++ {
			s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: fmt.Sprintf("p%d", i), Port: int32(10000 + i), Protocol: v1.ProtocolTCP})
		}
	})
	for k := 0; k < 10; k++ {
		sl := slice(fmt.Sprintf("wide-%d", k), "wide", 0, ep("10.180.0.11", true, "n1"))
		sl.Ports = nil
		for i := k * 100; i < (k+1)*100; i++ {
			sl.Ports = append(sl.Ports, discovery.EndpointPort{Name: ptr.To(fmt.Sprintf("p%d", i)), Port: ptr.To(int32(20000 + i)), Protocol: ptr.To(v1.ProtocolTCP)})
		}
		addSlice(sl)
	}
	// Hints for zones no node is in.
	addSvc("hints", nil)
	hinted := ep("10.180.0.12", true, "n1")
	hinted.Hints = &discovery.EndpointHints{ForZones: []discovery.ForZone{{Name: "zone-nowhere"}}}
	addSlice(slice("hints-1", "hints", 8080, hinted))
	// Source ranges of which none parses.
	addSvc("lb-closed", func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.LoadBalancerSourceRanges = []string{"bogus"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.4"}}
	})

	snap, _ := tr.Snapshot()
	got := endpointsOf(snap)
	for _, name := range []string{"aaa-normal", "zzz-normal"} {
		if got[name] != "10.180.0.5 10.180.0.6" {
			t.Errorf("normal Service %s: endpoints %q", name, got[name])
		}
	}
	if got["v6-slice"] != "10.180.0.7" {
		t.Errorf("IPv4-only Service must keep its IPv4 endpoint and leave the IPv6 slice out: %q", got["v6-slice"])
	}
	if got["fqdn"] != "" || got["unnamed"] != "" {
		t.Errorf("FQDN slice / unnamed slice port must give no endpoints: %q %q", got["fqdn"], got["unnamed"])
	}
	if got["dupes"] != "10.180.0.8 10.180.0.9" {
		t.Errorf("duplicates: %q", got["dupes"])
	}
	for _, sp := range snap.Services {
		if sp.Name.Name == "dupes" {
			for _, e := range sp.Endpoints {
				if !e.Ready {
					t.Errorf("duplicate endpoint must keep its ready copy: %+v", e)
				}
			}
		}
	}
	wide := 0
	for _, sp := range snap.Services {
		if sp.Name.Name == "wide" {
			wide++
			if len(sp.Endpoints) != 1 || int(sp.Endpoints[0].Port) != 20000+int(sp.Port-10000) {
				t.Fatalf("wide port %s: %+v", sp.Name, sp.Endpoints)
			}
		}
	}
	if wide != 1000 {
		t.Errorf("1,000-port Service: %d ports", wide)
	}
	if got["hints"] != "10.180.0.12" {
		t.Errorf("unusable hints must fall back to every endpoint: %q", got["hints"])
	}

	want := map[string]int{
		ReasonFamilyMismatch:    1,
		ReasonAddressType:       1,
		ReasonDuplicateEndpoint: 1,
		ReasonUnmatchedPort:     1,
		ReasonTopologyHints:     1,
		ReasonSourceRange:       1, // one per Service, though two problems (the entry, and "none parses")
	}
	check := func(when string) {
		t.Helper()
		for reason, n := range want {
			if counts[reason] != n {
				t.Errorf("%s: counter %s = %d, want %d (all: %v)", when, reason, counts[reason], n, counts)
			}
			if l := logs.lines("reason=" + reason); l != n {
				t.Errorf("%s: %d log lines for %s, want %d", when, l, reason, n)
			}
		}
		if len(counts) != len(want) {
			t.Errorf("%s: unexpected reasons counted: %v", when, counts)
		}
	}
	check("first snapshot")

	// Rebuild every Service (a node change marks all dirty) and touch an
	// odd slice: nothing new is reported.
	tr.SetNode(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{LabelZone: "zone-a"}},
		Status: v1.NodeStatus{Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "192.168.0.2"}}}})
	addSlice(slice("dupes-2", "dupes", 8080, ep("10.180.0.8", true, "n1"), ep("10.180.0.9", true, "n1"), ep("10.180.0.13", true, "n1")))
	tr.Snapshot()
	check("after rebuilding everything")

	// The duplicates go away, then come back: reported again.
	tr.SetSlice("ns", "dupes-2", nil, "dupes")
	tr.Snapshot()
	addSlice(slice("dupes-2", "dupes", 8080, ep("10.180.0.9", true, "n1")))
	tr.Snapshot()
	want[ReasonDuplicateEndpoint] = 2
	check("after the duplicates came back")

	// A deleted odd Service forgets its reports.
	tr.SetService(key("hints"), nil)
	tr.Snapshot()
	if _, ok := tr.reported[key("hints")]; ok {
		t.Error("a deleted Service keeps its report entry")
	}
	if n := len(tr.reported); n != 5 {
		t.Errorf("report entries for %d Services, want the 5 odd ones left: %v", n, tr.reported)
	}
}

// TestEndpointFamilies: endpoints of a family the Service has no cluster IP
// of never count, even where they would change eligibility: a ready IPv6
// endpoint must not hide the terminating fallback of an IPv4-only Service.
func TestEndpointFamilies(t *testing.T) {
	s := svc("a", nil)
	terminating := ep("10.180.0.5", false, "n1")
	terminating.Conditions.Serving = ptr.To(true)
	v4 := slice("a-1", "a", 8080, terminating)
	v6 := slice("a-2", "a", 8080, ep("fd00:180::5", true, "n1"))
	v6.AddressType = discovery.AddressTypeIPv6
	ports, warnings, err := ServicePorts(s, []*discovery.EndpointSlice{v4, v6})
	if err != nil {
		t.Fatal(err)
	}
	el := ports[0].Eligible(model.Node{Name: "n1"})
	if len(el.Cluster) != 1 || el.Cluster[0].IP != netip.MustParseAddr("10.180.0.5") {
		t.Errorf("want the terminating IPv4 endpoint as fallback, got %v", el.Cluster)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "IPv6") {
		t.Errorf("warnings %v", warnings)
	}
	// Dual-stack: both families count.
	ds := svc("a", func(s *v1.Service) { s.Spec.ClusterIPs = []string{"172.30.0.1", "fd00:30::1"} })
	ports, warnings, _ = ServicePorts(ds, []*discovery.EndpointSlice{v4, v6})
	if len(ports[0].Endpoints) != 2 || len(warnings) != 0 {
		t.Errorf("dual-stack: %v %v", ports[0].Endpoints, warnings)
	}
	if !slices.ContainsFunc(ports[0].Endpoints, func(e model.Endpoint) bool { return e.IP.Is6() }) {
		t.Error("dual-stack lost its IPv6 endpoint")
	}
}
