package grpcresolver

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"

	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/miniproxy/miniproxy/pkg/model"
)

const testNS = "lab"

func service(name string, mutate ...func(*v1.Service)) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS},
		Spec: v1.ServiceSpec{
			ClusterIP: "10.96.0.10",
			Ports: []v1.ServicePort{
				{Name: "grpc", Port: 80, Protocol: v1.ProtocolTCP},
				{Name: "metrics", Port: 9090, Protocol: v1.ProtocolTCP},
			},
		},
	}
	for _, m := range mutate {
		m(s)
	}
	return s
}

// ep describes one slice endpoint: ip, conditions and zone.
type ep struct {
	ip                          string
	ready, serving, terminating bool
	zone                        string
}

func readyEP(ip string) ep { return ep{ip: ip, ready: true, serving: true} }

func slice(svcName, name string, port int32, eps ...ep) *discovery.EndpointSlice {
	portName, proto := "grpc", v1.ProtocolTCP
	s := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS,
			Labels: map[string]string{discovery.LabelServiceName: svcName}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: &portName, Port: &port, Protocol: &proto}},
	}
	for _, e := range eps {
		e := e
		de := discovery.Endpoint{Addresses: []string{e.ip},
			Conditions: discovery.EndpointConditions{Ready: &e.ready, Serving: &e.serving, Terminating: &e.terminating}}
		if e.zone != "" {
			de.Zone = &e.zone
		}
		s.Endpoints = append(s.Endpoints, de)
	}
	return s
}

// recordingCC is a resolver.ClientConn that records every call with its time.
type recordingCC struct {
	ch chan call
}

type call struct {
	addrs []string
	err   error // set for ReportError
	at    time.Time
}

func newRecordingCC() *recordingCC { return &recordingCC{ch: make(chan call, 100)} }

func (c *recordingCC) UpdateState(s resolver.State) error {
	now := time.Now()
	var a []string
	for _, addr := range s.Addresses {
		a = append(a, addr.Addr)
	}
	if len(s.Endpoints) != len(s.Addresses) {
		panic("endpoints and addresses disagree")
	}
	c.ch <- call{addrs: a, at: now}
	return nil
}
func (c *recordingCC) ReportError(err error)         { c.ch <- call{err: err, at: time.Now()} }
func (c *recordingCC) NewAddress([]resolver.Address) {}
func (c *recordingCC) ParseServiceConfig(string) *serviceconfig.ParseResult {
	return &serviceconfig.ParseResult{}
}

// next returns the next call that satisfies ok, failing the test if none
// arrives before the deadline.
func (c *recordingCC) next(t *testing.T, what string, ok func(call) bool) call {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-c.ch:
			if ok(got) {
				return got
			}
		case <-deadline:
			t.Fatalf("no resolver call with %s", what)
		}
	}
}

func addrsEqual(want ...string) func(call) bool {
	return func(c call) bool { return c.err == nil && slices.Equal(c.addrs, want) }
}

func errIs(target error) func(call) bool {
	return func(c call) bool { return c.err != nil && errors.Is(c.err, target) }
}

func build(t *testing.T, client kubernetes.Interface, opts Options, target string) (*recordingCC, resolver.Resolver) {
	t.Helper()
	cc := newRecordingCC()
	u, err := url.Parse(Scheme + ":///" + target)
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewBuilder(client, opts).Build(resolver.Target{URL: *u}, cc, resolver.BuildOptions{})
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	t.Cleanup(r.Close)
	return cc, r
}

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Target
		err  bool
	}{
		{in: "echo.lab:80", want: Target{Namespace: "lab", Name: "echo", Port: "80"}},
		{in: "echo.lab:grpc", want: Target{Namespace: "lab", Name: "echo", Port: "grpc"}},
		{in: "echo:grpc", want: Target{Namespace: "dflt", Name: "echo", Port: "grpc"}},
		{in: "echo.lab.svc.cluster.local:80", want: Target{Namespace: "lab", Name: "echo", Port: "80"}},
		{in: "echo.lab", want: Target{Namespace: "lab", Name: "echo"}},
		{in: "echo.lab:", err: true},
		{in: ":80", err: true},
	} {
		got, err := ParseTarget(tc.in, "dflt")
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseTarget(%q) = %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestResolveEligibility checks the pure core against the model's rules.
func TestResolveEligibility(t *testing.T) {
	preferClose := func(s *v1.Service) {
		d := v1.ServiceTrafficDistributionPreferClose
		s.Spec.TrafficDistribution = &d
	}
	for _, tc := range []struct {
		name   string
		svc    *v1.Service
		slices []*discovery.EndpointSlice
		port   string
		node   model.Node
		want   []string
		err    error
	}{
		{name: "ready only, by number", svc: service("s"), port: "80",
			slices: []*discovery.EndpointSlice{slice("s", "a", 8080, readyEP("10.0.0.2"), readyEP("10.0.0.1"),
				ep{ip: "10.0.0.3", serving: true, terminating: true})},
			want: []string{"10.0.0.1:8080", "10.0.0.2:8080"}},
		{name: "by name, across slices", svc: service("s"), port: "grpc",
			slices: []*discovery.EndpointSlice{slice("s", "a", 8080, readyEP("10.0.0.1")), slice("s", "b", 8081, readyEP("10.0.0.2"))},
			want:   []string{"10.0.0.1:8080", "10.0.0.2:8081"}},
		{name: "terminating fallback", svc: service("s"), port: "grpc",
			slices: []*discovery.EndpointSlice{slice("s", "a", 8080,
				ep{ip: "10.0.0.1", serving: true, terminating: true},
				ep{ip: "10.0.0.2", serving: false, terminating: true})},
			want: []string{"10.0.0.1:8080"}},
		{name: "prefer close filters other zone", svc: service("s", preferClose), port: "grpc", node: model.Node{Zone: "a"},
			slices: []*discovery.EndpointSlice{slice("s", "x", 8080,
				ep{ip: "10.0.0.1", ready: true, serving: true, zone: "a"},
				ep{ip: "10.0.0.2", ready: true, serving: true, zone: "b"})},
			want: []string{"10.0.0.1:8080"}},
		{name: "malformed address skipped", svc: service("s"), port: "grpc",
			slices: []*discovery.EndpointSlice{slice("s", "a", 8080, readyEP("not-an-ip"), readyEP("10.0.0.1"))},
			want:   []string{"10.0.0.1:8080"}},
		{name: "headless resolves", svc: service("s", func(s *v1.Service) { s.Spec.ClusterIP = v1.ClusterIPNone }), port: "grpc",
			slices: []*discovery.EndpointSlice{slice("s", "a", 8080, readyEP("10.0.0.1"))},
			want:   []string{"10.0.0.1:8080"}},
		{name: "no service", port: "grpc", err: ErrNoService},
		{name: "no endpoints", svc: service("s"), port: "grpc", err: ErrNoEndpoints},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Resolve(tc.svc, tc.slices, Target{Namespace: testNS, Name: "s", Port: tc.port}, tc.node, nil)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("Resolve = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	if _, err := Resolve(service("s"), nil, Target{Namespace: testNS, Name: "s", Port: "nope"}, model.Node{}, nil); err == nil {
		t.Error("unknown port name resolved")
	}
	if _, err := Resolve(service("s"), nil, Target{Namespace: testNS, Name: "s"}, model.Node{}, nil); err == nil {
		t.Error("portless target resolved on a two-port service")
	}
}

// TestResolverLifecycle drives the resolver through the fake apiserver: the
// Service appears late, slices change and disappear, a malformed Service is
// reported and then fixed, and Close stops everything.
func TestResolverLifecycle(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset()
	cc, r := build(t, client, Options{}, "echo."+testNS+":grpc")

	cc.next(t, "service-not-found error", errIs(ErrNoService))

	if _, err := client.CoreV1().Services(testNS).Create(ctx, service("echo"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "no-endpoints error", errIs(ErrNoEndpoints))

	// A Service of the same name in another namespace and a slice of another
	// Service must not leak in.
	other := service("echo")
	other.Namespace = "elsewhere"
	if _, err := client.CoreV1().Services("elsewhere").Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.DiscoveryV1().EndpointSlices(testNS).Create(ctx, slice("other", "other-1", 8080, readyEP("10.9.9.9")), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	s1 := slice("echo", "echo-1", 8080, readyEP("10.0.0.1"), readyEP("10.0.0.2"))
	if _, err := client.DiscoveryV1().EndpointSlices(testNS).Create(ctx, s1, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "two endpoints", addrsEqual("10.0.0.1:8080", "10.0.0.2:8080"))

	// Latency of a slice update to UpdateState, logged (not asserted).
	var lat []time.Duration
	for i := 3; i <= 12; i++ {
		eps := []ep{readyEP("10.0.0.1"), readyEP("10.0.0.2"), readyEP(fmt.Sprintf("10.0.0.%d", i))}
		start := time.Now()
		if _, err := client.DiscoveryV1().EndpointSlices(testNS).Update(ctx, slice("echo", "echo-1", 8080, eps...), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		got := cc.next(t, "updated endpoints", addrsEqual("10.0.0.1:8080", "10.0.0.2:8080", fmt.Sprintf("10.0.0.%d:8080", i)))
		lat = append(lat, got.at.Sub(start))
	}
	slices.Sort(lat)
	t.Logf("slice update -> UpdateState over %d updates: min %v, median %v, max %v", len(lat), lat[0], lat[len(lat)/2], lat[len(lat)-1])

	// Only terminating endpoints left: the serving ones are the fallback.
	if _, err := client.DiscoveryV1().EndpointSlices(testNS).Update(ctx, slice("echo", "echo-1", 8080,
		ep{ip: "10.0.0.1", serving: true, terminating: true}, ep{ip: "10.0.0.2", terminating: true}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "terminating fallback", addrsEqual("10.0.0.1:8080"))

	// Slice deleted: empty state then an error, so gRPC drops the old address.
	if err := client.DiscoveryV1().EndpointSlices(testNS).Delete(ctx, "echo-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "empty state after slice delete", func(c call) bool { return c.err == nil && len(c.addrs) == 0 })
	cc.next(t, "no-endpoints error after slice delete", errIs(ErrNoEndpoints))

	// A malformed Service is reported, not fatal; fixing it recovers.
	if _, err := client.DiscoveryV1().EndpointSlices(testNS).Create(ctx, slice("echo", "echo-2", 8080, readyEP("10.0.1.1")), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "new slice", addrsEqual("10.0.1.1:8080"))
	bad := service("echo", func(s *v1.Service) { s.Spec.ClusterIP = "bogus" })
	if _, err := client.CoreV1().Services(testNS).Update(ctx, bad, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "conversion error", func(c call) bool { return c.err != nil })
	if _, err := client.CoreV1().Services(testNS).Update(ctx, service("echo"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "recovered", addrsEqual("10.0.1.1:8080"))

	// Service deleted: back to not found.
	if err := client.CoreV1().Services(testNS).Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	cc.next(t, "not found after delete", errIs(ErrNoService))

	// ResolveNow with nothing changed sends nothing new.
	r.ResolveNow(resolver.ResolveNowOptions{})
	// Close returns only after the informers stopped; later changes reach nobody.
	r.Close()
	if _, err := client.CoreV1().Services(testNS).Create(ctx, service("echo"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-cc.ch:
		t.Fatalf("resolver call after ResolveNow/Close: %+v", c)
	case <-time.After(200 * time.Millisecond):
		// Absence of an event can only be observed by waiting.
	}
}

// TestOnUpdateAndNode checks the hook and that the node's zone comes from the environment.
func TestOnUpdateAndNode(t *testing.T) {
	t.Setenv(EnvNodeZone, "b")
	d := v1.ServiceTrafficDistributionPreferClose
	svc := service("echo", func(s *v1.Service) { s.Spec.TrafficDistribution = &d })
	client := fake.NewClientset(svc, slice("echo", "echo-1", 8080,
		ep{ip: "10.0.0.1", ready: true, serving: true, zone: "a"},
		ep{ip: "10.0.0.2", ready: true, serving: true, zone: "b"}))
	var mu sync.Mutex
	var updates []Update
	cc, _ := build(t, client, Options{OnUpdate: func(u Update) { mu.Lock(); updates = append(updates, u); mu.Unlock() }}, "echo."+testNS+":80")
	cc.next(t, "zone b endpoint only", addrsEqual("10.0.0.2:8080"))
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(updates)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("OnUpdate not called")
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if u := updates[0]; u.Target != "echo.lab:80" || !slices.Equal(u.Addresses, []string{"10.0.0.2:8080"}) || u.Err != nil {
		t.Errorf("OnUpdate got %+v", u)
	}
}
