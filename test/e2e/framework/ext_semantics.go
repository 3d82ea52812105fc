package framework

// Helpers for the Service-semantics and dataplane e2e tests
// (test/e2e/semantics_test.go, dataplane_test.go): extra nodes whose
// miniproxy runs with non-default flags, hand-written EndpointSlices
// (conditions, hints), an in-process server that reports the client address
// it sees, fixed-source-port UDP flows, timed dials and /metrics scraping.
// Everything runs inside the run's namespaces.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// AddProxyNode adds one node named <prefix>-0 to the cluster and starts
// miniproxy on it in mode with extra flags appended (later flags win, so
// extra can override --cluster-cidr and friends). Tests that need
// non-default proxy flags use such a node instead of restarting the shared
// ones, so other tests never see the changed flags. The caller stops the
// proxy when done (the node namespace goes with the run).
func (c *Cluster) AddProxyNode(ctx context.Context, prefix, mode string, extra ...string) (*Node, *Proxy, error) {
	nodes, err := c.AddNodes(ctx, prefix, 1)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.StartProxy(ctx, nodes[0], ProxyOptions{Mode: mode, Extra: extra})
	if err != nil {
		return nodes[0], p, err
	}
	return nodes[0], p, nil
}

// SliceEndpoint is one endpoint of a hand-written EndpointSlice.
type SliceEndpoint struct {
	IP          netip.Addr
	Node        *Node // nodeName and zone
	Ready       bool
	Serving     bool
	Terminating bool
	// HintZone, when set, is written as hints.forZones (what the
	// EndpointSlice controller does for trafficDistribution: PreferClose).
	HintZone string
}

// PublishSlice creates or replaces the EndpointSlice <svc>-<suffix> of
// Service svc in namespace ns with eps and ports, the way the EndpointSlice
// controller would. The address type follows the first endpoint's family.
func (c *Cluster) PublishSlice(ctx context.Context, ns, svc, suffix string, eps []SliceEndpoint, ports []discoveryv1.EndpointPort) error {
	at := discoveryv1.AddressTypeIPv4
	if len(eps) > 0 && eps[0].IP.Is6() {
		at = discoveryv1.AddressTypeIPv6
	}
	var out []discoveryv1.Endpoint
	for _, e := range eps {
		ep := discoveryv1.Endpoint{
			Addresses: []string{e.IP.String()},
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptrTo(e.Ready), Serving: ptrTo(e.Serving), Terminating: ptrTo(e.Terminating),
			},
		}
		if e.Node != nil {
			ep.NodeName, ep.Zone = ptrTo(e.Node.Name), ptrTo(e.Node.Zone)
		}
		if e.HintZone != "" {
			ep.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: e.HintZone}}}
		}
		out = append(out, ep)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Name:      svc + "-" + suffix,
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svc,
				discoveryv1.LabelManagedBy:   "miniproxy-e2e",
			},
		},
		AddressType: at,
		Endpoints:   out,
		Ports:       ports,
	}
	api := c.Admin.DiscoveryV1().EndpointSlices(ns)
	cur, err := api.Get(ctx, slice.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := api.Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create EndpointSlice %s/%s: %w", ns, slice.Name, err)
		}
	case err != nil:
		return fmt.Errorf("get EndpointSlice %s/%s: %w", ns, slice.Name, err)
	default:
		slice.ResourceVersion = cur.ResourceVersion
		if _, err := api.Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update EndpointSlice %s/%s: %w", ns, slice.Name, err)
		}
	}
	return nil
}

// SlicePort is a named EndpointSlice port.
func SlicePort(name string, proto corev1.Protocol, port int) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptrTo(name), Protocol: ptrTo(proto), Port: ptrTo(int32(port))}
}

// DefaultSlicePorts are the ports ClusterIPService maps to (tcp, udp, http).
func DefaultSlicePorts() []discoveryv1.EndpointPort {
	return []discoveryv1.EndpointPort{
		SlicePort("tcp", corev1.ProtocolTCP, PodPort),
		SlicePort("udp", corev1.ProtocolUDP, PodPort),
		SlicePort("http", corev1.ProtocolTCP, PodHTTPPort),
	}
}

// PeerServer is a TCP server inside a pod namespace that answers every line
// with the address the connection came from, so a test can see whether the
// proxy masqueraded it.
type PeerServer struct {
	ln net.Listener
	wg sync.WaitGroup
}

// ServePeer listens on port in the pod's namespace. The listening socket
// lives in the namespace; accepting from any goroutine is fine.
func (p *Pod) ServePeer(port int) (*PeerServer, error) {
	var ln net.Listener
	err := p.NS.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: peer server on %d: %w", p.Name, port, err)
	}
	s := &PeerServer{ln: ln}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				r := bufio.NewReader(c)
				for {
					if _, err := r.ReadString('\n'); err != nil {
						return
					}
					host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
					if _, err := io.WriteString(c, host+"\n"); err != nil {
						return
					}
				}
			})
		}
	})
	return s, nil
}

// Close stops the server and waits for its goroutines.
func (s *PeerServer) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

// AskFrom opens one TCP connection from ns to addr and returns the line the
// server answered (a pod name for podserver, a client address for a
// PeerServer).
func AskFrom(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) (string, error) {
	return askTCP(ctx, ns, addr, timeout)
}

// TimedDial dials network/addr from ns once and returns how long the dial
// took to succeed or fail. It closes a successful connection.
func TimedDial(ctx context.Context, ns *NetNS, network, addr string, timeout time.Duration) (time.Duration, error) {
	var took time.Duration
	err := ns.Do(func() error {
		d := net.Dialer{Timeout: timeout}
		start := time.Now()
		c, err := d.DialContext(ctx, network, addr)
		took = time.Since(start)
		if err != nil {
			return err
		}
		return c.Close()
	})
	return took, err
}

// UDPAskConnected sends one datagram from a connected UDP socket in ns and
// waits up to timeout for the answer. A connected socket reports an ICMP
// port-unreachable as ECONNREFUSED on the read, which is how a test tells a
// reject from a silent drop (a read timeout).
func UDPAskConnected(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) (string, time.Duration, error) {
	var (
		answer string
		took   time.Duration
	)
	err := ns.Do(func() error {
		d := net.Dialer{}
		c, err := d.DialContext(ctx, "udp", addr)
		if err != nil {
			return fmt.Errorf("dial udp %s: %w", addr, err)
		}
		defer c.Close()
		start := time.Now()
		if _, err := c.Write([]byte("hello\n")); err != nil {
			took = time.Since(start)
			return fmt.Errorf("udp write %s: %w", addr, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(timeout))
		buf := make([]byte, 512)
		n, err := c.Read(buf)
		took = time.Since(start)
		if err != nil {
			return fmt.Errorf("udp read %s: %w", addr, err)
		}
		answer = strings.TrimSpace(string(buf[:n]))
		return nil
	})
	return answer, took, err
}

// UDPFlow is a UDP socket in a pod that keeps its source port, so every
// datagram belongs to the same conntrack flow (a DNS client reusing its
// socket, a QUIC connection).
type UDPFlow struct {
	pc  net.PacketConn
	dst net.Addr
}

// NewUDPFlow opens the socket in the pod's namespace.
func (p *Pod) NewUDPFlow(addr string) (*UDPFlow, error) {
	dst, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", addr, err)
	}
	pc, err := p.NS.ListenPacket("udp4", ":0")
	if err != nil {
		return nil, fmt.Errorf("pod %s: udp socket: %w", p.Name, err)
	}
	return &UDPFlow{pc: pc, dst: dst}, nil
}

// LocalPort is the flow's fixed source port.
func (f *UDPFlow) LocalPort() int { return f.pc.LocalAddr().(*net.UDPAddr).Port }

// Ask sends one datagram and waits up to timeout for an answer.
func (f *UDPFlow) Ask(timeout time.Duration) (string, error) {
	if _, err := f.pc.WriteTo([]byte("hello\n"), f.dst); err != nil {
		return "", fmt.Errorf("udp write %s: %w", f.dst, err)
	}
	_ = f.pc.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 512)
	n, _, err := f.pc.ReadFrom(buf)
	if err != nil {
		return "", fmt.Errorf("udp read from %s (src port %d): %w", f.dst, f.LocalPort(), err)
	}
	return strings.TrimSpace(string(buf[:n])), nil
}

// Close closes the socket.
func (f *UDPFlow) Close() error { return f.pc.Close() }

// Metrics scrapes the proxy's /metrics inside its node namespace (the
// metrics address is 127.0.0.1:10249 there) and returns every sample keyed
// by its name with labels, as printed (e.g. `x_count` or `x{mode="full"}`).
func (p *Proxy) Metrics(ctx context.Context) (map[string]float64, error) {
	hc := &http.Client{Transport: &http.Transport{DialContext: p.Node.NS.DialContext, DisableKeepAlives: true}, Timeout: 3 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10249/metrics", nil)
	if err != nil {
		return nil, fmt.Errorf("metrics request: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape metrics on %s: %w", p.Node.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape metrics on %s: HTTP %d", p.Node.Name, resp.StatusCode)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read metrics on %s: %w", p.Node.Name, err)
	}
	return out, nil
}

// ErrNoSCTP says the kernel cannot open SCTP sockets (module absent).
var ErrNoSCTP = errors.New("kernel has no SCTP support")
