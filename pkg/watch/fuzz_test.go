package watch

// Fuzz targets for the Service/EndpointSlice → model conversion and the
// tracker's EndpointSlice merge. Without -fuzz they run as unit tests over
// the seeds below and the committed corpus in testdata/fuzz/; `make fuzz`
// runs each for a bounded time.

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// fuzzInput is what FuzzServicePorts decodes: one Service and its slices.
type fuzzInput struct {
	Service v1.Service                `json:"service"`
	Slices  []discovery.EndpointSlice `json:"slices"`
}

func fuzzSeed(svc *v1.Service, sls ...*discovery.EndpointSlice) []byte {
	in := fuzzInput{Service: *svc}
	for _, sl := range sls {
		in.Slices = append(in.Slices, *sl)
	}
	b, err := json.Marshal(in)
	if err != nil {
		panic(err)
	}
	return b
}

// FuzzServicePorts: any Service and slices convert without panicking, and
// what comes out keeps the model's invariants: endpoints sorted, unique and
// of the Service's families; ports in range; at most one cluster IP per
// family; source ranges masked; a Service that lists source ranges always
// restricts sources (fail closed); the endpoint set does not depend on the
// order of the slices.
func FuzzServicePorts(f *testing.F) {
	lb := svc("lb", func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.ClusterIPs = []string{"172.30.0.1", "fd00:30::1"}
		s.Spec.LoadBalancerSourceRanges = []string{" 203.0.113.0/24", "bogus", "010.0.0.0/8"}
		s.Spec.ExternalIPs = []string{"203.0.113.7", "nope"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.4"}}
	})
	v6 := slice("lb-2", "lb", 8080, ep("fd00:180::5", true, "n1"))
	v6.AddressType = discovery.AddressTypeIPv6
	f.Add(fuzzSeed(svc("web", nil), slice("web-1", "web", 8080, ep("10.180.0.5", true, "n1"), ep("10.180.0.6", false, "n2"))))
	f.Add(fuzzSeed(lb, slice("lb-1", "lb", 8080, ep("10.180.0.5", true, "n1")), v6))
	f.Add(fuzzSeed(svc("dup", nil), slice("dup-1", "dup", 8080, ep("10.180.0.5", false, "n1")), slice("dup-2", "dup", 8080, ep("10.180.0.5", true, "n1"))))
	f.Add([]byte(`{"service":{"spec":{"clusterIP":"::ffff:10.0.0.1","ports":[{"port":70000},{"port":1,"protocol":"ICMP"}],"loadBalancerSourceRanges":[""]}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var in fuzzInput
		if err := json.Unmarshal(data, &in); err != nil {
			return
		}
		sls := make([]*discovery.EndpointSlice, len(in.Slices))
		for i := range in.Slices {
			sls[i] = &in.Slices[i]
		}
		ports, _, err := ServicePorts(&in.Service, sls)
		if err != nil {
			return
		}
		var families familySet
		for _, s := range in.Service.Spec.ClusterIPs {
			if ip, err := netip.ParseAddr(s); err == nil {
				families.add(ip.Unmap())
			}
		}
		if len(in.Service.Spec.ClusterIPs) == 0 {
			if ip, err := netip.ParseAddr(in.Service.Spec.ClusterIP); err == nil {
				families.add(ip.Unmap())
			}
		}
		for _, sp := range ports {
			checkPort(t, sp, families, len(in.Service.Spec.LoadBalancerSourceRanges) > 0)
		}
		// The same slices in reverse order: the same endpoints.
		slices.Reverse(sls)
		again, _, err := ServicePorts(&in.Service, sls)
		if err != nil || len(again) != len(ports) {
			t.Fatalf("reversed slices: %d ports, err %v; first time %d ports", len(again), err, len(ports))
		}
		for i := range ports {
			if a, b := addrPorts(ports[i].Endpoints), addrPorts(again[i].Endpoints); a != b {
				t.Fatalf("port %s: endpoints depend on slice order:\n %s\n %s", ports[i].Name, a, b)
			}
		}
	})
}

func checkPort(t *testing.T, sp *model.ServicePort, families familySet, listsRanges bool) {
	t.Helper()
	if sp.Port <= 0 || sp.Port > 65535 || sp.NodePort < 0 || sp.NodePort > 65535 {
		t.Fatalf("%s: port %d nodePort %d out of range", sp.Name, sp.Port, sp.NodePort)
	}
	seen := map[model.Family]bool{}
	for _, ip := range sp.ClusterIPs {
		f := model.FamilyOf(ip)
		if seen[f] || ip.Is4In6() {
			t.Fatalf("%s: cluster IPs %v: two of one family or mapped", sp.Name, sp.ClusterIPs)
		}
		seen[f] = true
	}
	for i, e := range sp.Endpoints {
		if e.Port <= 0 || e.Port > 65535 {
			t.Fatalf("%s: endpoint %s port out of range", sp.Name, e)
		}
		if !families.has(model.FamilyOf(e.IP)) || e.IP.Is4In6() {
			t.Fatalf("%s: endpoint %s of a family the Service has no cluster IP of (%v)", sp.Name, e, sp.ClusterIPs)
		}
		if i > 0 && sp.Endpoints[i-1].AddrPort().Compare(e.AddrPort()) >= 0 {
			t.Fatalf("%s: endpoints not sorted and unique: %v", sp.Name, sp.Endpoints)
		}
	}
	for _, p := range sp.LoadBalancerSourceRanges {
		if p != p.Masked() || p.Addr().Is4In6() {
			t.Fatalf("%s: source range %s not masked or mapped", sp.Name, p)
		}
	}
	if listsRanges && !sp.RestrictsSources() {
		t.Fatalf("%s: the Service lists source ranges but the port admits every source (fail open)", sp.Name)
	}
	if !listsRanges && sp.RestrictsSources() {
		t.Fatalf("%s: no source ranges listed but sources restricted", sp.Name)
	}
}

func addrPorts(eps []model.Endpoint) string {
	var s []string
	for _, e := range eps {
		s = append(s, e.String())
	}
	return strings.Join(s, " ")
}

// FuzzTrackerSlices replays a random sequence of EndpointSlice adds,
// updates (including relabels to another Service or to none) and deletes
// through the tracker, as the informer would deliver them, and checks after
// every snapshot that each Service's endpoints are exactly the conversion
// of the slices that name it now. This is the EndpointSlice merge: many
// slices per Service, slices moving between Services, repeated deletes.
//
// Each op is 3 bytes: kind (add/update, delete), slice (one of 4) and a
// byte whose low 2 bits pick the label (Service a, b, c or none) and whose
// high 6 bits pick which of 6 addresses the slice lists, ready or not.
func FuzzTrackerSlices(f *testing.F) {
	f.Add([]byte{0, 0, 0x10, 0, 1, 0x21, 0, 0, 0x11, 1, 1, 0})
	f.Add([]byte{0, 0, 0xfc, 0, 1, 0xfd, 0, 2, 0xfe, 0, 3, 0xff, 0, 0, 0x03, 1, 1, 0, 0, 1, 0x42})
	f.Add([]byte{0, 0, 0x10, 255, 0, 0x11, 0, 0, 0x12, 0, 0, 0x13, 1, 0, 0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
		services := []string{"a", "b", "c"}
		for i, name := range services {
			ip := fmt.Sprintf("172.30.0.%d", i+1)
			tr.SetService(types.NamespacedName{Namespace: "ns", Name: name}, svc(name, func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = ip, []string{ip} }))
		}
		cache := map[string]*Slice{} // what the informer's cache holds
		for len(ops) >= 3 {
			kind, which, arg := ops[0], ops[1]%4, ops[2]
			ops = ops[3:]
			name := fmt.Sprintf("s%d", which)
			old := cache[name]
			if kind%2 == 1 {
				if old != nil {
					tr.SetSlice(old.Namespace, old.Name, nil, old.Service)
					delete(cache, name)
				}
			} else {
				label := ""
				if l := int(arg & 3); l < len(services) {
					label = services[l]
				}
				var eps []discoveryEndpoint
				for k := 0; k < 6; k++ {
					if arg&(1<<(2+k)) != 0 {
						// Readiness differs per slice, so duplicates need the ranking.
						eps = append(eps, discoveryEndpoint{fmt.Sprintf("10.180.0.%d", k+1), (int(which)+k)%2 == 0})
					}
				}
				cur := NewSlice(fuzzSlice(name, label, eps))
				if old == nil {
					tr.SetSlice(cur.Namespace, cur.Name, cur, cur.Service)
				} else {
					tr.UpdateSlice(old, cur)
				}
				cache[name] = cur
			}
			if kind >= 128 { // snapshot only sometimes: changes accumulate between syncs
				continue
			}
			snap, _ := tr.Snapshot()
			for _, svcName := range services {
				var mine []*Slice
				for _, n := range slices.Sorted(maps.Keys(cache)) {
					if cache[n].Service == svcName {
						mine = append(mine, cache[n])
					}
				}
				want, _, err := servicePorts(tr.services[types.NamespacedName{Namespace: "ns", Name: svcName}], mine)
				if err != nil {
					t.Fatal(err)
				}
				got := snap.Services[want[0].Name]
				if got == nil {
					t.Fatalf("service %s missing from the snapshot", svcName)
				}
				if a, b := endpointsWithReadiness(got.Endpoints), endpointsWithReadiness(want[0].Endpoints); a != b {
					t.Fatalf("service %s: tracker has %q, its slices say %q (cache %v)", svcName, a, b, cacheLabels(cache))
				}
			}
		}
	})
}

type discoveryEndpoint struct {
	ip    string
	ready bool
}

func fuzzSlice(name, label string, eps []discoveryEndpoint) *discovery.EndpointSlice {
	var out []discovery.Endpoint
	for _, e := range eps {
		out = append(out, ep(e.ip, e.ready, "n1"))
	}
	sl := slice(name, label, 8080, out...)
	if label == "" {
		sl.Labels = nil
	}
	return sl
}

func endpointsWithReadiness(eps []model.Endpoint) string {
	var s []string
	for _, e := range eps {
		s = append(s, fmt.Sprintf("%s/%v", e, e.Ready))
	}
	return strings.Join(s, " ")
}

func cacheLabels(cache map[string]*Slice) map[string]string {
	out := map[string]string{}
	for k, v := range cache {
		out[k] = v.Service
	}
	return out
}
