package watch

import (
	"context"
	"log/slog"
	"maps"
	"reflect"
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Tracker accumulates Service, EndpointSlice and Node changes from event
// handlers and turns them into model snapshots on demand. Handlers only
// record what changed; the conversion happens in Snapshot, once per sync and
// only for the Services that changed since the previous snapshot.
type Tracker struct {
	log       *slog.Logger
	proxyName string

	mu       sync.Mutex
	node     model.Node
	services map[types.NamespacedName]*v1.Service
	// slices are each Service's slices. A short list rather than a map
	// by name: nearly every Service has one slice, and a map per Service
	// cost 3 MB at 10k Services.
	slices   map[types.NamespacedName][]*Slice
	dirty    map[types.NamespacedName]bool
	built    map[types.NamespacedName][]*model.ServicePort
	prev     *model.Snapshot
	gen      uint64
	pending  Pending
	nodeSeen bool
	// nodeGone says why this node is going away ("" while it is not):
	// NodeIneligible of the last Node seen, or its deletion.
	nodeGone string

	// frontends gives every frontend one owner (model.Frontends); built
	// holds the declared ports, the snapshots the effective ones.
	frontends *model.Frontends
	// reported holds, for each Service with problems, the reasons already
	// reported, so an odd object is logged and counted once, not at every
	// rebuild; a reason that goes away and comes back is reported again.
	// Only odd Services have an entry.
	reported map[types.NamespacedName][]string
	// onIgnored counts a reported problem (the metric); nil counts nothing.
	onIgnored func(reason string)
}

// Pending counts the changes consumed by one Snapshot call, for metrics.
type Pending struct {
	ServiceChanges  int
	EndpointChanges int
	// TriggerTimes are when the consumed endpoint changes happened (from the
	// EndpointSlice controller's annotation, or when miniproxy saw them).
	TriggerTimes []time.Time
	// Oldest is when the oldest consumed change was recorded (zero if none).
	Oldest time.Time
	// Conflicts are the frontend conflicts that began or ended in this
	// snapshot, each reported once, and how many are in force.
	Conflicts model.FrontendChanges
}

// NewTracker returns an empty tracker. proxyName is this proxy's
// service-proxy-name ("" to handle only unlabelled Services).
func NewTracker(log *slog.Logger, proxyName string) *Tracker {
	return &Tracker{
		log:       log,
		proxyName: proxyName,
		services:  map[types.NamespacedName]*v1.Service{},
		slices:    map[types.NamespacedName][]*Slice{},
		dirty:     map[types.NamespacedName]bool{},
		built:     map[types.NamespacedName][]*model.ServicePort{},
		frontends: model.NewFrontends(),
		reported:  map[types.NamespacedName][]string{},
	}
}

// Service returns the recorded Service object, or nil (for reporting, e.g.
// an Event about a frontend conflict).
func (t *Tracker) Service(key types.NamespacedName) *v1.Service {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.services[key]
}

// CountIgnored sets the function called once for every problem reported
// (reason is one of the Reason constants), normally a metric's Inc.
func (t *Tracker) CountIgnored(f func(reason string)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.onIgnored = f
}

func (t *Tracker) noteLocked(now time.Time) {
	if t.pending.Oldest.IsZero() {
		t.pending.Oldest = now
	}
}

// SetService records a Service add or update; svc nil with key set records a delete.
func (t *Tracker) SetService(key types.NamespacedName, svc *v1.Service) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, had := t.services[key]
	if svc == nil {
		if !had {
			return
		}
		delete(t.services, key)
	} else {
		if had && reflect.DeepEqual(old.Spec, svc.Spec) && reflect.DeepEqual(old.Status, svc.Status) && reflect.DeepEqual(old.Labels, svc.Labels) &&
			old.CreationTimestamp.Equal(&svc.CreationTimestamp) {
			return
		}
		t.services[key] = svc
	}
	t.dirty[key] = true
	t.pending.ServiceChanges++
	t.noteLocked(time.Now())
}

// SetSlice records an EndpointSlice add or update; slice nil records a
// delete. serviceName is the slice's kubernetes.io/service-name label ("":
// the slice belongs to no Service and is not recorded).
func (t *Tracker) SetSlice(namespace, name string, slice *Slice, serviceName string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.setSliceLocked(namespace, name, slice, serviceName)
}

// UpdateSlice records an EndpointSlice update from old to cur (both as the
// informer saw them). A slice whose kubernetes.io/service-name label changed
// is moved: removed from the Service it used to name, added to the one it
// names now (none if the label was removed), in one step, so no snapshot
// sees its endpoints on both or on neither. kube-proxy (v1.37) keys only by
// the new label and leaves the endpoints on the old Service.
func (t *Tracker) UpdateSlice(old, cur *Slice) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if old != nil && old.Service != cur.Service {
		t.setSliceLocked(old.Namespace, old.Name, nil, old.Service)
	}
	t.setSliceLocked(cur.Namespace, cur.Name, cur, cur.Service)
}

func (t *Tracker) setSliceLocked(namespace, name string, slice *Slice, serviceName string) {
	if serviceName == "" {
		return
	}
	key := types.NamespacedName{Namespace: namespace, Name: serviceName}
	now := time.Now()
	list := t.slices[key]
	i := slices.IndexFunc(list, func(s *Slice) bool { return s.Name == name })
	if slice == nil {
		if i < 0 {
			return
		}
		list = slices.Delete(list, i, i+1)
		if len(list) == 0 {
			delete(t.slices, key)
		} else {
			t.slices[key] = list
		}
	} else {
		if i >= 0 {
			old := list[i]
			list[i] = slice
			// addressType is immutable in the API; compared anyway because
			// it decides whether the endpoints are used at all.
			if reflect.DeepEqual(old.Endpoints, slice.Endpoints) && reflect.DeepEqual(old.Ports, slice.Ports) &&
				old.AddressType == slice.AddressType && slices.Equal(old.Problems, slice.Problems) {
				return
			}
		} else {
			t.slices[key] = append(list, slice)
		}
		if !slice.TriggerTime.IsZero() {
			now = slice.TriggerTime
		}
	}
	t.dirty[key] = true
	t.pending.EndpointChanges++
	t.pending.TriggerTimes = append(t.pending.TriggerTimes, now)
	t.noteLocked(time.Now())
}

// SetNode records this node's Node object. A change of zone or addresses
// changes eligibility for every Service, so every Service is rebuilt.
func (t *Tracker) SetNode(n *v1.Node) {
	info := NodeInfo(n)
	gone := NodeIneligible(n)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nodeSeen = true
	if gone != t.nodeGone {
		if gone != "" {
			t.log.Warn("this node is going away: /healthz reports unhealthy so load balancers drain it", "node", n.Name, "reason", gone)
		} else {
			t.log.Info("this node is no longer going away: /healthz follows the proxy again", "node", n.Name)
		}
		t.nodeGone = gone
	}
	if reflect.DeepEqual(info, t.node) {
		return
	}
	t.node = info
	for k := range t.services {
		t.dirty[k] = true
	}
	t.noteLocked(time.Now())
}

// DeleteNode records that this node's Node object was deleted. The rules
// stay as they are (the node is going away; kube-proxy exits and restarts
// here), but NodeEligible reports it.
func (t *Tracker) DeleteNode() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nodeGone == "" {
		t.log.Warn("this node's Node object was deleted: /healthz reports unhealthy", "node", t.node.Name)
	}
	t.nodeGone = "the Node was deleted"
}

// NodeEligible reports whether this node may receive load-balancer traffic
// (see NodeIneligible), and if not, why. A Node never seen counts as
// eligible: kube-proxy v1.37 reports it ineligible, but miniproxy also runs
// where nobody registers Node objects (benchmarks, bare namespaces), and
// the NodeCIDR detector already waits for and warns about a missing Node.
func (t *Tracker) NodeEligible() (bool, string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nodeGone == "", t.nodeGone
}

// PendingChanges returns the Service and EndpointSlice changes recorded
// and not yet taken by Snapshot (kube-proxy's
// kubeproxy_sync_proxy_rules_{service,endpoint}_changes_pending).
func (t *Tracker) PendingChanges() (services, endpoints int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending.ServiceChanges, t.pending.EndpointChanges
}

// HasNode reports whether the Node object has been seen.
func (t *Tracker) HasNode() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nodeSeen
}

// Snapshot builds a snapshot from everything recorded so far, reusing the
// ServicePort values of unchanged Services, and returns the changes it consumed.
func (t *Tracker) Snapshot() (*model.Snapshot, Pending) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var services map[model.ServicePortName]*model.ServicePort
	if t.prev != nil {
		services = maps.Clone(t.prev.Services)
	} else {
		services = make(map[model.ServicePortName]*model.ServicePort, len(t.services)*2)
	}
	var withdrawn, declared []*model.ServicePort
	for key := range t.dirty {
		for _, sp := range t.built[key] {
			delete(services, sp.Name)
		}
		withdrawn = append(withdrawn, t.built[key]...)
		delete(t.built, key)
		svc := t.services[key]
		if svc == nil {
			delete(t.reported, key)
			continue
		}
		if why := Ignored(svc, t.proxyName); why != "" {
			t.log.Debug("ignoring service", "service", key.String(), "reason", why)
			delete(t.reported, key)
			continue
		}
		ports, problems, err := servicePorts(svc, t.slices[key])
		if err != nil {
			problems = append(problems, Problem{ReasonMalformedService, err.Error()})
			ports = nil
		}
		problems = append(problems, hintProblems(ports, t.node.Zone)...)
		t.reportLocked(key, problems)
		if err != nil {
			continue
		}
		t.built[key] = ports
		declared = append(declared, ports...)
	}
	clear(t.dirty)
	// Frontend conflicts are decided here, before any backend renders, so
	// every mode programs the same owner. Ports that share a frontend with
	// a changed one may change too; the others keep their pointers. The
	// caller reports the conflicts (Pending.Conflicts).
	fc := t.frontends.Update(withdrawn, declared)
	for _, sp := range fc.Effective {
		services[sp.Name] = sp
	}
	t.gen++
	snap := &model.Snapshot{Node: t.node, Services: services, Generation: t.gen}
	if t.prev != nil && !reflect.DeepEqual(t.prev.Node, t.node) {
		// Backends detect changes by pointer, and eligibility depends on the
		// node; SetNode already marked every Service dirty, so every entry is new.
		t.log.Info("node changed; every service re-rendered", "node", t.node.Name)
	}
	t.prev = snap
	p := t.pending
	p.Conflicts = fc
	t.pending = Pending{}
	return snap, p
}

// reportLocked logs and counts the problems of the Service key whose reason
// was not already reported for it (one line per reason, with the number of
// occurrences and the first one's detail), and remembers the current set.
// A Service with a thousand odd slices is one log line per kind of oddity,
// and the same oddity is not reported again at every rebuild.
func (t *Tracker) reportLocked(key types.NamespacedName, problems []Problem) {
	if len(problems) == 0 {
		delete(t.reported, key)
		return
	}
	old := t.reported[key]
	var reasons []string
	for i, p := range problems {
		if slices.Contains(reasons, p.Reason) {
			continue
		}
		reasons = append(reasons, p.Reason)
		if slices.Contains(old, p.Reason) {
			continue
		}
		n := 0
		for _, q := range problems[i:] {
			if q.Reason == p.Reason {
				n++
			}
		}
		level := slog.LevelWarn
		if p.Reason == ReasonMalformedService || p.Reason == ReasonSourceRange {
			level = slog.LevelError
		}
		t.log.Log(context.Background(), level, "ignoring part of a service", "service", key.String(),
			"reason", p.Reason, "count", n, "detail", p.Detail)
		if t.onIgnored != nil {
			t.onIgnored(p.Reason)
		}
	}
	t.reported[key] = reasons
}
