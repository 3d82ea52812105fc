package main

import (
	"math"
	"testing"
)

func TestHistQuantile(t *testing.T) {
	inf := math.Inf(1)
	// kube-proxy-like coarse layout; before has 100 old observations
	// that must not count.
	before := []bucket{{0.25, 10}, {0.5, 50}, {1, 90}, {2, 100}, {inf, 100}}
	cases := []struct {
		name          string
		before, after []bucket
		q             float64
		want, total   float64
		ok            bool
	}{
		{
			// Added: 0 ≤0.25, 10 in (0.25,0.5], 80 in (0.5,1], 10 in (1,2].
			// rank 50 → 40 into the (0.5,1] bucket of 80: 0.5 + 0.5·40/80.
			name: "p50 difference, interpolated", before: before,
			after: []bucket{{0.25, 10}, {0.5, 60}, {1, 180}, {2, 200}, {inf, 200}},
			q:     0.5, want: 0.75, total: 100, ok: true,
		},
		{
			// rank 99 → 9 of the 10 in (1,2]: 1 + 1·9/10.
			name: "p99 difference", before: before,
			after: []bucket{{0.25, 10}, {0.5, 60}, {1, 180}, {2, 200}, {inf, 200}},
			q:     0.99, want: 1.9, total: 100, ok: true,
		},
		{
			// rank 2 of 8, 4 in [0,0.001]: 0.001·2/4.
			name:  "first bucket interpolates from zero",
			after: []bucket{{0.001, 4}, {0.002, 8}, {inf, 8}},
			q:     0.25, want: 0.0005, total: 8, ok: true,
		},
		{
			name: "quantile in +Inf is the highest finite bound", before: before,
			after: []bucket{{0.25, 10}, {0.5, 50}, {1, 90}, {2, 100}, {inf, 110}},
			q:     0.5, want: 2, total: 10, ok: true,
		},
		{
			name: "no new observation", before: before, after: before,
			q: 0.5, total: 0, ok: false,
		},
		{
			name: "empty", q: 0.5, ok: false,
		},
		{
			// Empty lower buckets must be skipped: rank 1 of 2, both in
			// (1,2]: 1 + 1·1/2, not 0.
			name:  "skips empty buckets",
			after: []bucket{{0.25, 0}, {0.5, 0}, {1, 0}, {2, 2}, {inf, 2}},
			q:     0.5, want: 1.5, total: 2, ok: true,
		},
		{
			// A bucket missing from before (new series) counts from 0.
			name:   "bucket absent before",
			before: []bucket{{1, 3}, {inf, 3}},
			after:  []bucket{{0.5, 2}, {1, 5}, {inf, 5}},
			// diff: ≤0.5: 2, ≤1: 2 (monotone clamp of 5-3=2), +Inf: 2
			q: 1, want: 0.5, total: 2, ok: true,
		},
	}
	for _, c := range cases {
		got, total, ok := histQuantile(c.before, c.after, c.q)
		if ok != c.ok || total != c.total || (ok && math.Abs(got-c.want) > 1e-9) {
			t.Errorf("%s: got (%v, %v, %v), want (%v, %v, %v)", c.name, got, total, ok, c.want, c.total, c.ok)
		}
	}
}

func TestBucketsOfParsesMetricsKeys(t *testing.T) {
	m := map[string]float64{}
	for _, l := range []struct {
		le string
		v  float64
	}{{"0.5", 1}, {"1.0", 2}, {"1e+00", 1}, {"+Inf", 4}} {
		m[bucketKey(progHist+"_bucket", l.le)] += l.v
	}
	m[progHist+"_count"] = 4
	got := bucketsOf(m, progHist)
	want := []bucket{{0.5, 1}, {1, 3}, {math.Inf(1), 4}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if le, ok := leLabel(`{ip_family="IPv4",le="0.25"}`); !ok || le != "0.25" {
		t.Fatalf("leLabel = %q, %v", le, ok)
	}
}
