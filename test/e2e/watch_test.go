package e2e

// What the watch layer makes of unusual API objects, through the real
// apiserver in every enabled mode: an EndpointSlice relabelled to another
// Service, loadBalancerSourceRanges the API admits but a strict parser does
// not, and a thousand odd-but-valid objects next to normal Services.

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestSliceRelabel: the EndpointSlice of Service A is relabelled
// (kubernetes.io/service-name) to Service B: B answers from A's pods and A
// has no endpoints left (rejects); with the label removed, neither has.
// kube-proxy v1.37 keeps the endpoints on A.
func TestSliceRelabel(t *testing.T) {
	suite.ForEachMode(t, "EndpointSlice relabel moves endpoints to the new Service", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, svcA, dep := deployService(t, ctx, me, "relabel-a", 2)
		svcB, err := c.CreateService(ctx, framework.ClusterIPService(ns, "relabel-b"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = c.DeleteService(ctx, ns, "relabel-a")
			_ = c.DeleteService(ctx, ns, "relabel-b")
		})
		client := newClient(t, ctx, me.Nodes[0], "relabel-client")
		want := dep.PodNames()
		addrA, addrB := framework.VIP(svcA, "tcp"), framework.VIP(svcB, "tcp")

		row.Note("A answers before the relabel")
		if got, err := waitExactly(ctx, "tcp", client, addrA, want, 60*time.Second); err != nil {
			t.Fatalf("A %s: want exactly %v, last %v: %v", addrA, want, got, err)
		}
		relabel := func(label string) {
			t.Helper()
			api := c.Admin.DiscoveryV1().EndpointSlices(ns)
			sl, err := api.Get(ctx, dep.SliceName(), metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if label == "" {
				delete(sl.Labels, discoveryv1.LabelServiceName)
			} else {
				sl.Labels[discoveryv1.LabelServiceName] = label
			}
			if _, err := api.Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}

		row.Note("relabelled A → B: B answers")
		relabel("relabel-b")
		if got, err := waitExactly(ctx, "tcp", client, addrB, want, 60*time.Second); err != nil {
			t.Fatalf("B %s after the relabel: want exactly %v, last %v: %v", addrB, want, got, err)
		}
		row.Note("relabelled A → B: A rejects")
		if r, err := extWaitOutcome(ctx, client.NS, addrA, framework.Rejected, 2*time.Second, 30*time.Second); err != nil {
			t.Fatalf("A %s after its slice moved to B: want rejected (no endpoints), last %v: %v", addrA, r, err)
		}

		row.Note("label removed: B rejects")
		relabel("")
		if r, err := extWaitOutcome(ctx, client.NS, addrB, framework.Rejected, 2*time.Second, 30*time.Second); err != nil {
			t.Fatalf("B %s after the label was removed: want rejected, last %v: %v", addrB, r, err)
		}
		if r := framework.Probe(ctx, client.NS, addrA, 2*time.Second); r.Outcome != framework.Rejected {
			t.Fatalf("A %s after the label was removed: want rejected, got %v", addrA, r)
		}
		row.Note("")
	})
}

// TestLoadBalancerSourceRangesPadded: the API admits space-padded
// loadBalancerSourceRanges (a historical accident it keeps). miniproxy used
// to drop such an entry as unparsable, and a Service whose only entry it
// was became open to every source. It must read it as kube-proxy does: the
// allowed client reaches the LB IP, another is dropped.
func TestLoadBalancerSourceRangesPadded(t *testing.T) {
	suite.ForEachMode(t, "loadBalancerSourceRanges space-padded: not fail-open", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		allowed, denied := extClient(t, ctx, c, 0), extClient(t, ctx, c, 1)
		lbIP := extTestIP(me.Mode, netip.MustParseAddr("198.51.100.10"), 2)
		s := newExtSvc(t, ctx, me, "lbpad", 2, me.Nodes, func(svc *corev1.Service) {
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.LoadBalancerSourceRanges = []string{"  " + netip.PrefixFrom(allowed.IP, 32).String() + " "}
		})
		if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, nil, lbIP); err != nil {
			t.Fatal(err)
		}
		want := s.dep.PodNames()
		addr := extHostPort(lbIP, framework.SvcPort)
		node := me.Nodes[0]
		extUpstream(t, ctx, c, lbIP, node)
		extRoute(t, ctx, allowed, lbIP, node)
		extRoute(t, ctx, denied, lbIP, node)

		row.Note("allowed source " + allowed.IP.String())
		if got, err := extWaitExactly(ctx, allowed.NS, addr, want, 60*time.Second); err != nil {
			t.Fatalf("LB IP %s from allowed %s: want exactly %v, last %v: %v", addr, allowed.IP, want, got, err)
		}
		row.Note("disallowed source " + denied.IP.String())
		extExpectAll(t, ctx, denied.NS, addr, framework.Dropped, 1500*time.Millisecond,
			fmt.Sprintf("LB IP %s from %s (outside loadBalancerSourceRanges %q)", addr, denied.IP, s.svc.Spec.LoadBalancerSourceRanges))
		row.Note("")
	})
}

// oddKinds are the odd-but-valid objects TestOddObjects creates, with how
// many Services of each and the reason miniproxy reports them under.
var oddKinds = []struct {
	kind, reason string
	services     int
}{
	{"v6slice", "family-mismatch", 150},       // IPv6 slice of an IPv4-only Service
	{"dupes", "duplicate-endpoint", 100},      // the same endpoints in two slices
	{"noname", "unmatched-slice-port", 150},   // slice port without a name, Service port named
	{"hints", "unusable-topology-hints", 100}, // hints for a zone no node is in
}

// TestOddObjects creates about 1,000 odd-but-valid objects at once (IPv6
// slices of IPv4-only Services, endpoints listed in two slices, slice ports
// without names, a Service with 1,000 ports over ten slices, hints for
// zones that do not exist) next to normal Services. The normal Services keep
// answering, the 1,000-port Service answers on its first and last port, and
// every node's miniproxy reports each odd Service exactly once per reason
// (miniproxy_ignored_objects_total{reason}), even after a resync.
func TestOddObjects(t *testing.T) {
	suite.ForEachMode(t, "1,000 odd-but-valid objects at once: others keep working, each reported once", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
		defer cancel()
		c := me.Cluster
		ns, normal, dep := deployService(t, ctx, me, "odd", 2)
		client := newClient(t, ctx, me.Nodes[0], "odd-client")
		want := dep.PodNames()

		before := make([]map[string]float64, len(me.Proxies))
		for i, p := range me.Proxies {
			m, err := p.Metrics(ctx)
			if err != nil {
				t.Fatal(err)
			}
			before[i] = m
		}

		row.Note("creating the odd objects")
		start := time.Now()
		objects, err := createOddObjects(ctx, c, ns, dep.Pods()[0].IP)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			deleteOddObjects(ctx, c, ns)
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("created %d odd objects in %v", objects, time.Since(start).Round(time.Millisecond))
		wide, err := c.Admin.CoreV1().Services(ns).Get(ctx, "wide", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}

		row.Note("every proxy reports each odd Service once")
		for i, p := range me.Proxies {
			err := framework.WaitFor(ctx, 3*time.Minute, time.Second, func() (bool, error) {
				m, err := p.Metrics(ctx)
				if err != nil {
					return false, nil
				}
				for _, k := range oddKinds {
					if ignoredDelta(before[i], m, k.reason) < float64(k.services) {
						return false, nil
					}
				}
				return true, nil
			})
			if err != nil {
				m, _ := p.Metrics(ctx)
				t.Fatalf("proxy on %s never reported every odd Service: %v (counters %v)", p.Node.Name, err, ignoredCounters(before[i], m))
			}
		}

		row.Note("normal Service answers")
		if got, err := waitExactly(ctx, "tcp", client, framework.VIP(normal, "tcp"), want, 90*time.Second); err != nil {
			t.Fatalf("normal Service next to the odd ones: want exactly %v, last %v: %v", want, got, err)
		}
		row.Note("1,000-port Service answers on its first and last port")
		for _, port := range []int{0, 999} {
			addr := netip.AddrPortFrom(netip.MustParseAddr(wide.Spec.ClusterIP), uint16(wide.Spec.Ports[port].Port)).String()
			if got := waitAnswers(t, ctx, client.NS, addr, 60*time.Second); got != dep.Pods()[0].Name {
				t.Fatalf("1,000-port Service port %d (%s): answered by %q, want %q", port, addr, got, dep.Pods()[0].Name)
			}
		}

		// A full resync rebuilds nothing odd a second time: touch one odd
		// slice of each kind and wait for a sync to pass.
		row.Note("no second report after changes and syncs")
		for _, k := range oddKinds {
			if err := touchSlice(ctx, c, ns, k.kind+"-0-a"); err != nil {
				t.Fatal(err)
			}
		}
		if err := waitSyncs(ctx, me.Proxies, 2); err != nil {
			t.Fatal(err)
		}
		for i, p := range me.Proxies {
			m, err := p.Metrics(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range oddKinds {
				if d := ignoredDelta(before[i], m, k.reason); d != float64(k.services) {
					t.Errorf("proxy on %s: %s counted %v times for %d odd Services, want exactly once each", p.Node.Name, k.reason, d, k.services)
				}
			}
			t.Logf("proxy on %s: %v", p.Node.Name, ignoredCounters(before[i], m))
		}
		if got, err := waitExactly(ctx, "tcp", client, framework.VIP(normal, "tcp"), want, 30*time.Second); err != nil {
			t.Fatalf("normal Service after the resync: want exactly %v, last %v: %v", want, got, err)
		}
		row.Note("")
	})
}

func ignoredDelta(before, after map[string]float64, reason string) float64 {
	k := fmt.Sprintf(`miniproxy_ignored_objects_total{reason=%q}`, reason)
	return after[k] - before[k]
}

func ignoredCounters(before, after map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k := range after {
		if strings.HasPrefix(k, "miniproxy_ignored_objects_total") {
			out[k] = after[k] - before[k]
		}
	}
	return out
}

// waitSyncs waits until every proxy has finished n more syncs.
func waitSyncs(ctx context.Context, proxies []*framework.Proxy, n int) error {
	const key = "kubeproxy_sync_proxy_rules_duration_seconds_count"
	start := make([]float64, len(proxies))
	for i, p := range proxies {
		m, err := p.Metrics(ctx)
		if err != nil {
			return err
		}
		start[i] = m[key]
	}
	return framework.WaitFor(ctx, 90*time.Second, 500*time.Millisecond, func() (bool, error) {
		for i, p := range proxies {
			m, err := p.Metrics(ctx)
			if err != nil || m[key] < start[i]+float64(n) {
				return false, nil
			}
		}
		return true, nil
	})
}

// touchSlice adds an endpoint (of the slice's family, at an address
// nothing answers on) to the slice: a real change, so the tracker rebuilds
// the Service and meets its oddity again.
func touchSlice(ctx context.Context, c *framework.Cluster, ns, name string) error {
	api := c.Admin.DiscoveryV1().EndpointSlices(ns)
	sl, err := api.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get slice %s: %w", name, err)
	}
	ip := "10.251.0.1"
	if sl.AddressType == discoveryv1.AddressTypeIPv6 {
		ip = "fd00:251::1"
	}
	sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}})
	if _, err := api.Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update slice %s: %w", name, err)
	}
	return nil
}

// createOddObjects creates the odd Services and slices of oddKinds plus the
// 1,000-port Service "wide" (ten slices of 100 ports, its endpoint the pod
// at podIP listening on the tcp port: every slice port maps to it), with 8
// writers in parallel. It returns how many objects it created.
func createOddObjects(ctx context.Context, c *framework.Cluster, ns string, podIP netip.Addr) (int, error) {
	type job func() error
	var jobs []job
	svcOf := func(name string) *corev1.Service {
		s := framework.ClusterIPService(ns, name)
		s.Spec.Selector = nil
		s.Spec.Ports = s.Spec.Ports[:1] // tcp only
		return s
	}
	createSvc := func(s *corev1.Service) error {
		_, err := c.Admin.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
		return err
	}
	createSlice := func(sl *discoveryv1.EndpointSlice) error {
		_, err := c.Admin.DiscoveryV1().EndpointSlices(ns).Create(ctx, sl, metav1.CreateOptions{})
		return err
	}
	slice := func(name, svc string, at discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{
				discoveryv1.LabelServiceName: svc, discoveryv1.LabelManagedBy: "miniproxy-e2e"}},
			AddressType: at, Ports: ports, Endpoints: eps,
		}
	}
	ep := func(ip string) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}
	}
	tcpPort := []discoveryv1.EndpointPort{framework.SlicePort("tcp", corev1.ProtocolTCP, framework.PodPort)}
	// Endpoints of odd Services are addresses nothing answers on: only
	// the rules are exercised, never a connection.
	fake := func(k, i int) string { return fmt.Sprintf("10.250.%d.%d", k, i%250+1) }
	for k, kind := range oddKinds {
		for i := 0; i < kind.services; i++ {
			name := fmt.Sprintf("%s-%d", kind.kind, i)
			s := svcOf(name)
			var sls []*discoveryv1.EndpointSlice
			switch kind.kind {
			case "v6slice":
				sls = append(sls, slice(name+"-a", name, discoveryv1.AddressTypeIPv6, tcpPort, ep(fmt.Sprintf("fd00:250::%x", i+1))))
			case "dupes":
				sls = append(sls, slice(name+"-a", name, discoveryv1.AddressTypeIPv4, tcpPort, ep(fake(k, i))),
					slice(name+"-b", name, discoveryv1.AddressTypeIPv4, tcpPort, ep(fake(k, i))))
			case "noname":
				unnamed := []discoveryv1.EndpointPort{{Protocol: ptr(corev1.ProtocolTCP), Port: ptr(int32(framework.PodPort))}}
				sls = append(sls, slice(name+"-a", name, discoveryv1.AddressTypeIPv4, unnamed, ep(fake(k, i))))
			case "hints":
				e := ep(fake(k, i))
				e.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "zone-nowhere"}}}
				sls = append(sls, slice(name+"-a", name, discoveryv1.AddressTypeIPv4, tcpPort, e))
			}
			jobs = append(jobs, func() error {
				if err := createSvc(s); err != nil {
					return err
				}
				for _, sl := range sls {
					if err := createSlice(sl); err != nil {
						return err
					}
				}
				return nil
			})
		}
	}
	objects := 0
	for _, k := range oddKinds {
		objects += k.services * 2
		if k.kind == "dupes" {
			objects += k.services
		}
	}
	// The 1,000-port Service: ports 20000..20999, every one mapped to the
	// pod's tcp port in slices of 100 ports (the API's maximum per slice).
	wide := svcOf("wide")
	wide.Spec.Ports = nil
	for i := 0; i < 1000; i++ {
		wide.Spec.Ports = append(wide.Spec.Ports, corev1.ServicePort{Name: fmt.Sprintf("p%d", i), Protocol: corev1.ProtocolTCP, Port: int32(20000 + i)})
	}
	jobs = append(jobs, func() error {
		if err := createSvc(wide); err != nil {
			return err
		}
		for k := 0; k < 10; k++ {
			var ports []discoveryv1.EndpointPort
			for i := k * 100; i < (k+1)*100; i++ {
				ports = append(ports, framework.SlicePort(fmt.Sprintf("p%d", i), corev1.ProtocolTCP, framework.PodPort))
			}
			if err := createSlice(slice(fmt.Sprintf("wide-%d", k), "wide", discoveryv1.AddressTypeIPv4, ports, ep(podIP.String()))); err != nil {
				return err
			}
		}
		return nil
	})
	objects += 11

	work := make(chan job)
	errs := make(chan error, len(jobs))
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				if err := j(); err != nil {
					errs <- err
				}
			}
		}()
	}
	for _, j := range jobs {
		work <- j
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		return objects, fmt.Errorf("creating odd objects: %w", err)
	}
	return objects, nil
}

// deleteOddObjects removes every Service and slice of the namespace except
// the test's normal ones (their own cleanups remove those).
func deleteOddObjects(ctx context.Context, c *framework.Cluster, ns string) {
	_ = c.Admin.DiscoveryV1().EndpointSlices(ns).DeleteCollection(ctx, metav1.DeleteOptions{},
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "!=odd"})
	list, err := c.Admin.CoreV1().Services(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	names := make(chan string)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range names {
				_ = c.Admin.CoreV1().Services(ns).Delete(ctx, n, metav1.DeleteOptions{})
			}
		}()
	}
	for _, s := range list.Items {
		if s.Name != "odd" {
			names <- s.Name
		}
	}
	close(names)
	wg.Wait()
}
