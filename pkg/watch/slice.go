package watch

import (
	"fmt"
	"net/netip"
	"time"

	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Slice is what the proxy reads of an EndpointSlice, and what the informer
// cache keeps instead of it (the transform converts). A decoded
// EndpointSlice of 5 endpoints with its labels costs about 2 KB of heap, most
// of it pointers, label maps and slices sized for decoding; at 10k Services
// that was the largest part of the steady-state heap. A Slice keeps the
// addresses parsed, the conditions resolved to their defaults and the
// repeated strings shared: under half of that.
type Slice struct {
	// Name and Namespace are the EndpointSlice's; the informer reads them
	// through GetObjectMeta (an embedded ObjectMeta would cost 264 bytes
	// per slice, mostly empty).
	Name, Namespace string
	// Service is the kubernetes.io/service-name label: the owning Service.
	Service     string
	AddressType discovery.AddressType
	Ports       []SlicePort
	Endpoints   []SliceEndpoint
	// TriggerTime is the EndpointSlice controller's last-change-trigger-time
	// annotation (zero when absent or unreadable).
	TriggerTime time.Time
	// Problems are the endpoints dropped at conversion (an unparsable
	// address), reported as warnings when the slice is used.
	Problems []string
}

// SlicePort is one port of a Slice. Port 0 means the API left it unset.
type SlicePort struct {
	Name     string
	Protocol model.Protocol
	Port     int32
}

// SliceEndpoint is one endpoint of a Slice, with the API's defaults
// applied: a nil ready condition means ready, a nil serving one means
// serving as ready says.
type SliceEndpoint struct {
	IP                          netip.Addr
	Ready, Serving, Terminating bool
	NodeName, Zone              string
	ZoneHints                   []string
}

// GetObjectMeta implements metav1.ObjectMetaAccessor, which the informer's
// key functions use. It is called a few times per event, never on a hot
// path, so building the ObjectMeta each time is cheaper than keeping one.
func (s *Slice) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace}
}

// GetObjectKind implements runtime.Object; a Slice carries no type meta.
func (s *Slice) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject implements runtime.Object.
func (s *Slice) DeepCopyObject() runtime.Object {
	c := *s
	c.Ports = append([]SlicePort(nil), s.Ports...)
	c.Endpoints = append([]SliceEndpoint(nil), s.Endpoints...)
	for i := range c.Endpoints {
		c.Endpoints[i].ZoneHints = append([]string(nil), c.Endpoints[i].ZoneHints...)
	}
	c.Problems = append([]string(nil), s.Problems...)
	return &c
}

// NewSlice converts an EndpointSlice on its own, sharing nothing with other
// slices (the informer's transform shares repeated strings).
func NewSlice(sl *discovery.EndpointSlice) *Slice { return (*interner)(nil).slice(sl) }

// slice converts sl into exactly sized arrays, sharing repeated strings
// through in, so nothing of the decoded object stays reachable.
func (in *interner) slice(sl *discovery.EndpointSlice) *Slice {
	s := &Slice{
		Name:        sl.Name,
		Namespace:   sl.Namespace,
		Service:     sl.Labels[discovery.LabelServiceName],
		AddressType: discovery.AddressType(in.str(string(sl.AddressType))),
	}
	if ts, err := time.Parse(time.RFC3339Nano, sl.Annotations[AnnotationTriggerTime]); err == nil {
		s.TriggerTime = ts
	}
	if len(sl.Ports) > 0 {
		s.Ports = make([]SlicePort, 0, len(sl.Ports))
	}
	for _, p := range sl.Ports {
		sp := SlicePort{Protocol: model.TCP}
		if p.Name != nil {
			sp.Name = in.str(*p.Name)
		}
		if p.Protocol != nil {
			sp.Protocol = model.Protocol(in.str(string(*p.Protocol)))
		}
		if p.Port != nil {
			sp.Port = *p.Port
		}
		s.Ports = append(s.Ports, sp)
	}
	if len(sl.Endpoints) > 0 {
		s.Endpoints = make([]SliceEndpoint, 0, len(sl.Endpoints))
	}
	for _, e := range sl.Endpoints {
		// Only the first address is used, as kube-proxy does: the API
		// guarantees the rest are duplicates of the same endpoint.
		if len(e.Addresses) == 0 {
			continue
		}
		ip, err := netip.ParseAddr(e.Addresses[0])
		if err != nil {
			s.Problems = append(s.Problems, fmt.Sprintf("slice %s: endpoint address %q: %v", sl.Name, e.Addresses[0], err))
			continue
		}
		ep := SliceEndpoint{IP: ip.Unmap(), Ready: e.Conditions.Ready == nil || *e.Conditions.Ready}
		ep.Serving = ep.Ready
		if e.Conditions.Serving != nil {
			ep.Serving = *e.Conditions.Serving
		}
		ep.Terminating = e.Conditions.Terminating != nil && *e.Conditions.Terminating
		if e.NodeName != nil {
			ep.NodeName = in.str(*e.NodeName)
		}
		if e.Zone != nil {
			ep.Zone = in.str(*e.Zone)
		}
		if e.Hints != nil && len(e.Hints.ForZones) > 0 {
			ep.ZoneHints = make([]string, 0, len(e.Hints.ForZones))
			for _, z := range e.Hints.ForZones {
				ep.ZoneHints = append(ep.ZoneHints, in.str(z.Name))
			}
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	return s
}
