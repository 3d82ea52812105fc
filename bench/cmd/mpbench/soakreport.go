package main

import (
	"encoding/json"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// soakSeries is one sampled quantity and the growth it tolerates before the
// verdict calls it growing: max(Abs, Rel × first-quarter median).
type soakSeries struct {
	Name    string
	Unit    string
	Abs     float64
	Rel     float64
	Verdict bool // false: reported, not judged
	Get     func(s SoakSample) float64
}

// soakSeriesList: why these tolerances.
//   - Memory (RSS, heap): 10 % or 2 MB. Go's heap swings by up to GOGC=100 %
//     between collections and the scavenger returns pages over minutes, so
//     single samples are noisy; quarter medians of ~20 samples move by a few
//     per cent on a flat process. 10 % over one soak is the smallest growth
//     this noise lets us call; the report turns it into a per-change bound.
//   - Goroutines and fds: 5. Both are exact counts; the scrape itself and a
//     sync in flight add one or two. A leak per Service, per sync or per
//     scrape adds hundreds over 15 minutes.
//   - Kernel chains, rules and set elements: 1 % or 20. The churn keeps their
//     number constant (swaps, not removals; a fixed window of ephemeral
//     Services), so anything left behind by a deleted Service or a moved
//     endpoint accumulates past that within minutes.
//   - Threads are reported, not judged: the Go runtime does not end idle
//     threads, so the count records the peak of concurrent blocking syscalls.
var soakSeriesList = []soakSeries{
	{"RSS", "MB", 2, 0.10, true, func(s SoakSample) float64 { return s.RSSMB }},
	{"Go heap in use", "MB", 2, 0.10, true, func(s SoakSample) float64 { return s.HeapMB }},
	{"goroutines", "", 5, 0, true, func(s SoakSample) float64 { return s.Goroutines }},
	{"open fds", "", 5, 0, true, func(s SoakSample) float64 { return s.FDs }},
	{"kernel chains", "", 20, 0.01, true, func(s SoakSample) float64 { return s.Chains }},
	{"kernel rules", "", 20, 0.01, true, func(s SoakSample) float64 { return s.Rules }},
	{"kernel set/map elements", "", 20, 0.01, true, func(s SoakSample) float64 { return s.Elements }},
	{"OS threads", "", 0, 0, false, func(s SoakSample) float64 { return s.Threads }},
}

// seriesStat is the verdict on one series after the warm-up.
type seriesStat struct {
	N         int
	FirstQ    float64 // median of the first quarter of the judged window
	LastQ     float64 // median of the last quarter
	SlopePerH float64 // least-squares slope, per hour
	Min, Max  float64 // over the judged window
	Tol       float64
	Growing   bool
	Judged    bool // false: too few samples
}

// analyzeSeries judges values v sampled at times t (seconds), leaving out
// samples before warm and invalid (negative) readings. A series grows when
// both the last-quarter median exceeds the first-quarter median by more
// than tol and the least-squares trend over the window does: one needs a
// sustained rise, the other that the rise is not one burst at the start
// or end of the window.
func analyzeSeries(t, v []float64, warm, abs, rel float64) seriesStat {
	var ts, vs []float64
	for i := range t {
		if t[i] >= warm && v[i] >= 0 && !math.IsNaN(v[i]) {
			ts, vs = append(ts, t[i]), append(vs, v[i])
		}
	}
	st := seriesStat{N: len(ts)}
	if len(ts) < 8 {
		return st
	}
	st.Judged = true
	t0, t1 := ts[0], ts[len(ts)-1]
	span := t1 - t0
	var first, last []float64
	for i, x := range ts {
		if x <= t0+span/4 {
			first = append(first, vs[i])
		}
		if x >= t1-span/4 {
			last = append(last, vs[i])
		}
	}
	st.FirstQ, st.LastQ = median(first), median(last)
	st.Min, st.Max = minMax(vs)
	slope := lsqSlope(ts, vs)
	st.SlopePerH = slope * 3600
	st.Tol = math.Max(abs, rel*st.FirstQ)
	st.Growing = st.LastQ-st.FirstQ > st.Tol && slope*span > st.Tol
	return st
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// lsqSlope is the least-squares slope of v over t.
func lsqSlope(t, v []float64) float64 {
	n := float64(len(t))
	var mt, mv float64
	for i := range t {
		mt += t[i]
		mv += v[i]
	}
	mt, mv = mt/n, mv/n
	var num, den float64
	for i := range t {
		num += (t[i] - mt) * (v[i] - mv)
		den += (t[i] - mt) * (t[i] - mt)
	}
	if den == 0 {
		return 0
	}
	return num / den
}

func (r *SoakRun) column(get func(SoakSample) float64) (t, v []float64) {
	for _, s := range r.Samples {
		t = append(t, s.T)
		v = append(v, get(s))
	}
	return t, v
}

// verdict judges every series of a run; growing lists the ones that grow.
func (r *SoakRun) verdict(warm float64) (stats []seriesStat, growing []string, judged bool) {
	judged = len(r.Samples) > 0
	for _, ss := range soakSeriesList {
		t, v := r.column(ss.Get)
		st := analyzeSeries(t, v, warm, ss.Abs, ss.Rel)
		stats = append(stats, st)
		if !ss.Verdict {
			continue
		}
		if ss.Name == "kernel set/map elements" && r.Mode != "nftables" {
			continue
		}
		if !st.Judged {
			judged = false
		}
		if st.Growing {
			growing = append(growing, ss.Name)
		}
	}
	return stats, growing, judged
}

func fmtNum(v float64, unit string) string {
	if math.IsNaN(v) {
		return "—"
	}
	if unit == "MB" {
		return fmt.Sprintf("%.1f MB", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func writeSoakReport(dir, stamp string, res *SoakResult) error {
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	w("# miniproxy churn soak, %s\n\n", res.Date.Format("2006-01-02 15:04 UTC"))
	w("Generated by `make soak` (`mpbench -soak %s -n %d`) on %s (%d CPUs, kernel %s, %s), kube-apiserver %s.\n",
		fmtDur(res.DurationS), res.N, res.Host, res.CPUs, res.Kernel, res.GoVersion, res.K8sVersion)
	w("Raw samples: `%s.json`; heap profiles: `%s-heap-<mode>-{warm,end}.pb.gz` (`go tool pprof -base warm end`).\n\n", stamp, stamp)

	var overall []string
	allJudged := len(res.Runs) > 0
	for i := range res.Runs {
		r := &res.Runs[i]
		_, growing, judged := r.verdict(res.WarmupS)
		allJudged = allJudged && judged && r.Error == ""
		for _, g := range growing {
			overall = append(overall, r.Mode+" "+g)
		}
	}
	switch {
	case len(overall) > 0:
		w("**Verdict: growing** (%s).\n\n", strings.Join(overall, ", "))
	case !allJudged:
		w("**Verdict: incomplete** (a mode failed or too few samples; see below).\n\n")
	default:
		w("**Verdict: flat** — no judged series grew past its tolerance in any mode (tolerances and why: below).\n\n")
	}
	w("**Load average** (1/5/15 min) before: %s, after: %s. The machine (%d CPUs) is shared with other builds and tests;\n", res.LoadBefore, res.LoadAfter, res.CPUs)
	w("the per-mode figures below give the load at each mode's start and end and the 1-min range over its samples.\n\n")
	w("Setup: real etcd + kube-apiserver, one node namespace, %d selector-less ClusterIP Services × %d endpoints, then for\n", res.N, res.Endpoints)
	w("each mode in turn miniproxy alone (`--profiling`, defaults otherwise) on an emptied node for %s of churn after its\n", fmtDur(res.DurationS))
	w("first sync: %.0f EndpointSlice updates/s round-robin over the first %d Services, each moving one endpoint to another\n", res.ChurnRate, res.ChurnSvcs)
	w("address and back (so endpoint chains/elements are deleted and created while their number stays constant), and one\n")
	w("new Service with a 5-endpoint slice every %s, the oldest deleted once %d are alive (Services, ClusterIPs and their\n", fmtDur(res.SvcIntervalS), res.SvcWindow)
	w("rules come and go). Sampled every %s: VmRSS, `go_memstats_heap_inuse_bytes`, `go_goroutines`, /proc/<pid>/fd, threads,\n", fmtDur(res.SampleS))
	w("and the node namespace's objects (`nft -j list ruleset` in nftables mode, `iptables-save` in iptables mode).\n\n")

	for i := range res.Runs {
		r := &res.Runs[i]
		stats, growing, _ := r.verdict(res.WarmupS)
		verdict := "flat"
		if len(growing) > 0 {
			verdict = "growing (" + strings.Join(growing, ", ") + ")"
		}
		w("## %s\n\n", r.Mode)
		if r.Error != "" {
			w("Error: `%s`\n\n", oneLine(r.Error))
			verdict = "incomplete"
		}
		var l1 []float64
		var last SoakSample
		for _, s := range r.Samples {
			l1 = append(l1, s.Load1)
			last = s
		}
		lmin, lmax := minMax(l1)
		w("First sync %.1f s after start; soak %.0f s, %d samples; %d EndpointSlice updates (%.1f/s, %d write errors), %d Services\n",
			r.FirstSyncS, r.DurationS, len(r.Samples), last.Writes, r.RateAchieved, last.WriteErrs, last.SvcCreated)
		w("created and %d deleted, %.0f syncs. Load at start %s, at end %s, 1-min load over the samples %.1f–%.1f.\n\n",
			last.SvcDeleted, last.Syncs-firstSyncs(r), r.LoadStart, r.LoadEnd, lmin, lmax)
		w("| series (after the %s warm-up) | first-quarter median | last-quarter median | change | slope per hour | min–max | tolerance | verdict |\n", fmtDur(res.WarmupS))
		w("|---|---|---|---|---|---|---|---|\n")
		for j, ss := range soakSeriesList {
			st := stats[j]
			if ss.Name == "kernel set/map elements" && r.Mode != "nftables" {
				continue
			}
			v := "flat"
			switch {
			case !ss.Verdict:
				v = "not judged"
			case !st.Judged:
				v = "too few samples"
			case st.Growing:
				v = "**growing**"
			}
			change := "—"
			if st.Judged && st.FirstQ > 0 {
				change = fmt.Sprintf("%+.1f %%", 100*(st.LastQ-st.FirstQ)/st.FirstQ)
			}
			tol := "—"
			if ss.Verdict && st.Judged {
				tol = fmtNum(st.Tol, ss.Unit)
			}
			slope := "—"
			if st.Judged {
				slope = fmt.Sprintf("%+.2f", st.SlopePerH)
				if ss.Unit != "" {
					slope += " " + ss.Unit
				}
			}
			rng := "—"
			if st.Judged {
				rng = fmtNum(st.Min, ss.Unit) + " – " + fmtNum(st.Max, ss.Unit)
			}
			w("| %s | %s | %s | %s | %s | %s | %s | %s |\n", ss.Name, fmtNum(st.FirstQ, ss.Unit), fmtNum(st.LastQ, ss.Unit), change, slope, rng, tol, v)
		}
		w("\n%s verdict: **%s**.", r.Mode, verdict)
		// What the memory tolerance means per change: the smallest leak
		// this soak would have caught.
		if st := stats[0]; st.Judged && last.Writes > 0 {
			perUpdate := st.Tol * (1 << 20) / float64(last.Writes)
			perSvc := st.Tol * (1 << 20) / math.Max(1, float64(last.SvcDeleted))
			w(" Detection limit for RSS: a leak of more than ~%.0f bytes per EndpointSlice update or ~%.0f KB per\n", perUpdate, perSvc/1024)
			w("created-and-deleted Service would have crossed the %s tolerance.", fmtNum(st.Tol, "MB"))
		}
		w("\n\n")
		if len(r.Errors) > 0 {
			w("Errors (first %d): `%s`\n\n", len(r.Errors), oneLine(strings.Join(r.Errors, "; ")))
		}
	}
	w("## How the verdict is decided\n\n")
	w("The first %s of each mode are a warm-up, plotted but not judged: the first sync's buffers are freed and the Go\n", fmtDur(res.WarmupS))
	w("scavenger returns them to the OS over the first minutes, so RSS falls there, which is not the question. Over the rest,\n")
	w("a series is **growing** when the median of its last quarter exceeds the median of its first quarter by more than its\n")
	w("tolerance *and* the least-squares trend over the window (slope × window length) does too — the first needs a lasting\n")
	w("rise, the second that it is not one burst at the edges. Tolerance = max(absolute, relative × first-quarter median):\n\n")
	w("- RSS and Go heap: 2 MB or 10 %%. The heap swings by up to GOGC=100 %% between collections and the scavenger works\n")
	w("  in the background; quarter medians of ~20 samples of a flat process move by a few per cent. The detection limit\n")
	w("  above turns the tolerance into bytes per change.\n")
	w("- Goroutines and open fds: 5. Exact counts; a scrape or a sync in flight adds one or two. A leak per Service, per\n")
	w("  sync or per scrape adds hundreds in 15 minutes.\n")
	w("- Kernel chains, rules, set/map elements: 20 or 1 %%. The churn keeps their number constant (endpoints are moved,\n")
	w("  not removed; a fixed window of ephemeral Services), so objects left behind by deleted Services or moved\n")
	w("  endpoints accumulate past that within minutes.\n")
	w("- OS threads are shown, not judged: the Go runtime does not end idle threads, so the count is the peak of concurrent\n")
	w("  blocking syscalls so far.\n\n")
	if err := writeSoakPlot(filepath.Join(dir, stamp+".png"), res); err != nil {
		w("Plot failed: %v\n", err)
	} else {
		w("## Plot\n\n![soak](%s.png)\n\nRSS (solid) and Go heap in use (dashed); goroutines; open fds; kernel rules (solid), chains (dashed) and\n", stamp)
		w("nftables set/map elements (dotted).\n")
		w("x: minutes since the churn started; the grey line marks the end of the warm-up.\n")
	}
	return os.WriteFile(filepath.Join(dir, stamp+".md"), []byte(b.String()), 0o644)
}

func firstSyncs(r *SoakRun) float64 {
	if len(r.Samples) == 0 || r.Samples[0].Syncs < 0 {
		return 0
	}
	return r.Samples[0].Syncs
}

func minMax(v []float64) (float64, float64) {
	if len(v) == 0 {
		return math.NaN(), math.NaN()
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = math.Min(lo, x), math.Max(hi, x)
	}
	return lo, hi
}

func fmtDur(s float64) string {
	switch {
	case s >= 60 && math.Mod(s, 60) == 0:
		return fmt.Sprintf("%.0fm", s/60)
	default:
		return fmt.Sprintf("%.0fs", s)
	}
}

var modeColor = map[string]color.Color{
	"iptables": color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	"nftables": color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	"ipvs":     color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
}

// writeSoakPlot draws the series over time, one panel per kind, both modes
// in each.
func writeSoakPlot(path string, res *SoakResult) error {
	type line struct {
		label  string
		get    func(SoakSample) float64
		dashed bool
	}
	panels := []struct {
		title, ylabel string
		lines         []line
	}{
		{"memory", "MB", []line{{"RSS", func(s SoakSample) float64 { return s.RSSMB }, false}, {"heap in use", func(s SoakSample) float64 { return s.HeapMB }, true}}},
		{"goroutines", "", []line{{"goroutines", func(s SoakSample) float64 { return s.Goroutines }, false}}},
		{"open fds", "", []line{{"fds", func(s SoakSample) float64 { return s.FDs }, false}}},
		{"kernel objects", "", []line{{"rules", func(s SoakSample) float64 { return s.Rules }, false}, {"chains", func(s SoakSample) float64 { return s.Chains }, true}, {"set/map elements", func(s SoakSample) float64 { return s.Elements }, true}}},
	}
	plots := make([][]*plot.Plot, len(panels))
	for i, pn := range panels {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s, %d Services, churn %.0f/s", pn.title, res.N, res.ChurnRate)
		p.X.Label.Text = "minutes"
		p.Y.Label.Text = pn.ylabel
		p.Legend.Top, p.Legend.Left = true, true
		p.Y.Min = 0
		ymax := 0.0
		for _, r := range res.Runs {
			for _, ln := range pn.lines {
				var pts plotter.XYs
				nonzero := false
				for _, s := range r.Samples {
					if v := ln.get(s); v >= 0 {
						nonzero = nonzero || v > 0
						pts = append(pts, plotter.XY{X: s.T / 60, Y: v})
						ymax = math.Max(ymax, v)
					}
				}
				if !nonzero { // e.g. set elements in iptables mode
					continue
				}
				l, err := plotter.NewLine(pts)
				if err != nil {
					return fmt.Errorf("plot %s: %w", pn.title, err)
				}
				l.Color = modeColor[r.Mode]
				if ln.dashed {
					l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				}
				if ln.label == "set/map elements" {
					l.Dashes = []vg.Length{vg.Points(1), vg.Points(2)}
				}
				p.Add(l)
				p.Legend.Add(r.Mode+" "+ln.label, l)
			}
		}
		// Head room for the legend, top left.
		p.Y.Max = ymax * 1.8
		p.Y.Tick.Marker = plainTicks{}
		if ymax > 0 {
			wl, err := plotter.NewLine(plotter.XYs{{X: res.WarmupS / 60, Y: 0}, {X: res.WarmupS / 60, Y: p.Y.Max}})
			if err == nil {
				wl.Color = color.Gray{Y: 0xa0}
				p.Add(wl)
			}
		}
		plots[i] = []*plot.Plot{p}
	}
	img := vgimg.New(8*vg.Inch, 11*vg.Inch)
	dc := draw.New(img)
	t := draw.Tiles{Rows: len(panels), Cols: 1, PadX: vg.Millimeter, PadY: 4 * vg.Millimeter,
		PadTop: vg.Points(4), PadBottom: vg.Points(4), PadLeft: vg.Points(4), PadRight: vg.Points(8)}
	canvases := plot.Align(plots, t, dc)
	for i := range plots {
		plots[i][0].Draw(canvases[i][0])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// plainTicks are gonum's default ticks labelled without trailing zeros.
type plainTicks struct{}

func (plainTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = strconv.FormatFloat(ts[i].Value, 'g', -1, 64)
		}
	}
	return ts
}

// soakReportFrom rewrites the markdown report and plot of a soak result
// file next to it in dir.
func soakReportFrom(dir, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	var res SoakResult
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("parse %s: %w", path, err)
	}
	return writeSoakReport(dir, strings.TrimSuffix(filepath.Base(path), ".json"), &res)
}
