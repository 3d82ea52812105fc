package framework

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Ports every test Deployment's pods listen on, and the Service ports that
// map to them.
const (
	PodPort     = 8080 // TCP and UDP
	PodHTTPPort = 8081
	SvcPort     = 80 // TCP "tcp" and UDP "udp"
	SvcHTTPPort = 81
)

// NewNamespace creates a Kubernetes namespace with a unique name.
func (c *Cluster) NewNamespace(ctx context.Context, prefix string) (string, error) {
	var b [3]byte
	_, _ = rand.Read(b[:])
	name := fmt.Sprintf("%s-%s", prefix, hex.EncodeToString(b[:]))
	if _, err := c.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		return "", fmt.Errorf("create namespace %s: %w", name, err)
	}
	return name, nil
}

// ClusterIPService returns a ClusterIP Service (not yet created) with ports
// tcp 80→8080, udp 80→8080 and http 81→8081, selecting app=<name>. Tests
// adjust it before CreateService.
func ClusterIPService(namespace, name string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{
				{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: SvcPort, TargetPort: intstr.FromInt32(PodPort)},
				{Name: "udp", Protocol: corev1.ProtocolUDP, Port: SvcPort, TargetPort: intstr.FromInt32(PodPort)},
				{Name: "http", Protocol: corev1.ProtocolTCP, Port: SvcHTTPPort, TargetPort: intstr.FromInt32(PodHTTPPort)},
			},
		},
	}
}

// CreateService creates svc and returns it as stored (with its ClusterIP).
func (c *Cluster) CreateService(ctx context.Context, svc *corev1.Service) (*corev1.Service, error) {
	out, err := c.Admin.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create Service %s/%s: %w", svc.Namespace, svc.Name, err)
	}
	return out, nil
}

// DeleteService deletes a Service and its EndpointSlices (there is no
// garbage collector running to do the latter).
func (c *Cluster) DeleteService(ctx context.Context, namespace, name string) error {
	if err := c.Admin.CoreV1().Services(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete Service %s/%s: %w", namespace, name, err)
	}
	err := c.Admin.DiscoveryV1().EndpointSlices(namespace).DeleteCollection(ctx, metav1.DeleteOptions{},
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + name})
	if err != nil {
		return fmt.Errorf("delete EndpointSlices of %s/%s: %w", namespace, name, err)
	}
	return nil
}

// DeploymentSpec describes a test Deployment.
type DeploymentSpec struct {
	Namespace string
	Name      string // also the Service name its EndpointSlice belongs to
	Replicas  int
	Nodes     []*Node // pods are placed round robin over these
	// PreferClose writes zone hints like the EndpointSlice controller does
	// for trafficDistribution: PreferClose.
	PreferClose bool
}

// Deployment is a set of pod namespaces running podserver plus the
// EndpointSlice that publishes them, maintained the way the EndpointSlice
// controller would (there is no controller-manager in this cluster).
type Deployment struct {
	Spec DeploymentSpec
	c    *Cluster

	mu     sync.Mutex
	pods   []*Pod
	placed int // pods ever created, for names and placement
	// terminating pods are still published (ready=false, serving=true,
	// terminating=true) until Scale removes them.
	terminating []*Pod
}

// Deploy creates the pods, waits until each answers, and publishes them.
func (c *Cluster) Deploy(ctx context.Context, spec DeploymentSpec) (*Deployment, error) {
	if len(spec.Nodes) == 0 {
		return nil, fmt.Errorf("deployment %s: no nodes", spec.Name)
	}
	d := &Deployment{Spec: spec, c: c}
	if err := d.Scale(ctx, spec.Replicas); err != nil {
		return nil, err
	}
	return d, nil
}

// Pods returns the current (ready) pods.
func (d *Deployment) Pods() []*Pod {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*Pod(nil), d.pods...)
}

// PodNames returns the names of the current pods.
func (d *Deployment) PodNames() []string {
	var out []string
	for _, p := range d.Pods() {
		out = append(out, p.Name)
	}
	return out
}

// Scale changes the number of pods. New pods are published once they answer;
// removed pods are first published as terminating, then removed from the
// slice, then stopped — the order a real rollout produces.
func (d *Deployment) Scale(ctx context.Context, replicas int) error {
	d.mu.Lock()
	cur := len(d.pods)
	d.mu.Unlock()
	switch {
	case replicas > cur:
		for i := cur; i < replicas; i++ {
			d.mu.Lock()
			k := d.placed
			d.placed++
			d.mu.Unlock()
			node := d.Spec.Nodes[k%len(d.Spec.Nodes)]
			p, err := node.NewPod(ctx, fmt.Sprintf("%s-%d", d.Spec.Name, k))
			if err != nil {
				return err
			}
			if err := p.Serve(ctx, PodPort, PodHTTPPort); err != nil {
				return err
			}
			d.mu.Lock()
			d.pods = append(d.pods, p)
			d.mu.Unlock()
		}
		return d.publish(ctx)
	case replicas < cur:
		d.mu.Lock()
		gone := append([]*Pod(nil), d.pods[replicas:]...)
		d.pods = d.pods[:replicas]
		d.terminating = gone
		d.mu.Unlock()
		if err := d.publish(ctx); err != nil {
			return err
		}
		d.mu.Lock()
		d.terminating = nil
		d.mu.Unlock()
		if err := d.publish(ctx); err != nil {
			return err
		}
		for _, p := range gone {
			if err := p.Delete(); err != nil {
				return err
			}
		}
	}
	return nil
}

// SliceName is the name of the Deployment's EndpointSlice.
func (d *Deployment) SliceName() string { return d.Spec.Name + "-e2e" }

// publish writes the EndpointSlice for the current state (create or update).
func (d *Deployment) publish(ctx context.Context) error {
	d.mu.Lock()
	var eps []discoveryv1.Endpoint
	add := func(p *Pod, ready, terminating bool) {
		ep := discoveryv1.Endpoint{
			Addresses: []string{p.IP.String()},
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptrTo(ready), Serving: ptrTo(true), Terminating: ptrTo(terminating),
			},
			NodeName:  ptrTo(p.Node.Name),
			Zone:      ptrTo(p.Node.Zone),
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: d.Spec.Namespace, Name: p.Name},
		}
		if d.Spec.PreferClose {
			ep.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: p.Node.Zone}}}
		}
		eps = append(eps, ep)
	}
	for _, p := range d.pods {
		add(p, true, false)
	}
	for _, p := range d.terminating {
		add(p, false, true)
	}
	d.mu.Unlock()

	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: d.Spec.Namespace,
			Name:      d.SliceName(),
			Labels: map[string]string{
				discoveryv1.LabelServiceName: d.Spec.Name,
				discoveryv1.LabelManagedBy:   "miniproxy-e2e",
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports: []discoveryv1.EndpointPort{
			{Name: ptrTo("tcp"), Protocol: ptrTo(corev1.ProtocolTCP), Port: ptrTo(int32(PodPort))},
			{Name: ptrTo("udp"), Protocol: ptrTo(corev1.ProtocolUDP), Port: ptrTo(int32(PodPort))},
			{Name: ptrTo("http"), Protocol: ptrTo(corev1.ProtocolTCP), Port: ptrTo(int32(PodHTTPPort))},
		},
	}
	api := d.c.Admin.DiscoveryV1().EndpointSlices(d.Spec.Namespace)
	cur, err := api.Get(ctx, slice.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := api.Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create EndpointSlice %s/%s: %w", slice.Namespace, slice.Name, err)
		}
	case err != nil:
		return fmt.Errorf("get EndpointSlice %s/%s: %w", slice.Namespace, slice.Name, err)
	default:
		slice.ResourceVersion = cur.ResourceVersion
		if _, err := api.Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update EndpointSlice %s/%s: %w", slice.Namespace, slice.Name, err)
		}
	}
	return nil
}

// Delete removes all pods (the EndpointSlice goes with DeleteService).
func (d *Deployment) Delete() error {
	d.mu.Lock()
	pods := append(d.pods, d.terminating...)
	d.pods, d.terminating = nil, nil
	d.mu.Unlock()
	for _, p := range pods {
		if err := p.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// VIP returns "clusterIP:port" for the named port of svc.
func VIP(svc *corev1.Service, port string) string {
	for _, p := range svc.Spec.Ports {
		if p.Name == port {
			return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), uint16(p.Port)).String()
		}
	}
	return fmt.Sprintf("<no port %q in %s/%s>", port, svc.Namespace, svc.Name)
}

// WaitFor polls cond until it is true or timeout passes (bounded; for tests
// and the lab alike).
func WaitFor(ctx context.Context, timeout, interval time.Duration, cond func() (bool, error)) error {
	return poll(ctx, timeout, interval, cond)
}
