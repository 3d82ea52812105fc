// Package watch turns Services, EndpointSlices and this node's Node, watched
// through client-go informers, into model snapshots. It never talks to the kernel.
//
// A slice belongs to the Service its kubernetes.io/service-name label names
// now: an update that changes the label moves it (Tracker.UpdateSlice).
// What a Service or its slices hold that cannot be used (problems.go) is
// left out, reported once per Service and reason, and counted; the rest is
// converted. loadBalancerSourceRanges fail closed: listed but unreadable
// ranges admit nobody (model.ServicePort.LoadBalancerSourceRangesInvalid).
package watch

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Start runs informers for Services, EndpointSlices and the Node named
// nodeName, feeding t and calling onChange after every recorded change. It
// returns once every informer has synced (or ctx ends); the informers keep
// running until ctx is cancelled.
func Start(ctx context.Context, client kubernetes.Interface, nodeName string, t *Tracker, onChange func()) error {
	// Headless slices are never proxied; filtering them server-side saves
	// memory on clusters with many headless Services. No indexers: nothing
	// lists the caches by namespace, and the default namespace index held
	// a set entry per object (1.5 MB at 10k Services).
	noIndex := cache.Indexers{}
	svcInf := coreinformers.NewFilteredServiceInformer(client, metav1.NamespaceAll, 0, noIndex, nil)
	sliceInf := discoveryinformers.NewFilteredEndpointSliceInformer(client, metav1.NamespaceAll, 0, noIndex,
		func(o *metav1.ListOptions) { o.LabelSelector = "!" + LabelHeadless })
	nodeInf := coreinformers.NewFilteredNodeInformer(client, 0, noIndex, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", nodeName).String()
	})
	in := newInterner()
	for _, inf := range []cache.SharedIndexInformer{svcInf, sliceInf, nodeInf} {
		if err := inf.SetTransform(in.stripForCache); err != nil {
			return fmt.Errorf("informer transform: %w", err)
		}
	}
	svcReg, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { onService(t, obj, false); onChange() },
		UpdateFunc: func(_, obj any) { onService(t, obj, false); onChange() },
		DeleteFunc: func(obj any) { onService(t, obj, true); onChange() },
	})
	if err != nil {
		return fmt.Errorf("service handler: %w", err)
	}
	sliceReg, err := sliceInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { onSlice(t, obj, false); onChange() },
		UpdateFunc: func(old, obj any) { onSliceUpdate(t, old, obj); onChange() },
		DeleteFunc: func(obj any) { onSlice(t, obj, true); onChange() },
	})
	if err != nil {
		return fmt.Errorf("endpointslice handler: %w", err)
	}
	nodeReg, err := nodeInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { onNode(t, obj); onChange() },
		UpdateFunc: func(_, obj any) { onNode(t, obj); onChange() },
		DeleteFunc: func(any) { t.DeleteNode() },
	})
	if err != nil {
		return fmt.Errorf("node handler: %w", err)
	}

	for _, inf := range []cache.SharedIndexInformer{svcInf, sliceInf, nodeInf} {
		go inf.RunWithContext(ctx)
	}
	syncCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	// Wait for the handlers, not only the stores: an informer's store can be
	// synced while its handler is still being fed the initial list, and a
	// first sync from a half-fed tracker would program a fraction of the
	// cluster (then trickle the rest in as partial syncs).
	if !cache.WaitForCacheSync(syncCtx.Done(), svcReg.HasSynced, sliceReg.HasSynced, nodeReg.HasSynced) {
		return fmt.Errorf("informer caches did not sync: %w", context.Cause(syncCtx))
	}
	return nil
}

// stripForCache drops what the proxy never reads before an object enters the
// informer cache (and, through the tracker, stays in memory for the life of
// the process): managedFields alone are often larger than the rest of a
// Service; annotations such as kubectl's last-applied copy, owner references
// and selectors are never read. EndpointSlices are converted to Slice, which
// keeps only what the proxy reads, parsed, with repeated strings (node names,
// zones, port names, protocols) shared through in. At 10k Services the caches
// are the largest part of a steady-state heap.
func (in *interner) stripForCache(obj any) (any, error) {
	switch o := obj.(type) {
	case *discovery.EndpointSlice:
		return in.slice(o), nil
	case *Slice:
		return o, nil // transformed already (a relist may pass it again)
	case *v1.Service:
		keepLabels(o, LabelServiceProxyName, LabelHeadless)
		return in.service(o), nil
	}
	m, ok := obj.(metav1.ObjectMetaAccessor)
	if !ok {
		return obj, nil
	}
	meta := m.GetObjectMeta()
	meta.SetManagedFields(nil)
	meta.SetOwnerReferences(nil)
	meta.SetUID("")
	meta.SetGenerateName("")
	switch o := obj.(type) {
	case *v1.Node:
		// Only name, labels (zone) and addresses are read; images and
		// conditions are a few KB per update.
		keepOnly(meta)
		o.Status.Images = nil
		o.Status.Conditions = nil
	}
	return obj, nil
}

// service copies what the proxy reads of o (Ignored, servicePorts) into a
// new Service with exactly sized arrays and shared repeated strings, so the
// decoded object, with its selector, target ports, status conditions and
// arrays sized for decoding, is not kept. At 10k Services the decoded ones
// were about 1.1 KB each.
func (in *interner) service(o *v1.Service) *v1.Service {
	sp := &o.Spec
	// creationTimestamp orders Services that claim one frontend
	// (model.Frontends); the UID lets an Event about one find it.
	s := &v1.Service{ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, Labels: o.Labels,
		UID: o.UID, CreationTimestamp: o.CreationTimestamp}}
	s.Spec = v1.ServiceSpec{
		Type:                     v1.ServiceType(in.str(string(sp.Type))),
		ClusterIP:                sp.ClusterIP,
		ClusterIPs:               slices.Clone(sp.ClusterIPs),
		ExternalIPs:              slices.Clone(sp.ExternalIPs),
		LoadBalancerSourceRanges: slices.Clone(sp.LoadBalancerSourceRanges),
		ExternalTrafficPolicy:    v1.ServiceExternalTrafficPolicy(in.str(string(sp.ExternalTrafficPolicy))),
		InternalTrafficPolicy:    (*v1.ServiceInternalTrafficPolicy)(in.strp((*string)(sp.InternalTrafficPolicy))),
		SessionAffinity:          v1.ServiceAffinity(in.str(string(sp.SessionAffinity))),
		SessionAffinityConfig:    sp.SessionAffinityConfig,
		TrafficDistribution:      in.strp(sp.TrafficDistribution),
		HealthCheckNodePort:      sp.HealthCheckNodePort,
	}
	if len(s.Spec.ClusterIPs) > 0 && s.Spec.ClusterIPs[0] == s.Spec.ClusterIP {
		s.Spec.ClusterIP = s.Spec.ClusterIPs[0] // one copy of the string
	}
	if len(sp.Ports) > 0 {
		s.Spec.Ports = make([]v1.ServicePort, len(sp.Ports))
		for i, p := range sp.Ports {
			s.Spec.Ports[i] = v1.ServicePort{Name: in.str(p.Name), Protocol: v1.Protocol(in.str(string(p.Protocol))),
				Port: p.Port, NodePort: p.NodePort}
		}
	}
	if ing := o.Status.LoadBalancer.Ingress; len(ing) > 0 {
		s.Status.LoadBalancer.Ingress = make([]v1.LoadBalancerIngress, len(ing))
		for i, g := range ing {
			s.Status.LoadBalancer.Ingress[i] = v1.LoadBalancerIngress{IP: g.IP,
				IPMode: (*v1.LoadBalancerIPMode)(in.strp((*string)(g.IPMode)))}
		}
	}
	return s
}

// keepLabels drops every label but the named ones, in place: the object is
// not cached yet, and a new map would cost as much as the old one.
func keepLabels(meta metav1.Object, keys ...string) {
	l := meta.GetLabels()
	for k := range l {
		if !slices.Contains(keys, k) {
			delete(l, k)
		}
	}
	if len(l) == 0 && l != nil {
		meta.SetLabels(nil)
	}
}

// interner shares one copy of values that repeat across cached objects. It
// is bounded: past maxInterned distinct strings new values are kept as they
// are, so a cluster that churns through names cannot grow it for ever.
type interner struct {
	mu   sync.Mutex
	strs map[string]*string
}

const maxInterned = 4096

func newInterner() *interner {
	return &interner{strs: map[string]*string{}}
}

// strp returns a shared pointer to a string equal to *p (nil stays nil).
func (in *interner) strp(p *string) *string {
	if p == nil || in == nil {
		return p
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if q, ok := in.strs[*p]; ok {
		return q
	}
	if len(in.strs) < maxInterned {
		in.strs[*p] = p
	}
	return p
}

func (in *interner) str(s string) string {
	if q := in.strp(&s); q != nil {
		return *q
	}
	return s
}

// keepOnly drops every annotation but the named ones.
func keepOnly(meta metav1.Object, annotations ...string) {
	a := meta.GetAnnotations()
	if len(a) == 0 {
		return
	}
	var kept map[string]string
	for _, k := range annotations {
		if v, ok := a[k]; ok {
			if kept == nil {
				kept = map[string]string{}
			}
			kept[k] = v
		}
	}
	meta.SetAnnotations(kept)
}

func onService(t *Tracker, obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	svc, ok := obj.(*v1.Service)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	if deleted {
		t.SetService(key, nil)
		return
	}
	t.SetService(key, svc)
}

func onSlice(t *Tracker, obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	sl, ok := obj.(*Slice)
	if !ok {
		return
	}
	if deleted {
		t.SetSlice(sl.Namespace, sl.Name, nil, sl.Service)
		return
	}
	t.SetSlice(sl.Namespace, sl.Name, sl, sl.Service)
}

// onSliceUpdate passes the previous version too: the service-name label
// can change, and only the previous version says which Service to take the
// slice from.
func onSliceUpdate(t *Tracker, oldObj, obj any) {
	cur, ok := obj.(*Slice)
	if !ok {
		return
	}
	old, _ := oldObj.(*Slice)
	t.UpdateSlice(old, cur)
}

func onNode(t *Tracker, obj any) {
	if n, ok := obj.(*v1.Node); ok {
		t.SetNode(n)
	}
}
