// Package grpcresolver is a gRPC name resolver that gives a gRPC client the
// endpoints miniproxy's dataplane would consider eligible for a Service,
// straight from the Kubernetes API, so that client-side load balancing
// (round_robin and friends) sees new and removed pods within milliseconds
// instead of waiting for DNS TTLs and re-resolution.
//
// Usage:
//
//	cc, err := grpc.NewClient("miniproxy:///name.namespace:port",
//		grpc.WithResolvers(grpcresolver.NewBuilder(client, grpcresolver.Options{})),
//		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
//		grpc.WithTransportCredentials(insecure.NewCredentials()))
//
// The target's endpoint is "name.namespace:port" or "name:port" (namespace
// from Options.Namespace, default "default"). port is a Service port number or
// a Service port name; it may be left out when the Service has exactly one
// port. Only TCP ports are resolved.
//
// For each target the resolver watches one Service and its EndpointSlices and
// converts them with the node agent's own code (watch.ServicePorts), then asks
// the model which endpoints are eligible (model.ServicePort.Eligible(node).Internal):
// ready endpoints; serving-and-terminating endpoints only when none is ready;
// topology hints / trafficDistribution PreferClose for the client's zone;
// internalTrafficPolicy Local for the client's node. Each eligible endpoint is
// handed to gRPC as one address ip:targetPort.
//
// Unlike the dataplane, the resolver also resolves headless Services and
// Services labelled for another proxy: a client-side resolver does not need a
// cluster IP, and the endpoint choice is the same.
//
// # RBAC
//
// The informers are scoped to the target's namespace, the Service by a
// metadata.name field selector and the EndpointSlices by the
// kubernetes.io/service-name label, so a Role in that namespace is enough:
//
//	apiVersion: rbac.authorization.k8s.io/v1
//	kind: Role
//	metadata: {name: grpc-client-resolver, namespace: NAMESPACE}
//	rules:
//	- apiGroups: [""]
//	  resources: [services]
//	  resourceNames: [NAME]          # list/watch are allowed by resourceNames because
//	  verbs: [get, list, watch]      # the resolver always sends fieldSelector metadata.name=NAME
//	- apiGroups: [discovery.k8s.io]
//	  resources: [endpointslices]
//	  verbs: [list, watch]           # slice names are generated, so no resourceNames here
//
// bound with a RoleBinding to the client pod's ServiceAccount. Nodes are never
// read: the client's node and zone come from Options.Node or the NODE_NAME and
// NODE_ZONE environment variables (set them with the downward API:
// spec.nodeName, and the pod's topology.kubernetes.io/zone label where the
// cluster copies it onto pods).
package grpcresolver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"google.golang.org/grpc/resolver"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/watch"
)

// Scheme is the URL scheme the builder registers for.
const Scheme = "miniproxy"

// Environment variables read when Options.Node leaves a field empty.
const (
	EnvNodeName = "NODE_NAME"
	EnvNodeZone = "NODE_ZONE"
)

// Options configure a Builder.
type Options struct {
	// Node is the client's node: Name drives internalTrafficPolicy Local,
	// Zone drives topology hints and PreferClose. Empty fields are taken from
	// $NODE_NAME and $NODE_ZONE.
	Node model.Node
	// Namespace is used for targets written "name:port". Default "default".
	Namespace string
	// Logger receives warnings about malformed objects; nil discards them.
	Logger *slog.Logger
	// OnUpdate, if set, is called after every state handed to gRPC (also
	// errors), from the resolver's goroutine. It is meant for measurements
	// (the lab records how long after a slice change gRPC learns of it) and
	// must not block.
	OnUpdate func(Update)
}

// Update describes one state handed to gRPC.
type Update struct {
	// Target is the target's endpoint string, e.g. "name.namespace:port".
	Target string
	// Addresses are the eligible endpoints as ip:port, sorted by address.
	Addresses []string
	// Err is non-nil when no address could be given (Service missing,
	// malformed, unknown port, or no eligible endpoint).
	Err error
	// At is when the state was handed to gRPC.
	At time.Time
}

// NewBuilder returns a resolver.Builder for the "miniproxy" scheme that reads
// the cluster through client. Pass it to grpc.WithResolvers.
func NewBuilder(client kubernetes.Interface, opts Options) resolver.Builder {
	if opts.Node.Name == "" {
		opts.Node.Name = os.Getenv(EnvNodeName)
	}
	if opts.Node.Zone == "" {
		opts.Node.Zone = os.Getenv(EnvNodeZone)
	}
	if opts.Namespace == "" {
		opts.Namespace = "default"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &builder{client: client, opts: opts}
}

// Register registers a builder for the "miniproxy" scheme in gRPC's global
// resolver registry, so that plain grpc.NewClient("miniproxy:///...") works.
// Like resolver.Register it must be called at init time, before any client
// is created; prefer NewBuilder with grpc.WithResolvers.
func Register(client kubernetes.Interface, opts Options) {
	resolver.Register(NewBuilder(client, opts))
}

type builder struct {
	client kubernetes.Interface
	opts   Options
}

func (b *builder) Scheme() string { return Scheme }

// Target is a parsed resolver target.
type Target struct {
	Namespace, Name string
	// Port is a port number or name as written; empty means "the only port".
	Port string
}

// ParseTarget parses "name.namespace:port", "name:port", "name.namespace" or
// "name"; defaultNamespace fills a missing namespace.
func ParseTarget(endpoint, defaultNamespace string) (Target, error) {
	endpoint = strings.TrimPrefix(endpoint, "/")
	var t Target
	host := endpoint
	if i := strings.LastIndexByte(endpoint, ':'); i >= 0 {
		host, t.Port = endpoint[:i], endpoint[i+1:]
		if t.Port == "" {
			return Target{}, fmt.Errorf("target %q: empty port", endpoint)
		}
	}
	t.Name, t.Namespace, _ = strings.Cut(host, ".")
	if t.Namespace == "" {
		t.Namespace = defaultNamespace
	}
	// Accept the cluster-DNS spelling name.namespace.svc[.cluster.local] too.
	t.Namespace, _, _ = strings.Cut(t.Namespace, ".")
	if t.Name == "" {
		return Target{}, fmt.Errorf("target %q: empty service name", endpoint)
	}
	return t, nil
}

func (b *builder) Build(target resolver.Target, cc resolver.ClientConn, _ resolver.BuildOptions) (resolver.Resolver, error) {
	endpoint := target.Endpoint()
	t, err := ParseTarget(endpoint, b.opts.Namespace)
	if err != nil {
		return nil, fmt.Errorf("miniproxy resolver: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &kubeResolver{
		target:   t,
		endpoint: endpoint,
		cc:       cc,
		opts:     b.opts,
		kick:     make(chan struct{}, 1),
		cancel:   cancel,
		done:     make(chan struct{}),
	}
	if err := r.start(ctx, b.client); err != nil {
		cancel()
		return nil, fmt.Errorf("miniproxy resolver %q: %w", endpoint, err)
	}
	return r, nil
}

// kubeResolver serves one target. Informer handlers only store the objects
// and kick the run goroutine, which converts and calls gRPC: handlers never
// block on gRPC, and a burst of slice updates coalesces into one UpdateState.
type kubeResolver struct {
	target   Target
	endpoint string
	cc       resolver.ClientConn
	opts     Options
	kick     chan struct{}
	cancel   context.CancelFunc
	done     chan struct{}

	mu      sync.Mutex
	svc     *v1.Service
	slices  map[string]*discovery.EndpointSlice
	synced  bool
	pushed  bool
	last    []string
	lastErr string
}

func (r *kubeResolver) start(ctx context.Context, client kubernetes.Interface) error {
	svcFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithNamespace(r.target.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", r.target.Name).String()
		}))
	sliceSel := labels.SelectorFromSet(labels.Set{discovery.LabelServiceName: r.target.Name})
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithNamespace(r.target.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sliceSel.String() }))

	svcInf := svcFactory.Core().V1().Services().Informer()
	if _, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.onService(obj, false) },
		UpdateFunc: func(_, obj any) { r.onService(obj, false) },
		DeleteFunc: func(obj any) { r.onService(obj, true) },
	}); err != nil {
		return fmt.Errorf("service handler: %w", err)
	}
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices().Informer()
	if _, err := sliceInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.onSlice(obj, false) },
		UpdateFunc: func(_, obj any) { r.onSlice(obj, false) },
		DeleteFunc: func(obj any) { r.onSlice(obj, true) },
	}); err != nil {
		return fmt.Errorf("endpointslice handler: %w", err)
	}
	svcFactory.Start(ctx.Done())
	sliceFactory.Start(ctx.Done())

	go func() {
		defer close(r.done)
		// Build must not block, so the first state is sent once both caches
		// have synced; until then gRPC queues RPCs (or fails them when the
		// caller's deadline ends) as for any slow resolver.
		if !cache.WaitForCacheSync(ctx.Done(), svcInf.HasSynced, sliceInf.HasSynced) {
			svcFactory.Shutdown()
			sliceFactory.Shutdown()
			return
		}
		r.mu.Lock()
		r.synced = true
		r.mu.Unlock()
		r.trigger()
		r.run(ctx)
		// Shutdown waits for the informer goroutines, so Close leaves
		// nothing running behind.
		svcFactory.Shutdown()
		sliceFactory.Shutdown()
	}()
	return nil
}

func (r *kubeResolver) trigger() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *kubeResolver) onService(obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	svc, ok := obj.(*v1.Service)
	// The field selector already scopes the watch; checking again keeps a
	// client (or fake) that ignores it from mixing Services up.
	if !ok || svc.Name != r.target.Name || svc.Namespace != r.target.Namespace {
		return
	}
	r.mu.Lock()
	if deleted {
		r.svc = nil
	} else {
		r.svc = svc
	}
	r.mu.Unlock()
	r.trigger()
}

func (r *kubeResolver) onSlice(obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	sl, ok := obj.(*discovery.EndpointSlice)
	if !ok || sl.Namespace != r.target.Namespace || sl.Labels[discovery.LabelServiceName] != r.target.Name {
		return
	}
	r.mu.Lock()
	if r.slices == nil {
		r.slices = map[string]*discovery.EndpointSlice{}
	}
	if deleted {
		delete(r.slices, sl.Name)
	} else {
		r.slices[sl.Name] = sl
	}
	r.mu.Unlock()
	r.trigger()
}

func (r *kubeResolver) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		}
		r.push()
	}
}

// push computes the eligible set and hands it to gRPC if it changed.
func (r *kubeResolver) push() {
	r.mu.Lock()
	if !r.synced {
		r.mu.Unlock()
		return
	}
	svc := r.svc
	sl := make([]*discovery.EndpointSlice, 0, len(r.slices))
	for _, s := range r.slices {
		sl = append(sl, s)
	}
	r.mu.Unlock()

	addrs, err := Resolve(svc, sl, r.target, r.opts.Node, r.opts.Logger)
	errText := ""
	if err != nil {
		errText = err.Error()
	}
	if r.pushed && slices.Equal(addrs, r.last) && errText == r.lastErr {
		return
	}
	r.pushed, r.last, r.lastErr = true, addrs, errText

	state := resolver.State{}
	for _, a := range addrs {
		addr := resolver.Address{Addr: a}
		state.Addresses = append(state.Addresses, addr)
		state.Endpoints = append(state.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{addr}})
	}
	if err != nil {
		// An empty state first, so the balancer drops connections to
		// endpoints that are no longer eligible (ReportError alone keeps the
		// last good addresses), then the reason, which RPCs fail with.
		_ = r.cc.UpdateState(state)
		r.cc.ReportError(err)
	} else if uerr := r.cc.UpdateState(state); uerr != nil {
		// gRPC rejected the state (e.g. the balancer wants something else);
		// it will call ResolveNow with backoff, and we will push again.
		r.opts.Logger.Warn("grpc rejected resolver state", "target", r.endpoint, "err", uerr)
		r.pushed = false
	}
	if r.opts.OnUpdate != nil {
		r.opts.OnUpdate(Update{Target: r.endpoint, Addresses: addrs, Err: err, At: time.Now()})
	}
}

// ResolveNow is a hint from gRPC (after connection failures or a rejected
// state). The informers already keep the state current, so it only
// re-evaluates; an unchanged set is not sent again.
func (r *kubeResolver) ResolveNow(resolver.ResolveNowOptions) { r.trigger() }

// Close stops the informers and waits for them, so no goroutine outlives
// the ClientConn.
func (r *kubeResolver) Close() {
	r.cancel()
	<-r.done
}

// ErrNoService is wrapped in the error reported while the Service does not exist.
var ErrNoService = errors.New("service not found")

// ErrNoEndpoints is wrapped in the error reported when no endpoint is eligible.
var ErrNoEndpoints = errors.New("no eligible endpoints")

// Resolve is the resolver's pure core, exported so callers (the lab) can
// compare it with what the dataplane programs: it converts svc and its
// slices with watch.ServicePorts, picks the port named by t, and returns the
// addresses (ip:port, sorted by address) of model's Eligible(node).Internal endpoints.
// Malformed fields and endpoints are dropped with a warning to log; log may
// be nil.
func Resolve(svc *v1.Service, endpointSlices []*discovery.EndpointSlice, t Target, node model.Node, log *slog.Logger) ([]string, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if svc == nil {
		return nil, fmt.Errorf("%s/%s: %w", t.Namespace, t.Name, ErrNoService)
	}
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		return nil, fmt.Errorf("%s/%s: ExternalName service has no endpoints", t.Namespace, t.Name)
	}
	portName, err := servicePortName(svc, t.Port)
	if err != nil {
		return nil, fmt.Errorf("%s/%s: %w", t.Namespace, t.Name, err)
	}
	if svc.Spec.ClusterIP == v1.ClusterIPNone || svc.Spec.ClusterIP == "" {
		// The conversion needs a cluster IP, which only the dataplane uses;
		// endpoint eligibility does not depend on it. A copy keeps the
		// informer's object untouched.
		c := *svc
		c.Spec.ClusterIP, c.Spec.ClusterIPs = "0.0.0.0", nil
		svc = &c
	}
	ports, warnings, err := watch.ServicePorts(svc, endpointSlices)
	if err != nil {
		return nil, fmt.Errorf("converting service: %w", err)
	}
	for _, w := range warnings {
		log.Warn("dropping malformed field", "service", t.Namespace+"/"+t.Name, "problem", w)
	}
	for _, sp := range ports {
		if sp.Name.Port != portName || sp.Protocol != model.TCP {
			continue
		}
		eps := sp.Eligible(node).Internal
		if len(eps) == 0 {
			return nil, fmt.Errorf("%s/%s port %q (%d endpoints known): %w", t.Namespace, t.Name, t.Port, len(sp.Endpoints), ErrNoEndpoints)
		}
		// The model keeps endpoints sorted by address and deduplicated.
		out := make([]string, 0, len(eps))
		for _, ep := range eps {
			out = append(out, ep.AddrPort().String())
		}
		return out, nil
	}
	return nil, fmt.Errorf("%s/%s: port %q was dropped as malformed", t.Namespace, t.Name, t.Port)
}

// servicePortName maps the target's port (number, name or empty) to the
// Service port's name, which is how EndpointSlices label their ports.
func servicePortName(svc *v1.Service, port string) (string, error) {
	var tcp []v1.ServicePort
	for _, p := range svc.Spec.Ports {
		if p.Protocol == "" || p.Protocol == v1.ProtocolTCP {
			tcp = append(tcp, p)
		}
	}
	if port == "" {
		if len(tcp) != 1 {
			return "", fmt.Errorf("target has no port and the service has %d TCP ports", len(tcp))
		}
		return tcp[0].Name, nil
	}
	n, numErr := strconv.ParseInt(port, 10, 32)
	for _, p := range tcp {
		if (numErr == nil && int64(p.Port) == n) || (numErr != nil && p.Name == port) {
			return p.Name, nil
		}
	}
	return "", fmt.Errorf("no TCP port %q", port)
}
