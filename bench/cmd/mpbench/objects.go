package main

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

const (
	benchNS     = "bench"
	svcPort     = 80
	podPort     = 8080
	epsPerSvc   = 5
	triggerAnno = "endpoints.kubernetes.io/last-change-trigger-time"
)

// bulkBase is where the bulk Services' endpoints live: 10.200.0.0/14 holds
// 262,144 addresses, enough for 44k × 5. Nothing ever answers there; those
// Services only have to be programmed.
var bulkBase = netip.MustParseAddr("10.200.0.0")

func bulkName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// bulkAddrs returns the endpoints of bulk Service i (distinct per Service, so
// no two Services share endpoint chains).
func bulkAddrs(i int) []string {
	b := bulkBase.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	out := make([]string, epsPerSvc)
	for j := range out {
		x := v + uint32(i*epsPerSvc+j)
		out[j] = netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)}).String()
	}
	return out
}

// altAddr is the address a soak swap moves a bulk endpoint to: the same
// offset in 10.204.0.0/14, next to bulkBase's /14.
func altAddr(a string) string {
	b := netip.MustParseAddr(a).As4()
	b[1] += 4
	return netip.AddrFrom4(b).String()
}

// service is a selector-less ClusterIP Service: there is no endpointslice
// controller in the bench control plane, the bench writes slices itself.
func service(name string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: benchNS, Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP,
			Ports: []corev1.ServicePort{{
				Protocol: corev1.ProtocolTCP, Port: svcPort, TargetPort: intstr.FromInt32(podPort),
			}},
		},
	}
}

// slice builds the single EndpointSlice of a Service. nodeName is where the
// endpoints claim to run; trigger, when set, becomes the
// last-change-trigger-time annotation both proxies turn into
// network_programming_duration_seconds.
func slice(svc string, addrs []string, nodeName string, trigger time.Time) *discoveryv1.EndpointSlice {
	portName := ""
	port := int32(podPort)
	proto := corev1.ProtocolTCP
	ready := true
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: benchNS,
			Name:      svc + "-1",
			Labels: map[string]string{
				discoveryv1.LabelServiceName: svc,
				discoveryv1.LabelManagedBy:   "mpbench",
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port, Protocol: &proto}},
	}
	if !trigger.IsZero() {
		s.Annotations = map[string]string{triggerAnno: trigger.UTC().Format(time.RFC3339)}
	}
	for _, a := range addrs {
		nn := nodeName
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{a},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName:   &nn,
		})
	}
	return s
}

// createService creates a Service and its slice and returns the ClusterIP.
func createService(ctx context.Context, cs kubernetes.Interface, name string, addrs []string, nodeName string, trigger time.Time) (string, error) {
	svc, err := cs.CoreV1().Services(benchNS).Create(ctx, service(name), metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("create Service %s: %w", name, err)
	}
	if _, err := cs.DiscoveryV1().EndpointSlices(benchNS).Create(ctx, slice(name, addrs, nodeName, trigger), metav1.CreateOptions{}); err != nil {
		return "", fmt.Errorf("create EndpointSlice of %s: %w", name, err)
	}
	return svc.Spec.ClusterIP, nil
}

func deleteService(ctx context.Context, cs kubernetes.Interface, name string) error {
	if err := cs.CoreV1().Services(benchNS).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete Service %s: %w", name, err)
	}
	if err := cs.DiscoveryV1().EndpointSlices(benchNS).Delete(ctx, name+"-1", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete EndpointSlice %s-1: %w", name, err)
	}
	return nil
}

// bulkCreate creates bulk Services [from, to) with `workers` parallel
// writers. Already existing objects (a re-run) are accepted.
func bulkCreate(ctx context.Context, cs kubernetes.Interface, from, to, workers int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	idx := make(chan int)
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				name := bulkName(i)
				_, err := cs.CoreV1().Services(benchNS).Create(ctx, service(name), metav1.CreateOptions{})
				if err == nil || apierrors.IsAlreadyExists(err) {
					_, err = cs.DiscoveryV1().EndpointSlices(benchNS).Create(ctx, slice(name, bulkAddrs(i), "elsewhere", time.Time{}), metav1.CreateOptions{})
				}
				if err != nil && !apierrors.IsAlreadyExists(err) {
					once.Do(func() { first = fmt.Errorf("bulk create %s: %w", name, err); cancel() })
					return
				}
			}
		}()
	}
feed:
	for i := from; i < to; i++ {
		select {
		case idx <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(idx)
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}
