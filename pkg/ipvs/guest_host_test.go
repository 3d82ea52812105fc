package ipvs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/guest"
)

// guestModules are loaded in the guest before TestKernel runs (dependencies,
// such as nf_conntrack and libcrc32c's crc32c, are added by the runner).
var guestModules = []string{
	"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh", "ip_vs_mh",
	"dummy", "veth",
	"nf_tables", "nft_chain_nat", "nft_masq", "nft_ct", "nft_reject_inet",
}

// guestFeatures names each guest case as a row of the e2e matrix.
var guestFeatures = map[string]string{
	"ClusterIPTCP":                      "ClusterIP TCP reaches every endpoint; off-cluster client masqueraded",
	"ClusterIPUDP":                      "ClusterIP UDP reaches every endpoint",
	"RoundRobinExactlyEven":             "scheduler rr spreads exactly evenly",
	"NoMasqueradeFromPods":              "masquerade: pod source kept (cluster-CIDR detector)",
	"SchedulerSHSourceSticky":           "scheduler sh keeps a source on one endpoint",
	"SchedulerMHSourceSticky":           "scheduler mh keeps a source on one endpoint",
	"SessionAffinityPersistence":        "sessionAffinity ClientIP (IPVS persistence)",
	"EndpointChangePropagates":          "endpoint change propagation (partial sync)",
	"GracefulDrain":                     "graceful termination: weight 0, delete when connections end",
	"NodePort":                          "NodePort on node addresses, masqueraded",
	"ServiceAddressOnlyServicePorts":    "service address rejects non-service ports",
	"LoadBalancerSourceRanges":          "loadBalancerSourceRanges allow and drop",
	"LoadBalancerSourceRangesNoneValid": "loadBalancerSourceRanges none readable: LB IP admits nobody",
	"DriftRepair":                       "drift repair (virtual server, VIP, filter table deleted by hand)",
	"RestartReconcileAndCleanup":        "restart reconcile and --cleanup leave others' virtual servers",
	"StrictARPOnlyInNodeNamespace":      "strictARP sysctls only in the node namespace",
	"CrashBetweenCreateAndRecord":       "SIGKILL between creating virtual servers and recording them: restart and --cleanup remove every owned one",
	"ForeignVirtualServersSurvive":      "other software's virtual servers untouched by syncs, a crash, a restart and --cleanup",
	"SIGKILLDuringLargeSync":            "SIGKILL at random points of a large sync: converges, nothing duplicate or stale (scaled down for TCG)",
}

// matrixRow has the shape of test/e2e/framework.Result, so the e2e suite can
// merge these rows into e2e-matrix.md by decoding the "matrix" array.
type matrixRow struct {
	Feature string `json:"feature"`
	Mode    string `json:"mode"`
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Test    string `json:"test,omitempty"`
}

// guestCase is one line of e2e-results/ipvs-guest.json.
type guestCase struct {
	Name    string  `json:"name"`
	Result  string  `json:"result"` // pass, fail, skip
	Seconds float64 `json:"seconds"`
	Reason  string  `json:"reason,omitempty"`
}

type guestReport struct {
	Mode           string      `json:"mode"`
	Runner         string      `json:"runner"`
	Driver         string      `json:"driver"`
	Kernel         string      `json:"kernel,omitempty"`
	Generated      string      `json:"generated"`
	BootSeconds    float64     `json:"boot_seconds"`
	ModulesSeconds float64     `json:"modules_loaded_seconds"`
	TestSeconds    float64     `json:"test_seconds"`
	TotalSeconds   float64     `json:"total_seconds"`
	BuildSeconds   float64     `json:"build_seconds"`
	InitramfsBytes int64       `json:"initramfs_bytes,omitempty"`
	Skipped        string      `json:"skipped,omitempty"`
	Cases          []guestCase `json:"cases"`
	Matrix         []matrixRow `json:"matrix"`
}

// TestGuest runs TestKernel inside a qemu guest whose kernel has IPVS (this
// host's usually does not) and maps every guest subtest onto a subtest here.
// It skips, saying why, when qemu or the kernel package is unavailable, and
// writes e2e-results/ipvs-guest.json for the e2e matrix.
func TestGuest(t *testing.T) {
	if os.Getenv(guest.InGuestEnv) != "" {
		t.Skip("inside the guest already")
	}
	if _, err := os.Stat("/proc/net/ip_vs"); err == nil {
		t.Skip("skipping: this kernel has IPVS, TestKernel runs directly")
	}
	if testing.Short() {
		t.Skip("skipping qemu guest in -short mode")
	}
	rep := &guestReport{Mode: "ipvs", Runner: "qemu-system-x86_64 -accel tcg -smp 1, Debian linux-image-amd64",
		Driver:    "backend driven with model snapshots (no apiserver in the guest)",
		Generated: time.Now().UTC().Format(time.RFC3339)}
	defer writeGuestReport(t, rep)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	bin := filepath.Join(t.TempDir(), "ipvs.test")
	if err := guest.BuildTestBinary(ctx, ".", bin); err != nil {
		t.Fatal(err)
	}
	rep.BuildSeconds = time.Since(start).Seconds()
	var console strings.Builder
	res, err := guest.Run(ctx, guest.Options{
		Binary:  bin,
		Args:    []string{"-test.v", "-test.run", guestRun(), "-test.timeout", "8m"},
		Env:     guestEnv(),
		Modules: guestModules,
		Timeout: 9 * time.Minute,
		Console: &console,
	})
	if errors.Is(err, guest.ErrUnavailable) && guest.Required() {
		t.Fatalf("the IPVS guest was required (%s=1) but cannot run: %v", guest.RequiredEnv, err)
	}
	if errors.Is(err, guest.ErrUnavailable) {
		rep.Skipped = err.Error()
		for _, name := range sortedFeatureNames() {
			rep.Matrix = append(rep.Matrix, matrixRow{Feature: guestFeatures[name], Mode: "ipvs", Status: "skip", Reason: err.Error(), Test: "pkg/ipvs TestGuest/" + name})
		}
		t.Skipf("skipping: %v", err)
	}
	if res != nil {
		rep.Kernel = res.KernelRelease
		rep.BootSeconds = res.Boot.Seconds()
		rep.ModulesSeconds = res.Modules.Seconds()
		rep.TotalSeconds = res.Total.Seconds()
		rep.InitramfsBytes = res.InitramfsBytes
		t.Logf("guest kernel %s: boot %v, modules loaded at %v, total %v, initramfs %d bytes",
			res.KernelRelease, res.Boot.Round(time.Millisecond), res.Modules.Round(time.Millisecond), res.Total.Round(time.Millisecond), res.InitramfsBytes)
	}
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	if len(res.FailedModules) > 0 {
		t.Errorf("modules failed to load in the guest: %v", res.FailedModules)
	}
	results := guest.ParseGoTest(res.Output)
	seen := 0
	for _, r := range results {
		if r.Name == "TestKernel" {
			rep.TestSeconds = r.Elapsed.Seconds()
			if r.Outcome == "SKIP" {
				t.Fatalf("TestKernel skipped inside the guest: %s", strings.Join(r.Output, "\n"))
			}
			continue
		}
		name, ok := strings.CutPrefix(r.Name, "TestKernel/")
		if !ok {
			continue
		}
		seen++
		c := guestCase{Name: name, Result: strings.ToLower(r.Outcome), Seconds: r.Elapsed.Seconds()}
		if r.Outcome != "PASS" {
			c.Reason = strings.Join(r.Output, "; ")
		}
		rep.Cases = append(rep.Cases, c)
		feature := guestFeatures[name]
		if feature == "" {
			feature = name
		}
		rep.Matrix = append(rep.Matrix, matrixRow{Feature: feature, Mode: "ipvs", Status: c.Result, Reason: c.Reason,
			Test: "pkg/ipvs TestGuest/" + name + " (qemu guest, kernel " + res.KernelRelease + ")"})
		t.Run(name, func(t *testing.T) {
			switch r.Outcome {
			case "FAIL":
				t.Errorf("failed in guest (%v):\n%s", r.Elapsed, strings.Join(r.Output, "\n"))
			case "SKIP":
				t.Skipf("skipped in guest: %s", strings.Join(r.Output, "; "))
			default:
				t.Logf("passed in guest (%v)", r.Elapsed)
				for _, line := range r.Output {
					t.Log(line)
				}
			}
		})
	}
	if seen == 0 || res.ExitCode != 0 && !t.Failed() {
		t.Fatalf("guest exit status %d with %d subtests reported:\n%s", res.ExitCode, seen, lastLines(res.Output, 60))
	}
}

// guestRun is the -test.run pattern inside the guest: TestKernel, or some of
// its subtests with MINIPROXY_GUEST_RUN (e.g. "SIGKILL|Crash").
func guestRun() string {
	if v := os.Getenv("MINIPROXY_GUEST_RUN"); v != "" {
		return "^TestKernel$/" + v
	}
	return "^TestKernel$"
}

// guestEnv is the guest test's environment: the in-guest marker and the
// crash tests' size and seed, when set on the host.
func guestEnv() []string {
	env := []string{guest.InGuestEnv + "=1"}
	for _, k := range []string{crashServicesEnv, crashTrialsEnv, crashSeedEnv} {
		if v := os.Getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	return env
}

func sortedFeatureNames() []string {
	var out []string
	for n := range guestFeatures {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// writeGuestReport writes the report to $MINIPROXY_E2E_RESULTS or
// <module root>/e2e-results.
func writeGuestReport(t *testing.T, rep *guestReport) {
	dir := os.Getenv("MINIPROXY_E2E_RESULTS")
	if dir == "" {
		root, err := moduleRoot()
		if err != nil {
			t.Logf("not writing guest report: %v", err)
			return
		}
		dir = filepath.Join(root, "e2e-results")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("not writing guest report: %v", err)
		return
	}
	b, _ := json.MarshalIndent(rep, "", "  ")
	p := filepath.Join(dir, "ipvs-guest.json")
	if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
		t.Logf("write %s: %v", p, err)
		return
	}
	t.Logf("wrote %s", p)
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}
