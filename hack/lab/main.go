// Command lab is `make lab`: the NAT-selection study. For every proxy mode it
// brings up a real control plane and a two-node namespace cluster
// (test/e2e/framework), runs miniproxy in that mode, and measures how the
// kernel rules pick an endpoint — once per connection, then pinned by
// conntrack — and what that means for gRPC:
//
//	spread    1,000 TCP connections and 1,000 UDP flows over 3 and 10 endpoints, chi-square
//	pin       one TCP connection, 1,000 requests, its conntrack entry; endpoint set changes
//	grpc      one channel, a channel pool, dns:/// + round_robin (CoreDNS), MaxConnectionAge,
//	          miniproxy's own resolver; scale 3 → 6 while the client runs
//	stale     a UDP flow keeping its source port while its endpoint is removed, with and
//	          without --conntrack-cleanup
//	affinity  sessionAffinity ClientIP before and after its timeout
//
// It writes lab-report/report.md, results.json and PNG plots. Everything is
// torn down at the end, also on failure or Ctrl-C.
//
//	go run ./hack/lab --mode iptables,nftables --experiment all --out lab-report
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// experiments in the order they run inside one cluster.
var allExperiments = []string{"spread", "pin", "stale", "affinity", "grpc"}

type config struct {
	modes       []string
	experiments []string
	out         string
	connections int
	coredns     string // CoreDNS binary; "" skips grpc (c)
}

func (c config) has(exp string) bool { return slices.Contains(c.experiments, exp) }

func main() {
	var mode, exp string
	cfg := config{}
	flag.StringVar(&mode, "mode", envOr("MODE", "iptables,nftables"), "comma-separated proxy modes (env MODE); ipvs needs an ip_vs kernel")
	flag.StringVar(&exp, "experiment", envOr("EXPERIMENT", "all"), "all or comma-separated: "+strings.Join(allExperiments, ","))
	flag.IntVar(&cfg.connections, "connections", 1000, "connections / flows / RPCs per measurement")
	flag.StringVar(&cfg.out, "out", "lab-report", "report directory")
	flag.StringVar(&cfg.coredns, "coredns", os.Getenv("MINIPROXY_COREDNS"), "CoreDNS binary built by hack/lab.sh (hack/coredns); empty skips gRPC (c)")
	flag.Parse()
	var err error
	if cfg.modes, cfg.experiments, err = parseSelection(mode, exp); err != nil {
		fmt.Fprintf(os.Stderr, "lab: %v\n", err)
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "lab: FAILED: %v\n", err)
		os.Exit(1)
	}
}

func parseSelection(mode, exp string) (modes, exps []string, err error) {
	for _, m := range strings.Split(mode, ",") {
		switch m = strings.TrimSpace(m); m {
		case "iptables", "nftables", "ipvs":
			modes = append(modes, m)
		case "all":
			modes = append(modes, "iptables", "nftables")
		case "":
		default:
			return nil, nil, fmt.Errorf("unknown mode %q (iptables, nftables, ipvs)", m)
		}
	}
	for _, e := range strings.Split(exp, ",") {
		switch e = strings.TrimSpace(e); {
		case e == "all":
			exps = append(exps, allExperiments...)
		case slices.Contains(allExperiments, e):
			exps = append(exps, e)
		case e == "":
		default:
			return nil, nil, fmt.Errorf("unknown experiment %q (all, %s)", e, strings.Join(allExperiments, ", "))
		}
	}
	if len(modes) == 0 || len(exps) == 0 {
		return nil, nil, errors.New("no mode or no experiment selected")
	}
	return slices.Compact(modes), slices.Compact(exps), nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// progress prints steps with their duration.
type progress struct {
	start, stepStart time.Time
	name             string
}

func (p *progress) step(name string) {
	p.done()
	p.name, p.stepStart = name, time.Now()
	fmt.Printf("[lab %6.1fs] %s …\n", time.Since(p.start).Seconds(), name)
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

func run(cfg config) error {
	p := &progress{start: time.Now()}
	res := &Results{
		Modes: cfg.modes, Experiments: cfg.experiments, Connections: cfg.connections,
		Kernel: kernel(), GoVersion: runtime.Version(), K8sVersion: framework.K8sVersion,
		Timestamp: time.Now().UTC().Format(time.RFC3339), IPVS: ipvsGuestResults(),
	}
	if err := framework.RequireRoot(); err != nil {
		return err
	}
	var failed []string
	for _, mode := range cfg.modes {
		mr := &ModeResult{Mode: mode}
		res.Results = append(res.Results, mr)
		if mode == "ipvs" {
			if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
				mr.Skipped = "this kernel has no ip_vs; the IPVS column comes from the qemu guest suite (make guest → e2e-results/ipvs-guest*.json)"
				p.log("ipvs: skipped: %s", mr.Skipped)
				continue
			}
		}
		t0 := time.Now()
		if err := runMode(cfg, mode, mr, p); err != nil {
			mr.Errors = append(mr.Errors, err.Error())
			failed = append(failed, fmt.Sprintf("%s: %v", mode, err))
		}
		mr.ElapsedSec = time.Since(t0).Seconds()
		// Write after every mode so an interrupted run still leaves numbers.
		if err := writeReport(cfg.out, res); err != nil {
			return err
		}
	}
	p.step("writing plots")
	res.ElapsedSec = time.Since(p.start).Seconds()
	if err := writePlots(cfg.out, res); err != nil {
		res.PlotError = err.Error()
	}
	if err := writeReport(cfg.out, res); err != nil {
		return err
	}
	p.done()
	fmt.Printf("\n%s\nreport: %s (%.0fs)\n", summary(res), filepath.Join(cfg.out, "report.md"), res.ElapsedSec)
	if len(failed) > 0 {
		return fmt.Errorf("%s", strings.Join(failed, "; "))
	}
	return nil
}

// lab is one mode's cluster.
type lab struct {
	cfg    config
	mode   string
	p      *progress
	env    *framework.Env
	cl     *framework.Cluster
	nodes  []*framework.Node
	client *framework.Pod
	web    *framework.Deployment
}

func runMode(cfg config, mode string, mr *ModeResult, p *progress) (err error) {
	p.step(mode + ": starting etcd + kube-apiserver " + framework.K8sVersion)
	env, err := framework.NewEnv(framework.Options{Log: p.log})
	if err != nil {
		return err
	}
	stop := env.HandleSignals(nil)
	defer func() {
		p.step(mode + ": tearing down")
		// Everything is gone after Close even when a process needed
		// SIGKILL (kube-apiserver sometimes outlives its 15 s grace while
		// watches drain); that is worth a note, not a failed study.
		if cerr := env.Close(); cerr != nil {
			mr.TeardownNote = cerr.Error()
			p.log("teardown note: %v", cerr)
		}
		stop()
		p.done()
	}()
	if _, err := env.MiniproxyBin(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cl, err := framework.StartCluster(ctx, env)
	if err != nil {
		return err
	}
	l := &lab{cfg: cfg, mode: mode, p: p, env: env, cl: cl}

	p.step(mode + ": 2 node namespaces, miniproxy --proxy-mode=" + mode)
	if l.nodes, err = cl.AddNodes(ctx, "node", 2); err != nil {
		return err
	}
	for _, n := range l.nodes {
		if _, err := cl.StartProxy(ctx, n, framework.ProxyOptions{Mode: mode}); err != nil {
			return err
		}
	}
	if _, err := cl.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	if l.client, err = l.nodes[0].NewPod(ctx, "client"); err != nil {
		return err
	}
	p.step(mode + ": Service lab/web, 3 server pods")
	if _, err := cl.CreateService(ctx, framework.ClusterIPService(ns, "web")); err != nil {
		return err
	}
	if l.web, err = cl.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "web", Replicas: 3, Nodes: l.nodes}); err != nil {
		return err
	}

	// Each experiment records its own error and the next one still runs.
	var errs []error
	runExp := func(name string, fn func(context.Context) error) {
		if !cfg.has(name) {
			return
		}
		if err := fn(ctx); err != nil {
			p.log("%s: %s FAILED: %v", mode, name, err)
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	runExp("spread", func(ctx context.Context) error { return l.spread(ctx, mr) })
	runExp("pin", func(ctx context.Context) error { return l.pin(ctx, mr) })
	runExp("stale", func(ctx context.Context) error { return l.stale(ctx, mr) })
	runExp("affinity", func(ctx context.Context) error { return l.affinity(ctx, mr) })
	runExp("grpc", func(ctx context.Context) error { return l.grpc(ctx, mr) })
	return errors.Join(errs...)
}

// ns is the Kubernetes namespace of every lab object.
const ns = "lab"

func kernel() string {
	out, err := exec.Command("uname", "-r").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}
