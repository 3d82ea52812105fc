package main

import (
	"errors"
	"fmt"
	"image/color"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// writePlots draws spread.png (per-endpoint share of the largest spread
// measurement, one bar group per mode and protocol, expected 1/n as a line)
// and grpc-<mode>.png (share of RPCs per pod over time for each scale-up
// variant).
func writePlots(dir string, r *Results) error {
	var errs []error
	if err := plotSpread(filepath.Join(dir, "spread.png"), r); err != nil {
		errs = append(errs, err)
	}
	for _, m := range r.Results {
		if m.GRPC != nil && len(m.GRPC.ScaleUps) > 0 {
			if err := plotGRPC(filepath.Join(dir, "grpc-"+m.Mode+".png"), m); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func plotSpread(path string, r *Results) error {
	p := plot.New()
	p.Title.Text = "Share of new connections per endpoint (10 endpoints)"
	p.Y.Label.Text = "share"
	p.X.Label.Text = "endpoint"
	w := vg.Points(6)
	var bars []*plotter.BarChart
	n := 0
	for _, m := range r.Results {
		for _, s := range m.Spread {
			if s.Endpoints != 10 {
				continue
			}
			vals := make(plotter.Values, len(s.Counts))
			for i, c := range s.Counts {
				vals[i] = c.Share
			}
			b, err := plotter.NewBarChart(vals, w)
			if err != nil {
				return fmt.Errorf("spread bars: %w", err)
			}
			b.Color = plotutil.Color(len(bars))
			b.LineStyle.Width = 0
			b.Offset = w * vg.Length(len(bars)-2)
			p.Legend.Add(fmt.Sprintf("%s %s (p=%.2f)", m.Mode, s.Proto, s.PValue), b)
			bars = append(bars, b)
			n = len(vals)
		}
	}
	if len(bars) == 0 {
		return nil
	}
	for _, b := range bars {
		p.Add(b)
	}
	exp := plotter.NewFunction(func(float64) float64 { return 1 / float64(n) })
	exp.Color = color.Black
	exp.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(exp)
	p.Legend.Add("expected 1/n", exp)
	p.Legend.Top = true
	p.X.Min, p.X.Max = -1, float64(n)
	p.Y.Min, p.Y.Max = 0, 0.2
	if err := p.Save(9*vg.Inch, 4.5*vg.Inch, path); err != nil {
		return fmt.Errorf("save %s: %w", path, err)
	}
	return nil
}

func plotGRPC(path string, m *ModeResult) error {
	ups := m.GRPC.ScaleUps
	const cols = 2
	rows := (len(ups) + cols - 1) / cols
	img := vgimg.New(vg.Length(cols)*5*vg.Inch, vg.Length(rows)*3.2*vg.Inch)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Points(8), PadY: vg.Points(8)}
	canvases := plot.Align(make2D(rows, cols, func(i int) *plot.Plot {
		if i >= len(ups) {
			return nil
		}
		return sharePlot(ups[i])
	}), tiles, dc)
	for i := range ups {
		sharePlot(ups[i]).Draw(canvases[i/cols][i%cols])
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	defer f.Close()
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func make2D(rows, cols int, f func(int) *plot.Plot) [][]*plot.Plot {
	out := make([][]*plot.Plot, rows)
	for r := range out {
		out[r] = make([]*plot.Plot, cols)
		for c := range out[r] {
			out[r][c] = f(r*cols + c)
		}
	}
	return out
}

// sharePlot draws each pod's share of the RPCs in each time bin.
func sharePlot(u ScaleUp) *plot.Plot {
	p := plot.New()
	p.Title.Text = u.Variant
	p.Title.TextStyle.Font.Size = vg.Points(9)
	p.X.Label.Text = "seconds"
	p.Y.Label.Text = "share of RPCs"
	p.Y.Min, p.Y.Max = 0, 1.05
	tl := u.Timeline
	for j, name := range tl.Names {
		pts := make(plotter.XYs, 0, len(tl.Bins))
		for i, bin := range tl.Bins {
			tot := 0
			for _, v := range bin {
				tot += v
			}
			if tot == 0 {
				continue
			}
			pts = append(pts, plotter.XY{X: (float64(i) + 0.5) * tl.BinSec, Y: float64(bin[j]) / float64(tot)})
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			continue
		}
		l.Color = plotutil.Color(j)
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(name, l)
	}
	line, err := plotter.NewLine(plotter.XYs{{X: tl.ScaleSec, Y: 0}, {X: tl.ScaleSec, Y: 1.05}})
	if err == nil {
		line.Color = color.Gray{Y: 100}
		line.Dashes = []vg.Length{vg.Points(3), vg.Points(3)}
		p.Add(line)
		p.Legend.Add("3 → 6 pods", line)
	}
	p.Legend.Top = true
	p.Legend.TextStyle.Font.Size = vg.Points(7)
	return p
}
