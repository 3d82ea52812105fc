package health

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// freePorts returns n ports that were free on 127.0.0.1 a moment ago. Another
// process could take one in between; the tests would then fail loudly, not
// pass wrongly.
func freePorts(t *testing.T, n int) []int32 {
	t.Helper()
	var lns []net.Listener
	var ports []int32
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		lns = append(lns, ln)
		ports = append(ports, int32(ln.Addr().(*net.TCPAddr).Port))
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}

var client = &http.Client{
	Transport: &http.Transport{DisableKeepAlives: true},
	Timeout:   10 * time.Second, // failsafe only
}

type probe struct {
	code   int
	header http.Header
	body   map[string]any
	raw    string
}

func get(t *testing.T, port int32) probe {
	t.Helper()
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		t.Fatalf("GET port %d: %v", port, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading port %d: %v", port, err)
	}
	p := probe{code: resp.StatusCode, header: resp.Header, raw: string(raw)}
	if err := json.Unmarshal(raw, &p.body); err != nil {
		t.Fatalf("port %d body %q: %v", port, raw, err)
	}
	return p
}

func expectRefused(t *testing.T, port int32) {
	t.Helper()
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err == nil {
		conn.Close()
		t.Fatalf("port %d still accepts connections", port)
	}
}

func newServiceHealth(t *testing.T, opts ServiceHealthOptions) *ServiceHealth {
	t.Helper()
	if opts.Addresses == nil {
		opts.Addresses = []netip.Addr{loopback}
	}
	s := NewServiceHealth(opts)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestServiceHealthAnswers(t *testing.T) {
	ports := freePorts(t, 1)
	p := ports[0]
	s := newServiceHealth(t, ServiceHealthOptions{})
	if err := s.Sync(map[int32]ServiceInfo{p: {Namespace: "ns", Name: "web", LocalEndpoints: 0}}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	got := get(t, p)
	if got.code != http.StatusServiceUnavailable {
		t.Errorf("0 local endpoints: status %d, want 503", got.code)
	}
	want := map[string]any{
		"service":             map[string]any{"namespace": "ns", "name": "web"},
		"localEndpoints":      float64(0),
		"serviceProxyHealthy": true,
	}
	if !reflect.DeepEqual(got.body, want) {
		t.Errorf("body %s, want %v", got.raw, want)
	}
	for k, v := range map[string]string{
		"Content-Type":                     "application/json",
		"X-Content-Type-Options":           "nosniff",
		"X-Load-Balancing-Endpoint-Weight": "0",
	} {
		if got.header.Get(k) != v {
			t.Errorf("header %s = %q, want %q", k, got.header.Get(k), v)
		}
	}

	// A count change must not reopen the port.
	before := s.servers[p]
	if err := s.Sync(map[int32]ServiceInfo{p: {Namespace: "ns", Name: "web", LocalEndpoints: 3}}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if s.servers[p] != before {
		t.Error("port was reopened for a count change")
	}
	got = get(t, p)
	if got.code != http.StatusOK || got.body["localEndpoints"] != float64(3) || got.header.Get("X-Load-Balancing-Endpoint-Weight") != "3" {
		t.Errorf("3 local endpoints: status %d, body %s", got.code, got.raw)
	}
}

func TestServiceHealthProxyUnhealthy(t *testing.T) {
	p := freePorts(t, 1)[0]
	var healthy atomic.Bool
	s := newServiceHealth(t, ServiceHealthOptions{ProxyHealthy: healthy.Load})
	if err := s.Sync(map[int32]ServiceInfo{p: {Namespace: "ns", Name: "web", LocalEndpoints: 2}}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	got := get(t, p)
	if got.code != http.StatusServiceUnavailable || got.body["serviceProxyHealthy"] != false {
		t.Errorf("proxy unhealthy: status %d body %s", got.code, got.raw)
	}
	healthy.Store(true)
	if got := get(t, p); got.code != http.StatusOK || got.body["serviceProxyHealthy"] != true {
		t.Errorf("proxy healthy: status %d body %s", got.code, got.raw)
	}
}

func TestServiceHealthOpensAndCloses(t *testing.T) {
	ports := freePorts(t, 3)
	a, b, c := ports[0], ports[1], ports[2]
	s := newServiceHealth(t, ServiceHealthOptions{})
	if err := s.Sync(map[int32]ServiceInfo{
		a: {Namespace: "ns", Name: "a", LocalEndpoints: 1},
		b: {Namespace: "ns", Name: "b", LocalEndpoints: 1},
	}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if got := get(t, a); got.body["service"].(map[string]any)["name"] != "a" {
		t.Errorf("port a answers for %s", got.raw)
	}
	if got := get(t, b); got.body["service"].(map[string]any)["name"] != "b" {
		t.Errorf("port b answers for %s", got.raw)
	}

	if err := s.Sync(map[int32]ServiceInfo{
		b: {Namespace: "ns", Name: "b", LocalEndpoints: 1},
		c: {Namespace: "ns", Name: "c", LocalEndpoints: 1},
	}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	expectRefused(t, a)
	if got := get(t, c); got.code != http.StatusOK || got.body["service"].(map[string]any)["name"] != "c" {
		t.Errorf("port c: %d %s", got.code, got.raw)
	}
	wantPorts := []int32{b, c}
	slices.Sort(wantPorts)
	if got := s.Ports(); !slices.Equal(got, wantPorts) {
		t.Errorf("Ports() = %v, want %v", got, wantPorts)
	}

	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	expectRefused(t, b)
	expectRefused(t, c)
}

func TestServiceHealthListenFailureIsolated(t *testing.T) {
	ports := freePorts(t, 2)
	busy, free := ports[0], ports[1]
	holder, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", busy))
	if err != nil {
		t.Fatalf("occupying port %d: %v", busy, err)
	}
	defer holder.Close()

	s := newServiceHealth(t, ServiceHealthOptions{})
	want := map[int32]ServiceInfo{
		busy: {Namespace: "ns", Name: "busy", LocalEndpoints: 1},
		free: {Namespace: "ns", Name: "free", LocalEndpoints: 1},
	}
	err = s.Sync(want)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("port %d for ns/busy", busy)) {
		t.Fatalf("Sync error = %v, want one naming port %d", err, busy)
	}
	if got := get(t, free); got.code != http.StatusOK {
		t.Errorf("free port: status %d", got.code)
	}
	if got := s.Ports(); !slices.Equal(got, []int32{free}) {
		t.Errorf("Ports() = %v, want [%d]", got, free)
	}

	// Once the port is released, the next Sync opens it.
	holder.Close()
	if err := s.Sync(want); err != nil {
		t.Fatalf("second Sync: %v", err)
	}
	if got := get(t, busy); got.code != http.StatusOK || got.body["service"].(map[string]any)["name"] != "busy" {
		t.Errorf("retried port: %d %s", got.code, got.raw)
	}
}

func TestServiceHealthAllAddresses(t *testing.T) {
	p := freePorts(t, 1)[0]
	s := NewServiceHealth(ServiceHealthOptions{}) // ":port"
	defer s.Close()
	if err := s.Sync(map[int32]ServiceInfo{p: {Namespace: "ns", Name: "web", LocalEndpoints: 1}}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if got := get(t, p); got.code != http.StatusOK {
		t.Errorf("status %d", got.code)
	}
}

func TestServicePorts(t *testing.T) {
	ip := netip.MustParseAddr
	ep := func(addr string, port int32, node string, ready bool) model.Endpoint {
		return model.Endpoint{IP: ip(addr), Port: port, NodeName: node, Ready: ready, Serving: true, Terminating: !ready}
	}
	name := func(ns, n, port string) model.ServicePortName {
		return model.ServicePortName{Namespace: ns, Name: n, Port: port, Protocol: model.TCP}
	}
	snap := &model.Snapshot{
		Node: model.Node{Name: "node-a"},
		Services: map[model.ServicePortName]*model.ServicePort{
			// Two ports of one Service: 10.1.0.1 serves both and counts once.
			name("ns", "web", "http"): {Name: name("ns", "web", "http"), NodePort: 30080, ExternalPolicyLocal: true, HealthCheckNodePort: 32000,
				Endpoints: []model.Endpoint{ep("10.1.0.1", 80, "node-a", true), ep("10.1.0.2", 80, "node-a", true), ep("10.2.0.1", 80, "node-b", true)}},
			name("ns", "web", "https"): {Name: name("ns", "web", "https"), NodePort: 30443, ExternalPolicyLocal: true, HealthCheckNodePort: 32000,
				Endpoints: []model.Endpoint{ep("10.1.0.1", 443, "node-a", true)}},
			// Only a terminating local endpoint: 0, so the LB drains this node.
			name("ns", "draining", ""): {Name: name("ns", "draining", ""), NodePort: 30090, ExternalPolicyLocal: true, HealthCheckNodePort: 32001,
				Endpoints: []model.Endpoint{ep("10.1.0.9", 80, "node-a", false), ep("10.2.0.9", 80, "node-b", true)}},
			// Cluster policy: no health check port even if a stale one is set.
			name("ns", "cluster", ""): {Name: name("ns", "cluster", ""), NodePort: 30100, HealthCheckNodePort: 32002,
				Endpoints: []model.Endpoint{ep("10.1.0.5", 80, "node-a", true)}},
		},
	}
	got := ServicePorts(snap)
	want := map[int32]ServiceInfo{
		32000: {Namespace: "ns", Name: "web", LocalEndpoints: 2},
		32001: {Namespace: "ns", Name: "draining", LocalEndpoints: 0},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ServicePorts = %+v, want %+v", got, want)
	}
}
