package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Matrix rows of the kubelet test bed.
const (
	rowKubeletDS       = "kubelet: deploy/daemonset.yaml applied, miniproxy Ready on 2 nodes (in-cluster config)"
	rowKubeletServices = "kubelet: Deployment ×3 behind ClusterIP+NodePort, real EndpointSlices; pod→VIP, node→VIP, external→NodePort"
	rowKubeletRollout  = "kubelet: DaemonSet rolling update to a new tag, zero probe failures"
)

// kubernetesVIP is the default/kubernetes Service (first address of
// framework.ServiceCIDR): in-cluster clients reach the apiserver there.
const kubernetesVIP = "10.96.0.1:443"

// kubeletSkip says why the kubelet test bed cannot run here, or "".
func kubeletSkip() string {
	if err := framework.RequireRoot(); err != nil {
		return err.Error()
	}
	if os.Getenv("MINIPROXY_E2E_KUBELET") != "1" {
		return "kubelet test bed off: set MINIPROXY_E2E_KUBELET=1 (needs MINIPROXY_NODE_TOOLS=1 hack/provision.sh)"
	}
	if miss := framework.KubeletTestBedMissing(); miss != "" {
		return "kubelet test bed not provisioned: " + miss
	}
	return ""
}

// TestKubeletDaemonSet runs deploy/daemonset.yaml the way users do: applied
// through the API (only the image reference, and the PROXY_MODE value the
// file tells users to edit, substituted) on a 2-node cluster whose nodes run
// real containerd + runc + kubelet, after upstream kube-proxy ran there and
// was removed (README "Replacing kube-proxy"). miniproxy reaches the
// apiserver with its ServiceAccount token through the kubernetes Service VIP,
// like any in-cluster client.
func TestKubeletDaemonSet(t *testing.T) {
	for _, mode := range framework.KnownModes {
		t.Run(mode, func(t *testing.T) {
			rows := map[string]*framework.Row{}
			for _, f := range []string{rowKubeletDS, rowKubeletServices, rowKubeletRollout} {
				rows[f] = suite.Matrix.Track(t, f, mode)
			}
			skip := func(why string) {
				for _, r := range rows {
					r.Note(why)
				}
				rows[rowKubeletDS].Skip(why)
			}
			if mode == "ipvs" {
				skip("this kernel has no IPVS; the kubelet test bed runs in host namespaces, not the qemu guest")
			}
			if why, off := suite.DisabledReason[mode]; off {
				skip(why)
			}
			if why := kubeletSkip(); why != "" {
				skip(why)
			}
			runKubeletDaemonSet(t, mode, rows)
		})
	}
}

func runKubeletDaemonSet(t *testing.T, mode string, rows map[string]*framework.Row) {
	before, err := framework.HostSysctls()
	if err != nil {
		t.Fatal(err)
	}
	env, err := framework.NewEnv(framework.Options{Log: suite.Logf})
	if err != nil {
		t.Fatal(err)
	}
	// Runs after every other cleanup of this test: the host must be as
	// before once the cluster is gone.
	t.Cleanup(func() {
		if err := env.Close(); err != nil {
			t.Errorf("teardown: %v", err)
		}
		after, err := framework.HostSysctls()
		if err != nil {
			t.Error(err)
		}
		for k, v := range before {
			if after[k] != v {
				t.Errorf("host sysctl %s changed: %s → %s", k, v, after[k])
			}
		}
		mounts, _ := os.ReadFile("/proc/self/mounts")
		for _, l := range strings.Split(string(mounts), "\n") {
			if strings.Contains(l, "/var/lib/kubelet") || strings.Contains(l, "/run/containerd") || strings.Contains(l, "/var/lib/containerd") || strings.Contains(l, env.ID) {
				t.Errorf("mount left in the host mount namespace: %s", l)
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	rows[rowKubeletDS].Note("bring-up")
	t0 := time.Now()
	kc, err := framework.StartKubeletCluster(ctx, env, 2)
	if err != nil {
		t.Fatalf("kubelet cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, kn := range kc.Nodes {
				t.Logf("%s", kn.KubeletLogs(8000))
			}
		}
	})
	bringUp := time.Since(t0)
	rows[rowKubeletDS].Note("images")
	t1 := time.Now()
	imgs, err := framework.BuildTestImages(ctx, env, filepath.Join(env.WorkDir, "images"))
	if err != nil {
		t.Fatalf("images: %v", err)
	}
	if err := kc.ImportImages(ctx, imgs.Pause, imgs.Podserver, imgs.Miniproxy); err != nil {
		t.Fatalf("import images: %v", err)
	}
	imagesTime := time.Since(t1)

	// A cluster "where kube-proxy ran": upstream kube-proxy programs the
	// node (the kubernetes Service VIP among it) and is then removed; its
	// rules stay in the kernel, as they do when its DaemonSet is deleted.
	rows[rowKubeletDS].Note("kube-proxy first")
	for _, kn := range kc.Nodes {
		kp, err := kc.StartKubeProxy(ctx, kn.Node, mode)
		if err != nil {
			t.Fatalf("kube-proxy on %s: %v", kn.Name, err)
		}
		// kube-proxy's /healthz is 200 before its first sync: wait until
		// the apiserver answers through the kubernetes Service VIP.
		if err := framework.WaitFor(ctx, 2*time.Minute, 200*time.Millisecond, func() (bool, error) {
			return framework.ConnectFrom(ctx, kn.NS, kubernetesVIP, time.Second) == nil, nil
		}); err != nil {
			t.Fatalf("kube-proxy on %s never programmed %s: %v\n%s", kn.Name, kubernetesVIP, err, kp.Logs())
		}
		if err := kp.Stop(); err != nil {
			t.Fatalf("stop kube-proxy on %s: %v", kn.Name, err)
		}
	}

	// kubectl apply -f deploy/daemonset.yaml, plus a workload. The image
	// reference stays: the image is imported as miniproxy:dev, the name the
	// file uses; PROXY_MODE is the value the file tells users to edit.
	rows[rowKubeletDS].Note("apply")
	m := *kc.Manifest
	m.Docs = nil
	for _, d := range kc.Manifest.Docs {
		d = bytes.ReplaceAll(d, []byte("value: iptables"), []byte("value: "+mode))
		m.Docs = append(m.Docs, d)
	}
	ns := "kubelet-e2e"
	if _, err := kc.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	applyAt := time.Now()
	if err := framework.ApplyManifest(ctx, kc.CP, &m, false); err != nil {
		t.Fatalf("apply deploy/daemonset.yaml: %v", err)
	}
	if _, err := kc.Admin.AppsV1().Deployments(ns).Create(ctx, podserverDeployment(ns, "web", 3), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	web, err := kc.Admin.CoreV1().Services(ns).Create(ctx, webService(ns, "web", corev1.ServiceTypeClusterIP), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	webNP, err := kc.Admin.CoreV1().Services(ns).Create(ctx, webService(ns, "web-np", corev1.ServiceTypeNodePort), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ds := m.DaemonSet
	var dsReadyAt time.Time
	err = framework.WaitFor(ctx, 5*time.Minute, 500*time.Millisecond, func() (bool, error) {
		d, err := kc.Admin.AppsV1().DaemonSets(ds.Namespace).Get(ctx, ds.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return d.Status.DesiredNumberScheduled == 2 && d.Status.NumberReady == 2, nil
	})
	if err != nil {
		dumpPods(ctx, t, kc, ds.Namespace)
		t.Fatalf("miniproxy DaemonSet not Ready on both nodes: %v", err)
	}
	dsReadyAt = time.Now()
	pods := daemonPods(ctx, t, kc, ds)
	for _, p := range pods {
		checkInClusterPod(t, p)
	}
	t.Logf("miniproxy Ready on both nodes %v after apply", dsReadyAt.Sub(applyAt).Round(time.Millisecond))
	// The probes' own URLs, from the node (hostNetwork: the pod's
	// namespace), answer 200.
	for _, kn := range kc.Nodes {
		for _, path := range []string{"/livez", "/healthz"} {
			if code, err := framework.HTTPStatusFrom(ctx, kn.NS, "http://127.0.0.1:10256"+path); err != nil || code != 200 {
				t.Errorf("%s %s: %d %v", kn.Name, path, code, err)
			}
		}
	}

	// The workload and every path to it.
	rows[rowKubeletServices].Note("services")
	webPods := waitDeploymentReady(ctx, t, kc, ns, "web", 3)
	var clientPod *framework.Pod
	{
		p := webPods[0]
		kn := nodeOf(kc, p.Spec.NodeName)
		pid, err := kn.ContainerPID(ctx, p, "podserver")
		if err != nil {
			t.Fatal(err)
		}
		pns, err := kn.PodNetNS(ctx, "c0", pid)
		if err != nil {
			t.Fatal(err)
		}
		clientPod = &framework.Pod{Name: p.Name, NS: pns, Node: kn.Node}
	}
	vip := framework.VIP(web, "tcp")
	npPort, err := framework.NodePortOf(webNP, "tcp")
	if err != nil {
		t.Fatal(err)
	}
	ext, err := kc.External(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, p := range webPods {
		want[p.Name] = true
	}
	type path struct {
		name string
		ns   *framework.NetNS
		addr string
	}
	paths := []path{{"pod→VIP", clientPod.NS, vip}}
	for _, kn := range kc.Nodes {
		paths = append(paths,
			path{"node " + kn.Name + "→VIP", kn.NS, vip},
			path{"external→NodePort " + kn.Name, ext.NS, fmt.Sprintf("%s:%d", kn.IP, npPort)})
	}
	var allAt time.Time
	err = framework.WaitFor(ctx, 2*time.Minute, 200*time.Millisecond, func() (bool, error) {
		for _, p := range paths {
			if framework.Probe(ctx, p.ns, p.addr, time.Second).Err != nil {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		for _, p := range paths {
			t.Logf("%s %s: %v", p.name, p.addr, framework.Probe(ctx, p.ns, p.addr, time.Second))
		}
		t.Fatalf("Services not answering on every path: %v", err)
	}
	allAt = time.Now()
	for _, p := range paths {
		c, err := framework.TCPCountsFrom(ctx, p.ns, p.addr, 30)
		if err != nil {
			t.Errorf("%s %s: %v", p.name, p.addr, err)
			continue
		}
		for _, n := range c.Names() {
			if !want[n] {
				t.Errorf("%s %s answered by %q, not a web pod", p.name, p.addr, n)
			}
		}
		t.Logf("%s %s: %v", p.name, p.addr, c)
	}
	checkSlices(ctx, t, kc, ns, "web", webPods)
	checkTerminating(ctx, t, kc, ns, "web", webPods[1])
	for _, kn := range kc.Nodes {
		rules, err := kn.Rules(ctx, mode)
		if err != nil {
			t.Errorf("rules on %s: %v", kn.Name, err)
		} else if !strings.Contains(rules, web.Spec.ClusterIP) {
			t.Errorf("%s: no rule for %s in the node's ruleset", kn.Name, web.Spec.ClusterIP)
		}
	}
	fig := map[string]any{
		"mode":                        mode,
		"nodes":                       len(kc.Nodes),
		"clusterBringUpSeconds":       bringUp.Seconds(),
		"imagesBuildImportSeconds":    imagesTime.Seconds(),
		"applyToDaemonSetReadySecond": dsReadyAt.Sub(applyAt).Seconds(),
		"applyToAllServicesAnswering": allAt.Sub(applyAt).Seconds(),
		"paths":                       len(paths),
	}
	if t.Failed() {
		return
	}

	// Rolling update to a new tag while a pod probes the VIP.
	rows[rowKubeletRollout].Note("rollout")
	pr, err := clientPod.StartProber(ctx, vip, 10*time.Millisecond, 4)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	rollAt := time.Now()
	patch := fmt.Sprintf(`{"spec":{"template":{"spec":{"containers":[{"name":"miniproxy","image":%q}]}}}}`, framework.MiniproxyImageNext)
	if _, err := kc.Admin.AppsV1().DaemonSets(ds.Namespace).Patch(ctx, ds.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		pr.Stop()
		t.Fatal(err)
	}
	err = framework.WaitFor(ctx, 5*time.Minute, 250*time.Millisecond, func() (bool, error) {
		d, err := kc.Admin.AppsV1().DaemonSets(ds.Namespace).Get(ctx, ds.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		s := d.Status
		return s.ObservedGeneration >= d.Generation && s.UpdatedNumberScheduled == 2 && s.NumberReady == 2 && s.NumberAvailable == 2, nil
	})
	rolledAt := time.Now()
	time.Sleep(time.Second)
	rep := pr.Stop()
	if err != nil {
		dumpPods(ctx, t, kc, ds.Namespace)
		t.Fatalf("rolling update did not finish: %v", err)
	}
	for _, p := range daemonPods(ctx, t, kc, ds) {
		if img := p.Spec.Containers[0].Image; img != framework.MiniproxyImageNext {
			t.Errorf("%s runs %s after the rollout", p.Name, img)
		}
		checkInClusterPod(t, p)
	}
	nFail, nTotal, first := framework.Failed(rep.New, time.Time{}, time.Time{})
	lFail, lTotal, lfirst := framework.Failed(rep.Long, time.Time{}, time.Time{})
	fig["rolloutSeconds"] = rolledAt.Sub(rollAt).Seconds()
	fig["rolloutNewConnections"], fig["rolloutNewConnectionsFailed"] = nTotal, nFail
	fig["rolloutLongLivedAsks"], fig["rolloutLongLivedFailed"] = lTotal, lFail
	if first != nil {
		fig["rolloutFirstError"] = first.Err.Error()
		t.Errorf("rollout: %d of %d new connections failed; first at %v: %v", nFail, nTotal, first.At.Sub(rollAt), first.Err)
	}
	if lfirst != nil {
		fig["rolloutFirstLongLivedError"] = lfirst.Err.Error()
		t.Errorf("rollout: %d of %d asks on long-lived connections failed; first: %v", lFail, lTotal, lfirst.Err)
	}
	if nTotal < 100 {
		t.Errorf("rollout: only %d probe connections; the prober did not run", nTotal)
	}
	t.Logf("rollout in %v: %d/%d new connections failed, %d/%d long-lived asks failed", rolledAt.Sub(rollAt).Round(time.Millisecond), nFail, nTotal, lFail, lTotal)
	// kubelet logs every failed probe (-v=2): liveness never failed.
	for _, kn := range kc.Nodes {
		if n := kn.KubeletLogCount(`probeType="Liveness"`, `pod="kube-system/miniproxy-`); n > 0 {
			t.Errorf("%s: kubelet logged %d failed liveness probes of miniproxy", kn.Name, n)
		}
	}
	writeKubeletFigures(t, mode, fig)
}

func writeKubeletFigures(t *testing.T, mode string, fig map[string]any) {
	if err := os.MkdirAll(suite.ResultsDir, 0o755); err != nil {
		t.Error(err)
		return
	}
	b, _ := json.MarshalIndent(fig, "", "  ")
	p := filepath.Join(suite.ResultsDir, "kubelet-daemonset-"+mode+".json")
	if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
		t.Error(err)
	}
	t.Logf("figures: %s\n%s", p, b)
}

func podserverDeployment(ns, name string, replicas int32) *appsv1.Deployment {
	labels := map[string]string{"app": name}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					AutomountServiceAccountToken: new(bool),
					Containers: []corev1.Container{{
						Name:            "podserver",
						Image:           framework.PodserverImage,
						ImagePullPolicy: corev1.PullIfNotPresent,
						Args:            []string{"serve", "--name", "$(POD_NAME)", "--tcp", "8080", "--udp", "8080", "--http", "8081"},
						Env: []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{
							FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"},
						}}},
						Ports: []corev1.ContainerPort{{Name: "tcp", ContainerPort: 8080}, {Name: "http", ContainerPort: 8081}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8081)}},
							PeriodSeconds: 2,
						},
					}},
				},
			},
		},
	}
}

func webService(ns, name string, typ corev1.ServiceType) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{
			Type:     typ,
			Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{
				{Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
			},
		},
	}
}

func nodeOf(kc *framework.KubeletCluster, name string) *framework.KubeletNode {
	for _, kn := range kc.Nodes {
		if kn.Name == name {
			return kn
		}
	}
	return nil
}

func daemonPods(ctx context.Context, t *testing.T, kc *framework.KubeletCluster, ds *appsv1.DaemonSet) []*corev1.Pod {
	t.Helper()
	sel := metav1.FormatLabelSelector(ds.Spec.Selector)
	l, err := kc.Admin.CoreV1().Pods(ds.Namespace).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		t.Fatal(err)
	}
	var out []*corev1.Pod
	nodes := map[string]bool{}
	for i := range l.Items {
		p := &l.Items[i]
		if p.DeletionTimestamp != nil {
			continue
		}
		out = append(out, p)
		nodes[p.Spec.NodeName] = true
	}
	if len(nodes) != 2 {
		t.Errorf("miniproxy pods on %d nodes, want 2", len(nodes))
	}
	return out
}

// checkInClusterPod: Running and Ready (readiness passed), never restarted
// (liveness never failed), and configured only by its ServiceAccount: no
// kubeconfig flag, the token volume kubelet projects.
func checkInClusterPod(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if p.Status.Phase != corev1.PodRunning {
		t.Errorf("%s phase %s", p.Name, p.Status.Phase)
	}
	ready := slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
		return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
	})
	if !ready {
		t.Errorf("%s not Ready", p.Name)
	}
	for _, cs := range p.Status.ContainerStatuses {
		if cs.RestartCount != 0 {
			t.Errorf("%s container %s restarted %d times (last: %+v)", p.Name, cs.Name, cs.RestartCount, cs.LastTerminationState)
		}
	}
	for _, a := range p.Spec.Containers[0].Command {
		if strings.Contains(a, "kubeconfig") {
			t.Errorf("%s runs with %s; want the in-cluster config", p.Name, a)
		}
	}
	if !slices.ContainsFunc(p.Spec.Volumes, func(v corev1.Volume) bool {
		return strings.HasPrefix(v.Name, "kube-api-access-") && v.Projected != nil
	}) {
		t.Errorf("%s has no projected ServiceAccount token volume", p.Name)
	}
}

func waitDeploymentReady(ctx context.Context, t *testing.T, kc *framework.KubeletCluster, ns, name string, n int) []*corev1.Pod {
	t.Helper()
	var pods []*corev1.Pod
	err := framework.WaitFor(ctx, 3*time.Minute, 250*time.Millisecond, func() (bool, error) {
		l, err := kc.Admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return false, nil
		}
		pods = pods[:0]
		for i := range l.Items {
			p := &l.Items[i]
			if p.DeletionTimestamp == nil && p.Status.PodIP != "" && slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
				return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
			}) {
				pods = append(pods, p)
			}
		}
		return len(pods) == n, nil
	})
	if err != nil {
		dumpPods(ctx, t, kc, ns)
		t.Fatalf("Deployment %s/%s: %d of %d pods Ready: %v", ns, name, len(pods), n, err)
	}
	return pods
}

// checkSlices: the endpointslice controller (not the test) published every
// pod as ready.
func checkSlices(ctx context.Context, t *testing.T, kc *framework.KubeletCluster, ns, svc string, pods []*corev1.Pod) {
	t.Helper()
	err := framework.WaitFor(ctx, time.Minute, 250*time.Millisecond, func() (bool, error) {
		l, err := kc.Admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
		if err != nil {
			return false, nil
		}
		ready := map[string]bool{}
		for _, s := range l.Items {
			if s.Labels[discoveryv1.LabelManagedBy] != "endpointslice-controller.k8s.io" {
				return false, fmt.Errorf("slice %s managed by %q", s.Name, s.Labels[discoveryv1.LabelManagedBy])
			}
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && *ep.Conditions.Ready && len(ep.Addresses) > 0 {
					ready[ep.Addresses[0]] = true
				}
			}
		}
		for _, p := range pods {
			if !ready[p.Status.PodIP] {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Errorf("EndpointSlices of %s/%s: %v", ns, svc, err)
	}
}

// checkTerminating deletes a pod and watches the controller publish it as
// terminating (not ready) before it goes away.
func checkTerminating(ctx context.Context, t *testing.T, kc *framework.KubeletCluster, ns, svc string, pod *corev1.Pod) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	w, err := kc.Admin.DiscoveryV1().EndpointSlices(ns).Watch(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	if err := kc.Admin.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for ev := range w.ResultChan() {
		s, ok := ev.Object.(*discoveryv1.EndpointSlice)
		if !ok {
			continue
		}
		for _, ep := range s.Endpoints {
			c := ep.Conditions
			if len(ep.Addresses) > 0 && ep.Addresses[0] == pod.Status.PodIP && c.Terminating != nil && *c.Terminating {
				if c.Ready != nil && *c.Ready {
					t.Errorf("terminating endpoint %s still ready", pod.Status.PodIP)
				}
				return
			}
		}
	}
	t.Errorf("deleting %s: its endpoint %s was never published as terminating", pod.Name, pod.Status.PodIP)
}

func dumpPods(ctx context.Context, t *testing.T, kc *framework.KubeletCluster, ns string) {
	t.Helper()
	l, err := kc.Admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Logf("list pods: %v", err)
		return
	}
	for _, p := range l.Items {
		b, _ := json.MarshalIndent(p.Status, "", " ")
		t.Logf("pod %s/%s on %q:\n%s", p.Namespace, p.Name, p.Spec.NodeName, b)
	}
	ev, err := kc.Admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err == nil {
		for _, e := range ev.Items {
			t.Logf("event %s %s: %s %s", e.InvolvedObject.Name, e.Type, e.Reason, e.Message)
		}
	}
}
