package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// outage is how long kube-apiserver and etcd stay down.
const outage = 60 * time.Second

// TestFaultAPIServerDown stops kube-apiserver and etcd for 60 s and starts
// them again while a prober opens a new connection to a ClusterIP every 10 ms
// and three long-lived connections ask every 200 ms. Expected (README
// "Health"): zero failed connections, the rules stay and periodic full syncs
// keep running from the informers' cache, /healthz and /livez answer 200
// throughout on every node, no sync fails, and once the control plane is back
// a Service created then is programmed (the watches resumed).
//
// The suite's control plane serves every other test, so this test brings up
// a cluster of its own per mode and stops only that one.
func TestFaultAPIServerDown(t *testing.T) {
	for _, mode := range framework.KnownModes {
		t.Run(mode, func(t *testing.T) {
			row := suite.Matrix.Track(t, "fault: kube-apiserver + etcd down 60 s (traffic, health, resync)", mode)
			if why, off := suite.DisabledReason[mode]; off {
				row.Skip(why)
			}
			if err := framework.RequireRoot(); err != nil {
				row.Skip(err.Error())
			}
			faultAPIServerDown(t, row, mode)
		})
	}
}

// apiDownFigures is what the test writes to e2e-results/.
type apiDownFigures struct {
	Mode                 string         `json:"mode"`
	OutageSeconds        float64        `json:"outageSeconds"`    // both stopped → apiserver ready again
	RestartSeconds       float64        `json:"restartSeconds"`   // restart → apiserver ready
	ProbeConnections     int64          `json:"probeConnections"` // new connections attempted
	ProbeFailed          int64          `json:"probeFailed"`      // of which failed
	ProbeFirstError      string         `json:"probeFirstError,omitempty"`
	ProbeRatePerSecond   float64        `json:"probeRatePerSecond"`          // achieved
	LongLivedAsks        int64          `json:"longLivedAsks"`               // requests on the long-lived connections
	LongLivedFailed      int64          `json:"longLivedFailed"`             // failed or answered by another endpoint
	Health               map[string]int `json:"health"`                      // "<phase> <node> <path> <code>" → probes
	SyncsDuringOutage    int            `json:"syncsDuringOutage"`           // last-sync timestamp moves seen on node 0
	SyncFailures         float64        `json:"syncFailures"`                // failure counter of the mode, all nodes, at the end
	NewServiceCreated    float64        `json:"newServiceCreatedSeconds"`    // control plane ready → Service and endpoints created
	NewServiceProgrammed float64        `json:"newServiceProgrammedSeconds"` // created → answers from every node
}

func faultAPIServerDown(t *testing.T, row *framework.Row, mode string) {
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	row.Note("own cluster setup")
	env, err := framework.NewEnv(framework.Options{Log: suite.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := env.Close(); err != nil {
			t.Errorf("teardown of the fault cluster: %v", err)
		}
	})
	c, err := framework.StartCluster(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	prefix := map[string]string{"iptables": "ipt", "nftables": "nft", "ipvs": "ipvs"}[mode]
	nodes, err := c.AddNodes(ctx, prefix+"-node", 2)
	if err != nil {
		t.Fatal(err)
	}
	me := &framework.ModeEnv{Mode: mode, Cluster: c, Nodes: nodes}
	for _, n := range nodes {
		p, err := c.StartProxy(ctx, n, framework.ProxyOptions{Mode: mode})
		if p != nil {
			me.Proxies = append(me.Proxies, p)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	me.DumpOnFailure(t)

	row.Note("Service before the outage")
	f := newFixture(t, ctx, me, "apidown", 2)
	addr := framework.VIP(f.svc, "tcp")
	client := f.clients[0]
	if got, err := waitExactly(ctx, "tcp", client, addr, f.dep.PodNames(), 90*time.Second); err != nil {
		t.Fatalf("VIP %s never worked: %v: %v", addr, got, err)
	}

	fig := apiDownFigures{Mode: mode, Health: map[string]int{}}
	var phase atomic.Value
	phase.Store("before")

	// Long-lived connections: each must keep its endpoint and never fail.
	var longAsks, longFailed atomic.Int64
	type longConn struct {
		c     *framework.Conn
		first string
	}
	var longs []longConn
	for i := 0; i < 3; i++ {
		conn, err := client.DialTCP(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		first, err := conn.Ask(2 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		longs = append(longs, longConn{conn, first})
	}

	probeCtx, stopProbes := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var probes, probeFailed atomic.Int64
	var firstErrOnce sync.Once
	probeStart := time.Now()
	// A new connection every 10 ms; each runs in its own goroutine so a slow
	// one does not delay the next (at most 100 in flight).
	wg.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		inflight := make(chan struct{}, 100)
		var cw sync.WaitGroup
		defer cw.Wait()
		for {
			select {
			case <-probeCtx.Done():
				return
			case <-tick.C:
			}
			select {
			case inflight <- struct{}{}:
			default:
				// 100 connections pending for 10 ms each means they hang:
				// count it as a failure rather than queueing forever.
				probes.Add(1)
				probeFailed.Add(1)
				continue
			}
			probes.Add(1)
			cw.Go(func() {
				defer func() { <-inflight }()
				if _, err := askFrom(ctx, client, addr, 2*time.Second); err != nil {
					probeFailed.Add(1)
					firstErrOnce.Do(func() { fig.ProbeFirstError = fmt.Sprintf("%s: %v", phase.Load(), err) })
				}
			})
		}
	})
	wg.Go(func() {
		for probeCtx.Err() == nil {
			for _, l := range longs {
				longAsks.Add(1)
				got, err := l.c.Ask(2 * time.Second)
				if err != nil || got != l.first {
					longFailed.Add(1)
					t.Logf("%s: long-lived connection to %s: answer %q (first %q), err %v", phase.Load(), l.first, got, l.first, err)
				}
			}
			sleepCtx(probeCtx, 200*time.Millisecond)
		}
	})
	// /healthz and /livez of every node, once a second.
	var healthMu sync.Mutex
	wg.Go(func() {
		for probeCtx.Err() == nil {
			for _, n := range nodes {
				for _, path := range []string{"/healthz", "/livez"} {
					code, body := nodeGet(ctx, n, fmt.Sprintf("http://127.0.0.1:10256%s", path))
					healthMu.Lock()
					k := fmt.Sprintf("%s %s %s %d", phase.Load(), n.Name, path, code)
					if fig.Health[k] == 0 && code != http.StatusOK {
						t.Logf("%s: %s%s answered %d: %s", phase.Load(), n.Name, path, code, body)
					}
					fig.Health[k]++
					healthMu.Unlock()
				}
			}
			sleepCtx(probeCtx, time.Second)
		}
	})
	// Periodic syncs during the outage: count moves of the last-sync
	// timestamp on node 0.
	var syncsDuringOutage atomic.Int64
	wg.Go(func() {
		last := 0.0
		for probeCtx.Err() == nil {
			ts := metricSum(ctx, nodes[0], "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
			if phase.Load() == "outage" && last != 0 && ts > last {
				syncsDuringOutage.Add(1)
			}
			last = ts
			sleepCtx(probeCtx, time.Second)
		}
	})

	sleepCtx(ctx, 5*time.Second)
	row.Note("stopping kube-apiserver and etcd")
	// A short grace: kube-apiserver drains watches on SIGTERM for longer
	// than that, so it is killed, as in a crash.
	if err := c.CP.StopControlPlane(5 * time.Second); err != nil {
		t.Logf("stopping the control plane: %v", err)
	}
	stopped := time.Now()
	phase.Store("outage")
	suite.Logf("%s: kube-apiserver and etcd stopped for %v", mode, outage)
	sleepCtx(ctx, outage)
	row.Note("restarting kube-apiserver and etcd")
	restart := time.Now()
	if err := c.CP.RestartControlPlane(ctx, env); err != nil {
		stopProbes()
		wg.Wait()
		t.Fatal(err)
	}
	ready := time.Now()
	phase.Store("after")
	fig.OutageSeconds = ready.Sub(stopped).Seconds()
	fig.RestartSeconds = ready.Sub(restart).Seconds()
	suite.Logf("%s: control plane back after %.1f s (restart took %.1f s)", mode, fig.OutageSeconds, fig.RestartSeconds)

	// Resync after: a Service created now is programmed on every node.
	row.Note("new Service after the outage")
	f2 := newFixture(t, ctx, me, "apiback", 1)
	created := time.Now()
	fig.NewServiceCreated = created.Sub(ready).Seconds()
	addr2 := framework.VIP(f2.svc, "tcp")
	for i, cl := range f2.clients {
		if got, err := waitExactly(ctx, "tcp", cl, addr2, f2.dep.PodNames(), 180*time.Second); err != nil {
			t.Errorf("Service created after the outage never answered on %s (%s): %v: %v", nodes[i].Name, addr2, got, err)
		}
	}
	// Includes client-go's reflector backoff after the outage (up to 30 s),
	// as for kube-proxy.
	fig.NewServiceProgrammed = time.Since(created).Seconds()
	sleepCtx(ctx, 5*time.Second)
	stopProbes()
	wg.Wait()

	fig.ProbeConnections, fig.ProbeFailed = probes.Load(), probeFailed.Load()
	fig.ProbeRatePerSecond = float64(fig.ProbeConnections) / time.Since(probeStart).Seconds()
	fig.LongLivedAsks, fig.LongLivedFailed = longAsks.Load(), longFailed.Load()
	fig.SyncsDuringOutage = int(syncsDuringOutage.Load())
	failureMetric := map[string]string{
		"iptables": "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
		"nftables": "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
		"ipvs":     "miniproxy_ipvs_sync_failures_total",
	}[mode]
	for _, n := range nodes {
		fig.SyncFailures += metricSum(ctx, n, failureMetric)
	}
	writeFigures(t, fmt.Sprintf("fault-apiserver-%s.json", mode), fig)
	t.Logf("figures: %+v", fig)

	row.Note("")
	if fig.ProbeFailed != 0 {
		t.Errorf("%d of %d new connections failed (first: %s)", fig.ProbeFailed, fig.ProbeConnections, fig.ProbeFirstError)
	}
	if fig.ProbeConnections < int64(outage/(10*time.Millisecond))/2 {
		t.Errorf("only %d connections attempted; the prober did not keep its 10 ms pace", fig.ProbeConnections)
	}
	if fig.LongLivedFailed != 0 {
		t.Errorf("%d of %d requests on long-lived connections failed or changed endpoint", fig.LongLivedFailed, fig.LongLivedAsks)
	}
	for k, v := range fig.Health {
		if !strings.HasSuffix(k, " 200") {
			t.Errorf("health probes answered %q %d times; every /healthz and /livez must stay 200 through an apiserver outage", k, v)
		}
	}
	for _, ph := range []string{"outage", "after"} {
		for _, n := range nodes {
			if fig.Health[fmt.Sprintf("%s %s /livez 200", ph, n.Name)] == 0 {
				t.Errorf("no /livez answer from %s during %s", n.Name, ph)
			}
		}
	}
	if fig.SyncsDuringOutage == 0 {
		t.Errorf("no sync completed on %s during the %v outage (periodic full syncs must go on from the cache)", nodes[0].Name, outage)
	}
	if fig.SyncFailures != 0 {
		t.Errorf("%s = %v: a sync failed", failureMetric, fig.SyncFailures)
	}
	for _, p := range me.Proxies {
		if !p.Running() {
			t.Errorf("miniproxy on %s exited", p.Node.Name)
		}
	}
}

// askFrom opens one new TCP connection from the pod, sends a line and reads
// the answering endpoint's name.
func askFrom(ctx context.Context, p *framework.Pod, addr string, timeout time.Duration) (string, error) {
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := p.NS.DialContext(dctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read: %w", err)
	}
	return strings.TrimSpace(line), nil
}

// nodeGet fetches url from inside the node's namespace; code 0 means no answer.
func nodeGet(ctx context.Context, n *framework.Node, url string) (int, string) {
	hc := &http.Client{Transport: &http.Transport{DialContext: n.NS.DialContext, DisableKeepAlives: true}, Timeout: 2 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err.Error()
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// metricSum returns the sum of every sample of the metric name on the node's
// /metrics (0 when absent or unreachable).
func metricSum(ctx context.Context, n *framework.Node, name string) float64 {
	code, body := nodeGet(ctx, n, "http://127.0.0.1:10249/metrics")
	if code != http.StatusOK {
		return 0
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(?:\{[^}]*\})? (\S+)$`)
	sum := 0.0
	for _, m := range re.FindAllStringSubmatch(body, -1) {
		if v, err := strconv.ParseFloat(m[1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func writeFigures(t *testing.T, name string, v any) {
	t.Helper()
	if err := os.MkdirAll(suite.ResultsDir, 0o755); err != nil {
		t.Errorf("results dir: %v", err)
		return
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Errorf("figures: %v", err)
		return
	}
	path := filepath.Join(suite.ResultsDir, name)
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		t.Errorf("figures: %v", err)
		return
	}
	t.Logf("figures written to %s", path)
}

// sleepCtx sleeps d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
