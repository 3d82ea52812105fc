package iptables

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/netnstest"
)

// BenchmarkKernelColdStart applies a full sync of N services × 5 endpoints
// into a fresh namespace (MP_BENCH_N, default 1000), then one partial change.
// Results are written by bench/ scripts; run with
//
//	MP_BENCH_N=10000 go test -run XXX -bench KernelColdStart -benchtime 1x ./pkg/iptables
func BenchmarkKernelColdStart(b *testing.B) {
	netnstest.RequireRoot(b, "iptables-restore")
	n := 1000
	if s := os.Getenv("MP_BENCH_N"); s != "" {
		fmt.Sscan(s, &n)
	}
	snap := scaleSnapshot(n, 5)
	for i := 0; i < b.N; i++ {
		ns := netnstest.New(b, "bench")
		be, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), cfg(), ExecRunner("ip", "netns", "exec", ns.Name))
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		res, err := be.Sync(context.Background(), snap, true)
		if err != nil {
			b.Fatal(err)
		}
		cold := time.Since(start)

		changed := scaleSnapshot(n, 5)
		for k, v := range snap.Services {
			changed.Services[k] = v
		}
		sps := snap.Sorted()
		one := *sps[len(sps)/2]
		one.Endpoints = one.Endpoints[1:]
		changed.Services[one.Name] = &one
		start = time.Now()
		if _, err := be.Sync(context.Background(), changed, false); err != nil {
			b.Fatal(err)
		}
		partial := time.Since(start)
		b.ReportMetric(cold.Seconds(), "cold-s")
		b.ReportMetric(partial.Seconds()*1000, "partial-ms")
		b.ReportMetric(float64(res.Rules), "lines")
		b.Logf("N=%d cold start %v (%d lines), one endpoint removed %v", n, cold, res.Rules, partial)
	}
}
