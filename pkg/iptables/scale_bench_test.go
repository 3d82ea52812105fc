package iptables

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// BenchmarkKernelColdStart applies a full sync of N services × 5 endpoints
// into a fresh namespace (MP_BENCH_N, default 1000), then one partial change,
// a 100-Service partial change, and the periodic full sync with and without a
// foreign commit in between.
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
		c := cfg()
		c.NetNS = proxy.NetNS(ns.Path())
		be, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), c, nil)
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
		// Churn: 100 services each swap one endpoint for a new address, the
		// shape of a rolling update; one partial sync carries all of them.
		churned := scaleSnapshot(n, 5)
		for k, v := range changed.Services {
			churned.Services[k] = v
		}
		for i := 0; i < 100 && i < len(sps); i++ {
			sp := *sps[i*len(sps)/100]
			eps := append([]model.Endpoint(nil), sp.Endpoints...)
			eps[0].IP = netip.AddrFrom4([4]byte{10, 250, byte(i >> 8), byte(i)})
			sp.Endpoints = eps
			churned.Services[sp.Name] = &sp
		}
		start = time.Now()
		if _, err := be.Sync(context.Background(), churned, false); err != nil {
			b.Fatal(err)
		}
		churn := time.Since(start)

		// The periodic full sync: settled by the generation when only we
		// committed, a rewrite of everything once anyone else has.
		start = time.Now()
		if _, err := be.Sync(context.Background(), churned, true); err != nil {
			b.Fatal(err)
		}
		checked := time.Since(start)
		ns.MustRun(b, "iptables", "-t", "nat", "-N", "OTHER-AGENT")
		start = time.Now()
		if _, err := be.Sync(context.Background(), churned, true); err != nil {
			b.Fatal(err)
		}
		rewrite := time.Since(start)

		b.ReportMetric(cold.Seconds(), "cold-s")
		b.ReportMetric(partial.Seconds()*1000, "partial-ms")
		b.ReportMetric(churn.Seconds()*1000, "churn100-ms")
		b.ReportMetric(checked.Seconds()*1000, "fullcheck-ms")
		b.ReportMetric(rewrite.Seconds(), "fullrewrite-s")
		b.ReportMetric(float64(res.Rules), "lines")
		b.Logf("N=%d cold start %v (%d lines), one endpoint removed %v, 100 services changed %v, periodic full sync %v unchanged / %v after a foreign commit",
			n, cold, res.Rules, partial, churn, checked, rewrite)
	}
}
