package ipvsapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/miniproxy/miniproxy/pkg/ipvs"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/watch"
	"github.com/miniproxy/miniproxy/test/e2e/framework"
	"github.com/miniproxy/miniproxy/test/guest"
	"github.com/miniproxy/miniproxy/test/guest/glab"
)

const kubeconfigEnv = "MINIPROXY_GUEST_KUBECONFIG"

var guestModules = []string{
	"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh", "ip_vs_mh",
	"dummy", "veth", "nf_tables", "nft_chain_nat", "nft_masq", "nft_ct", "nft_reject_inet",
}

type row struct {
	Feature string `json:"feature"`
	Mode    string `json:"mode"`
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Test    string `json:"test,omitempty"`
}

type report struct {
	Driver       string  `json:"driver"`
	Kernel       string  `json:"kernel,omitempty"`
	Generated    string  `json:"generated"`
	BootSeconds  float64 `json:"boot_seconds"`
	TestSeconds  float64 `json:"test_seconds"`
	TotalSeconds float64 `json:"total_seconds"`
	Skipped      string  `json:"skipped,omitempty"`
	Matrix       []row   `json:"matrix"`
}

var features = map[string]string{
	"ClusterIP":       "ClusterIP through the apiserver (watch → model → IPVS)",
	"UDP":             "UDP Service through the apiserver",
	"EndpointChange":  "endpoint change propagation through the apiserver",
	"NodePort":        "NodePort through the apiserver",
	"SessionAffinity": "sessionAffinity ClientIP through the apiserver",
	"ServiceDeleted":  "deleted Service is removed from IPVS",
}

// TestGuestAPIServer is the host side: control plane up, guest booted inside
// its namespace, guest subtests mapped to subtests here.
func TestGuestAPIServer(t *testing.T) {
	if os.Getenv(guest.InGuestEnv) != "" {
		t.Skip("inside the guest already")
	}
	if testing.Short() {
		t.Skip("skipping control plane + qemu guest in -short mode")
	}
	rep := &report{Driver: "guest against the host kube-apiserver: lib/ = pkg/watch + pkg/ipvs in the test process; binary/ = static bin/miniproxy --proxy-mode ipvs in the guest's node namespace",
		Generated: time.Now().UTC().Format(time.RFC3339)}
	defer writeReport(t, rep)
	skip := func(why string) {
		rep.Skipped = why
		if guest.Required() {
			t.Fatalf("the guest was required (%s=1) but cannot run: %s", guest.RequiredEnv, why)
		}
		t.Skip("skipping: " + why)
	}
	if _, err := exec.LookPath(guest.QemuBinary); err != nil {
		skip(guest.QemuBinary + " not installed")
	}
	env, err := framework.NewEnv(framework.Options{Log: t.Logf})
	if err != nil {
		skip(err.Error())
	}
	defer env.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	cp, err := env.StartControlPlane(ctx)
	if err != nil {
		t.Fatalf("control plane: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "ipvsapi.test")
	if err := guest.BuildTestBinary(ctx, ".", bin); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"kubeconfig": cp.AdminKubeconfig}
	// The real binary, static so it runs on the guest's bare initramfs.
	mp := filepath.Join(t.TempDir(), "miniproxy")
	build := exec.CommandContext(ctx, "go", "build", "-o", mp, "./cmd/miniproxy")
	build.Dir = filepath.Join("..", "..", "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Logf("no miniproxy binary for the guest (binary cases will skip): %v: %s", err, out)
	} else {
		files["miniproxy"] = mp
	}
	ipBin, err := exec.LookPath("ip")
	if err != nil {
		skip("ip not installed")
	}
	res, err := guest.Run(ctx, guest.Options{
		Binary:  bin,
		Args:    []string{"-test.v", "-test.run", "^(TestAPIInGuest|TestBinaryInGuest)$", "-test.timeout", "8m"},
		Env:     []string{guest.InGuestEnv + "=1", kubeconfigEnv + "=/kubeconfig"},
		Modules: guestModules,
		Network: true,
		Prefix:  []string{ipBin, "netns", "exec", cp.NS.Name},
		Files:   files,
		Timeout: 9 * time.Minute,
	})
	if errors.Is(err, guest.ErrUnavailable) {
		skip(err.Error())
	}
	if res != nil {
		rep.BootSeconds, rep.TotalSeconds, rep.Kernel = res.Boot.Seconds(), res.Total.Seconds(), res.KernelRelease
		t.Logf("guest: boot %v, total %v, initramfs %d bytes", res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond), res.InitramfsBytes)
	}
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	seen := 0
	for _, r := range guest.ParseGoTest(res.Output) {
		if r.Name == "TestAPIInGuest" || r.Name == "TestBinaryInGuest" {
			rep.TestSeconds += r.Elapsed.Seconds()
			if r.Outcome == "SKIP" {
				t.Logf("%s skipped in the guest: %s", r.Name, strings.Join(r.Output, "\n"))
			}
			continue
		}
		var name, variant, prefix string
		if n, ok := strings.CutPrefix(r.Name, "TestAPIInGuest/"); ok {
			name, variant, prefix = n, "lib/", ""
		} else if n, ok := strings.CutPrefix(r.Name, "TestBinaryInGuest/"); ok {
			name, variant, prefix = n, "binary/", "miniproxy binary: "
		} else {
			continue
		}
		seen++
		reason := ""
		if r.Outcome != "PASS" {
			reason = strings.Join(r.Output, "; ")
		}
		f := features[name]
		if f == "" {
			f = name
		}
		rep.Matrix = append(rep.Matrix, row{Feature: prefix + f, Mode: "ipvs", Status: strings.ToLower(r.Outcome), Reason: reason,
			Test: "test/guest/ipvsapi TestGuestAPIServer/" + variant + name})
		t.Run(variant+name, func(t *testing.T) {
			switch r.Outcome {
			case "FAIL":
				t.Errorf("failed in guest (%v):\n%s", r.Elapsed, strings.Join(r.Output, "\n"))
			case "SKIP":
				t.Skipf("skipped in guest: %s", strings.Join(r.Output, "; "))
			default:
				t.Logf("passed in guest (%v): %s", r.Elapsed, strings.Join(r.Output, "; "))
			}
		})
	}
	if seen == 0 || (res.ExitCode != 0 && !t.Failed()) {
		out := res.Output
		if i := len(out) - 6000; i > 0 {
			out = out[i:]
		}
		t.Fatalf("guest exit %d, %d subtests:\n%s", res.ExitCode, seen, out)
	}
}

func writeReport(t *testing.T, rep *report) {
	dir := os.Getenv("MINIPROXY_E2E_RESULTS")
	if dir == "" {
		wd, _ := os.Getwd()
		dir = filepath.Join(wd, "..", "..", "..", "e2e-results")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("report: %v", err)
		return
	}
	b, _ := json.MarshalIndent(rep, "", "  ")
	p := filepath.Join(dir, "ipvs-guest-apiserver.json")
	if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
		t.Logf("report: %v", err)
		return
	}
	t.Logf("wrote %s", p)
}

// guestClient connects to the host apiserver from the guest's root namespace.
func guestClient(t *testing.T, kc string) (kubernetes.Interface, *url.URL) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	glab.Must(t, err, "kubeconfig")
	u, err := url.Parse(cfg.Host)
	glab.Must(t, err, "server URL")
	// Same apiserver, reached through qemu: keep verifying its certificate
	// against the name it was issued for.
	cfg.TLSClientConfig.ServerName = u.Hostname()
	cfg.Host = "https://" + guest.GuestHostIP + ":" + u.Port()
	client, err := kubernetes.NewForConfig(cfg)
	glab.Must(t, err, "client")
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := client.Discovery().ServerVersion()
		if err == nil {
			return client, u
		}
		if time.Now().After(deadline) {
			t.Fatalf("apiserver unreachable from the guest at %s: %v", cfg.Host, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// objects creates a namespace and a Node object for one guest node.
func objects(t *testing.T, ctx context.Context, client kubernetes.Interface, prefix string) (nsName, nodeName string) {
	suffix := fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()%100000)
	nsName, nodeName = "ipvs-guest-"+suffix, "guest-node-"+suffix
	_, err := client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nsName}}, metav1.CreateOptions{})
	glab.Must(t, err, "namespace")
	t.Cleanup(func() { _ = client.CoreV1().Namespaces().Delete(context.Background(), nsName, metav1.DeleteOptions{}) })
	_, err = client.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName},
		Status: v1.NodeStatus{Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: glab.NodeIP}}}}, metav1.CreateOptions{})
	glab.Must(t, err, "node")
	t.Cleanup(func() { _ = client.CoreV1().Nodes().Delete(context.Background(), nodeName, metav1.DeleteOptions{}) })
	return nsName, nodeName
}

// TestAPIInGuest is the guest side with the proxy loop in this process:
// pkg/watch feeding pkg/ipvs.
func TestAPIInGuest(t *testing.T) {
	kc := os.Getenv(kubeconfigEnv)
	if kc == "" {
		t.Skip("runs only inside the guest (TestGuestAPIServer boots it)")
	}
	client, _ := guestClient(t, kc)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := glab.New(t, 3)
	be, err := ipvs.New(proxy.Config{NetNS: proxy.NetNS(glab.NSPath(l.Node)), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(glab.ClusterNet)}},
		ipvs.Options{})
	glab.Must(t, err, "backend")
	defer be.Close()
	nsName, nodeName := objects(t, ctx, client, "lib")

	// The proxy loop: sync on every change and once a second (which also
	// finishes graceful drains), as the real sync runner would.
	tracker := watch.NewTracker(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), "")
	kick := make(chan struct{}, 1)
	glab.Must(t, watch.Start(ctx, client, nodeName, tracker, func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}), "watch")
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		first := true
		for {
			select {
			case <-ctx.Done():
				return
			case <-kick:
			case <-tick.C:
			}
			snap, _ := tracker.Snapshot()
			if _, err := be.Sync(ctx, snap, first); err != nil && ctx.Err() == nil {
				t.Logf("sync: %v", err)
				first = true
				continue
			}
			first = false
		}
	}()
	defer func() {
		cancel()
		<-loopDone
		if err := be.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}()
	runCases(t, &api{ctx: ctx, c: client, ns: nsName, node: nodeName, lab: l})
}

// TestBinaryInGuest runs the real miniproxy binary (--proxy-mode ipvs)
// inside the guest's node namespace. The apiserver is reached through a
// small forwarder listening on the node's loopback, since qemu's 10.0.2.2
// is only routable from the guest's root namespace.
func TestBinaryInGuest(t *testing.T) {
	kc := os.Getenv(kubeconfigEnv)
	if kc == "" {
		t.Skip("runs only inside the guest (TestGuestAPIServer boots it)")
	}
	if _, err := os.Stat("/miniproxy"); err != nil {
		t.Skip("skipping: no static miniproxy binary was put in the guest")
	}
	client, u := guestClient(t, kc)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := glab.New(t, 3)
	nsName, nodeName := objects(t, ctx, client, "bin")

	var ln net.Listener
	glab.Must(t, glab.In(l.Node, func() error {
		var err error
		ln, err = net.Listen("tcp4", "127.0.0.1:6443")
		return err
	}), "apiserver forwarder")
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := net.DialTimeout("tcp", net.JoinHostPort(guest.GuestHostIP, u.Port()), 10*time.Second)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); up.Close() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	kcfg, err := clientcmd.LoadFromFile(kc)
	glab.Must(t, err, "load kubeconfig")
	for _, c := range kcfg.Clusters {
		c.Server = "https://127.0.0.1:6443"
		c.TLSServerName = u.Hostname()
	}
	nodeKC := filepath.Join(t.TempDir(), "node.kubeconfig")
	glab.Must(t, clientcmd.WriteToFile(*kcfg, nodeKC), "write node kubeconfig")

	var logs bytes.Buffer
	cmd := exec.Command("/miniproxy", "--kubeconfig", nodeKC, "--proxy-mode", "ipvs",
		"--hostname-override", nodeName, "--cluster-cidr", glab.ClusterNet,
		"--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	// Started from a thread inside the node namespace, so the child is
	// born there (fork inherits the calling thread's namespace).
	glab.Must(t, glab.In(l.Node, cmd.Start), "start miniproxy")
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			out := logs.String()
			if len(out) > 4000 {
				out = out[len(out)-4000:]
			}
			t.Logf("miniproxy log:\n%s", out)
		}
	}()
	runCases(t, &api{ctx: ctx, c: client, ns: nsName, node: nodeName, lab: l})
}

// runCases exercises one node whose proxy (in-process or the binary) is
// already watching the apiserver.
func runCases(t *testing.T, a *api) {
	l, client, ctx, nsName := a.lab, a.c, a.ctx, a.ns
	a.t = t
	t.Run("ClusterIP", func(t *testing.T) {
		a.t = t
		start := time.Now()
		ip := a.service("web", v1.ProtocolTCP, 3, nil)
		a.until("all 3 endpoints answer on "+ip, func() bool {
			got, err := l.TryCount("tcp", glab.ClientIP(0), ip+":80", 9)
			return err == nil && len(got) == 3
		})
		t.Logf("Service + EndpointSlice created → traffic to all endpoints in %v", time.Since(start).Round(time.Millisecond))
	})
	t.Run("UDP", func(t *testing.T) {
		a.t = t
		ip := a.service("dns", v1.ProtocolUDP, 3, nil)
		a.until("all 3 endpoints answer UDP on "+ip, func() bool {
			got, err := l.TryCount("udp", glab.ClientIP(0), ip+":80", 9)
			return err == nil && len(got) == 3
		})
	})
	t.Run("EndpointChange", func(t *testing.T) {
		a.t = t
		ip := a.service("scale", v1.ProtocolTCP, 3, nil)
		a.until("3 endpoints", func() bool {
			got, err := l.TryCount("tcp", glab.ClientIP(0), ip+":80", 9)
			return err == nil && len(got) == 3
		})
		start := time.Now()
		a.slice("scale", v1.ProtocolTCP, 2)
		a.until("pod3 no longer chosen", func() bool {
			got, err := l.TryCount("tcp", glab.ClientIP(0), ip+":80", 12)
			return err == nil && got["pod3"] == 0 && len(got) == 2
		})
		t.Logf("EndpointSlice update → traffic moved in %v", time.Since(start).Round(time.Millisecond))
		a.slice("scale", v1.ProtocolTCP, 3)
		a.until("pod3 back", func() bool {
			got, err := l.TryCount("tcp", glab.ClientIP(0), ip+":80", 9)
			return err == nil && len(got) == 3
		})
	})
	t.Run("NodePort", func(t *testing.T) {
		a.t = t
		var port int32
		a.service("np", v1.ProtocolTCP, 3, func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort })
		svc, err := client.CoreV1().Services(nsName).Get(ctx, "np", metav1.GetOptions{})
		glab.Must(t, err, "get np")
		port = svc.Spec.Ports[0].NodePort
		dst := fmt.Sprintf("%s:%d", glab.NodeIP, port)
		a.until("NodePort "+dst+" reaches all endpoints", func() bool {
			got, err := l.TryCount("tcp", glab.ClientIP(1), dst, 9)
			return err == nil && len(got) == 3
		})
	})
	t.Run("SessionAffinity", func(t *testing.T) {
		a.t = t
		timeout := int32(60)
		ip := a.service("sticky", v1.ProtocolTCP, 3, func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: &timeout}}
		})
		a.until("reachable", func() bool { _, err := l.TryCount("tcp", glab.ClientIP(2), ip+":80", 1); return err == nil })
		if got := l.Count("tcp", glab.ClientIP(2), ip+":80", 10); len(got) != 1 {
			t.Fatalf("ClientIP affinity: one client spread over %v", got)
		}
	})
	t.Run("ServiceDeleted", func(t *testing.T) {
		a.t = t
		ip := a.service("gone", v1.ProtocolTCP, 3, nil)
		a.until("reachable", func() bool { _, err := l.TryCount("tcp", glab.ClientIP(0), ip+":80", 1); return err == nil })
		glab.Must(t, client.CoreV1().Services(nsName).Delete(ctx, "gone", metav1.DeleteOptions{}), "delete service")
		a.until("connections to the deleted Service's IP fail", func() bool {
			_, err := glab.Ask(l.Client, "tcp", glab.ClientIP(0), ip+":80")
			return err != nil
		})
	})
}

type api struct {
	t    *testing.T
	ctx  context.Context
	c    kubernetes.Interface
	ns   string
	node string
	lab  *glab.Lab
}

// service creates a selectorless Service on port 80 → PodPort and its
// EndpointSlice over the first n pods; returns the allocated ClusterIP.
func (a *api) service(name string, proto v1.Protocol, n int, mod func(*v1.Service)) string {
	a.t.Helper()
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: a.ns},
		Spec: v1.ServiceSpec{Ports: []v1.ServicePort{{Port: 80, Protocol: proto, TargetPort: intstr.FromInt32(glab.PodPort)}}}}
	if mod != nil {
		mod(svc)
	}
	out, err := a.c.CoreV1().Services(a.ns).Create(a.ctx, svc, metav1.CreateOptions{})
	glab.Must(a.t, err, "create service "+name)
	a.slice(name, proto, n)
	return out.Spec.ClusterIP
}

// slice creates or replaces the Service's EndpointSlice with the first n pods.
func (a *api) slice(name string, proto v1.Protocol, n int) {
	a.t.Helper()
	ready, port, pname := true, int32(glab.PodPort), ""
	es := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-guest", Namespace: a.ns, Labels: map[string]string{
			discovery.LabelServiceName: name, discovery.LabelManagedBy: "miniproxy-guest-test"}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: &pname, Port: &port, Protocol: &proto}},
	}
	for i := 0; i < n; i++ {
		node := a.node
		es.Endpoints = append(es.Endpoints, discovery.Endpoint{Addresses: []string{glab.PodIP(i)},
			Conditions: discovery.EndpointConditions{Ready: &ready}, NodeName: &node})
	}
	cur, err := a.c.DiscoveryV1().EndpointSlices(a.ns).Get(a.ctx, es.Name, metav1.GetOptions{})
	if err == nil {
		es.ResourceVersion = cur.ResourceVersion
		_, err = a.c.DiscoveryV1().EndpointSlices(a.ns).Update(a.ctx, es, metav1.UpdateOptions{})
	} else {
		_, err = a.c.DiscoveryV1().EndpointSlices(a.ns).Create(a.ctx, es, metav1.CreateOptions{})
	}
	glab.Must(a.t, err, "endpointslice "+es.Name)
}

// until polls cond every 200 ms for at most 60 s.
func (a *api) until(what string, cond func() bool) {
	a.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			a.t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
