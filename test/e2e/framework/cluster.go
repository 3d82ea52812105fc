package framework

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Cluster is a control plane plus the nodes added to it.
type Cluster struct {
	Env      *Env
	CP       *ControlPlane
	Admin    kubernetes.Interface
	Manifest *Manifest
	// ProxyKubeconfig authenticates as the manifest's ServiceAccount (a
	// bound token), so miniproxy has exactly the shipped permissions.
	ProxyKubeconfig string

	mu        sync.Mutex
	nodeCount int // allocates underlay addresses and pod CIDRs
	nodes     []*Node
}

// StartCluster starts the control plane and installs miniproxy's RBAC from
// deploy/daemonset.yaml.
func StartCluster(ctx context.Context, e *Env) (*Cluster, error) {
	m, err := LoadManifest(e.Root)
	if err != nil {
		return nil, err
	}
	cp, err := e.StartControlPlane(ctx)
	if err != nil {
		return nil, err
	}
	c := &Cluster{Env: e, CP: cp, Admin: cp.Admin, Manifest: m}
	if err := applyRBAC(ctx, cp, m); err != nil {
		return nil, err
	}
	if err := c.writeProxyKubeconfig(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Cluster) writeProxyKubeconfig(ctx context.Context) error {
	sa := c.Manifest.ServiceAccount
	tr, err := c.Admin.CoreV1().ServiceAccounts(sa.Namespace).CreateToken(ctx, sa.Name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptrTo(int64(24 * 3600))},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for %s/%s: %w", sa.Namespace, sa.Name, err)
	}
	c.ProxyKubeconfig = filepath.Join(c.CP.dir, "miniproxy.kubeconfig")
	return writeKubeconfig(c.ProxyKubeconfig, c.CP.Server(), c.CP.pki.CertPEM, &clientcmdapi.AuthInfo{Token: tr.Status.Token})
}

// Node is a node namespace: underlay eth0, a pod bridge cbr0 holding the
// first address of its pod CIDR, and the pods on it.
type Node struct {
	Name    string
	Zone    string
	NS      *NetNS
	IP      netip.Addr   // underlay (status.addresses InternalIP)
	PodCIDR netip.Prefix // spec.podCIDRs[0]
	Index   int

	c       *Cluster
	mu      sync.Mutex
	nextPod int
}

// AddNodes creates n nodes named <prefix>-0..n-1 in zones zone-a, zone-b, …
// (round robin), wires routes between all nodes of the cluster, and registers
// Node objects.
func (c *Cluster) AddNodes(ctx context.Context, prefix string, n int) ([]*Node, error) {
	var out []*Node
	for i := 0; i < n; i++ {
		node, err := c.addNode(ctx, fmt.Sprintf("%s-%d", prefix, i), fmt.Sprintf("zone-%c", 'a'+i%3))
		if err != nil {
			return nil, err
		}
		out = append(out, node)
	}
	if err := c.routeAll(ctx); err != nil {
		return nil, err
	}
	return out, nil
}

func (c *Cluster) addNode(ctx context.Context, name, zone string) (*Node, error) {
	c.mu.Lock()
	idx := c.nodeCount
	c.nodeCount++
	c.mu.Unlock()
	if idx > 200 {
		return nil, fmt.Errorf("too many nodes for %s", UnderlayPrefix)
	}
	node := &Node{
		Name:    name,
		Zone:    zone,
		IP:      netip.AddrFrom4([4]byte{10, 250, 0, byte(10 + idx)}),
		PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(idx), 0}), 24),
		Index:   idx,
		c:       c,
	}
	e := c.Env
	ns, err := newNetNS(ctx, fmt.Sprintf("%s-n%d", e.ID, idx))
	if err != nil {
		return nil, err
	}
	node.NS = ns
	e.Defer("delete node ns "+name, ns.Delete)
	if err := attachUnderlay(ctx, c.CP.Underlay, ns, fmt.Sprintf("u-n%d", idx), node.IP.String()); err != nil {
		return nil, err
	}
	gw := node.PodCIDR.Addr().Next()
	if err := ns.RunAll(ctx,
		[]string{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		[]string{"ip", "link", "add", "cbr0", "type", "bridge"},
		[]string{"ip", "addr", "add", netip.PrefixFrom(gw, 24).String(), "dev", "cbr0"},
		[]string{"ip", "link", "set", "cbr0", "up"},
		// Locally generated traffic to a VIP needs a route before the nat
		// OUTPUT hook can rewrite it; real nodes have a default route.
		[]string{"ip", "route", "add", ServiceCIDR, "dev", "eth0", "src", node.IP.String()},
	); err != nil {
		return nil, err
	}
	if err := c.registerNode(ctx, node); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.nodes = append(c.nodes, node)
	c.mu.Unlock()
	e.Log("node %s up: ns %s underlay %s pods %s zone %s", name, ns.Name, node.IP, node.PodCIDR, zone)
	return node, nil
}

// routeAll gives every node a route to every other node's pod CIDR (a flat
// "host-gw" network, like a simple CNI). Idempotent: `ip route replace`.
func (c *Cluster) routeAll(ctx context.Context) error {
	c.mu.Lock()
	nodes := append([]*Node(nil), c.nodes...)
	c.mu.Unlock()
	for _, a := range nodes {
		for _, b := range nodes {
			if a == b {
				continue
			}
			if _, err := a.NS.Run(ctx, "ip", "route", "replace", b.PodCIDR.String(), "via", b.IP.String()); err != nil {
				return err
			}
		}
	}
	return nil
}

func (c *Cluster) registerNode(ctx context.Context, node *Node) error {
	obj := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: node.Name,
			Labels: map[string]string{
				"kubernetes.io/hostname":        node.Name,
				"kubernetes.io/os":              "linux",
				"topology.kubernetes.io/zone":   node.Zone,
				"topology.kubernetes.io/region": "e2e",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: node.PodCIDR.String(), PodCIDRs: []string{node.PodCIDR.String()}},
	}
	created, err := c.Admin.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Node %s: %w", node.Name, err)
	}
	// Node agents wait for status.addresses; it is only writable through
	// the status subresource.
	now := metav1.NewTime(time.Now())
	created.Status = corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: node.IP.String()},
			{Type: corev1.NodeHostName, Address: node.Name},
		},
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "E2ENodeReady",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}},
	}
	if _, err := c.Admin.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update Node %s status: %w", node.Name, err)
	}
	c.Env.Defer("delete Node "+node.Name, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// Best effort: the control plane may already be gone.
		_ = c.Admin.CoreV1().Nodes().Delete(ctx, node.Name, metav1.DeleteOptions{})
		return nil
	})
	return nil
}

// Nodes returns all nodes added so far.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*Node(nil), c.nodes...)
}

// Pod is a pod namespace on a node, on the node's pod bridge.
type Pod struct {
	Name string
	IP   netip.Addr
	Node *Node
	NS   *NetNS
	proc *Process
	del  sync.Once
}

// NewPod creates a pod namespace on the node. The veth is created inside the
// node namespace with its peer moved straight into the pod; the bridge port
// gets hairpin mode so the pod can reach itself through a VIP.
func (n *Node) NewPod(ctx context.Context, name string) (*Pod, error) {
	n.mu.Lock()
	k := n.nextPod
	n.nextPod++
	n.mu.Unlock()
	if k > 200 {
		return nil, fmt.Errorf("node %s: pod CIDR exhausted", n.Name)
	}
	ip := n.PodCIDR.Addr()
	for i := 0; i < 10+k; i++ {
		ip = ip.Next()
	}
	e := n.c.Env
	ns, err := newNetNS(ctx, fmt.Sprintf("%s-n%d-p%d", e.ID, n.Index, k))
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: name, IP: ip, Node: n, NS: ns}
	e.Defer("delete pod "+name, p.Delete)
	port := fmt.Sprintf("vp%d", k)
	if err := n.NS.RunAll(ctx,
		[]string{"ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.Name},
		[]string{"ip", "link", "set", port, "master", "cbr0", "up"},
		[]string{"ip", "link", "set", port, "type", "bridge_slave", "hairpin", "on"},
	); err != nil {
		return nil, err
	}
	if err := ns.RunAll(ctx,
		[]string{"ip", "addr", "add", netip.PrefixFrom(ip, 24).String(), "dev", "eth0"},
		[]string{"ip", "link", "set", "eth0", "up"},
		[]string{"ip", "route", "add", "default", "via", n.PodCIDR.Addr().Next().String()},
	); err != nil {
		return nil, err
	}
	return p, nil
}

// Serve starts bin/podserver in the pod (TCP+UDP on tcpUDPPort, HTTP on
// httpPort when non-zero) and waits until it answers from the node.
func (p *Pod) Serve(ctx context.Context, tcpUDPPort, httpPort int) error {
	e := p.Node.c.Env
	args := []string{"serve", "--name", p.Name, "--tcp", fmt.Sprint(tcpUDPPort), "--udp", fmt.Sprint(tcpUDPPort)}
	if httpPort != 0 {
		args = append(args, "--http", fmt.Sprint(httpPort))
	}
	proc, err := e.start(p.NS, "pod-"+p.Name, filepath.Join(e.BinDir, "podserver"), args...)
	if err != nil {
		return err
	}
	p.proc = proc
	addr := netip.AddrPortFrom(p.IP, uint16(tcpUDPPort)).String()
	err = poll(ctx, 20*time.Second, 50*time.Millisecond, func() (bool, error) {
		if exited, werr := proc.Exited(); exited {
			return false, fmt.Errorf("podserver %s exited: %v: %s", p.Name, werr, proc.Logs(2000))
		}
		name, err := askTCP(ctx, p.Node.NS, addr, time.Second)
		return err == nil && name == p.Name, nil
	})
	if err != nil {
		return fmt.Errorf("pod %s not answering on %s: %w", p.Name, addr, err)
	}
	return nil
}

// Delete stops the pod's server and removes its namespace (and veth).
func (p *Pod) Delete() error {
	var err error
	p.del.Do(func() {
		if p.proc != nil {
			_ = p.proc.Stop(5 * time.Second)
		}
		err = p.NS.Delete()
	})
	return err
}
