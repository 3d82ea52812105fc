package conntrack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// clientPort is the first fixed source port of the test clients: what a DNS
// resolver or a statsd sender does, and what makes a stale entry stick.
const clientPort = 40053

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// lab is a node namespace with routed pod namespaces serving UDP on 8080
// (poda 10.180.0.5, podb 10.180.0.6, …), a client pod at 10.180.0.100 with
// fixed-port UDP sockets, and the iptables backend programming the node.
type lab struct {
	node   *netnstest.NS
	pods   map[string]*netnstest.Pod
	client *netnstest.Pod
	socks  map[int]*net.UDPConn
	cfg    proxy.Config
}

func newLab(t *testing.T, podIPs ...string) *lab {
	t.Helper()
	netnstest.RequireRoot(t, "iptables-restore", "iptables-save", "sysctl")
	n := netnstest.NewNode(t, podIPs...)
	return &lab{node: n.NS, pods: n.Pods, client: n.Client, socks: map[int]*net.UDPConn{},
		cfg: proxy.Config{NetNS: proxy.NetNS(n.NS.Path()), ClusterCIDRs: []netip.Prefix{mt.ClusterCIDR}, LocalMode: proxy.LocalModeClusterCIDR}}
}

// proxyProcess is what one miniproxy process holds: a backend and a
// reconciler. A restart is a new proxyProcess on the same namespace.
type proxyProcess struct {
	backend *iptables.Backend
	rec     *Reconciler
}

func (l *lab) start(t *testing.T) *proxyProcess {
	t.Helper()
	b, err := iptables.New(quiet, l.cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(l.cfg.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &proxyProcess{backend: b, rec: NewReconciler(quiet, c, l.cfg, nil)}
}

// sync programs snap and reconciles, as cmd/miniproxy does after each sync.
func (p *proxyProcess) sync(t *testing.T, snap *model.Snapshot, full bool) Stats {
	t.Helper()
	if _, err := p.backend.Sync(context.Background(), snap, full); err != nil {
		t.Fatal(err)
	}
	st, err := p.rec.Reconcile(context.Background(), snap, full)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (l *lab) sock(t *testing.T, port int) *net.UDPConn {
	t.Helper()
	if s := l.socks[port]; s != nil {
		return s
	}
	var s *net.UDPConn
	if err := l.client.Do(func() (err error) {
		s, err = net.ListenUDP("udp4", &net.UDPAddr{Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	l.socks[port] = s
	return s
}

// ask sends one datagram from the client's fixed port to vip and returns the
// name of the pod that answered, or an error if nobody did within wait.
func (l *lab) ask(t *testing.T, port int, vip string, wait time.Duration) (string, error) {
	s := l.sock(t, port)
	to := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(vip))
	if _, err := s.WriteToUDP([]byte("?"), to); err != nil {
		return "", fmt.Errorf("send to %s: %w", vip, err)
	}
	buf := make([]byte, 256)
	deadline := time.Now().Add(wait)
	for {
		_ = s.SetReadDeadline(deadline)
		n, from, err := s.ReadFromUDPAddrPort(buf)
		if err != nil {
			return "", fmt.Errorf("no answer from %s: %w", vip, err)
		}
		// Answers from elsewhere (none expected) are ignored.
		if from.String() != vip {
			continue
		}
		return strings.Fields(string(buf[:n]))[0], nil
	}
}

// pin sends from port until conntrack pins it (five answers from the same
// pod) and returns that pod.
func (l *lab) pin(t *testing.T, port int, vip string) string {
	t.Helper()
	first, err := l.ask(t, port, vip, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if name, err := l.ask(t, port, vip, 2*time.Second); err != nil || name != first {
			t.Fatalf("port %d datagram %d: got %q, %v; want %s again (conntrack should pin the flow)", port, i, name, err, first)
		}
	}
	return first
}

// pinned maps each client port used to the pod its flow is pinned to.
type pinned map[int]string

// port returns a client port pinned to pod.
func (p pinned) port(pod string) int {
	for port, name := range p {
		if name == pod {
			return port
		}
	}
	return 0
}

// flowsTo lists the entries expected for the ports pinned to the given pods.
func (p pinned) flowsTo(pods ...string) []string {
	var out []string
	for port, name := range p {
		for _, want := range pods {
			if name == want {
				out = append(out, flowTo(port, name))
			}
		}
	}
	sort.Strings(out)
	return out
}

// pinEach pins client ports until each of the wanted pods has at least one
// (bounded: the endpoint is chosen at random per flow).
func (l *lab) pinEach(t *testing.T, vip string, pods ...string) pinned {
	t.Helper()
	got := pinned{}
	for port := clientPort; port < clientPort+40; port++ {
		got[port] = l.pin(t, port, vip)
		all := true
		for _, p := range pods {
			all = all && got.port(p) != 0
		}
		if all {
			return got
		}
	}
	t.Fatalf("client ports did not reach each of %v in 40 tries: %v", pods, got)
	return nil
}

// silent asserts that datagrams from port get no answer at all. Proving
// absence needs some wait; it is bounded and not a speed assertion.
func (l *lab) silent(t *testing.T, port int, vip, why string) {
	t.Helper()
	for i := 0; i < 3; i++ {
		if name, err := l.ask(t, port, vip, 400*time.Millisecond); err == nil {
			t.Fatalf("%s: datagram %d to %s was answered by %s", why, i, vip, name)
		}
	}
}

// kill really removes a pod: its address disappears, so nothing answers.
func (l *lab) kill(t *testing.T, pod string) {
	t.Helper()
	p := l.pods[pod]
	p.MustRun(t, "ip", "addr", "del", p.IP.String()+"/32", "dev", "eth0")
}

// flows lists the node's conntrack entries of protocol proto (17 UDP, 6
// TCP) to dst ("" for any) as "client port -> reply source", sorted.
func (l *lab) flows(t *testing.T, proto uint8, dst string) []string {
	t.Helper()
	conn, err := ct.Dial(&netlink.Config{NetNS: l.node.FD(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	all, err := conn.Dump(nil)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, fl := range all {
		o, r := fl.TupleOrig, fl.TupleReply
		od := netip.AddrPortFrom(o.IP.DestinationAddress, o.Proto.DestinationPort)
		if o.Proto.Protocol != proto || (dst != "" && od.String() != dst) {
			continue
		}
		out = append(out, fmt.Sprintf("%d -> %s", o.Proto.SourcePort, netip.AddrPortFrom(r.IP.SourceAddress, r.Proto.SourcePort)))
	}
	sort.Strings(out)
	return out
}

func flowTo(port int, pod string) string { return fmt.Sprintf("%d -> %s:8080", port, podIP[pod]) }

var podIP = map[string]string{"poda": "10.180.0.5", "podb": "10.180.0.6"}
var ep = map[string]model.Endpoint{"poda": mt.Ep("10.180.0.5", 8080, "node-a"), "podb": mt.Ep("10.180.0.6", 8080, "node-a")}

func udpSP(vip string, nodePort int32, eps ...model.Endpoint) *model.ServicePort {
	sp := mt.SP("ns", "dns", "", vip, 53, eps...)
	sp.Protocol, sp.Name.Protocol = model.UDP, model.UDP
	sp.NodePort = nodePort
	return sp
}

// The frontends every test runs on: the ClusterIP, and the NodePort on the
// node's address the client uses as its gateway (the flow's original
// destination is that address, which the model does not carry).
var frontends = []struct {
	name, vip string
	nodePort  int32
}{
	{"ClusterIP", "172.30.0.10:53", 0},
	{"NodePort", "10.180.0.1:30053", 30053},
}

// TestKernelRestart (1): miniproxy was down while the endpoint a client is
// pinned to went away. The new process has no previous snapshot; its first
// reconcile finds the entry in the kernel and deletes it. "scaled to zero"
// is the case the snapshot diff could not see (it had no previous endpoint
// to call gone, and no current endpoint to call the frontend opened).
func TestKernelRestart(t *testing.T) {
	for _, fe := range frontends {
		t.Run(fe.name, func(t *testing.T) {
			t.Run("one endpoint left", func(t *testing.T) { restart(t, fe.vip, fe.nodePort, true) })
			t.Run("scaled to zero", func(t *testing.T) { restart(t, fe.vip, fe.nodePort, false) })
		})
	}
}

func restart(t *testing.T, vip string, nodePort int32, survivor bool) {
	l := newLab(t, podIP["poda"], podIP["podb"])
	old := l.start(t)
	old.sync(t, mt.Snap(udpSP("172.30.0.10", nodePort, ep["poda"], ep["podb"])), true)
	ports := l.pinEach(t, vip, "poda", "podb")
	// The process stops; poda dies; podb dies too when scaled to zero.
	l.kill(t, "poda")
	var eps []model.Endpoint
	if survivor {
		eps = append(eps, ep["podb"])
	} else {
		l.kill(t, "podb")
	}
	l.silent(t, ports.port("poda"), vip, "pinned to the dead pod while the proxy is down")

	fresh := l.start(t)
	st := fresh.sync(t, mt.Snap(udpSP("172.30.0.10", nodePort, eps...)), true)
	got := l.flows(t, 17, vip)
	if survivor {
		// The dead pod's flow went; the survivor's flow is healthy and
		// stays (a restart must not cut it, kubernetes #122740).
		want := ports.flowsTo("podb")
		if dead := len(ports) - len(want); !equal(got, want) || st.Deleted != dead {
			t.Fatalf("after the restart's reconcile: entries %v (deleted %d), want %v (deleted %d)", got, st.Deleted, want, dead)
		}
		if name, err := l.ask(t, ports.port("poda"), vip, 2*time.Second); err != nil || name != "podb" {
			t.Fatalf("the dead pod's client after the reconcile: %q, %v; want podb", name, err)
		}
		return
	}
	if len(got) != 0 || st.Deleted != len(ports) {
		t.Fatalf("after the restart's reconcile: entries %v (deleted %d), want none (deleted %d)", got, st.Deleted, len(ports))
	}
	// The next datagram meets the no-endpoints rule instead of the dead pod.
	l.silent(t, ports.port("poda"), vip, "scaled to zero")
	if got := l.flows(t, 17, vip); len(got) != 0 {
		t.Fatalf("a datagram to a Service without endpoints left an entry: %v", got)
	}
}

// TestKernelScaledToZero (2): a running proxy sees the Service's last
// endpoints go; every flow to it goes, the NodePort's too (kube-proxy v1.37
// skips NodePorts here because it cannot tell them from other traffic to
// the same port number).
func TestKernelScaledToZero(t *testing.T) {
	for _, fe := range frontends {
		t.Run(fe.name, func(t *testing.T) {
			l := newLab(t, podIP["poda"], podIP["podb"])
			p := l.start(t)
			p.sync(t, mt.Snap(udpSP("172.30.0.10", fe.nodePort, ep["poda"], ep["podb"])), false)
			ports := l.pinEach(t, fe.vip, "poda", "podb")
			l.kill(t, "poda")
			l.kill(t, "podb")
			st := p.sync(t, mt.Snap(udpSP("172.30.0.10", fe.nodePort)), false)
			if got := l.flows(t, 17, fe.vip); len(got) != 0 || st.Deleted != len(ports) {
				t.Fatalf("entries %v (deleted %d), want none (deleted %d)", got, st.Deleted, len(ports))
			}
			l.silent(t, ports.port("podb"), fe.vip, "scaled to zero")
		})
	}
}

// TestKernelHealthyFlowsSurvive (3): flows answered by eligible endpoints
// are never deleted — not by a full sync's reconcile, not by a restarted
// process's first one — and a TCP flow is not even listed: the kernel
// filters the dump by protocol.
func TestKernelHealthyFlowsSurvive(t *testing.T) {
	for _, fe := range frontends {
		t.Run(fe.name, func(t *testing.T) {
			l := newLab(t, podIP["poda"], podIP["podb"])
			p := l.start(t)
			snap := mt.Snap(udpSP("172.30.0.10", fe.nodePort, ep["poda"], ep["podb"]))
			p.sync(t, snap, true)
			ports := l.pinEach(t, fe.vip, "poda", "podb")
			if _, _, err := l.client.Ask("tcp", "10.180.0.5:8080", 2*time.Second); err != nil {
				t.Fatal(err)
			}
			if tcp := l.flows(t, 6, ""); len(tcp) == 0 {
				t.Fatal("no TCP entry to check the dump filter with")
			}
			before := l.flows(t, 17, fe.vip)

			// The same snapshot, partial: provably nothing to do.
			if st := p.sync(t, snap, false); !st.Skipped {
				t.Fatalf("an unchanged partial sync dumped conntrack: %+v", st)
			}
			// A full sync always reconciles; a restart too.
			for i, q := range []*proxyProcess{p, l.start(t)} {
				st := q.sync(t, snap, true)
				if st.Skipped || st.Deleted != 0 || st.Stale != 0 {
					t.Fatalf("pass %d: %+v, want a dump that deletes nothing", i, st)
				}
				if all := l.flows(t, 17, ""); st.Listed != len(all) {
					t.Fatalf("pass %d listed %d entries, the table holds %d UDP entries %v: the dump is not the UDP ones", i, st.Listed, len(all), all)
				}
				if got := l.flows(t, 17, fe.vip); !equal(got, before) {
					t.Fatalf("pass %d: entries %v, want %v untouched", i, got, before)
				}
			}
			for port, pod := range ports {
				if name, err := l.ask(t, port, fe.vip, 2*time.Second); err != nil || name != pod {
					t.Fatalf("client port %d: %q, %v; want %s still", port, name, err, pod)
				}
			}
		})
	}
}

// TestKernelRemovedEndpoint (4): one endpoint is removed; its flows go,
// the other endpoint's stay.
func TestKernelRemovedEndpoint(t *testing.T) {
	for _, fe := range frontends {
		t.Run(fe.name, func(t *testing.T) {
			l := newLab(t, podIP["poda"], podIP["podb"])
			p := l.start(t)
			p.sync(t, mt.Snap(udpSP("172.30.0.10", fe.nodePort, ep["poda"], ep["podb"])), false)
			ports := l.pinEach(t, fe.vip, "poda", "podb")
			l.kill(t, "poda")
			st := p.sync(t, mt.Snap(udpSP("172.30.0.10", fe.nodePort, ep["podb"])), false)
			want := ports.flowsTo("podb")
			if got, dead := l.flows(t, 17, fe.vip), len(ports)-len(want); !equal(got, want) || st.Deleted != dead {
				t.Fatalf("entries %v (deleted %d), want %v (deleted %d)", got, st.Deleted, want, dead)
			}
			if name, err := l.ask(t, ports.port("poda"), fe.vip, 2*time.Second); err != nil || name != "podb" {
				t.Fatalf("the removed endpoint's client: %q, %v; want podb", name, err)
			}
		})
	}
}

// TestKernelServiceDeleted: flows through a frontend that no longer exists
// go (the running process remembers the removed port until one pass has
// completed).
func TestKernelServiceDeleted(t *testing.T) {
	l := newLab(t, podIP["poda"])
	p := l.start(t)
	const vip = "172.30.0.10:53"
	p.sync(t, mt.Snap(udpSP("172.30.0.10", 0, ep["poda"])), false)
	l.pin(t, clientPort, vip)
	st := p.sync(t, mt.Snap(), false)
	if got := l.flows(t, 17, vip); len(got) != 0 || st.Deleted != 1 {
		t.Fatalf("entries %v (deleted %d), want none (deleted 1)", got, st.Deleted)
	}
}

// TestKernelOpenedFrontend: a client sends to a Service's VIP before its
// rules exist. The node routes the datagrams to its default gateway (which
// drops them) and conntrack records a flow that is not DNATed. When the
// Service appears with an endpoint, that entry would keep the client away
// from the new DNAT rule; the reconcile deletes it, and then leaves the new,
// DNATed entry alone.
func TestKernelOpenedFrontend(t *testing.T) {
	l := newLab(t, podIP["poda"])
	netnstest.AddPod(t, l.node, "10.180.0.200", "10.180.0.1") // a router that drops (forwarding is off in a new namespace)
	l.node.MustRun(t, "ip", "route", "add", "default", "via", "10.180.0.200")
	const vip = "172.30.0.20:53"
	p := l.start(t)
	p.sync(t, mt.Snap(), false)
	l.silent(t, clientPort, vip, "before the Service exists")
	if got, want := l.flows(t, 17, vip), []string{fmt.Sprintf("%d -> %s", clientPort, vip)}; !equal(got, want) {
		t.Fatalf("entries %v, want %v (not DNATed)", got, want)
	}
	st := p.sync(t, mt.Snap(udpSP("172.30.0.20", 0, ep["poda"])), false)
	if st.Deleted != 1 {
		t.Fatalf("deleted %d, want 1", st.Deleted)
	}
	if name, err := l.ask(t, clientPort, vip, 2*time.Second); err != nil || name != "poda" {
		t.Fatalf("after the reconcile: %q, %v; want poda", name, err)
	}
	if st := p.sync(t, mt.Snap(udpSP("172.30.0.20", 0, ep["poda"])), true); st.Deleted != 0 {
		t.Fatalf("a second pass deleted %d entries, want 0", st.Deleted)
	}
	if got, want := l.flows(t, 17, vip), []string{flowTo(clientPort, "poda")}; !equal(got, want) {
		t.Fatalf("entries %v, want %v", got, want)
	}
}

// TestNewBadNamespace checks that New reports an unusable path.
func TestNewBadNamespace(t *testing.T) {
	_, err := New(proxy.NetNS("/run/netns/mp-does-not-exist"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("want a not-exist error, got %v", err)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// BenchmarkKernelReconcile measures one reconcile pass over 10k injected UDP
// entries (1,000 UDP Services × 10 clients, DNATed to one of two endpoints)
// next to 20k TCP entries the kernel filter must leave out: "keep" deletes
// nothing (a full sync's pass), "scale-to-zero" deletes all 10k. Figures go
// to bench/results/conntrack-reconcile.md, not into assertions.
func BenchmarkKernelReconcile(b *testing.B) {
	netnstest.RequireRoot(b)
	node := netnstest.New(b, "ctb")
	c, err := New(proxy.NetNS(node.Path()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	conn, err := ct.Dial(&netlink.Config{NetNS: node.FD(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()

	const services, clients, tcpEntries = 1000, 10, 20000
	var ports []*model.ServicePort
	vip := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{172, 30, byte(i >> 8), byte(i)}) }
	epIP := func(i, k int) netip.Addr {
		return netip.AddrFrom4([4]byte{10, 180, byte(i >> 8), byte(2*(i&0x7f) + k)})
	}
	for i := 0; i < services; i++ {
		sp := udpSP(vip(i).String(), 0, mt.Ep(epIP(i, 0).String(), 8080, "node-a"), mt.Ep(epIP(i, 1).String(), 8080, "node-a"))
		sp.Name.Name = fmt.Sprintf("dns-%d", i)
		ports = append(ports, sp)
	}
	full := mt.Snap(ports...)
	var empty []*model.ServicePort
	for _, sp := range ports {
		e := *sp
		e.Endpoints = nil
		empty = append(empty, &e)
	}
	zero := mt.Snap(empty...)

	inject := func() {
		for i := 0; i < services; i++ {
			for k := 0; k < clients; k++ {
				cl := netip.AddrFrom4([4]byte{10, 181, byte(k), 1})
				f := ct.NewFlow(17, 0, cl, vip(i), uint16(40000+i), 53, 120, 0)
				f.TupleReply = ct.Tuple{
					IP:    ct.IPTuple{SourceAddress: epIP(i, k%2), DestinationAddress: cl},
					Proto: ct.ProtoTuple{Protocol: 17, SourcePort: 8080, DestinationPort: uint16(40000 + i)},
				}
				if err := conn.Create(f); err != nil && !errors.Is(err, os.ErrExist) {
					b.Fatal(err)
				}
			}
		}
	}
	inject()
	for i := 0; i < tcpEntries; i++ {
		f := ct.NewFlow(6, 0, netip.AddrFrom4([4]byte{10, 182, byte(i >> 8), byte(i)}), netip.MustParseAddr("10.183.0.1"), uint16(1024+i%60000), 443, 120, 0)
		f.ProtoInfo.TCP = &ct.ProtoInfoTCP{State: 3} // ESTABLISHED
		if err := conn.Create(f); err != nil && !errors.Is(err, os.ErrExist) {
			b.Fatal(err)
		}
	}

	b.Run("keep-10k", func(b *testing.B) {
		p := NewPlan(full, nil, nil)
		for i := 0; i < b.N; i++ {
			res, err := c.Reconcile(context.Background(), model.IPv4, 17, p)
			if err != nil || res.Listed != services*clients || res.Deleted != 0 {
				b.Fatalf("%+v, %v", res, err)
			}
		}
	})
	b.Run("scale-to-zero-10k", func(b *testing.B) {
		p := NewPlan(zero, nil, nil)
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			inject()
			b.StartTimer()
			res, err := c.Reconcile(context.Background(), model.IPv4, 17, p)
			if err != nil || res.Deleted != services*clients {
				b.Fatalf("%+v, %v", res, err)
			}
		}
	})
}
