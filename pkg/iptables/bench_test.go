package iptables

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
)

// scaleSnapshot builds n ClusterIP services with eps endpoints each.
func scaleSnapshot(n, eps int) *model.Snapshot {
	s := mt.Snap()
	for i := 0; i < n; i++ {
		var list []model.Endpoint
		for j := 0; j < eps; j++ {
			ip := netip.AddrFrom4([4]byte{10, byte(128 + (i*eps+j)>>16), byte((i*eps + j) >> 8), byte(i*eps + j)})
			list = append(list, mt.Ep(ip.String(), 8080, "node-b"))
		}
		vip := netip.AddrFrom4([4]byte{172, 30, byte(i >> 8), byte(i)})
		sp := mt.SP("bench", fmt.Sprintf("svc-%d", i), "http", vip.String(), 80, list...)
		s.Services[sp.Name] = sp
	}
	return s
}

func benchmarkRender(b *testing.B, n int) {
	snap := scaleSnapshot(n, 5)
	r := &Renderer{Cfg: cfg(), Family: model.IPv4}
	base := r.RenderBase(snap.Node)
	b.ReportAllocs()
	b.ResetTimer()
	var lines int
	for i := 0; i < b.N; i++ {
		p := renderFull(r, snap, base, nil, coldChunk)
		for _, c := range p.chunks {
			_ = c.String()
		}
		_ = p.final.String()
		lines = p.lines()
	}
	b.ReportMetric(float64(lines), "lines")
}

func BenchmarkRenderFull1k(b *testing.B)  { benchmarkRender(b, 1000) }
func BenchmarkRenderFull10k(b *testing.B) { benchmarkRender(b, 10000) }

// BenchmarkRenderOneChange is the pure cost of a partial sync at 10k services.
func BenchmarkRenderOneChange(b *testing.B) {
	snap := scaleSnapshot(10000, 5)
	r := &Renderer{Cfg: cfg(), Family: model.IPv4}
	sps := snap.Sorted()
	sp := sps[len(sps)/2]
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t := newRestoreText()
		sr := r.RenderService(sp, snap.Node)
		for _, c := range sr.Chains {
			t.chain(c)
		}
		_ = t.String()
	}
}
