// Command lab is `make lab`: it brings up a real control plane and a two-node
// namespace cluster (test/e2e/framework), runs miniproxy in one mode, creates
// a ClusterIP Service with three server pods, opens short connections from a
// client pod, and reports the per-endpoint distribution with a chi-square
// goodness-of-fit test against a uniform spread. Everything is torn down at
// the end, also on failure or Ctrl-C.
//
//	go run ./hack/lab --mode iptables --connections 1000 --out lab-report
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

type config struct {
	mode        string
	connections int
	out         string
	nodes       int
	replicas    int
}

func main() {
	cfg := config{}
	flag.StringVar(&cfg.mode, "mode", envOr("MODE", "iptables"), "proxy mode: iptables | nftables | ipvs (env MODE)")
	flag.IntVar(&cfg.connections, "connections", 1000, "short TCP connections to open through the VIP")
	flag.StringVar(&cfg.out, "out", "lab-report", "report directory")
	flag.IntVar(&cfg.nodes, "nodes", 2, "node namespaces")
	flag.IntVar(&cfg.replicas, "replicas", 3, "server pods behind the Service")
	flag.Parse()
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "lab: FAILED: %v\n", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// progress prints numbered steps with their duration.
type progress struct {
	start, stepStart time.Time
	n, total         int
	name             string
}

func (p *progress) step(name string) {
	p.done()
	p.n++
	p.name, p.stepStart = name, time.Now()
	fmt.Printf("[lab %6.1fs] step %d/%d: %s …\n", time.Since(p.start).Seconds(), p.n, p.total, name)
}

func (p *progress) done() {
	if p.name != "" {
		fmt.Printf("[lab %6.1fs]   done: %s (%.1fs)\n", time.Since(p.start).Seconds(), p.name, time.Since(p.stepStart).Seconds())
		p.name = ""
	}
}

func (p *progress) log(format string, args ...any) {
	fmt.Printf("[lab %6.1fs]   %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}

// Results is results.json.
type Results struct {
	Mode        string           `json:"mode"`
	Connections int              `json:"connections"`
	Errors      int              `json:"errors"`
	Endpoints   []EndpointResult `json:"endpoints"`
	ChiSquare   float64          `json:"chi_square"`
	DF          int              `json:"degrees_of_freedom"`
	PValue      float64          `json:"p_value"`
	Uniform     bool             `json:"consistent_with_uniform"` // p >= 0.01
	ElapsedSec  float64          `json:"connections_elapsed_seconds"`
	Service     string           `json:"service"`
	VIP         string           `json:"vip"`
	Client      string           `json:"client"`
	ClientNode  string           `json:"client_node"`
	Kernel      string           `json:"kernel"`
	GoVersion   string           `json:"go_version"`
	K8sVersion  string           `json:"kube_apiserver_version"`
	Timestamp   string           `json:"timestamp"`
}

// EndpointResult is one endpoint's share.
type EndpointResult struct {
	Name     string  `json:"name"`
	IP       string  `json:"ip"`
	Node     string  `json:"node"`
	SameNode bool    `json:"same_node_as_client"`
	Count    int     `json:"count"`
	Share    float64 `json:"share"`
	Expected float64 `json:"expected"`
}

func run(cfg config) (err error) {
	p := &progress{start: time.Now(), total: 8}
	p.step("checking prerequisites")
	if err := framework.RequireRoot(); err != nil {
		return err
	}
	env, err := framework.NewEnv(framework.Options{Log: p.log})
	if err != nil {
		return err
	}
	if _, err := env.MiniproxyBin(); err != nil {
		return err
	}
	stop := env.HandleSignals(nil)
	defer func() {
		p.step("tearing down")
		if cerr := env.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("teardown: %w", cerr)
		}
		stop()
		p.done()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	p.step("starting etcd + kube-apiserver " + framework.K8sVersion)
	cl, err := framework.StartCluster(ctx, env)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(env.K8sBin, "kubectl")); err == nil {
		p.log("kubectl: ip netns exec %s %s/kubectl --kubeconfig %s get nodes", cl.CP.NS.Name, env.K8sBin, cl.CP.AdminKubeconfig)
	}

	p.step(fmt.Sprintf("creating %d node namespaces", cfg.nodes))
	nodes, err := cl.AddNodes(ctx, "node", cfg.nodes)
	if err != nil {
		return err
	}

	p.step("starting miniproxy --proxy-mode=" + cfg.mode + " on every node")
	for _, n := range nodes {
		if _, err := cl.StartProxy(ctx, n, framework.ProxyOptions{Mode: cfg.mode}); err != nil {
			return err
		}
	}

	p.step(fmt.Sprintf("creating Service lab/web and %d server pods + 1 client pod", cfg.replicas))
	if _, err := cl.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "lab"}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("namespace lab: %w", err)
	}
	svc, err := cl.CreateService(ctx, framework.ClusterIPService("lab", "web"))
	if err != nil {
		return err
	}
	dep, err := cl.Deploy(ctx, framework.DeploymentSpec{Namespace: "lab", Name: "web", Replicas: cfg.replicas, Nodes: nodes})
	if err != nil {
		return err
	}
	client, err := nodes[0].NewPod(ctx, "client")
	if err != nil {
		return err
	}
	vip := framework.VIP(svc, "tcp")
	p.log("Service lab/web ClusterIP %s, pods %v, client on %s", vip, dep.PodNames(), client.Node.Name)

	p.step("waiting until the VIP reaches every endpoint")
	want := dep.PodNames()
	err = framework.WaitFor(ctx, 60*time.Second, 200*time.Millisecond, func() (bool, error) {
		c, err := client.TCPCounts(ctx, vip, 60)
		return err == nil && c.Errors == 0 && len(c.ByName) == len(want), err
	})
	if err != nil {
		return fmt.Errorf("VIP %s did not reach all of %v: %w", vip, want, err)
	}

	p.step(fmt.Sprintf("opening %d short TCP connections to %s", cfg.connections, vip))
	t0 := time.Now()
	counts, err := client.TCPCounts(ctx, vip, cfg.connections)
	if err != nil {
		return err
	}
	elapsed := time.Since(t0)

	res := analyse(cfg, counts, dep.Pods(), client, elapsed)
	res.Service, res.VIP = "lab/web", vip
	if err := writeReport(cfg.out, res); err != nil {
		return err
	}
	p.done()
	fmt.Print(markdown(res))
	fmt.Printf("report: %s\n", filepath.Join(cfg.out, "report.md"))
	if res.Errors > 0 {
		return fmt.Errorf("%d of %d connections failed (first: %v)", res.Errors, cfg.connections, counts.FirstErr)
	}
	return nil
}

func analyse(cfg config, counts framework.Counts, pods []*framework.Pod, client *framework.Pod, elapsed time.Duration) Results {
	res := Results{
		Mode: cfg.mode, Connections: cfg.connections, Errors: counts.Errors,
		Client: client.Name, ClientNode: client.Node.Name,
		ElapsedSec: elapsed.Seconds(), Kernel: kernel(), GoVersion: runtime.Version(),
		K8sVersion: framework.K8sVersion, Timestamp: time.Now().UTC().Format(time.RFC3339),
	}
	total := counts.Total()
	expected := float64(total) / float64(len(pods))
	obs := make([]float64, 0, len(pods))
	for _, p := range pods {
		n := counts.ByName[p.Name]
		obs = append(obs, float64(n))
		res.Endpoints = append(res.Endpoints, EndpointResult{
			Name: p.Name, IP: p.IP.String(), Node: p.Node.Name, SameNode: p.Node == client.Node,
			Count: n, Share: float64(n) / math.Max(1, float64(total)), Expected: expected,
		})
	}
	res.ChiSquare, res.DF, res.PValue = chiSquareUniform(obs)
	res.Uniform = res.PValue >= 0.01
	return res
}

func markdown(r Results) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# miniproxy lab: endpoint distribution (%s mode)\n\n", r.Mode)
	fmt.Fprintf(&b, "%d short TCP connections from pod `%s` (node %s) to ClusterIP Service `%s` (%s), %d failed, in %.2fs.\n\n",
		r.Connections, r.Client, r.ClientNode, r.Service, r.VIP, r.Errors, r.ElapsedSec)
	b.WriteString("| endpoint | IP | node | same node as client | connections | share | expected |\n|---|---|---|---|---:|---:|---:|\n")
	for _, e := range r.Endpoints {
		fmt.Fprintf(&b, "| %s | %s | %s | %v | %d | %.1f%% | %.1f |\n", e.Name, e.IP, e.Node, e.SameNode, e.Count, 100*e.Share, e.Expected)
	}
	verdict := "consistent with a uniform spread (p ≥ 0.01)"
	if !r.Uniform {
		verdict = "NOT consistent with a uniform spread (p < 0.01)"
	}
	fmt.Fprintf(&b, "\nChi-square goodness of fit against uniform: χ² = %.3f, df = %d, p = %.4f — %s.\n\n", r.ChiSquare, r.DF, r.PValue, verdict)
	fmt.Fprintf(&b, "kube-apiserver %s, kernel %s, %s, %s.\n", r.K8sVersion, r.Kernel, r.GoVersion, r.Timestamp)
	return b.String()
}

func writeReport(dir string, r Results) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("report dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "report.md"), []byte(markdown(r)), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}

func kernel() string {
	out, err := exec.Command("uname", "-r").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// chiSquareUniform tests observed counts against equal expected counts and
// returns the statistic, degrees of freedom and the upper-tail p-value.
func chiSquareUniform(obs []float64) (stat float64, df int, p float64) {
	if len(obs) < 2 {
		return 0, 0, 1
	}
	total := 0.0
	for _, o := range obs {
		total += o
	}
	if total == 0 {
		return 0, len(obs) - 1, 1
	}
	e := total / float64(len(obs))
	for _, o := range obs {
		stat += (o - e) * (o - e) / e
	}
	df = len(obs) - 1
	return stat, df, upperGammaQ(float64(df)/2, stat/2)
}

// upperGammaQ is the regularized upper incomplete gamma function Q(a, x),
// the chi-square survival function at 2x with 2a degrees of freedom. It uses
// the power series for x < a+1 and Lentz's continued fraction otherwise.
func upperGammaQ(a, x float64) float64 {
	if x <= 0 {
		return 1
	}
	lg, _ := math.Lgamma(a)
	prefix := math.Exp(-x + a*math.Log(x) - lg)
	if x < a+1 {
		sum, term := 1/a, 1/a
		for n := 1; n < 1000; n++ {
			term *= x / (a + float64(n))
			sum += term
			if math.Abs(term) < math.Abs(sum)*1e-15 {
				break
			}
		}
		return 1 - prefix*sum
	}
	const tiny = 1e-300
	b := x + 1 - a
	c := 1 / tiny
	d := 1 / b
	h := d
	for i := 1; i < 1000; i++ {
		an := -float64(i) * (float64(i) - a)
		b += 2
		d = an*d + b
		if math.Abs(d) < tiny {
			d = tiny
		}
		c = b + an/c
		if math.Abs(c) < tiny {
			c = tiny
		}
		d = 1 / d
		delta := d * c
		h *= delta
		if math.Abs(delta-1) < 1e-15 {
			break
		}
	}
	return prefix * h
}
