package main

// Soak mode (`mpbench -soak 15m`, `make soak`): miniproxy alone, one mode
// after the other, each for the soak duration under continuous churn, sampled
// every -soak-sample for the figures a leak would move: RSS, Go heap,
// goroutines, open fds, threads and the number of kernel objects it owns.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

// soakOptions are the soak's own knobs; the churn rate is -churn-rate.
type soakOptions struct {
	dur         time.Duration // per mode
	sample      time.Duration
	warmup      time.Duration // left out of the verdict (still plotted)
	svcInterval time.Duration // one ephemeral Service created (and the oldest deleted) per interval
	svcWindow   int           // ephemeral Services alive at once
}

// SoakSample is one reading of the proxy and the node's kernel. -1 marks a
// reading that failed.
type SoakSample struct {
	T          float64 `json:"t_s"` // since the churn started
	RSSMB      float64 `json:"rss_mb"`
	HeapMB     float64 `json:"heap_inuse_mb"` // go_memstats_heap_inuse_bytes
	Goroutines float64 `json:"goroutines"`    // go_goroutines
	FDs        float64 `json:"open_fds"`      // entries of /proc/<pid>/fd
	Threads    float64 `json:"threads"`       // Threads: of /proc/<pid>/status
	Tables     float64 `json:"kernel_tables"`
	Chains     float64 `json:"kernel_chains"`
	Rules      float64 `json:"kernel_rules"`
	Elements   float64 `json:"kernel_set_elements"` // nftables sets and maps; 0 for iptables
	Syncs      float64 `json:"syncs"`               // sync_proxy_rules_duration_seconds_count, cumulative
	SyncAgeS   float64 `json:"since_last_sync_s"`
	Writes     int64   `json:"slice_updates"` // cumulative
	WriteErrs  int64   `json:"slice_update_errors"`
	SvcCreated int64   `json:"services_created"`
	SvcDeleted int64   `json:"services_deleted"`
	Load1      float64 `json:"load1"`
}

// SoakRun is one mode's soak.
type SoakRun struct {
	Mode         string       `json:"mode"`
	Started      time.Time    `json:"started"`
	FirstSyncS   float64      `json:"first_sync_s"`
	DurationS    float64      `json:"duration_s"`
	RateAchieved float64      `json:"slice_updates_per_s"`
	LoadStart    string       `json:"loadavg_start"`
	LoadEnd      string       `json:"loadavg_end"`
	Samples      []SoakSample `json:"samples"`
	Profiles     []string     `json:"heap_profiles,omitempty"`
	Errors       []string     `json:"errors,omitempty"`
	Error        string       `json:"error,omitempty"`
}

// SoakResult is the whole soak, as written to soak-<date>.json.
type SoakResult struct {
	Date         time.Time `json:"date"`
	Host         string    `json:"host"`
	Kernel       string    `json:"kernel"`
	CPUs         int       `json:"cpus"`
	GoVersion    string    `json:"go_version"`
	K8sVersion   string    `json:"k8s_version"`
	N            int       `json:"services"`
	Endpoints    int       `json:"endpoints_per_service"`
	ChurnRate    float64   `json:"slice_updates_per_s_target"`
	ChurnSvcs    int       `json:"churned_services"`
	SvcIntervalS float64   `json:"service_cycle_interval_s"`
	SvcWindow    int       `json:"ephemeral_services_alive"`
	SampleS      float64   `json:"sample_interval_s"`
	WarmupS      float64   `json:"warmup_s"`
	DurationS    float64   `json:"duration_per_mode_s"`
	LoadBefore   string    `json:"loadavg_before"`
	LoadAfter    string    `json:"loadavg_after"`
	Runs         []SoakRun `json:"runs"`
}

func runSoak(o options, so soakOptions) error {
	if len(o.ns) != 1 {
		return fmt.Errorf("-soak takes one -n, got %v", o.ns)
	}
	n := o.ns[0]
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
	res := &SoakResult{
		Date: time.Now().UTC(), CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), K8sVersion: framework.K8sVersion,
		N: n, Endpoints: epsPerSvc, ChurnRate: o.churnRate, ChurnSvcs: min(churnMaxServices, n),
		SvcIntervalS: so.svcInterval.Seconds(), SvcWindow: so.svcWindow, SampleS: so.sample.Seconds(),
		WarmupS: so.warmup.Seconds(), DurationS: so.dur.Seconds(), LoadBefore: machine.LoadAvg(),
	}
	res.Host, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		res.Kernel = strings.TrimSpace(string(b))
	}
	stamp := "soak-" + res.Date.Format("2006-01-02-1504")
	jsonPath := filepath.Join(o.out, stamp+".json")
	save := func() {
		res.LoadAfter = machine.LoadAvg()
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
			logf("write %s: %v", jsonPath, err)
		}
		if err := writeSoakReport(o.out, stamp, res); err != nil {
			logf("soak report: %v", err)
		}
	}

	cluster, err := framework.StartCluster(ctx, env)
	if err != nil {
		return err
	}
	nodes, err := cluster.AddNodes(ctx, "soak", 1)
	if err != nil {
		return err
	}
	node := nodes[0]
	cfg := rest.CopyConfig(cluster.CP.AdminConfig)
	cfg.QPS, cfg.Burst = 5000, 10000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("soak client: %w", err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace: %w", err)
	}
	logf("bulk-creating %d Services (× %d endpoints)", n, epsPerSvc)
	if err := bulkCreate(ctx, cs, 0, n, o.workers); err != nil {
		return err
	}
	logDir := filepath.Join(env.WorkDir, "proxy-logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return fmt.Errorf("log dir: %w", err)
	}
	mp, err := env.MiniproxyBin()
	if err != nil {
		return err
	}
	for i, mode := range o.modes {
		spec := proxySpec{Impl: "miniproxy", Mode: mode, Bin: mp}
		// --profiling: heap profiles after the warm-up and at the end, so
		// growth can be attributed (go tool pprof -base warm end).
		spec.Args = append(proxyArgs("miniproxy", mode, cluster.CP.AdminKubeconfig, node.Name), "--profiling")
		r := soakOne(ctx, o, so, cs, node, spec, n, logDir, filepath.Join(o.out, fmt.Sprintf("%s-heap-%s", stamp, mode)), i)
		res.Runs = append(res.Runs, r)
		save()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	logf("wrote %s and %s.md", jsonPath, filepath.Join(o.out, stamp))
	return nil
}

// soakCounters are the churn's running totals, read by the sampler.
type soakCounters struct {
	writes, writeErrs, created, deleted atomic.Int64
	mu                                  sync.Mutex
	errs                                []string
}

func (c *soakCounters) errf(format string, a ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errs) < 10 {
		c.errs = append(c.errs, fmt.Sprintf(format, a...))
	}
}

func soakOne(ctx context.Context, o options, so soakOptions, cs kubernetes.Interface, node *framework.Node, spec proxySpec, n int, logDir, profPrefix string, round int) SoakRun {
	r := SoakRun{Mode: spec.Mode, Started: time.Now().UTC(), LoadStart: machine.LoadAvg()}
	logf("soak %s at %d Services for %v: starting (load %s)", spec, n, so.dur, r.LoadStart)
	if err := cleanNode(ctx, node); err != nil {
		r.Error = err.Error()
		return r
	}
	p, err := startProxy(node, spec, logDir, fmt.Sprintf("soak-%d", n))
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer func() {
		p.stop(20 * time.Second)
		if err := cleanNode(context.Background(), node); err != nil {
			logf("clean node after %s: %v", spec, err)
		}
	}()
	synced, err := p.waitFirstSync(ctx, o.timeout)
	if err != nil {
		r.Error = fmt.Sprintf("first sync: %v", err)
		return r
	}
	r.FirstSyncS = round3(synced.Sub(p.start).Seconds())
	logf("soak %s: first sync after %.1fs", spec, r.FirstSyncS)

	var cnt soakCounters
	cctx, stopChurn := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); soakSlices(cctx, cs, n, o.churnRate, &cnt) }()
	// Each mode cycles its own names: the previous mode's were deleted.
	go func() { defer wg.Done(); soakServices(cctx, cs, so, round, &cnt) }()

	t0 := time.Now()
	warmProf := false
	for {
		s := soakSample(ctx, p, node, spec.Mode, &cnt)
		s.T = round3(time.Since(t0).Seconds())
		r.Samples = append(r.Samples, s)
		if len(r.Samples)%6 == 1 {
			logf("soak %s t=%.0fs: RSS %.1f MB heap %.1f MB goroutines %.0f fds %.0f chains %.0f rules %.0f elements %.0f, %d updates %d errors, %d/%d Services created/deleted, load %.2f",
				spec, s.T, s.RSSMB, s.HeapMB, s.Goroutines, s.FDs, s.Chains, s.Rules, s.Elements, s.Writes, s.WriteErrs, s.SvcCreated, s.SvcDeleted, s.Load1)
		}
		if p.exited() {
			r.Error = fmt.Sprintf("miniproxy exited during the soak: %v\n%s", p.err, p.logTail())
			break
		}
		if !warmProf && time.Since(t0) >= so.warmup {
			warmProf = true
			if path := profPrefix + "-warm.pb.gz"; p.saveProfile(ctx, "heap?gc=1", path) == nil {
				r.Profiles = append(r.Profiles, filepath.Base(path))
			}
		}
		if time.Since(t0) >= so.dur || ctx.Err() != nil {
			break
		}
		next := t0.Add(time.Duration(len(r.Samples)) * so.sample)
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(next)):
		}
	}
	stopChurn()
	wg.Wait()
	r.DurationS = round3(time.Since(t0).Seconds())
	r.RateAchieved = round3(float64(cnt.writes.Load()) / r.DurationS)
	r.LoadEnd = machine.LoadAvg()
	if !p.exited() {
		if path := profPrefix + "-end.pb.gz"; p.saveProfile(context.WithoutCancel(ctx), "heap?gc=1", path) == nil {
			r.Profiles = append(r.Profiles, filepath.Base(path))
		}
	}
	// The ephemeral Services go before the next mode starts from the same N.
	if err := deleteSoakServices(context.WithoutCancel(ctx), cs); err != nil {
		cnt.errf("%v", err)
	}
	r.Errors = cnt.errs
	logf("soak %s: done, %.1f slice updates/s, %d Services created, %d deleted, %d write errors", spec, r.RateAchieved, cnt.created.Load(), cnt.deleted.Load(), cnt.writeErrs.Load())
	return r
}

// soakSlices writes rate EndpointSlice updates per second until ctx ends,
// round-robin over the first min(1000, n) bulk Services, each moving one
// endpoint to another address and back, so endpoint objects are deleted and
// created at the rate while their number stays constant.
func soakSlices(ctx context.Context, cs kubernetes.Interface, n int, rate float64, cnt *soakCounters) {
	nsvc := min(churnMaxServices, n)
	slots := make([]*churnSlot, nsvc)
	for i := range slots {
		slots[i] = &churnSlot{idx: i, swap: true}
	}
	// More writers than the bench's churn: a busy machine slows the
	// apiserver, and the soak should keep its rate for 15 minutes.
	workers := max(8, min(32, int(math.Ceil(rate/3))))
	jobs := make(chan *churnSlot, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				if err := s.write(ctx, cs, false); err != nil {
					if ctx.Err() != nil {
						return
					}
					cnt.writeErrs.Add(1)
					cnt.errf("%v", err)
				} else {
					cnt.writes.Add(1)
				}
			}
		}()
	}
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	k := 0
	defer func() { close(jobs); wg.Wait() }()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			select {
			case jobs <- slots[k%nsvc]:
				k++
			default: // every writer busy: the achieved rate shows it
			}
		}
	}
}

const soakPrefix = "soak-"

// soakAddrs are the endpoints of ephemeral Service k: 10.208.0.0/13, apart
// from the bulk (10.200/14) and swap (10.204/14) ranges, reused after
// 104,857 Services.
func soakAddrs(k int) []string {
	out := make([]string, epsPerSvc)
	for j := range out {
		x := (uint32(10)<<24 | uint32(208)<<16) + uint32((k*epsPerSvc+j)%(1<<19))
		out[j] = netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)}).String()
	}
	return out
}

// soakServices creates one ephemeral Service with its slice every interval
// and deletes the oldest once more than window are alive, so Services (and
// their ClusterIPs, chains and map elements) keep coming and going.
func soakServices(ctx context.Context, cs kubernetes.Interface, so soakOptions, round int, cnt *soakCounters) {
	var alive []string
	tick := time.NewTicker(so.svcInterval)
	defer tick.Stop()
	for k := round * 1_000_000; ; k++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		name := fmt.Sprintf("%s%07d", soakPrefix, k)
		if _, err := createService(ctx, cs, name, soakAddrs(k), "elsewhere", time.Now()); err != nil {
			if ctx.Err() != nil {
				return
			}
			cnt.writeErrs.Add(1)
			cnt.errf("%v", err)
			continue
		}
		cnt.created.Add(1)
		alive = append(alive, name)
		for len(alive) > so.svcWindow {
			if err := deleteService(ctx, cs, alive[0]); err != nil {
				if ctx.Err() != nil {
					return
				}
				cnt.writeErrs.Add(1)
				cnt.errf("%v", err)
				break
			}
			cnt.deleted.Add(1)
			alive = alive[1:]
		}
	}
}

// deleteSoakServices removes every ephemeral Service and slice left.
func deleteSoakServices(ctx context.Context, cs kubernetes.Interface) error {
	svcs, err := cs.CoreV1().Services(benchNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list Services: %w", err)
	}
	var errs []error
	for _, s := range svcs.Items {
		if strings.HasPrefix(s.Name, soakPrefix) {
			errs = append(errs, deleteService(ctx, cs, s.Name))
		}
	}
	return errors.Join(errs...)
}

// soakSample reads the proxy's process, metrics and the node's rules.
func soakSample(ctx context.Context, p *proc, node *framework.Node, mode string, cnt *soakCounters) SoakSample {
	s := SoakSample{RSSMB: round3(p.rssMB()), HeapMB: -1, Goroutines: -1, FDs: -1, Threads: -1, Tables: -1, Chains: -1, Rules: -1, Elements: -1, Syncs: -1, SyncAgeS: -1}
	if m, err := p.metrics(ctx); err == nil {
		if v, ok := m["go_memstats_heap_inuse_bytes"]; ok {
			s.HeapMB = round3(v / (1 << 20))
		}
		if v, ok := m["go_goroutines"]; ok {
			s.Goroutines = v
		}
		if v, ok := m[syncCount]; ok {
			s.Syncs = v
		}
		if v := m[syncStamp]; v > 0 {
			s.SyncAgeS = round3(float64(time.Now().UnixNano())/1e9 - v)
		}
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid)); err == nil {
		s.FDs = float64(len(ents))
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid)); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == "Threads:" {
				s.Threads, _ = strconv.ParseFloat(f[1], 64)
			}
		}
	}
	var k kernelCount
	var err error
	if mode == "nftables" {
		k, err = countNft(node)
	} else {
		k, err = countIptables(node)
	}
	if err == nil {
		s.Tables, s.Chains, s.Rules, s.Elements = k.tables, k.chains, k.rules, k.elements
	} else {
		cnt.errf("count kernel objects: %v", err)
	}
	s.Writes, s.WriteErrs = cnt.writes.Load(), cnt.writeErrs.Load()
	s.SvcCreated, s.SvcDeleted = cnt.created.Load(), cnt.deleted.Load()
	if f := strings.Fields(machine.LoadAvg()); len(f) > 0 {
		s.Load1, _ = strconv.ParseFloat(f[0], 64)
	}
	return s
}

type kernelCount struct{ tables, chains, rules, elements float64 }

// nodeOutput runs bin in the node namespace and returns its stdout alone
// (warnings on stderr must not corrupt JSON), killed after 60 s.
func nodeOutput(node *framework.Node, bin string, args ...string) ([]byte, error) {
	cmd := node.NS.Command(bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", bin, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
		}
		return out.Bytes(), nil
	case <-time.After(60 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return nil, fmt.Errorf("%s %s: timed out", bin, strings.Join(args, " "))
	}
}

// countNft counts the node namespace's nf_tables objects (the namespace is
// the soak's own, so all of them are the proxy's).
func countNft(node *framework.Node) (kernelCount, error) {
	b, err := nodeOutput(node, "nft", "-j", "list", "ruleset")
	if err != nil {
		return kernelCount{}, err
	}
	return parseNftJSON(b)
}

func parseNftJSON(b []byte) (kernelCount, error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return kernelCount{}, fmt.Errorf("parse nft -j: %w", err)
	}
	var k kernelCount
	for _, obj := range doc.Nftables {
		for kind, raw := range obj {
			switch kind {
			case "table":
				k.tables++
			case "chain":
				k.chains++
			case "rule":
				k.rules++
			case "set", "map":
				var s struct {
					Elem []json.RawMessage `json:"elem"`
				}
				if err := json.Unmarshal(raw, &s); err != nil {
					return kernelCount{}, fmt.Errorf("parse nft -j %s: %w", kind, err)
				}
				k.elements += float64(len(s.Elem))
			}
		}
	}
	return k, nil
}

// countIptables counts tables, chains and rules in iptables-save's output.
func countIptables(node *framework.Node) (kernelCount, error) {
	b, err := nodeOutput(node, "iptables-save")
	if err != nil {
		return kernelCount{}, err
	}
	return parseIptablesSave(b), nil
}

func parseIptablesSave(b []byte) kernelCount {
	var k kernelCount
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			k.tables++
		case strings.HasPrefix(l, ":"):
			k.chains++
		case strings.HasPrefix(l, "-A "):
			k.rules++
		}
	}
	return k
}
