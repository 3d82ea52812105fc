package main

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

const (
	progHist  = "kubeproxy_network_programming_duration_seconds"
	syncCount = "kubeproxy_sync_proxy_rules_duration_seconds_count"
	syncStamp = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
	// churnMaxServices bounds how many bulk Services the churn spreads over.
	churnMaxServices = 1000
)

// churnResult is one proxy's "steady stream of endpoint changes" figures.
type churnResult struct {
	RateTarget   float64  `json:"rate_target"`   // EndpointSlice updates per second asked for
	RateAchieved float64  `json:"rate_achieved"` // successful updates / write window
	DurationS    float64  `json:"duration_s"`    // write window
	Services     int      `json:"services"`      // bulk Services the updates were spread over
	Writes       int      `json:"writes"`        // successful updates
	WriteErrors  int      `json:"write_errors"`
	TicksMissed  int      `json:"ticks_missed,omitempty"` // ticks dropped because every writer was busy
	ProgN        float64  `json:"prog_observations"`      // network_programming observations in the window
	ProgP50      float64  `json:"prog_p50_ms"`            // from the histogram difference, -1 when none
	ProgP99      float64  `json:"prog_p99_ms"`
	Syncs        float64  `json:"syncs"` // sync_proxy_rules_duration_seconds_count delta
	CPUS         float64  `json:"cpu_s"` // proxy + reaped children, window + settle
	CPUPerChange float64  `json:"cpu_per_change_ms"`
	RSSMB        float64  `json:"rss_mb"`   // at the end of the window
	SettleS      float64  `json:"settle_s"` // last write → proxy idle again
	Errors       []string `json:"errors,omitempty"`
}

// bucket is one cumulative histogram bucket.
type bucket struct {
	LE    float64 // upper bound, +Inf for the last
	Count float64 // cumulative count
}

// leLabel extracts the le label from a {…} label set.
func leLabel(labels string) (string, bool) {
	i := strings.Index(labels, `le="`)
	if i < 0 {
		return "", false
	}
	rest := labels[i+4:]
	j := strings.IndexByte(rest, '"')
	if j < 0 {
		return "", false
	}
	return rest[:j], true
}

// bucketKey is the key under which proc.metrics stores one bucket of a
// histogram: the bound is normalised so "1", "1.0" and "1e+00" coincide.
func bucketKey(bucketName, le string) string {
	if v, err := strconv.ParseFloat(le, 64); err == nil {
		le = strconv.FormatFloat(v, 'g', -1, 64)
	}
	return bucketName + `{le="` + le + `"}`
}

// bucketsOf returns the buckets of histogram name (without _bucket) from a
// proc.metrics map, sorted by bound.
func bucketsOf(m map[string]float64, name string) []bucket {
	prefix := name + `_bucket{le="`
	var out []bucket
	for k, v := range m {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		le, err := strconv.ParseFloat(strings.TrimSuffix(k[len(prefix):], `"}`), 64)
		if err != nil {
			continue
		}
		out = append(out, bucket{LE: le, Count: v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LE < out[j].LE })
	return out
}

// histQuantile is the q-quantile of the observations added between two
// scrapes of one cumulative histogram, interpolated linearly within the
// bucket it falls in (as Prometheus' histogram_quantile). A quantile in the
// +Inf bucket is the highest finite bound. ok is false when no observation
// was added.
func histQuantile(before, after []bucket, q float64) (v float64, total float64, ok bool) {
	prev := make(map[float64]float64, len(before))
	for _, b := range before {
		prev[b.LE] = b.Count
	}
	d := make([]bucket, 0, len(after))
	for _, b := range after {
		c := b.Count - prev[b.LE]
		if c < 0 {
			c = 0
		}
		// Cumulative counts never decrease with the bound; scrapes of a
		// histogram being written to may disagree slightly.
		if n := len(d); n > 0 && c < d[n-1].Count {
			c = d[n-1].Count
		}
		d = append(d, bucket{LE: b.LE, Count: c})
	}
	if len(d) == 0 {
		return 0, 0, false
	}
	total = d[len(d)-1].Count
	if total <= 0 || math.IsNaN(q) {
		return 0, total, false
	}
	q = math.Max(0, math.Min(1, q))
	rank := q * total
	i := sort.Search(len(d), func(i int) bool { return d[i].Count >= rank && d[i].Count > 0 })
	if i == len(d) {
		i = len(d) - 1
	}
	if math.IsInf(d[i].LE, 1) {
		if i == 0 {
			return 0, total, false
		}
		return d[i-1].LE, total, true
	}
	lower, lowerCount := 0.0, 0.0
	if i > 0 {
		lower, lowerCount = d[i-1].LE, d[i-1].Count
	}
	if d[i].LE < lower || d[i].Count == lowerCount {
		return d[i].LE, total, true
	}
	return lower + (d[i].LE-lower)*(rank-lowerCount)/(d[i].Count-lowerCount), total, true
}

// churnSlot is one bulk Service's slice as the churn writers know it.
type churnSlot struct {
	mu      sync.Mutex
	idx     int
	rv      string // resourceVersion of our last write, "" before the first
	removed bool   // one endpoint is currently left out
	flips   int
	touched bool // a churn write was attempted (it may have landed even if it failed)
	// swap: instead of leaving one endpoint out, replace its address by
	// one in altBase (the soak), so every update deletes and creates
	// kernel objects while their number stays the same.
	swap bool
}

// write updates the slot's slice with the endpoint set toggled (all 5 ↔ 4
// of them, a different one left out each time; with swap, one of the 5
// moved to its altAddr and back), or to the plain bulk object
// when restore is set. trigger, when set, becomes the trigger-time
// annotation at full (nanosecond) resolution.
func (s *churnSlot) write(ctx context.Context, cs kubernetes.Interface, restore bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	name := bulkName(s.idx)
	addrs := bulkAddrs(s.idx)
	removed := !s.removed
	if restore {
		removed = false
	} else {
		s.touched = true
	}
	if removed {
		drop := (s.flips / 2) % len(addrs)
		if s.swap {
			addrs[drop] = altAddr(addrs[drop])
		} else {
			addrs = append(append([]string(nil), addrs[:drop]...), addrs[drop+1:]...)
		}
	}
	sl := slice(name, addrs, "elsewhere", time.Time{})
	for attempt := 0; ; attempt++ {
		if s.rv == "" {
			cur, err := cs.DiscoveryV1().EndpointSlices(benchNS).Get(ctx, sl.Name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("get slice %s: %w", sl.Name, err)
			}
			s.rv = cur.ResourceVersion
		}
		sl.ResourceVersion = s.rv
		if !restore {
			sl.Annotations = map[string]string{triggerAnno: time.Now().UTC().Format(time.RFC3339Nano)}
		}
		got, err := cs.DiscoveryV1().EndpointSlices(benchNS).Update(ctx, sl, metav1.UpdateOptions{})
		if err == nil {
			s.rv, s.removed = got.ResourceVersion, removed
			if !restore {
				s.flips++
			}
			return nil
		}
		s.rv = ""
		if !apierrors.IsConflict(err) || attempt > 0 {
			return fmt.Errorf("update slice %s: %w", sl.Name, err)
		}
	}
}

// measureChurn writes rate EndpointSlice updates per second for dur, spread
// round-robin over the first min(1000, n) bulk Services, each update
// removing or restoring one endpoint, and reads the proxy's own figures for
// the window. Every touched slice is restored to the bulk object afterwards.
func measureChurn(ctx context.Context, cs kubernetes.Interface, p *proc, n int, rate float64, dur time.Duration) *churnResult {
	res := &churnResult{RateTarget: rate, ProgP50: -1, ProgP99: -1}
	errf := func(format string, a ...any) {
		if len(res.Errors) < 5 {
			res.Errors = append(res.Errors, fmt.Sprintf(format, a...))
		}
	}
	nsvc := min(churnMaxServices, n)
	res.Services = nsvc
	slots := make([]*churnSlot, nsvc)
	for i := range slots {
		slots[i] = &churnSlot{idx: i}
	}
	workers := int(math.Ceil(rate / 10))
	workers = max(4, min(16, workers))

	// Let the previous measurements' last sync finish first.
	select {
	case <-ctx.Done():
		return res
	case <-time.After(1500 * time.Millisecond):
	}
	m0, err := p.metrics(ctx)
	if err != nil {
		errf("metrics before: %v", err)
		return res
	}
	cpu0 := p.cpuSeconds()
	t0 := time.Now()

	var (
		mu       sync.Mutex
		writes   int
		failures int
		wg       sync.WaitGroup
	)
	jobs := make(chan *churnSlot, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				err := s.write(ctx, cs, false)
				mu.Lock()
				if err != nil {
					failures++
					errf("%v", err)
				} else {
					writes++
				}
				mu.Unlock()
			}
		}()
	}
	interval := time.Duration(float64(time.Second) / rate)
	tick := time.NewTicker(interval)
	end := time.NewTimer(dur)
	k := 0
feed:
	for {
		select {
		case <-ctx.Done():
			break feed
		case <-end.C:
			break feed
		case <-tick.C:
			select {
			case jobs <- slots[k%nsvc]:
				k++
			default:
				res.TicksMissed++
			}
		}
	}
	tick.Stop()
	end.Stop()
	close(jobs)
	wg.Wait()
	lastWrite := time.Now()
	window := lastWrite.Sub(t0)
	res.DurationS = round3(window.Seconds())
	res.Writes, res.WriteErrors = writes, failures
	res.RateAchieved = round3(float64(writes) / window.Seconds())
	res.RSSMB = round3(p.rssMB())

	// Settled: a sync ended after the last write and no network
	// programming observation was added for 2.5 s (more than twice the
	// 1 s min-sync-period both proxies use).
	m1 := m0
	var (
		lastCount = -1.0
		stableAt  time.Time
		deadline  = time.Now().Add(60 * time.Second)
	)
	for {
		if m, err := p.metrics(ctx); err == nil {
			m1 = m
			c := m[progHist+"_count"]
			if c != lastCount {
				lastCount, stableAt = c, time.Now()
			}
			synced := m[syncStamp] > float64(lastWrite.UnixNano())/1e9
			if synced && time.Since(stableAt) >= 2500*time.Millisecond {
				break
			}
		}
		if time.Now().After(deadline) {
			errf("proxy not settled within 60 s of the last write")
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
		if ctx.Err() != nil {
			break
		}
	}
	res.SettleS = round3(time.Since(lastWrite).Seconds())
	if cpu1 := p.cpuSeconds(); cpu0 >= 0 && cpu1 >= 0 {
		res.CPUS = round3(cpu1 - cpu0)
		if writes > 0 {
			res.CPUPerChange = round3(res.CPUS / float64(writes) * 1000)
		}
	}
	res.Syncs = m1[syncCount] - m0[syncCount]
	b0, b1 := bucketsOf(m0, progHist), bucketsOf(m1, progHist)
	if v, total, ok := histQuantile(b0, b1, 0.5); ok {
		res.ProgP50, res.ProgN = round3(v*1000), total
	}
	if v, _, ok := histQuantile(b0, b1, 0.99); ok {
		res.ProgP99 = round3(v * 1000)
	}
	if res.ProgN == 0 {
		res.ProgN = m1[progHist+"_count"] - m0[progHist+"_count"]
	}

	// Later proxies must see the same objects: every touched slice back to
	// its 5 endpoints without annotation, as bulkCreate wrote it.
	rctx := context.WithoutCancel(ctx)
	todo := make(chan *churnSlot)
	var rwg sync.WaitGroup
	for w := 0; w < workers; w++ {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			for s := range todo {
				if err := s.write(rctx, cs, true); err != nil {
					mu.Lock()
					errf("restore: %v", err)
					mu.Unlock()
				}
			}
		}()
	}
	for _, s := range slots {
		if s.touched {
			todo <- s
		}
	}
	close(todo)
	rwg.Wait()
	return res
}
