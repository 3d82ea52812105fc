// Package watch turns Services, EndpointSlices and this node's Node, watched
// through client-go informers, into model snapshots. It never talks to the kernel.
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
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Start runs informers for Services, EndpointSlices and the Node named
// nodeName, feeding t and calling onChange after every recorded change. It
// returns once every informer has synced (or ctx ends); the informers keep
// running until ctx is cancelled.
func Start(ctx context.Context, client kubernetes.Interface, nodeName string, t *Tracker, onChange func()) error {
	// Headless slices are never proxied; filtering them server-side saves
	// memory on clusters with many headless Services.
	factory := informers.NewSharedInformerFactory(client, 0)
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = "!" + LabelHeadless }))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", nodeName).String()
		}))

	svcInf := factory.Core().V1().Services().Informer()
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices().Informer()
	nodeInf := nodeFactory.Core().V1().Nodes().Informer()
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
		UpdateFunc: func(_, obj any) { onSlice(t, obj, false); onChange() },
		DeleteFunc: func(obj any) { onSlice(t, obj, true); onChange() },
	})
	if err != nil {
		return fmt.Errorf("endpointslice handler: %w", err)
	}
	nodeReg, err := nodeInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { onNode(t, obj); onChange() },
		UpdateFunc: func(_, obj any) { onNode(t, obj); onChange() },
	})
	if err != nil {
		return fmt.Errorf("node handler: %w", err)
	}

	for _, f := range []informers.SharedInformerFactory{factory, sliceFactory, nodeFactory} {
		f.Start(ctx.Done())
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
// Service or EndpointSlice; annotations such as kubectl's last-applied copy,
// owner references and endpoint target references are never read. At 10k
// Services the caches are the largest part of a steady-state heap. Only the
// trigger-time annotation, which feeds network_programming_duration, and the
// labels the proxy reads survive. Values that repeat across thousands of
// endpoints (conditions, node names, zones, port names and protocols) are
// shared through in.
func (in *interner) stripForCache(obj any) (any, error) {
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
	case *discovery.EndpointSlice:
		keepOnly(meta, AnnotationTriggerTime)
		keepLabels(meta, discovery.LabelServiceName)
		o.AddressType = discovery.AddressType(in.str(string(o.AddressType)))
		for i := range o.Endpoints {
			e := &o.Endpoints[i]
			e.TargetRef, e.Hostname, e.DeprecatedTopology = nil, nil, nil
			e.Conditions.Ready = in.boolp(e.Conditions.Ready)
			e.Conditions.Serving = in.boolp(e.Conditions.Serving)
			e.Conditions.Terminating = in.boolp(e.Conditions.Terminating)
			e.NodeName = in.strp(e.NodeName)
			e.Zone = in.strp(e.Zone)
		}
		for i := range o.Ports {
			pt := &o.Ports[i]
			pt.Name = in.strp(pt.Name)
			if pt.Protocol != nil {
				p := v1.Protocol(in.str(string(*pt.Protocol)))
				pt.Protocol = &p
			}
			pt.AppProtocol = nil
		}
	case *v1.Service:
		keepOnly(meta)
		keepLabels(meta, LabelServiceProxyName, LabelHeadless)
	case *v1.Node:
		// Only name, labels (zone) and addresses are read; images and
		// conditions are a few KB per update.
		keepOnly(meta)
		o.Status.Images = nil
		o.Status.Conditions = nil
	}
	return obj, nil
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
	mu          sync.Mutex
	strs        map[string]*string
	True, False *bool
}

const maxInterned = 4096

func newInterner() *interner {
	t, f := true, false
	return &interner{strs: map[string]*string{}, True: &t, False: &f}
}

// strp returns a shared pointer to a string equal to *p (nil stays nil).
func (in *interner) strp(p *string) *string {
	if p == nil {
		return nil
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

// boolp returns the shared pointer for *p (nil stays nil). Nothing writes
// through cached objects' pointers, so sharing them is safe.
func (in *interner) boolp(p *bool) *bool {
	switch {
	case p == nil:
		return nil
	case *p:
		return in.True
	default:
		return in.False
	}
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
	sl, ok := obj.(*discovery.EndpointSlice)
	if !ok {
		return
	}
	svcName := sl.Labels[discovery.LabelServiceName]
	if deleted {
		t.SetSlice(sl.Namespace, sl.Name, nil, svcName)
		return
	}
	t.SetSlice(sl.Namespace, sl.Name, sl, svcName)
}

func onNode(t *Tracker, obj any) {
	if n, ok := obj.(*v1.Node); ok {
		t.SetNode(n)
	}
}
