package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// proxySpec is one proxy implementation in one mode.
type proxySpec struct {
	Impl string // "miniproxy" or "kube-proxy"
	Mode string // "iptables" or "nftables"
	Bin  string
	Args []string
}

func (s proxySpec) String() string { return s.Impl + "/" + s.Mode }

// proxyArgs gives both proxies the same identity and addresses. kube-proxy
// otherwise runs with its defaults for the mode, except that its conntrack
// tuning is switched off: nf_conntrack_max and the hash size are global to
// the machine, and a benchmark must not change the host.
func proxyArgs(impl, mode, kubeconfig, node string) []string {
	args := []string{
		"--kubeconfig", kubeconfig,
		"--hostname-override", node,
		"--proxy-mode", mode,
		"--cluster-cidr", framework.ClusterCIDR,
		"--metrics-bind-address", "127.0.0.1:10249",
		"--healthz-bind-address", "0.0.0.0:10256",
	}
	if impl == "kube-proxy" {
		args = append(append(args, framework.KubeProxyHostSafeArgs...), "--v=1")
	}
	return args
}

// proc is a running proxy process inside the node namespace.
type proc struct {
	spec  proxySpec
	cmd   *exec.Cmd
	start time.Time
	log   string
	done  chan struct{}
	err   error
	hc    *http.Client
}

func startProxy(node *framework.Node, spec proxySpec, logDir string, tag string) (*proc, error) {
	logPath := filepath.Join(logDir, fmt.Sprintf("%s-%s-%s.log", spec.Impl, spec.Mode, tag))
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("proxy log: %w", err)
	}
	cmd := node.NS.Command(spec.Bin, spec.Args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	p := &proc{
		spec: spec, cmd: cmd, log: logPath, done: make(chan struct{}),
		hc: &http.Client{Transport: &http.Transport{DialContext: node.NS.DialContext}, Timeout: 10 * time.Second},
	}
	p.start = time.Now()
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", spec, err)
	}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group (the proxy and any
// iptables-restore / nft child), SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *proc) logTail() string {
	f, err := os.Open(p.log)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > 3000 {
		_, _ = f.Seek(st.Size()-3000, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// saveProfile fetches one pprof profile from the proxy (miniproxy with
// --profiling serves pprof on the metrics address), e.g. "heap?gc=1" or
// "profile?seconds=5", and writes it to path.
func (p *proc) saveProfile(ctx context.Context, which, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10249/debug/pprof/"+which, nil)
	if err != nil {
		return err
	}
	// A CPU profile takes as long as it asks for; the shared client's
	// timeout is for scrapes.
	resp, err := (&http.Client{Transport: p.hc.Transport}).Do(req)
	if err != nil {
		return fmt.Errorf("fetch %s profile of %s: %w", which, p.spec, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s profile of %s: HTTP %s", which, p.spec, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read %s profile of %s: %w", which, p.spec, err)
	}
	return os.WriteFile(path, b, 0o644)
}

// cpuProfileFromStart records a CPU profile of the proxy's first seconds
// (its cold start) into path, starting as soon as the endpoint listens.
func (p *proc) cpuProfileFromStart(ctx context.Context, seconds int, path string) <-chan error {
	done := make(chan error, 1)
	go func() {
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := p.metrics(ctx); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		done <- p.saveProfile(ctx, fmt.Sprintf("profile?seconds=%d", seconds), path)
	}()
	return done
}

// metrics scrapes /metrics and returns the unlabelled samples by name.
func (p *proc) metrics(ctx context.Context) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10249/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", p.spec, err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "kubeproxy_") && !strings.HasPrefix(line, "process_") && !strings.HasPrefix(line, "go_") {
			continue
		}
		// kube-proxy runs both families by default and labels its series
		// with ip_family; the bench Services are IPv4, so IPv6 series are
		// left out and the remaining label sets of a name are added up.
		if strings.Contains(line, `ip_family="IPv6"`) {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		name := line[:i]
		le, hasLE := "", false
		if j := strings.IndexByte(name, '{'); j >= 0 {
			if strings.HasSuffix(name[:j], "_bucket") {
				le, hasLE = leLabel(name[j:])
			}
			name = name[:j]
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(line[i+1:]), 64); err == nil {
			out[name] += v
			// Histogram buckets are also kept per upper bound, as
			// name{le="<bound>"} (see bucketsOf), summed over the
			// remaining labels like the unlabelled series.
			if hasLE {
				out[bucketKey(name, le)] += v
			}
		}
	}
	return out, sc.Err()
}

// rssMB reads VmRSS of the proxy process (ip netns exec execs the binary,
// so the pid is the proxy's).
func (p *proc) rssMB() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				kb, _ := strconv.ParseFloat(f[1], 64)
				return kb / 1024
			}
		}
	}
	return -1
}

// cpuSeconds is user+system CPU of the proxy and its reaped children
// (iptables-restore, nft) so far.
func (p *proc) cpuSeconds() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(s[i+1:])
	// Fields after ")": state(0) ... utime(11) stime(12) cutime(13) cstime(14).
	if len(f) < 15 {
		return -1
	}
	var ticks float64
	for _, k := range []int{11, 12, 13, 14} {
		v, _ := strconv.ParseFloat(f[k], 64)
		ticks += v
	}
	return ticks / 100 // USER_HZ is 100 on Linux
}

// waitFirstSync polls the metrics until the first complete sync is
// recorded, returning its end time as the proxy reported it.
func (p *proc) waitFirstSync(ctx context.Context, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if p.exited() {
			return time.Time{}, fmt.Errorf("%s exited: %v\n%s", p.spec, p.err, p.logTail())
		}
		m, err := p.metrics(ctx)
		if err == nil {
			if ts := m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]; ts > 0 {
				return time.Unix(0, int64(ts*1e9)), nil
			}
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return time.Time{}, errTimedOut
}

var errTimedOut = fmt.Errorf("timed out")
