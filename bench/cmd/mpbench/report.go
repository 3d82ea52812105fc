package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// pick returns the run of impl/mode at n, or nil.
func pick(res *Result, impl, mode string, n int) *Run {
	for i := range res.Runs {
		r := &res.Runs[i]
		if r.Impl == impl && r.Mode == mode && r.N == n {
			return r
		}
	}
	return nil
}

// metric is one row of the comparison table.
type metric struct {
	name string
	unit string
	get  func(r *Run) (float64, bool)
}

func statP(s func(r *Run) *Stats, p99 bool) func(r *Run) (float64, bool) {
	return func(r *Run) (float64, bool) {
		st := s(r)
		if st == nil {
			return 0, false
		}
		if p99 {
			return st.P99, true
		}
		return st.P50, true
	}
}

func changes(f func(c *changeResult) *Stats) func(r *Run) *Stats {
	return func(r *Run) *Stats {
		if r.Changes == nil {
			return nil
		}
		return f(r.Changes)
	}
}

var metrics = []metric{
	{"cold start (process start → last-created Service's VIP answers)", "s", func(r *Run) (float64, bool) { return r.ColdStartS, r.ColdStartS >= 0 && !r.TimedOut }},
	{"first sync as reported by the proxy (sync_proxy_rules_last_timestamp)", "s", func(r *Run) (float64, bool) { return r.FirstSyncS, r.FirstSyncS > 0 }},
	{"CPU to first sync (proxy + children)", "s", func(r *Run) (float64, bool) { return r.CPUColdS, r.CPUColdS >= 0 && !r.TimedOut }},
	{"add 1 Service: API write → VIP answers, p50", "ms", statP(changes(func(c *changeResult) *Stats { return c.AddAnswer }), false)},
	{"add 1 Service: API write → VIP answers, p99", "ms", statP(changes(func(c *changeResult) *Stats { return c.AddAnswer }), true)},
	{"add 1 Service: proxy's network_programming, p50", "ms", statP(changes(func(c *changeResult) *Stats { return c.AddProg }), false)},
	{"remove 1 endpoint: proxy's network_programming, p50", "ms", statP(changes(func(c *changeResult) *Stats { return c.RemoveProg }), false)},
	{"remove 1 endpoint: proxy's network_programming, p99", "ms", statP(changes(func(c *changeResult) *Stats { return c.RemoveProg }), true)},
	{"RSS after first sync", "MB", func(r *Run) (float64, bool) { return r.RSSMB, r.RSSMB > 0 && !r.TimedOut }},
	{"RSS 3 s after first sync", "MB", func(r *Run) (float64, bool) { return r.RSSSettledMB, r.RSSSettledMB > 0 }},
	{"RSS after the changes", "MB", func(r *Run) (float64, bool) { return r.RSSMaxMB, r.RSSMaxMB > 0 }},
	{"first connect to the last-created VIP, p50", "ms", statP(func(r *Run) *Stats { return r.FirstConnect }, false)},
	{"first connect direct to the pod (baseline), p50", "ms", statP(func(r *Run) *Stats { return r.DirectConnect }, false)},
	{"first connect: VIP p50 − direct p50 (the rules' cost)", "ms", func(r *Run) (float64, bool) {
		if r.FirstConnect == nil || r.DirectConnect == nil {
			return 0, false
		}
		return round3(r.FirstConnect.P50 - r.DirectConnect.P50), true
	}},
	// Churn rows stay after the ones writePlots picks by index.
	{"churn: EndpointSlice updates achieved", "/s", churnVal(func(c *churnResult) (float64, bool) { return c.RateAchieved, c.Writes > 0 })},
	{"churn: proxy's network_programming, p50", "ms", churnVal(func(c *churnResult) (float64, bool) { return c.ProgP50, c.ProgN > 0 && c.ProgP50 >= 0 })},
	{"churn: proxy's network_programming, p99", "ms", churnVal(func(c *churnResult) (float64, bool) { return c.ProgP99, c.ProgN > 0 && c.ProgP99 >= 0 })},
	{"churn: syncs during the window", "", churnVal(func(c *churnResult) (float64, bool) { return c.Syncs, c.Writes > 0 })},
	{"churn: CPU during the window (proxy + children)", "s", churnVal(func(c *churnResult) (float64, bool) { return c.CPUS, c.Writes > 0 && c.CPUS >= 0 })},
	{"churn: CPU per endpoint change", "ms/change", churnVal(func(c *churnResult) (float64, bool) { return c.CPUPerChange, c.Writes > 0 && c.CPUPerChange >= 0 })},
	{"churn: RSS at the end of the window", "MB", churnVal(func(c *churnResult) (float64, bool) { return c.RSSMB, c.RSSMB > 0 })},
}

func churnVal(f func(c *churnResult) (float64, bool)) func(r *Run) (float64, bool) {
	return func(r *Run) (float64, bool) {
		if r.Churn == nil {
			return 0, false
		}
		return f(r.Churn)
	}
}

func fmtVal(v float64, unit string) string {
	switch {
	case unit == "":
		return fmt.Sprintf("%.0f", v)
	case unit == "/s":
		return fmt.Sprintf("%.1f /s", v)
	case unit == "ms/change":
		return fmt.Sprintf("%.2f ms", v)
	case unit == "s":
		return fmt.Sprintf("%.2f s", v)
	case unit == "MB":
		return fmt.Sprintf("%.0f MB", v)
	case v < 1:
		return fmt.Sprintf("%.3f ms", v)
	default:
		return fmt.Sprintf("%.0f ms", v)
	}
}

func cell(r *Run, m metric) (string, float64, bool) {
	if r == nil {
		return "not run", 0, false
	}
	if r.TimedOut && (m.unit == "s" && strings.HasPrefix(m.name, "cold")) {
		return fmt.Sprintf("timed out after %.0f s", r.TimeoutS), 0, false
	}
	v, ok := m.get(r)
	if !ok {
		if r.TimedOut {
			return "—", 0, false
		}
		if r.Error != "" {
			return "error", 0, false
		}
		return "—", 0, false
	}
	return fmtVal(v, m.unit), v, true
}

func writeReport(dir string, res *Result, jsonPath string) error {
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	w("# miniproxy vs kube-proxy %s\n\n", res.K8sVersion)
	w("Generated by `make bench%s` on %s (%d CPUs, kernel %s, %s), %s. Raw data: `%s`.\n\n",
		map[bool]string{true: "-quick", false: ""}[res.Quick], res.Host, res.CPUs, res.Kernel, res.GoVersion,
		res.Date.Format("2006-01-02 15:04 UTC"), baseNames(jsonPath))
	w("**Load average** (1/5/15 min) before: %s, after: %s. The machine is shared with other builds, so absolute\n", res.LoadBefore, res.LoadAfter)
	w("figures include contention; the two proxies ran back to back on the same objects, so the ratios are the headline.\n\n")
	w("Setup: real etcd + kube-apiserver, one node namespace, N selector-less ClusterIP Services (TCP 80→8080), one\n")
	w("EndpointSlice of %d endpoints each written directly; the measured Service is created last and has 5 real listeners.\n", res.Endpoints)
	w("Both proxies: `--kubeconfig --hostname-override --proxy-mode --cluster-cidr`, defaults otherwise (kube-proxy's\n")
	w("conntrack tuning off: `--conntrack-max-per-core=0` etc., because those sysctls are global to the host).\n")
	w("Tables are deleted (`nft flush ruleset` in the node namespace) and conntrack flushed between proxies.\n\n")
	for _, c := range res.Create {
		w("Bulk creation of Services %d..%d: %.1f s (%.0f objects/s).\n", c.From, c.To, c.Seconds, float64(2*(c.To-c.From))/math.Max(c.Seconds, 1e-9))
	}
	w("\n")
	for _, n := range res.Ns {
		for _, mode := range []string{"iptables", "nftables"} {
			mp, kp := pick(res, "miniproxy", mode, n), pick(res, "kube-proxy", mode, n)
			if mp == nil && kp == nil {
				continue
			}
			w("## %s, %d Services × %d endpoints\n\n", mode, n, res.Endpoints)
			w("| | miniproxy | kube-proxy | miniproxy / kube-proxy |\n|---|---|---|---|\n")
			for _, m := range metrics {
				a, av, aok := cell(mp, m)
				k, kv, kok := cell(kp, m)
				ratio := "—"
				if aok && kok && kv > 0 {
					ratio = fmt.Sprintf("%.3g", av/kv)
				} else if aok && kp != nil && kp.TimedOut && strings.HasPrefix(m.name, "cold") {
					ratio = fmt.Sprintf("< %.3g", av/kp.TimeoutS)
				}
				w("| %s | %s | %s | %s |\n", m.name, a, k, ratio)
			}
			for _, r := range []*Run{mp, kp} {
				if r == nil {
					continue
				}
				if r.Error != "" {
					w("\n%s error: `%s`\n", r.Impl, oneLine(r.Error))
				}
				if r.Changes != nil && len(r.Changes.Errors) > 0 {
					w("\n%s change errors: `%s`\n", r.Impl, oneLine(strings.Join(r.Changes.Errors, "; ")))
				}
				if c := r.Churn; c != nil {
					w("\n%s churn: %.0f updates/s asked for over %d Services, %d writes in %.1f s (%d errors, %d ticks missed), %.0f programming observations, settled %.1f s after the last write.",
						r.Impl, c.RateTarget, c.Services, c.Writes, c.DurationS, c.WriteErrors, c.TicksMissed, c.ProgN, c.SettleS)
					if len(c.Errors) > 0 {
						w(" Errors: `%s`", oneLine(strings.Join(c.Errors, "; ")))
					}
					w("\n")
				}
				w("\n%s started at load %s.", r.Impl, r.Load)
			}
			w("\n\n")
		}
	}
	if len(res.Notes) > 0 {
		w("## Notes\n\n")
		for _, n := range res.Notes {
			w("- %s\n", n)
		}
		w("\n")
	}
	w("## How the figures are taken\n\n")
	w("- *cold start*: from `exec` of the proxy (inside the node namespace) until the Service created last (its slice is\n")
	w("  also last in every list) answers a TCP connect through its VIP from a pod. The proxy's own end-of-first-sync stamp\n")
	w("  (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`) is shown next to it: a first sync that ran before the\n")
	w("  proxy had seen every object ends early without being complete. Bounded by a per-run timeout; a run past it is\n")
	w("  recorded as timed out and killed. RSS and CPU are read when the last Service answers.\n")
	w("- *add 1 Service → VIP answers*: time from just before the Service create to the first successful TCP connect from a pod\n")
	w("  namespace to the new ClusterIP; a fresh connect is started every 5 ms (each its own conntrack entry). It includes the\n")
	w("  slice write and both watches. Changes are spaced 1.5 s apart so each meets an idle proxy (min-sync-period 1 s).\n")
	w("  The Service and its EndpointSlice are two writes a few ms apart (as with the real endpointslice controller): a proxy\n")
	w("  that syncs the Service alone first must wait out --min-sync-period (1 s) before the sync that adds the endpoints,\n")
	w("  so ~1 s of this figure is the sync runner's rate limit, not rule programming.\n")
	w("- *network_programming*: the proxy's own histogram (`kubeproxy_network_programming_duration_seconds`), one observation\n")
	w("  per change read as the delta of _sum; the slice is written just after a whole second so the 1 s resolution of the\n")
	w("  trigger-time annotation does not blur it.\n")
	w("- *first connect*: connect() time of fresh connections from a pod to the Service created last (worst position in a\n")
	w("  linear iptables walk), next to the same connect straight to a pod IP.\n")
	w("- *RSS*: VmRSS of the proxy process from /proc when the last Service first answers (the peak of a cold start,\n")
	w("  with its buffers still held), 3 s after the proxy reported its first sync, and after the change series.\n")
	w("- *churn*: after the one-at-a-time changes, a steady stream of EndpointSlice updates (a ticker and a few parallel\n")
	w("  writers; `-churn-rate`, default 50/s, for `-churn-duration`, default 60 s, 20 s with -quick) spread round-robin\n")
	w("  over the first min(1,000, N) bulk Services, each update removing or restoring one endpoint and carrying the\n")
	w("  trigger-time annotation at nanosecond resolution. network_programming p50/p99 are interpolated linearly within\n")
	w("  the buckets of the difference of the proxy's histogram between before the window and the moment it is idle again\n")
	w("  (a sync ended after the last write and no new observation for 2.5 s), so their precision is the proxy's bucket\n")
	w("  layout. Syncs are the delta of `sync_proxy_rules_duration_seconds_count`, CPU the delta of the proxy's utime+stime\n")
	w("  (with reaped children) over the same span. Touched slices are restored to their 5 endpoints afterwards.\n\n")
	if err := writePlots(dir, res); err != nil {
		w("Plots failed: %v\n", err)
	} else {
		w("## Plots\n\n")
		for _, mode := range []string{"iptables", "nftables"} {
			w("![cold start %s](cold-start-%s.png) ![add Service %s](add-service-%s.png)\n\n", mode, mode, mode, mode)
		}
		w("![RSS](rss.png)\n\n")
	}
	return os.WriteFile(filepath.Join(dir, "latest.md"), []byte(b.String()), 0o644)
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "`", "'")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

var implColor = map[string]color.Color{
	"miniproxy":  color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	"kube-proxy": color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
}

// writePlots draws value vs N for each mode, miniproxy against kube-proxy.
// The y axes are logarithmic: the two proxies differ by orders of magnitude.
func writePlots(dir string, res *Result) error {
	type series struct {
		file, title, ylabel string
		modes               []string
		get                 func(r *Run) (float64, bool)
	}
	add := metrics[3].get
	var all []series
	for _, mode := range []string{"iptables", "nftables"} {
		all = append(all,
			series{"cold-start-" + mode + ".png", "cold start, " + mode, "seconds", []string{mode}, metrics[0].get},
			series{"add-service-" + mode + ".png", "add 1 Service → VIP answers (p50), " + mode, "milliseconds", []string{mode}, add},
		)
	}
	all = append(all, series{"rss.png", "RSS 3 s after first sync", "MB", []string{"iptables", "nftables"}, metrics[9].get})
	for _, s := range all {
		p := plot.New()
		p.Title.Text = s.title
		p.X.Label.Text = "Services (× 5 endpoints)"
		p.Y.Label.Text = s.ylabel
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		p.Legend.Top = true
		p.Legend.Left = true
		lines := 0
		for _, mode := range s.modes {
			for _, impl := range []string{"miniproxy", "kube-proxy"} {
				var pts plotter.XYs
				ns := append([]int(nil), res.Ns...)
				sort.Ints(ns)
				for _, n := range ns {
					r := pick(res, impl, mode, n)
					if r == nil {
						continue
					}
					if v, ok := s.get(r); ok && v > 0 {
						pts = append(pts, plotter.XY{X: float64(n), Y: v})
					}
				}
				if len(pts) == 0 {
					continue
				}
				l, sc, err := plotter.NewLinePoints(pts)
				if err != nil {
					return fmt.Errorf("plot %s: %w", s.file, err)
				}
				l.Color, sc.Color = implColor[impl], implColor[impl]
				if mode == "nftables" && len(s.modes) > 1 {
					l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				}
				p.Add(l, sc)
				label := impl
				if len(s.modes) > 1 {
					label += " " + mode
				}
				p.Legend.Add(label, l, sc)
				lines++
			}
		}
		if lines == 0 {
			continue
		}
		// Log ticks are only drawn at powers of ten: widen both axes to
		// the enclosing decades so every plot has labelled ticks.
		p.Y.Min, p.Y.Max = decade(p.Y.Min, math.Floor), decade(p.Y.Max, math.Ceil)
		p.X.Min, p.X.Max = decade(p.X.Min, math.Floor), decade(p.X.Max, math.Ceil)
		if p.X.Min == p.X.Max {
			p.X.Max *= 10
		}
		if p.Y.Min == p.Y.Max {
			p.Y.Max *= 10
		}
		if err := p.Save(6*vg.Inch, 4*vg.Inch, filepath.Join(dir, s.file)); err != nil {
			return fmt.Errorf("save %s: %w", s.file, err)
		}
	}
	return nil
}

func baseNames(paths string) string {
	var out []string
	for _, p := range strings.Split(paths, ",") {
		out = append(out, filepath.Base(strings.TrimSpace(p)))
	}
	return strings.Join(out, "`, `")
}

func decade(v float64, round func(float64) float64) float64 {
	if v <= 0 {
		return 1e-3
	}
	return math.Pow(10, round(math.Log10(v)))
}
