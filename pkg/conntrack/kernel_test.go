package conntrack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
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

// clientPort is the fixed source port of the test client: what a DNS
// resolver or a VoIP client does, and what makes a stale entry stick.
const clientPort = 40053

// lab is a node namespace with routed pod namespaces serving UDP, a client
// pod with one fixed-port UDP socket, the iptables backend and a Cleaner for
// the node namespace.
type lab struct {
	node    *netnstest.NS
	pods    map[string]*netnstest.Pod
	client  *netnstest.Pod
	sock    *net.UDPConn
	backend *iptables.Backend
	cleaner *Cleaner
}

func newLab(t *testing.T, podIPs ...string) *lab {
	t.Helper()
	netnstest.RequireRoot(t, "iptables-restore", "iptables-save", "sysctl")
	n := netnstest.NewNode(t, podIPs...)
	l := &lab{node: n.NS, pods: n.Pods, client: n.Client}
	if err := l.client.Do(func() (err error) {
		l.sock, err = net.ListenUDP("udp4", &net.UDPAddr{Port: clientPort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.sock.Close() })
	cfg := proxy.Config{ClusterCIDRs: []netip.Prefix{mt.ClusterCIDR}, LocalMode: proxy.LocalModeClusterCIDR}
	b, err := iptables.New(slog.New(slog.NewTextHandler(os.Stderr, nil)), cfg, iptables.ExecRunner("ip", "netns", "exec", l.node.Name))
	if err != nil {
		t.Fatal(err)
	}
	l.backend = b
	c, err := New(l.node.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	l.cleaner = c
	return l
}

func (l *lab) sync(t *testing.T, snap *model.Snapshot) {
	t.Helper()
	if _, err := l.backend.Sync(context.Background(), snap, true); err != nil {
		t.Fatal(err)
	}
}

// ask sends one datagram from the fixed client port to vip and returns the
// name of the pod that answered, or an error if nobody did within wait.
func (l *lab) ask(vip string, wait time.Duration) (string, error) {
	to := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(vip))
	if _, err := l.sock.WriteToUDP([]byte("?"), to); err != nil {
		return "", fmt.Errorf("send to %s: %w", vip, err)
	}
	buf := make([]byte, 256)
	deadline := time.Now().Add(wait)
	for {
		_ = l.sock.SetReadDeadline(deadline)
		n, from, err := l.sock.ReadFromUDPAddrPort(buf)
		if err != nil {
			return "", fmt.Errorf("no answer from %s: %w", vip, err)
		}
		// A late answer to an earlier datagram would come from the
		// same VIP; every answer names its pod, so any is fine, but
		// answers from elsewhere are ignored.
		if from.String() != vip {
			continue
		}
		return strings.Fields(string(buf[:n]))[0], nil
	}
}

// silent asserts that datagrams from the fixed port get no answer at all.
// Proving absence needs some wait; it is bounded and not a speed assertion.
func (l *lab) silent(t *testing.T, vip, why string) {
	t.Helper()
	for i := 0; i < 3; i++ {
		if name, err := l.ask(vip, 400*time.Millisecond); err == nil {
			t.Fatalf("%s: datagram %d to %s was answered by %s; the stale entry did not pin the flow, so the test proves nothing", why, i, vip, name)
		}
	}
}

// udpFlows lists the node's UDP conntrack entries from the client's fixed
// port to dst, as "orig dst -> reply src".
func (l *lab) udpFlows(t *testing.T, dst string) []string {
	t.Helper()
	conn, err := ct.Dial(&netlink.Config{NetNS: l.node.FD(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	flows, err := conn.Dump(nil)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, fl := range flows {
		o, r := fl.TupleOrig, fl.TupleReply
		od := netip.AddrPortFrom(o.IP.DestinationAddress, o.Proto.DestinationPort)
		if o.Proto.Protocol != 17 || o.Proto.SourcePort != clientPort || od.String() != dst {
			continue
		}
		out = append(out, od.String()+" -> "+netip.AddrPortFrom(r.IP.SourceAddress, r.Proto.SourcePort).String())
	}
	return out
}

func udpSP(vip string, eps ...model.Endpoint) *model.ServicePort {
	sp := mt.SP("ns", "dns", "", vip, 53, eps...)
	sp.Protocol, sp.Name.Protocol = model.UDP, model.UDP
	return sp
}

// TestKernelGoneEndpoint is case (a): the endpoint a fixed-port client was
// DNATed to goes away. Without cleanup the client keeps talking to the dead
// endpoint; after Clean its next datagram reaches the survivor.
func TestKernelGoneEndpoint(t *testing.T) {
	t.Run("ClusterIP", func(t *testing.T) { goneEndpoint(t, "172.30.0.10:53", false) })
	// The client reaches the NodePort on the node's address it uses as
	// gateway; the flow's original destination is that address, which
	// Stale does not know: the NodePort frontend matches any address.
	t.Run("NodePort", func(t *testing.T) { goneEndpoint(t, "10.180.0.1:30053", true) })
}

func goneEndpoint(t *testing.T, vip string, nodePort bool) {
	l := newLab(t, "10.180.0.5", "10.180.0.6")
	ips := map[string]string{"poda": "10.180.0.5", "podb": "10.180.0.6"}
	eps := map[string]model.Endpoint{"poda": mt.Ep("10.180.0.5", 8080, "node-a"), "podb": mt.Ep("10.180.0.6", 8080, "node-a")}
	svc := func(eps ...model.Endpoint) *model.ServicePort {
		sp := udpSP("172.30.0.10", eps...)
		if nodePort {
			sp.NodePort = 30053
		}
		return sp
	}
	s1 := mt.Snap(svc(eps["poda"], eps["podb"]))
	l.sync(t, s1)

	first, err := l.ask(vip, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The entry pins the flow: the same source port keeps the same pod.
	for i := 0; i < 5; i++ {
		if name, err := l.ask(vip, 2*time.Second); err != nil || name != first {
			t.Fatalf("datagram %d: got %q, %v; want %s again (conntrack should pin the flow)", i, name, err, first)
		}
	}
	dead := first
	alive := "poda"
	if dead == "poda" {
		alive = "podb"
	}
	t.Logf("fixed port %d is pinned to %s; killing it", clientPort, dead)

	// Really kill the endpoint: its address disappears, so nothing answers.
	l.pods[dead].MustRun(t, "ip", "addr", "del", ips[dead]+"/32", "dev", "eth0")
	s2 := mt.Snap(svc(eps[alive]))
	l.sync(t, s2)

	l.silent(t, vip, "after the endpoint was removed from the rules, without cleanup")
	want := vip + " -> " + ips[dead] + ":8080"
	if got := l.udpFlows(t, vip); len(got) != 1 || got[0] != want {
		t.Fatalf("conntrack entries for the client: %v, want [%s]", got, want)
	}

	w := Stale(s1, s2)
	if len(w.Gone) != 1 || w.Gone[0].Endpoint.String() != ips[dead]+":8080" || len(w.Opened) != 0 {
		t.Fatalf("unexpected work %+v", w)
	}
	n, err := l.cleaner.Clean(context.Background(), w)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("Clean deleted %d entries, want 1", n)
	}
	name, err := l.ask(vip, 2*time.Second)
	if err != nil {
		t.Fatalf("after Clean: %v", err)
	}
	if name != alive {
		t.Fatalf("after Clean answered by %s, want %s", name, alive)
	}
	// Cleaning again finds nothing: the new entry is DNATed to the survivor.
	if n, err := l.cleaner.Clean(context.Background(), w); err != nil || n != 0 {
		t.Fatalf("second Clean: deleted %d, %v; want 0, nil", n, err)
	}
}

// TestKernelOpenedFrontend is case (b): a client sends to a Service's VIP
// before its rules exist. The node routes the datagrams to its default
// gateway (which drops them) and conntrack records a flow that is not
// DNATed. When the Service appears with an endpoint, that entry keeps the
// client's datagrams away from the new DNAT rule until it is deleted.
func TestKernelOpenedFrontend(t *testing.T) {
	l := newLab(t, "10.180.0.5")
	gw := netnstest.AddPod(t, l.node, "10.180.0.200", "10.180.0.1")
	_ = gw // a router that drops what it gets (forwarding is off in a new namespace)
	l.node.MustRun(t, "ip", "route", "add", "default", "via", "10.180.0.200")
	const vip = "172.30.0.20:53"

	s0 := mt.Snap() // the Service does not exist yet
	l.sync(t, s0)
	l.silent(t, vip, "before the Service exists")
	want := vip + " -> " + vip // not DNATed
	if got := l.udpFlows(t, vip); len(got) != 1 || got[0] != want {
		t.Fatalf("conntrack entries for the client: %v, want [%s]", got, want)
	}

	s1 := mt.Snap(udpSP("172.30.0.20", mt.Ep("10.180.0.5", 8080, "node-a")))
	l.sync(t, s1)
	l.silent(t, vip, "after the Service appeared, without cleanup")

	w := Stale(s0, s1)
	if len(w.Opened) != 1 || w.Opened[0].Frontend.String() != vip || len(w.Gone) != 0 {
		t.Fatalf("unexpected work %+v", w)
	}
	n, err := l.cleaner.Clean(context.Background(), w)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("Clean deleted %d entries, want 1", n)
	}
	name, err := l.ask(vip, 2*time.Second)
	if err != nil {
		t.Fatalf("after Clean: %v", err)
	}
	if name != "poda" {
		t.Fatalf("after Clean answered by %s, want poda", name)
	}
	// The new, DNATed entry is what Keep protects: Clean leaves it alone.
	if n, err := l.cleaner.Clean(context.Background(), w); err != nil || n != 0 {
		t.Fatalf("second Clean: deleted %d, %v; want 0, nil", n, err)
	}
	if got := l.udpFlows(t, vip); len(got) != 1 || got[0] != vip+" -> 10.180.0.5:8080" {
		t.Fatalf("conntrack entries after Clean: %v", got)
	}
}

// TestNewBadNamespace checks that New reports an unusable path.
func TestNewBadNamespace(t *testing.T) {
	_, err := New("/run/netns/mp-does-not-exist")
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("want a not-exist error, got %v", err)
	}
}
