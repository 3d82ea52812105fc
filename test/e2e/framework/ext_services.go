package framework

// Helpers for traffic that comes from outside the cluster (NodePort,
// externalIPs, LoadBalancer IPs, source ranges, traffic policies): off-cluster
// clients on the underlay, probes that tell a drop from a reject, the
// server-side view of a connection, LoadBalancer status, health checks.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// External clients live at the top of the underlay /24: nodes are numbered
// from .10 and the framework refuses more than 200 of them (.210), so
// .240–.249 never collide with a node.
const (
	extClientBase = 240
	extClientMax  = 10
)

// ExtClient is a machine on the nodes' L2 segment that is not a node: its own
// namespace on the underlay bridge with one address and no proxy, no pod
// route, nothing else. It is the "outside" of NodePort and LoadBalancer
// tests, and its address is outside the cluster CIDR.
type ExtClient struct {
	Index int
	IP    netip.Addr
	NS    *NetNS
}

// External returns off-cluster client k (0 ≤ k < 10), creating it on first
// use. Clients are shared by the tests of one run (creating and deleting one
// per test would reuse an address with a new MAC while the nodes' neighbour
// caches still hold the old one); they are deleted with the run. Routes a
// test adds with Route are the test's to remove. Not safe for tests running
// in parallel with t.Parallel (the e2e suite runs its tests one by one).
func (c *Cluster) External(ctx context.Context, k int) (*ExtClient, error) {
	if k < 0 || k >= extClientMax {
		return nil, fmt.Errorf("external client %d: only 0..%d exist", k, extClientMax-1)
	}
	x := &ExtClient{
		Index: k,
		IP:    netip.AddrFrom4([4]byte{10, 250, 0, byte(extClientBase + k)}),
		NS:    &NetNS{Name: fmt.Sprintf("%s-x%d", c.Env.ID, k)},
	}
	// The namespace's existence is the record that the client was set up;
	// it is only ever created here, in full, before External returns.
	if _, err := os.Stat(x.NS.Path()); err == nil {
		return x, nil
	}
	ns, err := newNetNS(ctx, x.NS.Name)
	if err != nil {
		return nil, fmt.Errorf("external client %d: %w", k, err)
	}
	c.Env.Defer("delete external client ns "+ns.Name, ns.Delete)
	if err := attachUnderlay(ctx, c.CP.Underlay, ns, fmt.Sprintf("u-x%d", k), x.IP.String()); err != nil {
		return nil, fmt.Errorf("external client %d: %w", k, err)
	}
	c.Env.Log("external client %d up: ns %s address %s", k, ns.Name, x.IP)
	return x, nil
}

// Route sends traffic for dst (an address "routed to the node", like an
// external IP or a load balancer's IP) via the node's underlay address. It
// replaces any earlier route for dst and returns a func that removes it.
func (x *ExtClient) Route(ctx context.Context, dst netip.Prefix, via netip.Addr) (func() error, error) {
	if _, err := x.NS.Run(ctx, "ip", "route", "replace", dst.String(), "via", via.String()); err != nil {
		return nil, err
	}
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := x.NS.Run(ctx, "ip", "route", "del", dst.String())
		return err
	}, nil
}

// TCPCounts opens n short connections to addr and counts the answering
// endpoints (2 s per connection).
func (x *ExtClient) TCPCounts(ctx context.Context, addr string, n int) (Counts, error) {
	return TCPCountsFrom(ctx, x.NS, addr, n)
}

// TCPCountsFrom opens n short connections from any namespace (a node's own
// namespace for NodePorts on 127.0.0.1, an external client, a pod).
func TCPCountsFrom(ctx context.Context, ns *NetNS, addr string, n int) (Counts, error) {
	return countFrom(ctx, ns, n, func() (string, error) { return askTCPHere(ctx, addr, 2*time.Second) })
}

// ProbeOutcome classifies one connection attempt.
type ProbeOutcome string

// The outcomes of Probe. Dropped and Rejected are what a Service's rules
// decide; Unreachable usually means no rule matched and the node had no
// route for the destination.
const (
	Answered    ProbeOutcome = "answered"
	Dropped     ProbeOutcome = "dropped (no answer before the timeout)"
	Rejected    ProbeOutcome = "rejected (connection refused / RST)"
	Unreachable ProbeOutcome = "unreachable (ICMP host/net unreachable)"
	OtherError  ProbeOutcome = "other error"
)

// ProbeResult is one connection attempt: who answered, or how it failed.
type ProbeResult struct {
	Outcome ProbeOutcome
	Name    string // the endpoint's name when Answered
	Local   netip.AddrPort
	Err     error
}

func (r ProbeResult) String() string {
	if r.Outcome == Answered {
		return fmt.Sprintf("answered by %s (client %s)", r.Name, r.Local)
	}
	return fmt.Sprintf("%s: %v", r.Outcome, r.Err)
}

// Probe opens one TCP connection from ns to addr, sends a line, and reports
// the answer or the kind of failure. timeout bounds the whole attempt, so a
// dropped SYN costs exactly timeout.
func Probe(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) ProbeResult {
	var res ProbeResult
	err := ns.Do(func() error {
		d := net.Dialer{Timeout: timeout}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if ap, perr := netip.ParseAddrPort(c.LocalAddr().String()); perr == nil {
			res.Local = ap
		}
		_ = c.SetDeadline(time.Now().Add(timeout))
		res.Name, err = askOn(c)
		return err
	})
	res.Err = err
	res.Outcome = classify(err)
	return res
}

func classify(err error) ProbeOutcome {
	var ne net.Error
	switch {
	case err == nil:
		return Answered
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		return Rejected
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return Unreachable
	case errors.As(err, &ne) && ne.Timeout():
		return Dropped
	default:
		return OtherError
	}
}

// ExtConn is a long-lived TCP connection from any namespace; the test can ask
// the server side who it thinks the client is (Peers) while it is open.
type ExtConn struct {
	c     net.Conn
	Local netip.AddrPort
}

// DialFrom opens a connection from ns to addr that stays open until Close.
func DialFrom(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) (*ExtConn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, ns.Name, err)
	}
	local, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("local address of %s: %w", addr, err)
	}
	return &ExtConn{c: c, Local: local}, nil
}

// Ask sends one line and returns the answering endpoint's name.
func (c *ExtConn) Ask(timeout time.Duration) (string, error) {
	_ = c.c.SetDeadline(time.Now().Add(timeout))
	return askOn(c.c)
}

// Close closes the connection.
func (c *ExtConn) Close() error { return c.c.Close() }

// Peers lists the remote addresses of the established TCP connections on
// the pod's local port, as the pod's kernel sees them: after DNAT and any
// SNAT, this is the client address the server application gets from
// accept(). podserver answers with its name only, so this is how a test
// proves that a source address was (or was not) preserved.
func (p *Pod) Peers(ctx context.Context, port int) ([]netip.AddrPort, error) {
	out, err := p.NS.Run(ctx, "ss", "-Htn", "state", "established", fmt.Sprintf("( sport = :%d )", port))
	if err != nil {
		return nil, err
	}
	var peers []netip.AddrPort
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		// Recv-Q Send-Q Local Peer (state is omitted when filtered on it).
		if len(f) < 4 {
			continue
		}
		ap, err := netip.ParseAddrPort(f[3])
		if err != nil {
			return nil, fmt.Errorf("ss in %s: peer %q: %w", p.Name, f[3], err)
		}
		// A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
		peers = append(peers, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	}
	return peers, nil
}

// Sysctl reads a sysctl inside ns (never the root namespace).
func Sysctl(ctx context.Context, ns *NetNS, key string) (string, error) {
	out, err := ns.Run(ctx, "sysctl", "-n", key)
	return strings.TrimSpace(out), err
}

// HealthCheck is kube-proxy's healthCheckNodePort answer.
type HealthCheck struct {
	Code int
	Body struct {
		Service struct {
			Namespace string `json:"namespace"`
			Name      string `json:"name"`
		} `json:"service"`
		LocalEndpoints      int  `json:"localEndpoints"`
		ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
	}
	Raw string
}

// GetHealthCheck does an HTTP GET from ns on http://addr/ (a node's
// healthCheckNodePort) and decodes kube-proxy's JSON.
func GetHealthCheck(ctx context.Context, ns *NetNS, addr string) (HealthCheck, error) {
	var hc HealthCheck
	client := &http.Client{
		Transport: &http.Transport{DialContext: ns.DialContext, DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return hc, fmt.Errorf("health check request %s: %w", addr, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return hc, fmt.Errorf("GET %s from %s: %w", addr, ns.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return hc, fmt.Errorf("read health check body from %s: %w", addr, err)
	}
	hc.Code, hc.Raw = resp.StatusCode, strings.TrimSpace(string(b))
	if err := json.Unmarshal(b, &hc.Body); err != nil {
		return hc, fmt.Errorf("health check body from %s is not kube-proxy's JSON: %w: %q", addr, err, hc.Raw)
	}
	return hc, nil
}

// SetLoadBalancerIngress writes status.loadBalancer.ingress (what a cloud
// controller would do) with one entry per IP, all with ipMode mode (nil: the
// field is left unset, which means VIP). It retries on conflicts.
func (c *Cluster) SetLoadBalancerIngress(ctx context.Context, namespace, name string, mode *corev1.LoadBalancerIPMode, ips ...netip.Addr) (*corev1.Service, error) {
	var out *corev1.Service
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		svc, err := c.Admin.CoreV1().Services(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		svc.Status.LoadBalancer.Ingress = nil
		for _, ip := range ips {
			svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip.String(), IPMode: mode})
		}
		out, err = c.Admin.CoreV1().Services(namespace).UpdateStatus(ctx, svc, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("set load balancer status of %s/%s: %w", namespace, name, err)
	}
	return out, nil
}

// NodePortOf returns the allocated nodePort of the named port.
func NodePortOf(svc *corev1.Service, port string) (int, error) {
	for _, p := range svc.Spec.Ports {
		if p.Name == port {
			if p.NodePort == 0 {
				return 0, fmt.Errorf("%s/%s port %q has no nodePort", svc.Namespace, svc.Name, port)
			}
			return int(p.NodePort), nil
		}
	}
	return 0, fmt.Errorf("%s/%s has no port %q", svc.Namespace, svc.Name, port)
}

// BridgeIP is the node's address on its pod bridge (cbr0): a second address
// the node owns besides the underlay one, used to check which node
// addresses serve NodePorts.
func (n *Node) BridgeIP() netip.Addr { return n.PodCIDR.Addr().Next() }

// RouteIn replaces the route for dst in ns with one via the given next hop
// and returns a func that deletes it. Tests use it inside node namespaces to
// model "the rest of the network": on a real node an address that no
// Service rule captures is routed on (default route) rather than refused.
func RouteIn(ctx context.Context, ns *NetNS, dst netip.Prefix, via netip.Addr) (func() error, error) {
	if _, err := ns.Run(ctx, "ip", "route", "replace", dst.String(), "via", via.String()); err != nil {
		return nil, err
	}
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := ns.Run(ctx, "ip", "route", "del", dst.String())
		return err
	}, nil
}

// Own adds addr as a local address of the client (on lo), making it the
// real owner of, say, a load balancer IP; returns a func that removes it.
func (x *ExtClient) Own(ctx context.Context, addr netip.Addr) (func() error, error) {
	p := netip.PrefixFrom(addr, addr.BitLen()).String()
	if _, err := x.NS.Run(ctx, "ip", "addr", "replace", p, "dev", "lo"); err != nil {
		return nil, err
	}
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := x.NS.Run(ctx, "ip", "addr", "del", p, "dev", "lo")
		return err
	}, nil
}

// ServeName answers every line on TCP port with name, on all of the
// client's addresses, until the returned func is called. It runs in the test
// process (the listening socket lives in the client's namespace), so a
// connection that no proxy rule captured is answered by "the network"
// itself and a test can tell "untouched" from "dropped" and "proxied".
func (x *ExtClient) ServeName(port int, name string) (func() error, error) {
	var ln net.Listener
	err := x.NS.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on :%d in %s: %w", port, x.NS.Name, err)
	}
	reply := []byte(name + "\n")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				r := bufio.NewReader(c)
				for {
					if _, err := r.ReadString('\n'); err != nil {
						return
					}
					if _, err := c.Write(reply); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Close, nil
}
