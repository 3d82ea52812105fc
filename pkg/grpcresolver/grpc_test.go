package grpcresolver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/miniproxy/miniproxy/pkg/grpcresolver/example"
	"github.com/miniproxy/miniproxy/pkg/model"
)

const roundRobin = `{"loadBalancingConfig":[{"round_robin":{}}]}`

// startServers starts n name servers on 127.0.0.1..n, all on one port (as
// pods behind one EndpointSlice port are), each answering with its IP.
func startServers(t *testing.T, n int) (port int32) {
	t.Helper()
	for attempt := 0; attempt < 20; attempt++ {
		first, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		port = int32(first.Addr().(*net.TCPAddr).Port)
		lis := []net.Listener{first}
		for i := 2; i <= n; i++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:%d", i, port))
			if err != nil {
				break // port taken on another loopback address: try another
			}
			lis = append(lis, l)
		}
		if len(lis) < n {
			for _, l := range lis {
				l.Close()
			}
			continue
		}
		for i, l := range lis {
			s := grpc.NewServer()
			example.RegisterNameServer(s, fmt.Sprintf("127.0.0.%d", i+1))
			go s.Serve(l)
			t.Cleanup(s.Stop)
		}
		return port
	}
	t.Fatal("no port free on all loopback addresses")
	return 0
}

func loopbackEPs(from, to int) []ep {
	var out []ep
	for i := from; i <= to; i++ {
		out = append(out, readyEP(fmt.Sprintf("127.0.0.%d", i)))
	}
	return out
}

// lab is a fake cluster with one Service "echo" whose slice points at real servers.
type lab struct {
	t      *testing.T
	client *fake.Clientset
	port   int32
	cc     *grpc.ClientConn
}

func newLab(t *testing.T, servers int, svc *v1.Service, node model.Node, eps ...ep) *lab {
	t.Helper()
	port := startServers(t, servers)
	client := fake.NewClientset(svc, slice("echo", "echo-1", port, eps...))
	cc, err := grpc.NewClient(Scheme+":///echo."+testNS+":grpc",
		grpc.WithResolvers(NewBuilder(client, Options{Node: node})),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { cc.Close() })
	return &lab{t: t, client: client, port: port, cc: cc}
}

func (l *lab) setEndpoints(eps ...ep) {
	l.t.Helper()
	if _, err := l.client.DiscoveryV1().EndpointSlices(testNS).Update(context.Background(),
		slice("echo", "echo-1", l.port, eps...), metav1.UpdateOptions{}); err != nil {
		l.t.Fatal(err)
	}
}

// call makes n RPCs and counts answers per server.
func (l *lab) call(n int) map[string]int {
	l.t.Helper()
	counts := map[string]int{}
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		name, err := example.Name(ctx, l.cc, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			l.t.Fatalf("rpc %d: %v", i, err)
		}
		counts[name]++
	}
	return counts
}

// settle makes RPCs in windows of 60 until the servers answering are exactly
// want (at most 100 windows), i.e. until round_robin has connected to every
// eligible endpoint and dropped the others; it returns how long that took.
func (l *lab) settle(want ...string) time.Duration {
	l.t.Helper()
	start := time.Now()
	var got []string
	for i := 0; i < 100; i++ {
		got = keys(l.call(60))
		if strings.Join(got, ",") == strings.Join(want, ",") {
			return time.Since(start)
		}
	}
	l.t.Fatalf("servers answering = %v, want %v", got, want)
	return 0
}

func keys(m map[string]int) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func names(from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprintf("127.0.0.%d", i))
	}
	sort.Strings(out)
	return out
}

func assertShares(t *testing.T, counts map[string]int, total int, lo, hi float64) {
	t.Helper()
	for name, c := range counts {
		if share := float64(c) / float64(total); share < lo || share > hi {
			t.Errorf("%s got %d of %d RPCs (%.1f%%), want %.0f%%..%.0f%%", name, c, total, 100*share, 100*lo, 100*hi)
		}
	}
}

// TestRoundRobinSpreadAndScaleUp: 300 RPCs over 3 endpoints spread evenly
// with round_robin, and scaling the slice to 6 brings the new servers in.
func TestRoundRobinSpreadAndScaleUp(t *testing.T) {
	l := newLab(t, 6, service("echo"), model.Node{}, loopbackEPs(1, 3)...)
	// Warm-up until all three are connected: round_robin only picks READY
	// subchannels, and the first ones to connect would otherwise get extra.
	l.settle(names(1, 3)...)

	counts := l.call(300)
	t.Logf("300 RPCs over 3 endpoints: %v", counts)
	if len(counts) != 3 {
		t.Fatalf("answers from %v, want 3 servers", keys(counts))
	}
	assertShares(t, counts, 300, 0.25, 0.42)

	start := time.Now()
	l.setEndpoints(loopbackEPs(1, 6)...)
	l.settle(names(1, 6)...)
	t.Logf("scale 3 -> 6: all 6 servers answering %v after the slice update", time.Since(start))
	counts = l.call(600)
	t.Logf("600 RPCs over 6 endpoints: %v", counts)
	assertShares(t, counts, 600, 0.10, 0.25)

	// Scale down to 2: the removed servers stop getting traffic.
	l.setEndpoints(loopbackEPs(1, 2)...)
	l.settle(names(1, 2)...)
	if got := keys(l.call(100)); strings.Join(got, ",") != strings.Join(names(1, 2), ",") {
		t.Errorf("after scale-down answers from %v", got)
	}
}

// TestTerminatingFallback: ready endpoints win; when only terminating
// endpoints remain, the serving ones are used.
func TestTerminatingFallback(t *testing.T) {
	l := newLab(t, 3, service("echo"), model.Node{},
		readyEP("127.0.0.1"),
		ep{ip: "127.0.0.2", serving: true, terminating: true},
		ep{ip: "127.0.0.3", serving: true, terminating: true})
	l.settle("127.0.0.1")
	if got := keys(l.call(100)); len(got) != 1 || got[0] != "127.0.0.1" {
		t.Fatalf("with one ready endpoint answers from %v", got)
	}
	l.setEndpoints(
		ep{ip: "127.0.0.1", serving: false, terminating: true},
		ep{ip: "127.0.0.2", serving: true, terminating: true},
		ep{ip: "127.0.0.3", serving: true, terminating: true})
	l.settle("127.0.0.2", "127.0.0.3")
	counts := l.call(200)
	if _, ok := counts["127.0.0.1"]; ok || len(counts) != 2 {
		t.Fatalf("terminating-only answers %v, want only 127.0.0.2 and .3", counts)
	}
}

// TestPreferCloseZone: with PreferClose and the client in zone a, the zone b
// endpoint gets nothing; when zone a empties, zone b is used.
func TestPreferCloseZone(t *testing.T) {
	d := v1.ServiceTrafficDistributionPreferClose
	svc := service("echo", func(s *v1.Service) { s.Spec.TrafficDistribution = &d })
	zoned := func(aReady bool) []ep {
		return []ep{
			{ip: "127.0.0.1", ready: aReady, serving: aReady, zone: "a"},
			{ip: "127.0.0.2", ready: true, serving: true, zone: "b"},
			{ip: "127.0.0.3", ready: aReady, serving: aReady, zone: "a"},
		}
	}
	l := newLab(t, 3, svc, model.Node{Name: "n1", Zone: "a"}, zoned(true)...)
	l.settle("127.0.0.1", "127.0.0.3")
	counts := l.call(200)
	if _, ok := counts["127.0.0.2"]; ok {
		t.Fatalf("other-zone endpoint got traffic: %v", counts)
	}
	assertShares(t, counts, 200, 0.35, 0.65)
	l.setEndpoints(zoned(false)...)
	l.settle("127.0.0.2")
}

// TestServiceAppearsLater: a client started before the Service exists waits
// (RPCs with WaitForReady) and connects once it is created.
func TestServiceAppearsLater(t *testing.T) {
	port := startServers(t, 1)
	client := fake.NewClientset()
	cc, err := grpc.NewClient(Scheme+":///echo."+testNS+":80",
		grpc.WithResolvers(NewBuilder(client, Options{})),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err = example.Name(ctx, cc)
	cancel()
	// round_robin reports its own "no children" error rather than the
	// resolver's text; what matters is that the RPC fails fast as Unavailable.
	if status.Code(errors.Unwrap(err)) != codes.Unavailable {
		t.Fatalf("RPC before the Service exists: err = %v, want Unavailable", err)
	}
	ctxb := context.Background()
	if _, err := client.CoreV1().Services(testNS).Create(ctxb, service("echo"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var sl *discovery.EndpointSlice = slice("echo", "echo-1", port, readyEP("127.0.0.1"))
	if _, err := client.DiscoveryV1().EndpointSlices(testNS).Create(ctxb, sl, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(ctxb, 10*time.Second)
	defer cancel()
	name, err := example.Name(ctx, cc, grpc.WaitForReady(true))
	if err != nil || name != "127.0.0.1" {
		t.Fatalf("RPC after the Service appeared: %q, %v", name, err)
	}
}
