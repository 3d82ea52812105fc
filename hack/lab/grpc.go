package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/miniproxy/miniproxy/pkg/grpcresolver"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

const (
	grpcPort   = 9090
	grpcMethod = "/podserver.Name/Get" // cmd/podserver/grpc.go
	poolSize   = 8
	maxAge     = 2 * time.Second // MaxConnectionAge of the (d) servers
	// scale-up runs: 3 pods for scaleAt, then 6 until scaleWindow after the change.
	scaleAt     = 3 * time.Second
	scaleWindow = 8 * time.Second
	streamEvery = 10 * time.Millisecond
	binWidth    = 500 * time.Millisecond
)

// GRPC holds the gRPC experiment's results.
type GRPC struct {
	Histograms []Histogram `json:"histograms"`
	ScaleUps   []ScaleUp   `json:"scale_ups"`
	DNS        *DNSInfo    `json:"dns,omitempty"`
	Skipped    []string    `json:"skipped,omitempty"`
}

// Histogram is how many of N RPCs each pod answered for one client variant.
type Histogram struct {
	Variant string         `json:"variant"`
	Target  string         `json:"target"`
	RPCs    int            `json:"rpcs"`
	Errors  int            `json:"errors"`
	Counts  map[string]int `json:"counts"`
}

// ScaleUp is a client running while the server set grows from 3 to 6.
type ScaleUp struct {
	Variant string `json:"variant"`
	// FirstNewSec / AllNewSec: time from the EndpointSlice update to the
	// first RPC answered by any new pod / by every new pod; -1 = not within
	// WindowSec.
	FirstNewSec float64 `json:"first_new_pod_seconds"`
	AllNewSec   float64 `json:"all_new_pods_seconds"`
	WindowSec   float64 `json:"window_seconds"`
	// BaselineRPCs answered before the scale-up (0 makes the reaction
	// time meaningless: the client was not running on the old set yet).
	BaselineRPCs int `json:"baseline_rpcs"`
	// ResolverUpdateSec (f only): slice update → resolver hands gRPC 6 addresses.
	ResolverUpdateSec float64  `json:"resolver_update_seconds,omitempty"`
	Timeline          Timeline `json:"timeline"`
}

// Timeline is RPC counts per pod in fixed bins, for share-over-time plots.
type Timeline struct {
	BinSec   float64  `json:"bin_seconds"`
	ScaleSec float64  `json:"scale_at_seconds"`
	Names    []string `json:"names"`
	Bins     [][]int  `json:"bins"` // [bin][name]
}

// DNSInfo is what CoreDNS answered for the headless Service.
type DNSInfo struct {
	Server  string   `json:"server"`
	Name    string   `json:"name"`
	TTL     uint32   `json:"ttl_seconds"`
	Records []string `json:"a_records"`
}

type sample struct {
	t    time.Time
	name string // "" = error
}

// grpcPods is a set of gRPC server pods published to one or more Services.
type grpcPods struct {
	l     *lab
	name  string
	svcs  []string
	extra []string
	pods  []*framework.Pod
	next  int
	// publishedAt is when the last EndpointSlice write started: the moment
	// a scale-up becomes visible to the API.
	publishedAt time.Time
}

func (g *grpcPods) scale(ctx context.Context, n int) error {
	for len(g.pods) < n {
		node := g.l.nodes[g.next%len(g.l.nodes)]
		p, err := node.NewPod(ctx, fmt.Sprintf("%s-%d", g.name, g.next))
		g.next++
		if err != nil {
			return err
		}
		args := append([]string{"serve", "--name", p.Name, "--tcp", "", "--udp", "", "--grpc", strconv.Itoa(grpcPort)}, g.extra...)
		if err := p.StartPodserver(args...); err != nil {
			return err
		}
		addr := netip.AddrPortFrom(p.IP, grpcPort).String()
		if err := framework.WaitFor(ctx, 20*time.Second, 50*time.Millisecond, func() (bool, error) {
			if exited, logs := p.PodserverExited(); exited {
				return false, fmt.Errorf("podserver %s exited: %s", p.Name, logs)
			}
			_, err := framework.TimedDial(ctx, node.NS, "tcp", addr, time.Second)
			return err == nil, nil
		}); err != nil {
			return fmt.Errorf("gRPC pod %s: %w", p.Name, err)
		}
		g.pods = append(g.pods, p)
	}
	var gone []*framework.Pod
	if len(g.pods) > n {
		gone, g.pods = g.pods[n:], g.pods[:n]
	}
	g.publishedAt = time.Now()
	if err := g.publish(ctx); err != nil {
		return err
	}
	for _, p := range gone {
		if err := p.Delete(); err != nil {
			return err
		}
	}
	return nil
}

func (g *grpcPods) publish(ctx context.Context) error {
	var eps []framework.SliceEndpoint
	for _, p := range g.pods {
		eps = append(eps, framework.SliceEndpoint{IP: p.IP, Node: p.Node, Ready: true, Serving: true})
	}
	ports := []discoveryv1.EndpointPort{framework.SlicePort("grpc", corev1.ProtocolTCP, grpcPort)}
	for _, s := range g.svcs {
		if err := g.l.cl.PublishSlice(ctx, ns, s, "lab", eps, ports); err != nil {
			return err
		}
	}
	return nil
}

func grpcService(name string, headless bool) *corev1.Service {
	svc := framework.ClusterIPService(ns, name)
	svc.Spec.Ports = []corev1.ServicePort{{Name: "grpc", Protocol: corev1.ProtocolTCP, Port: grpcPort}}
	if headless {
		svc.Spec.ClusterIP = corev1.ClusterIPNone
	}
	return svc
}

func (l *lab) grpc(ctx context.Context, mr *ModeResult) error {
	l.p.step(l.mode + ": gRPC — 3 server pods, one client")
	res := &GRPC{}
	mr.GRPC = res
	for _, s := range []*corev1.Service{grpcService("grpc", false), grpcService("grpc-headless", true), grpcService("grpc-age", false)} {
		if _, err := l.cl.CreateService(ctx, s); err != nil {
			return err
		}
	}
	plain := &grpcPods{l: l, name: "grpc", svcs: []string{"grpc", "grpc-headless"}}
	aged := &grpcPods{l: l, name: "grpc-age", svcs: []string{"grpc-age"}, extra: []string{"--grpc-max-connection-age", maxAge.String()}}
	if err := plain.scale(ctx, 3); err != nil {
		return err
	}
	if err := aged.scale(ctx, 3); err != nil {
		return err
	}
	vip, ageVIP := l.vip(ctx, "grpc", "grpc"), l.vip(ctx, "grpc-age", "grpc")
	if err := l.waitGRPC(ctx, vip, names(plain.pods)); err != nil {
		return err
	}
	if err := l.waitGRPC(ctx, ageVIP, names(aged.pods)); err != nil {
		return err
	}

	var updMu sync.Mutex
	var updates []grpcresolver.Update
	resolverTarget := "miniproxy:///grpc-headless." + ns + ":grpc"
	mpResolver := grpcresolver.NewBuilder(l.cl.Admin, grpcresolver.Options{
		Node: model.Node{Name: l.client.Node.Name, Zone: l.client.Node.Zone},
		OnUpdate: func(u grpcresolver.Update) {
			updMu.Lock()
			updates = append(updates, u)
			updMu.Unlock()
		},
	})

	// Histograms.
	hist := func(variant, target, lb string, channels int, opts ...grpc.DialOption) error {
		ccs, err := l.channels(target, lb, channels, opts...)
		if err != nil {
			return err
		}
		defer closeAll(ccs)
		h := Histogram{Variant: variant, Target: target, RPCs: l.cfg.connections, Counts: map[string]int{}}
		for i := 0; i < l.cfg.connections; i++ {
			name, err := call(ctx, ccs[i%len(ccs)])
			if err != nil {
				h.Errors++
				continue
			}
			h.Counts[name]++
		}
		res.Histograms = append(res.Histograms, h)
		l.p.log("gRPC %s: %v (errors %d)", variant, h.Counts, h.Errors)
		return nil
	}
	if err := hist("a: one channel → ClusterIP", "passthrough:///"+vip, "pick_first", 1); err != nil {
		return err
	}
	if err := hist(fmt.Sprintf("b: pool of %d channels → ClusterIP", poolSize), "passthrough:///"+vip, "pick_first", poolSize); err != nil {
		return err
	}
	dnsTarget := ""
	if l.cfg.coredns == "" {
		res.Skipped = append(res.Skipped, "c: no CoreDNS binary (hack/lab.sh builds it from hack/coredns; set MINIPROXY_COREDNS)")
	} else if info, err := l.startCoreDNS(ctx); err != nil {
		res.Skipped = append(res.Skipped, "c: CoreDNS did not start: "+err.Error())
		l.p.log("CoreDNS: %v", err)
	} else {
		res.DNS = info
		dnsTarget = fmt.Sprintf("dns://%s/%s:%d", info.Server, info.Name, grpcPort)
		samples, err := l.podClient(ctx, dnsTarget, nil, fmt.Sprintf("--rpcs=%d", l.cfg.connections), "--duration=60s")
		if err != nil {
			return err
		}
		h := Histogram{Variant: "c: headless + dns:/// + round_robin (CoreDNS)", Target: dnsTarget, RPCs: len(samples), Counts: map[string]int{}}
		for _, s := range samples {
			if s.name == "" {
				h.Errors++
			} else {
				h.Counts[s.name]++
			}
		}
		res.Histograms = append(res.Histograms, h)
		l.p.log("gRPC %s: %v (errors %d); DNS TTL %ds", h.Variant, h.Counts, h.Errors, info.TTL)
	}
	if err := hist("f: miniproxy resolver + round_robin", resolverTarget, "round_robin", 1, grpc.WithResolvers(mpResolver)); err != nil {
		return err
	}

	// Scale-ups and share over time.
	type run struct {
		variant string
		pods    *grpcPods
		stream  func(ctx context.Context, at func(time.Time)) ([]sample, error)
	}
	inProc := func(target, lb string, opts ...grpc.DialOption) func(context.Context, func(time.Time)) ([]sample, error) {
		return func(ctx context.Context, scale func(time.Time)) ([]sample, error) {
			ccs, err := l.channels(target, lb, 1, opts...)
			if err != nil {
				return nil, err
			}
			defer closeAll(ccs)
			return stream(ctx, ccs[0], scale), nil
		}
	}
	runs := []run{
		{"a: one channel → ClusterIP", plain, inProc("passthrough:///"+vip, "pick_first")},
		{fmt.Sprintf("d: one channel → ClusterIP, server MaxConnectionAge %v", maxAge), aged, inProc("passthrough:///"+ageVIP, "pick_first")},
		{"f: miniproxy resolver + round_robin", plain, inProc(resolverTarget, "round_robin", grpc.WithResolvers(mpResolver))},
	}
	if dnsTarget != "" {
		runs = append(runs, run{"c: headless + dns:/// + round_robin (CoreDNS)", plain, func(ctx context.Context, scale func(time.Time)) ([]sample, error) {
			// The client runs in the pod; scale only once it has answers
			// (DNS resolved, connections up), then stop it scaleWindow later.
			control := func(proc *framework.Process) {
				_ = framework.WaitFor(ctx, 15*time.Second, 50*time.Millisecond, func() (bool, error) {
					return countAnswers(proc.LogPath) >= 100, nil
				})
				scale(time.Now())
				select {
				case <-ctx.Done():
				case <-time.After(scaleWindow):
				}
				_ = proc.Stop(5 * time.Second)
			}
			return l.podClient(ctx, dnsTarget, control, "--rpcs=0", "--interval="+streamEvery.String(), "--duration=60s")
		}})
	}
	for _, r := range runs {
		l.p.step(l.mode + ": gRPC scale 3 → 6 while running: " + r.variant)
		var scaledAt time.Time
		var scaleErr error
		done := make(chan struct{})
		start := time.Now()
		samples, err := r.stream(ctx, func(t time.Time) {
			defer close(done)
			scaledAt = t
			scaleErr = r.pods.scale(ctx, 6)
			scaledAt = r.pods.publishedAt
		})
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if err != nil {
			return err
		}
		if scaleErr != nil {
			return scaleErr
		}
		su := scaleUpResult(r.variant, samples, start, scaledAt, names(r.pods.pods[3:]))
		if r.variant[0] == 'f' {
			updMu.Lock()
			for _, u := range updates {
				if !u.At.Before(scaledAt) && len(u.Addresses) == 6 {
					su.ResolverUpdateSec = u.At.Sub(scaledAt).Seconds()
					break
				}
			}
			updMu.Unlock()
		}
		res.ScaleUps = append(res.ScaleUps, su)
		l.p.log("%s: first new pod after %.3fs, all after %.3fs (-1: not within %.0fs)", r.variant, su.FirstNewSec, su.AllNewSec, su.WindowSec)
		if err := r.pods.scale(ctx, 3); err != nil {
			return err
		}
	}
	return nil
}

// stream calls cc every streamEvery; at scaleAt it calls scale in the
// background and keeps going for scaleWindow afterwards.
func stream(ctx context.Context, cc *grpc.ClientConn, scale func(time.Time)) []sample {
	var out []sample
	start := time.Now()
	scaled := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-time.After(scaleAt):
			scale(time.Now())
		}
		close(scaled)
	}()
	end := start.Add(scaleAt + scaleWindow + 10*time.Second) // bounded even if scaling is slow
	for time.Now().Before(end) && ctx.Err() == nil {
		name, err := call(ctx, cc)
		if err != nil {
			name = ""
		}
		out = append(out, sample{time.Now(), name})
		time.Sleep(streamEvery)
		select {
		case <-scaled:
			if e := time.Now().Add(scaleWindow); e.Before(end) {
				end = e
			}
			scaled = nil
		default:
		}
	}
	return out
}

func scaleUpResult(variant string, samples []sample, start, scaledAt time.Time, newPods []string) ScaleUp {
	su := ScaleUp{Variant: variant, FirstNewSec: -1, AllNewSec: -1, WindowSec: scaleWindow.Seconds()}
	seen := map[string]bool{}
	for _, s := range samples {
		if s.t.Before(scaledAt) && s.name != "" {
			su.BaselineRPCs++
		}
		if s.t.Before(scaledAt) || !slices.Contains(newPods, s.name) {
			continue
		}
		if len(seen) == 0 {
			su.FirstNewSec = s.t.Sub(scaledAt).Seconds()
		}
		seen[s.name] = true
		if len(seen) == len(newPods) && su.AllNewSec < 0 {
			su.AllNewSec = s.t.Sub(scaledAt).Seconds()
		}
	}
	nameSet := map[string]bool{}
	for _, s := range samples {
		if s.name != "" {
			nameSet[s.name] = true
		}
	}
	tl := Timeline{BinSec: binWidth.Seconds(), ScaleSec: scaledAt.Sub(start).Seconds(), Names: slices.Sorted(func(yield func(string) bool) {
		for n := range nameSet {
			if !yield(n) {
				return
			}
		}
	})}
	for _, s := range samples {
		b := int(s.t.Sub(start) / binWidth)
		for len(tl.Bins) <= b {
			tl.Bins = append(tl.Bins, make([]int, len(tl.Names)))
		}
		if i := slices.Index(tl.Names, s.name); i >= 0 {
			tl.Bins[b][i]++
		}
	}
	su.Timeline = tl
	return su
}

// channels opens n client channels whose connections are made from the
// client pod's namespace.
func (l *lab) channels(target, lb string, n int, opts ...grpc.DialOption) ([]*grpc.ClientConn, error) {
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		return l.client.NS.DialContext(ctx, "tcp", addr)
	}
	opts = append(opts, grpc.WithContextDialer(dial), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(fmt.Sprintf(`{"loadBalancingConfig":[{%q:{}}]}`, lb)))
	var out []*grpc.ClientConn
	for i := 0; i < n; i++ {
		cc, err := grpc.NewClient(target, opts...)
		if err != nil {
			closeAll(out)
			return nil, fmt.Errorf("grpc client %s: %w", target, err)
		}
		out = append(out, cc)
	}
	return out, nil
}

func closeAll(ccs []*grpc.ClientConn) {
	for _, cc := range ccs {
		_ = cc.Close()
	}
}

func call(ctx context.Context, cc grpc.ClientConnInterface) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	out := new(wrapperspb.StringValue)
	if err := cc.Invoke(ctx, grpcMethod, new(emptypb.Empty), out, grpc.WaitForReady(true)); err != nil {
		return "", fmt.Errorf("%s: %w", grpcMethod, err)
	}
	return out.GetValue(), nil
}

// waitGRPC waits until fresh channels to vip reach every pod in want.
func (l *lab) waitGRPC(ctx context.Context, vip string, want []string) error {
	seen := map[string]bool{}
	return framework.WaitFor(ctx, 30*time.Second, 50*time.Millisecond, func() (bool, error) {
		ccs, err := l.channels("passthrough:///"+vip, "pick_first", 1)
		if err != nil {
			return false, err
		}
		defer closeAll(ccs)
		if name, err := call(ctx, ccs[0]); err == nil {
			seen[name] = true
		}
		for _, w := range want {
			if !seen[w] {
				return false, nil
			}
		}
		return true, nil
	})
}

// podClient runs `podserver grpc-client` inside the client pod (so DNS
// resolution happens from the pod) and parses its per-RPC lines.
// control, if set, runs while the client runs and may stop it early.
func (l *lab) podClient(ctx context.Context, target string, control func(*framework.Process), args ...string) ([]sample, error) {
	args = append([]string{"grpc-client", "--target", target, "--lb", "round_robin"}, args...)
	proc, err := l.env.StartProcess(l.client.NS, fmt.Sprintf("grpc-client-%d", time.Now().UnixNano()), filepath.Join(l.env.BinDir, "podserver"), args...)
	if err != nil {
		return nil, err
	}
	if control != nil {
		control(proc)
	}
	if err := framework.WaitFor(ctx, 90*time.Second, 50*time.Millisecond, func() (bool, error) {
		exited, _ := proc.Exited()
		return exited, nil
	}); err != nil {
		return nil, fmt.Errorf("grpc-client did not finish: %w", err)
	}
	if _, werr := proc.Exited(); werr != nil {
		return nil, fmt.Errorf("grpc-client: %w: %s", werr, proc.Logs(2000))
	}
	f, err := os.Open(proc.LogPath)
	if err != nil {
		return nil, fmt.Errorf("grpc-client output: %w", err)
	}
	defer f.Close()
	var out []sample
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		ms, name, ok := strings.Cut(sc.Text(), " ")
		v, err := strconv.ParseInt(ms, 10, 64)
		if !ok || err != nil {
			continue
		}
		if strings.HasPrefix(name, "ERR ") {
			name = ""
		}
		out = append(out, sample{time.UnixMilli(v), name})
	}
	return out, sc.Err()
}

// countAnswers counts successful RPC lines in a grpc-client log so far.
func countAnswers(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if _, name, ok := strings.Cut(line, " "); ok && name != "" && !strings.HasPrefix(name, "ERR ") {
			n++
		}
	}
	return n
}

// startCoreDNS runs the lab's CoreDNS in the control-plane namespace with
// the kubernetes plugin reading the apiserver, routes the pod CIDRs there,
// and waits until the headless Service resolves from the client pod.
func (l *lab) startCoreDNS(ctx context.Context) (*DNSInfo, error) {
	if err := l.cl.RoutePodsFromControlPlane(ctx); err != nil {
		return nil, err
	}
	corefile := filepath.Join(l.env.WorkDir, "Corefile")
	conf := fmt.Sprintf(`cluster.local:53 {
    errors
    kubernetes cluster.local {
        kubeconfig %s
        ttl 5
    }
}
`, l.cl.CP.AdminKubeconfig)
	if err := os.WriteFile(corefile, []byte(conf), 0o644); err != nil {
		return nil, fmt.Errorf("write Corefile: %w", err)
	}
	proc, err := l.env.StartProcess(l.cl.CP.NS, "coredns", l.cfg.coredns, "-conf", corefile)
	if err != nil {
		return nil, err
	}
	info := &DNSInfo{Server: net.JoinHostPort(framework.ControlPlaneIP, "53"), Name: "grpc-headless." + ns + ".svc.cluster.local"}
	var last error
	err = framework.WaitFor(ctx, 30*time.Second, 200*time.Millisecond, func() (bool, error) {
		if exited, werr := proc.Exited(); exited {
			return false, fmt.Errorf("coredns exited: %v: %s", werr, proc.Logs(2000))
		}
		info.Records, info.TTL, last = queryA(l.client.NS, info.Server, info.Name)
		return last == nil && len(info.Records) == 3, nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w (last: %v)", err, last)
	}
	return info, nil
}

// queryA asks server for name's A records from inside ns.
func queryA(nsh *framework.NetNS, server, name string) ([]string, uint32, error) {
	q := dnsmessage.Message{Header: dnsmessage.Header{ID: 4242, RecursionDesired: true}, Questions: []dnsmessage.Question{{
		Name: dnsmessage.MustNewName(name + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET,
	}}}
	pkt, err := q.Pack()
	if err != nil {
		return nil, 0, fmt.Errorf("pack: %w", err)
	}
	var ips []string
	var ttl uint32
	err = nsh.Do(func() error {
		c, err := net.DialTimeout("udp", server, time.Second)
		if err != nil {
			return fmt.Errorf("dial %s: %w", server, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(pkt); err != nil {
			return fmt.Errorf("dns write: %w", err)
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("dns read: %w", err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:n]); err != nil {
			return fmt.Errorf("dns unpack: %w", err)
		}
		for _, a := range m.Answers {
			if r, ok := a.Body.(*dnsmessage.AResource); ok {
				ips = append(ips, netip.AddrFrom4(r.A).String())
				ttl = a.Header.TTL
			}
		}
		return nil
	})
	slices.Sort(ips)
	return ips, ttl, err
}
