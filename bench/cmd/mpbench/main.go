// Command mpbench is `make bench`: miniproxy against upstream kube-proxy on
// the same machine, in the same run, against the same objects.
//
// It starts a real etcd + kube-apiserver and one node namespace through
// test/e2e/framework, bulk-creates N selector-less ClusterIP Services with
// one EndpointSlice of 5 endpoints each (written directly, parallel
// writers, high-QPS client), and then runs each proxy in turn in the node
// namespace: cold start (process start → first complete sync, from the
// proxy's kubeproxy_sync_proxy_rules_last_timestamp_seconds), RSS and CPU
// after that sync, first-connect latency to the Service created last, and one
// change at a time (add a Service: API write → VIP answers a connect from a
// pod; remove one endpoint: the proxy's network_programming_duration), then
// a churn phase (a steady stream of EndpointSlice updates, by default 50/s
// for 60 s over the first 1,000 Services: network programming p50/p99 from
// the proxy's histogram, syncs and CPU in the window). The node's tables are deleted between proxies. Results go to
// <out>/<date>.json, <out>/latest.md and PNG plots.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/miniproxy/miniproxy/internal/machine"
	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

type options struct {
	ns         []int
	impls      []string
	modes      []string
	timeout    time.Duration
	reps       int
	connects   int
	workers    int
	out        string
	quick      bool
	skipReason string
	churnRate  float64
	churnDur   time.Duration
	keep       bool
	heapProf   bool
	cpuProf    bool
}

// Run is one proxy in one mode at one N.
type Run struct {
	Impl       string  `json:"impl"`
	Mode       string  `json:"mode"`
	N          int     `json:"services"`
	ColdStartS float64 `json:"cold_start_s"` // process start → last-created VIP answers; -1 when it timed out
	FirstSyncS float64 `json:"first_sync_reported_s"`
	TimedOut   bool    `json:"timed_out,omitempty"`
	TimeoutS   float64 `json:"timeout_s"`
	CPUColdS   float64 `json:"cpu_to_first_sync_s"`
	RSSMB      float64 `json:"rss_after_sync_mb"`
	RSSMaxMB   float64 `json:"rss_after_changes_mb"`
	// RSSSettledMB is read settleRSS after the first sync: the peak at the
	// moment the VIP answers includes buffers the proxy frees right after.
	RSSSettledMB  float64       `json:"rss_settled_mb,omitempty"`
	TargetAfterMs float64       `json:"target_answer_after_sync_ms"`
	FirstConnect  *Stats        `json:"first_connect_target"`
	DirectConnect *Stats        `json:"first_connect_direct_pod"`
	Changes       *changeResult `json:"changes,omitempty"`
	Churn         *churnResult  `json:"churn,omitempty"`
	Error         string        `json:"error,omitempty"`
	Load          string        `json:"loadavg_at_start"`
	Started       time.Time     `json:"started"`
}

// Result is the whole run, as written to <date>.json.
type Result struct {
	Date       time.Time `json:"date"`
	Host       string    `json:"host"`
	Kernel     string    `json:"kernel"`
	CPUs       int       `json:"cpus"`
	GoVersion  string    `json:"go_version"`
	K8sVersion string    `json:"k8s_version"`
	Quick      bool      `json:"quick"`
	Ns         []int     `json:"services"`
	Endpoints  int       `json:"endpoints_per_service"`
	LoadBefore string    `json:"loadavg_before"`
	LoadAfter  string    `json:"loadavg_after"`
	Create     []Create  `json:"bulk_create"`
	Runs       []Run     `json:"runs"`
	Notes      []string  `json:"notes"`
}

// Create records how long the bulk writes took.
type Create struct {
	From, To int
	Seconds  float64
}

func main() {
	var o options
	var ns, impls, modes string
	flag.StringVar(&ns, "n", envOr("BENCH_N", "1000,10000"), "comma-separated Service counts (env BENCH_N)")
	flag.StringVar(&impls, "impls", envOr("BENCH_IMPLS", "miniproxy,kube-proxy"), "proxies to run")
	flag.StringVar(&modes, "modes", envOr("BENCH_MODES", "iptables,nftables"), "modes to run")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "bound on one proxy's cold start; longer is recorded as timed out")
	flag.IntVar(&o.reps, "reps", 10, "repetitions of each one-change measurement")
	flag.IntVar(&o.connects, "connects", 30, "fresh connections per first-connect measurement")
	flag.IntVar(&o.workers, "workers", 32, "parallel API writers for the bulk creation")
	flag.StringVar(&o.out, "out", "bench/results", "results directory")
	flag.BoolVar(&o.quick, "quick", os.Getenv("QUICK") == "1", "N = 1,000 only (env QUICK=1)")
	flag.StringVar(&o.skipReason, "skip-note", "", "note on N values left out, written to the results")
	flag.Float64Var(&o.churnRate, "churn-rate", 50, "EndpointSlice updates per second during the churn phase")
	churnDefault := 60 * time.Second
	if v := os.Getenv("BENCH_CHURN_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mpbench: bad BENCH_CHURN_DURATION %q\n", v)
			os.Exit(2)
		}
		churnDefault = d
	}
	flag.DurationVar(&o.churnDur, "churn-duration", churnDefault, "length of the churn phase, 0 disables it (env BENCH_CHURN_DURATION; 20s with -quick unless set)")
	flag.BoolVar(&o.keep, "keep", os.Getenv("BENCH_KEEP") == "1", "keep the work dir (proxy logs, apiserver data) and print its path (env BENCH_KEEP=1)")
	flag.BoolVar(&o.heapProf, "heap-profile", os.Getenv("BENCH_HEAP_PROFILE") == "1", "run miniproxy with --profiling and save its heap profile after the one-change phase as <out>/heap-<mode>-<N>.pb.gz (env BENCH_HEAP_PROFILE=1)")
	flag.BoolVar(&o.cpuProf, "cpu-profile", os.Getenv("BENCH_CPU_PROFILE") == "1", "run miniproxy with --profiling and save CPU profiles of its first 6 s (cold start) and of the one-change phase as <out>/cpu-{cold,changes}-<mode>-<N>.pb.gz (env BENCH_CPU_PROFILE=1)")
	var so soakOptions
	flag.DurationVar(&so.dur, "soak", 0, "soak mode: miniproxy alone under continuous churn for this long per mode, sampled for leaks (env SOAK via bench/run.sh); -n gives N (default 1000)")
	flag.DurationVar(&so.sample, "soak-sample", 10*time.Second, "soak: sampling interval")
	flag.DurationVar(&so.warmup, "soak-warmup", 0, "soak: leading part left out of the verdict (default 10% of -soak, at least until the ephemeral Services' window is full)")
	flag.DurationVar(&so.svcInterval, "soak-svc-interval", time.Second, "soak: one ephemeral Service created (and the oldest deleted) per interval")
	flag.IntVar(&so.svcWindow, "soak-svc-window", 10, "soak: ephemeral Services alive at once")
	soakReport := flag.String("soak-report-from", "", "soak result JSON: only rewrite its markdown report and plot")
	merge := flag.String("report-from", "", "comma-separated result JSON files: merge their runs and only write the report")
	flag.Parse()
	if *merge != "" {
		if err := reportFrom(o.out, strings.Split(*merge, ",")); err != nil {
			fmt.Fprintf(os.Stderr, "mpbench: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if *soakReport != "" {
		if err := soakReportFrom(o.out, *soakReport); err != nil {
			fmt.Fprintf(os.Stderr, "mpbench: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if so.dur > 0 {
		explicit := os.Getenv("BENCH_N") != ""
		flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "n" })
		if !explicit {
			ns = "1000"
		}
		if so.warmup == 0 {
			// 10 %, but at least until the ephemeral window is full.
			so.warmup = max(so.dur/10, time.Duration(so.svcWindow)*so.svcInterval+so.sample)
		}
		if o.churnRate <= 0 || so.sample <= 0 || so.svcInterval <= 0 || so.svcWindow < 1 {
			fmt.Fprintf(os.Stderr, "mpbench: -churn-rate, -soak-sample, -soak-svc-interval and -soak-svc-window must be positive\n")
			os.Exit(2)
		}
	}
	if o.quick {
		ns = "1000"
		explicit := os.Getenv("BENCH_CHURN_DURATION") != ""
		flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "churn-duration" })
		if !explicit {
			o.churnDur = 20 * time.Second
		}
	}
	if o.churnDur > 0 && o.churnRate <= 0 {
		fmt.Fprintf(os.Stderr, "mpbench: -churn-rate must be positive\n")
		os.Exit(2)
	}
	for _, f := range strings.Split(ns, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || v <= 0 {
			fmt.Fprintf(os.Stderr, "mpbench: bad -n %q\n", ns)
			os.Exit(2)
		}
		o.ns = append(o.ns, v)
	}
	o.impls = strings.Split(impls, ",")
	o.modes = strings.Split(modes, ",")
	if so.dur > 0 {
		if err := runSoak(o, so); err != nil {
			fmt.Fprintf(os.Stderr, "mpbench: soak FAILED: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "mpbench: FAILED: %v\n", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[mpbench %s] %s\n", time.Now().UTC().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func run(o options) error {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	env, err := framework.NewEnv(framework.Options{Log: logf, KeepWorkDir: o.keep})
	if err != nil {
		return err
	}
	defer func() {
		if err := env.Close(); err != nil {
			logf("teardown: %v", err)
		}
	}()
	res := &Result{
		Date: time.Now().UTC(), CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), K8sVersion: framework.K8sVersion,
		Quick: o.quick, Ns: o.ns, Endpoints: epsPerSvc, LoadBefore: machine.LoadAvg(),
	}
	res.Host, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		res.Kernel = strings.TrimSpace(string(b))
	}
	if o.skipReason != "" {
		res.Notes = append(res.Notes, o.skipReason)
	}
	stamp := res.Date.Format("2006-01-02-1504")
	jsonPath := filepath.Join(o.out, stamp+".json")
	save := func() {
		res.LoadAfter = machine.LoadAvg()
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
			logf("write %s: %v", jsonPath, err)
		}
	}

	cluster, err := framework.StartCluster(ctx, env)
	if err != nil {
		return err
	}
	nodes, err := cluster.AddNodes(ctx, "bench", 1)
	if err != nil {
		return err
	}
	node := nodes[0]
	cfg := rest.CopyConfig(cluster.CP.AdminConfig)
	// Bulk creation is bounded by the apiserver, not the client limiter.
	cfg.QPS, cfg.Burst = 5000, 10000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("bench client: %w", err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace: %w", err)
	}
	// Five real listeners behind every measured Service, and a client pod.
	var live []string
	for i := 0; i < epsPerSvc; i++ {
		pod, err := node.NewPod(ctx, fmt.Sprintf("srv-%d", i))
		if err != nil {
			return err
		}
		if err := pod.Serve(ctx, podPort, 0); err != nil {
			return err
		}
		live = append(live, pod.IP.String())
	}
	client, err := node.NewPod(ctx, "client")
	if err != nil {
		return err
	}
	logDir := filepath.Join(env.WorkDir, "proxy-logs")
	if o.keep {
		logf("keeping the work dir: proxy logs in %s", logDir)
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return fmt.Errorf("log dir: %w", err)
	}
	mp, err := env.MiniproxyBin()
	if err != nil {
		return err
	}
	bins := map[string]string{"miniproxy": mp, "kube-proxy": filepath.Join(env.K8sBin, "kube-proxy")}

	have := 0
	prevTarget := ""
	for _, n := range o.ns {
		if n > have {
			logf("bulk-creating Services %d..%d (× %d endpoints)", have, n, epsPerSvc)
			t0 := time.Now()
			if err := bulkCreate(ctx, cs, have, n, o.workers); err != nil {
				return err
			}
			res.Create = append(res.Create, Create{From: have, To: n, Seconds: round3(time.Since(t0).Seconds())})
			logf("created %d Services in %v", n-have, time.Since(t0).Round(time.Millisecond))
			have = n
		}
		// The measured Service is the newest: last in creation order and,
		// by name, last in any sorted rule list.
		if prevTarget != "" {
			if err := deleteService(ctx, cs, prevTarget); err != nil {
				return err
			}
		}
		target := fmt.Sprintf("zzz-target-%d", n)
		targetIP, err := createService(ctx, cs, target, live, node.Name, time.Time{})
		if err != nil {
			return err
		}
		prevTarget = target
		for _, mode := range o.modes {
			for _, impl := range o.impls {
				spec := proxySpec{Impl: impl, Mode: mode, Bin: bins[impl]}
				spec.Args = proxyArgs(impl, mode, cluster.CP.AdminKubeconfig, node.Name)
				if (o.heapProf || o.cpuProf) && impl == "miniproxy" {
					spec.Args = append(spec.Args, "--profiling")
				}
				r := benchOne(ctx, o, cs, node, client, spec, n, targetIP, live, logDir)
				res.Runs = append(res.Runs, r)
				save()
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
		}
	}
	save()
	logf("wrote %s", jsonPath)
	if err := writeReport(o.out, res, jsonPath); err != nil {
		return err
	}
	return nil
}

// cleanNode deletes every table in the node namespace (iptables-nft tables
// are nf_tables tables too) and its conntrack entries, so each proxy starts
// from an empty kernel. The namespace is this run's own.
func cleanNode(ctx context.Context, node *framework.Node) error {
	if _, err := node.NS.Run(ctx, "nft", "flush", "ruleset"); err != nil {
		return err
	}
	if _, err := node.NS.Run(ctx, "conntrack", "-F"); err != nil {
		logf("conntrack -F in %s: %v", node.NS.Name, err)
	}
	return nil
}

func benchOne(ctx context.Context, o options, cs kubernetes.Interface, node *framework.Node, client *framework.Pod, spec proxySpec, n int, targetIP string, live []string, logDir string) Run {
	r := Run{Impl: spec.Impl, Mode: spec.Mode, N: n, TimeoutS: o.timeout.Seconds(), Load: machine.LoadAvg(), Started: time.Now().UTC()}
	logf("%s at %d Services: starting (load %s)", spec, n, r.Load)
	if err := cleanNode(ctx, node); err != nil {
		r.Error = err.Error()
		return r
	}
	p, err := startProxy(node, spec, logDir, strconv.Itoa(n))
	if err != nil {
		r.Error = err.Error()
		return r
	}
	profiling := o.cpuProf && spec.Impl == "miniproxy"
	var coldProf <-chan error
	if profiling {
		coldProf = p.cpuProfileFromStart(ctx, 6, filepath.Join(o.out, fmt.Sprintf("cpu-cold-%s-%d.pb.gz", spec.Mode, n)))
	}
	defer func() {
		p.stop(20 * time.Second)
		if err := cleanNode(context.Background(), node); err != nil {
			logf("clean node after %s: %v", spec, err)
		}
	}()
	synced, err := p.waitFirstSync(ctx, o.timeout)
	r.CPUColdS = round3(p.cpuSeconds())
	r.RSSMB = round3(p.rssMB())
	if errors.Is(err, errTimedOut) {
		r.TimedOut, r.ColdStartS = true, -1
		logf("%s at %d: no complete sync within %v (timed out)", spec, n, o.timeout)
		return r
	}
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.FirstSyncS = round3(synced.Sub(p.start).Seconds())
	// The proxy's "synced" is only as complete as its view of the API at
	// that moment; cold start ends when the Service created last (whose
	// slice is also last) answers through its VIP.
	target := fmt.Sprintf("%s:%d", targetIP, svcPort)
	left := o.timeout - time.Since(p.start)
	if left < 30*time.Second {
		left = 30 * time.Second
	}
	answered, err := waitAnswer(ctx, client, target, 5*time.Millisecond, left)
	r.CPUColdS = round3(p.cpuSeconds())
	r.RSSMB = round3(p.rssMB())
	if err != nil {
		r.TimedOut, r.ColdStartS = true, -1
		r.TimeoutS = round3(time.Since(p.start).Seconds())
		r.Error = fmt.Sprintf("first sync reported after %.1fs, but the last-created Service's VIP did not answer within %.0fs of process start", r.FirstSyncS, r.TimeoutS)
		logf("%s at %d: %s", spec, n, r.Error)
		return r
	}
	r.ColdStartS = round3(answered.Sub(p.start).Seconds())
	r.TargetAfterMs = round3(ms(answered.Sub(synced)))
	logf("%s at %d: first sync reported after %.3fs, last Service answers after %.3fs, RSS %.1f MB, CPU %.2fs", spec, n, r.FirstSyncS, r.ColdStartS, r.RSSMB, r.CPUColdS)
	if r.FirstConnect, err = firstConnect(ctx, client, target, o.connects); err != nil {
		r.Error = err.Error()
		return r
	}
	if r.DirectConnect, err = firstConnect(ctx, client, fmt.Sprintf("%s:%d", live[0], podPort), o.connects); err != nil {
		r.Error = err.Error()
		return r
	}
	if wait := time.Until(synced.Add(settleRSS)); wait > 0 {
		time.Sleep(wait)
	}
	r.RSSSettledMB = round3(p.rssMB())
	logf("%s at %d: RSS %v after the first sync: %.1f MB", spec, n, settleRSS, r.RSSSettledMB)
	var changesProf <-chan error
	if profiling {
		if err := <-coldProf; err != nil {
			logf("%s at %d: cold-start CPU profile: %v", spec, n, err)
		}
		// measureChanges spends about 2.5 s per change, two changes per rep.
		secs := 5*o.reps + 2
		changesProf = goErr(func() error {
			return p.saveProfile(ctx, fmt.Sprintf("profile?seconds=%d", secs), filepath.Join(o.out, fmt.Sprintf("cpu-changes-%s-%d.pb.gz", spec.Mode, n)))
		})
	}
	ch, created := measureChanges(ctx, cs, p, client, live, node.Name, n, o.reps, fmt.Sprintf("%s-%s-%d", spec.Impl, spec.Mode, n))
	if changesProf != nil {
		if err := <-changesProf; err != nil {
			logf("%s at %d: one-change CPU profile: %v", spec, n, err)
		} else {
			logf("%s at %d: CPU profiles in %s/cpu-{cold,changes}-%s-%d.pb.gz", spec, n, o.out, spec.Mode, n)
		}
	}
	r.Changes = ch
	r.RSSMaxMB = round3(p.rssMB())
	if o.heapProf && spec.Impl == "miniproxy" {
		path := filepath.Join(o.out, fmt.Sprintf("heap-%s-%d.pb.gz", spec.Mode, n))
		if err := p.saveProfile(ctx, "heap?gc=1", path); err != nil {
			logf("%s at %d: heap profile: %v", spec, n, err)
		} else {
			logf("%s at %d: heap profile in %s (go tool pprof -sample_index=inuse_space %s)", spec, n, path, path)
		}
	}
	if ch.AddAnswer != nil {
		logf("%s at %d: add Service → VIP answers p50 %.1f ms p99 %.1f ms", spec, n, ch.AddAnswer.P50, ch.AddAnswer.P99)
	}
	if ch.RemoveProg != nil {
		logf("%s at %d: remove endpoint programmed p50 %.1f ms p99 %.1f ms", spec, n, ch.RemoveProg.P50, ch.RemoveProg.P99)
	}
	for _, name := range created {
		if err := deleteService(ctx, cs, name); err != nil {
			logf("%v", err)
		}
	}
	if o.churnDur > 0 && ctx.Err() == nil {
		logf("%s at %d: churn, %.0f EndpointSlice updates/s for %v", spec, n, o.churnRate, o.churnDur)
		c := measureChurn(ctx, cs, p, n, o.churnRate, o.churnDur)
		r.Churn = c
		logf("%s at %d: churn achieved %.1f/s (%d writes, %d errors), %.0f programming observations p50 %.1f ms p99 %.1f ms, %.0f syncs, CPU %.2fs (%.2f ms/change), RSS %.1f MB, settled %.1fs after the last write",
			spec, n, c.RateAchieved, c.Writes, c.WriteErrors, c.ProgN, c.ProgP50, c.ProgP99, c.Syncs, c.CPUS, c.CPUPerChange, c.RSSMB, c.SettleS)
		for _, e := range c.Errors {
			logf("%s at %d: churn: %s", spec, n, e)
		}
	}
	return r
}

// settleRSS is how long after the first sync the settled RSS is read.
const settleRSS = 3 * time.Second

func goErr(f func() error) <-chan error {
	c := make(chan error, 1)
	go func() { c <- f() }()
	return c
}

// reportFrom merges the runs of several result files (e.g. a quick 1k run and
// a later 10k run) into one report; later files win for the same proxy,
// mode and N.
func reportFrom(out string, files []string) error {
	var merged *Result
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("read %s: %w", f, err)
		}
		var r Result
		if err := json.Unmarshal(b, &r); err != nil {
			return fmt.Errorf("parse %s: %w", f, err)
		}
		upgradeV1(&r)
		if merged == nil {
			merged = &r
			continue
		}
		for _, run := range r.Runs {
			replaced := false
			for i := range merged.Runs {
				m := &merged.Runs[i]
				if m.Impl == run.Impl && m.Mode == run.Mode && m.N == run.N {
					*m, replaced = run, true
				}
			}
			if !replaced {
				merged.Runs = append(merged.Runs, run)
			}
		}
		for _, n := range r.Ns {
			if !slices.Contains(merged.Ns, n) {
				merged.Ns = append(merged.Ns, n)
			}
		}
		slices.Sort(merged.Ns)
		merged.Create = append(merged.Create, r.Create...)
		merged.Notes = append(merged.Notes, r.Notes...)
		merged.Quick = merged.Quick && r.Quick
		merged.LoadAfter = r.LoadAfter
		merged.Notes = append(merged.Notes, fmt.Sprintf("merged from %s (run %s, load %s → %s)", filepath.Base(f), r.Date.Format("15:04 UTC"), r.LoadBefore, r.LoadAfter))
	}
	if merged == nil {
		return errors.New("no result files")
	}
	return writeReport(out, merged, strings.Join(files, ", "))
}

// upgradeV1 converts results written before cold start was defined as "the
// last-created VIP answers": those stored the proxy's first-sync stamp as
// cold_start_s and the wait for the VIP after it separately.
func upgradeV1(r *Result) {
	for i := range r.Runs {
		run := &r.Runs[i]
		if run.FirstSyncS != 0 || run.ColdStartS <= 0 {
			continue
		}
		run.FirstSyncS = run.ColdStartS
		switch {
		case strings.Contains(run.Error, "did not answer"):
			run.TimedOut, run.TimeoutS = true, round3(run.ColdStartS+30)
			run.ColdStartS = -1
			run.Error = fmt.Sprintf("first sync reported after %.1fs, but the last-created Service's VIP did not answer within 30 s after it", run.FirstSyncS)
		case run.TargetAfterMs > 0:
			run.ColdStartS = round3(run.ColdStartS + run.TargetAfterMs/1000)
		}
	}
}
