package main

import (
	"context"
	"fmt"
	"math"
	"net"
	"sort"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Stats summarises samples in milliseconds.
type Stats struct {
	N       int       `json:"n"`
	P50     float64   `json:"p50_ms"`
	P99     float64   `json:"p99_ms"`
	Max     float64   `json:"max_ms"`
	Samples []float64 `json:"samples_ms,omitempty"`
}

func summarize(ms []float64) *Stats {
	if len(ms) == 0 {
		return nil
	}
	s := append([]float64(nil), ms...)
	sort.Float64s(s)
	q := func(p float64) float64 {
		// Nearest-rank: with 10 samples p99 is the maximum, which is what
		// an operator would see as the worst change.
		k := int(math.Ceil(p*float64(len(s)))) - 1
		if k < 0 {
			k = 0
		}
		return round3(s[k])
	}
	return &Stats{N: len(s), P50: q(0.5), P99: q(0.99), Max: round3(s[len(s)-1]), Samples: roundAll(ms)}
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

func roundAll(v []float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = round3(x)
	}
	return out
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// connectOnce opens one fresh TCP connection from the client pod (a new
// source port, so a new conntrack entry walks the nat rules) and returns the
// connect time.
func connectOnce(ctx context.Context, client *framework.Pod, addr string, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var took time.Duration
	err := client.NS.Do(func() error {
		var d net.Dialer
		t0 := time.Now()
		c, err := d.DialContext(ctx, "tcp", addr)
		took = time.Since(t0)
		if err != nil {
			return err
		}
		return c.Close()
	})
	return took, err
}

// firstConnect measures n fresh connects to addr.
func firstConnect(ctx context.Context, client *framework.Pod, addr string, n int) (*Stats, error) {
	var out []float64
	for i := 0; i < n; i++ {
		d, err := connectOnce(ctx, client, addr, 3*time.Second)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", addr, err)
		}
		out = append(out, ms(d))
	}
	s := summarize(out)
	s.Samples = nil
	return s, nil
}

// waitAnswer launches a fresh connect to addr every interval (each one a new
// conntrack entry, so an early SYN that missed the rules cannot poison later
// ones) and returns when the first one succeeds: the time at which the VIP
// answered. Bounded by timeout.
func waitAnswer(ctx context.Context, client *framework.Pod, addr string, interval, timeout time.Duration) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var (
		once sync.Once
		at   time.Time
		wg   sync.WaitGroup
	)
	found := make(chan struct{})
	start := time.Now()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := connectOnce(ctx, client, addr, 500*time.Millisecond); err == nil {
				once.Do(func() { at = time.Now(); close(found) })
			}
		}()
		select {
		case <-found:
			cancel()
			wg.Wait()
			return at, nil
		case <-ctx.Done():
			wg.Wait()
			select {
			case <-found:
				return at, nil
			default:
			}
			return time.Time{}, fmt.Errorf("%s did not answer within %v", addr, timeout)
		case <-tick.C:
			// Long waits (a cold start still catching up) probe every
			// 50 ms after the first 2 s, to bound the goroutines and
			// setns calls the probing itself costs the machine.
			if interval < 50*time.Millisecond && time.Since(start) > 2*time.Second {
				interval = 50 * time.Millisecond
				tick.Reset(interval)
			}
		}
	}
}

// programmed waits until the proxy's network_programming_duration histogram
// has more than prevCount observations and returns the newest observation
// (sum delta when exactly one was added).
func programmed(ctx context.Context, p *proc, prevCount, prevSum float64, timeout time.Duration) (float64, float64, float64, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		m, err := p.metrics(ctx)
		if err == nil {
			c := m["kubeproxy_network_programming_duration_seconds_count"]
			s := m["kubeproxy_network_programming_duration_seconds_sum"]
			if c > prevCount {
				return (s - prevSum) / (c - prevCount) * 1000, c, s, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, 0, 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return 0, 0, 0, fmt.Errorf("no network programming observation within %v", timeout)
}

func histo(ctx context.Context, p *proc) (float64, float64) {
	m, err := p.metrics(ctx)
	if err != nil {
		return 0, 0
	}
	return m["kubeproxy_network_programming_duration_seconds_count"], m["kubeproxy_network_programming_duration_seconds_sum"]
}

// alignToSecond sleeps until just after a whole second. The trigger-time
// annotation has one-second resolution (RFC 3339), so writing right after
// the second it names keeps the proxy-reported latency exact to a few ms.
func alignToSecond(ctx context.Context) time.Time {
	now := time.Now()
	next := now.Truncate(time.Second).Add(time.Second)
	select {
	case <-ctx.Done():
	case <-time.After(next.Sub(now) + time.Millisecond):
	}
	return next
}

// changeResult is one proxy's "one change at scale" figures.
type changeResult struct {
	AddAnswer  *Stats `json:"add_service_answer"`     // API write (Service create) → VIP answers a connect
	AddProg    *Stats `json:"add_service_programmed"` // proxy's own network_programming_duration for the new slice
	RemoveProg *Stats `json:"remove_endpoint_programmed"`
	Errors     []string
}

// measureChanges adds reps Services (5 live endpoints each) and removes one
// endpoint from reps bulk Services, one change at a time.
func measureChanges(ctx context.Context, cs kubernetes.Interface, p *proc, client *framework.Pod, live []string, nodeName string, n, reps int, tag string) (*changeResult, []string) {
	res := &changeResult{}
	var answer, prog, remove []float64
	var created []string
	for i := 0; i < reps; i++ {
		// Space the changes beyond both proxies' 1 s min-sync-period, so
		// each measures a change arriving at an idle proxy.
		select {
		case <-ctx.Done():
			return res, created
		case <-time.After(1500 * time.Millisecond):
		}
		c0, s0 := histo(ctx, p)
		trig := alignToSecond(ctx)
		name := fmt.Sprintf("add-%s-%d", tag, i)
		t0 := time.Now()
		ip, err := createService(ctx, cs, name, live, nodeName, trig)
		if err != nil {
			res.Errors = append(res.Errors, err.Error())
			continue
		}
		created = append(created, name)
		at, err := waitAnswer(ctx, client, fmt.Sprintf("%s:%d", ip, svcPort), 5*time.Millisecond, 60*time.Second)
		if err != nil {
			res.Errors = append(res.Errors, err.Error())
			continue
		}
		answer = append(answer, ms(at.Sub(t0)))
		if v, _, _, err := programmed(ctx, p, c0, s0, 10*time.Second); err == nil {
			prog = append(prog, v)
		} else {
			res.Errors = append(res.Errors, fmt.Sprintf("add %s: %v", name, err))
		}
	}
	for i := 0; i < reps && i < n; i++ {
		select {
		case <-ctx.Done():
			return res, created
		case <-time.After(1500 * time.Millisecond):
		}
		// Spread the victims over the table instead of always the first.
		k := (i*7919 + 13) % n
		name := bulkName(k)
		c0, s0 := histo(ctx, p)
		trig := alignToSecond(ctx)
		sl := slice(name, bulkAddrs(k)[:epsPerSvc-1], "elsewhere", trig)
		cur, err := cs.DiscoveryV1().EndpointSlices(benchNS).Get(ctx, sl.Name, metav1.GetOptions{})
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("get slice %s: %v", sl.Name, err))
			continue
		}
		sl.ResourceVersion = cur.ResourceVersion
		if _, err := cs.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("update slice %s: %v", sl.Name, err))
			continue
		}
		v, _, _, err := programmed(ctx, p, c0, s0, 60*time.Second)
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("remove endpoint of %s: %v", name, err))
		} else {
			remove = append(remove, v)
		}
		// Put the endpoint back so every proxy run starts from the same
		// objects (the restore is not measured).
		restore := slice(name, bulkAddrs(k), "elsewhere", time.Time{})
		if cur, err = cs.DiscoveryV1().EndpointSlices(benchNS).Get(ctx, sl.Name, metav1.GetOptions{}); err == nil {
			restore.ResourceVersion = cur.ResourceVersion
			_, err = cs.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, restore, metav1.UpdateOptions{})
		}
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("restore slice %s: %v", sl.Name, err))
		}
	}
	res.AddAnswer, res.AddProg, res.RemoveProg = summarize(answer), summarize(prog), summarize(remove)
	return res, created
}
