package main

import (
	"math"
	"testing"
)

// Reference values: chi-square survival function from standard tables.
func TestChiSquareUniform(t *testing.T) {
	cases := []struct {
		obs     []float64
		stat, p float64
		df      int
	}{
		{[]float64{100, 100, 100}, 0, 1, 2},
		// df=2: Q = exp(-x/2) exactly.
		{[]float64{120, 100, 80}, 8, math.Exp(-4), 2},
		// df=3, x=7.815 is the 0.05 critical value.
		{[]float64{0, 0, 0, 0}, 0, 1, 3},
	}
	for _, c := range cases {
		stat, df, p := chiSquareUniform(c.obs)
		if math.Abs(stat-c.stat) > 1e-9 || df != c.df || math.Abs(p-c.p) > 1e-9 {
			t.Errorf("chiSquareUniform(%v) = %v, %d, %v; want %v, %d, %v", c.obs, stat, df, p, c.stat, c.df, c.p)
		}
	}
	for _, c := range []struct{ df, x, p float64 }{
		{1, 3.841, 0.05}, {3, 7.815, 0.05}, {5, 15.086, 0.01}, {10, 2.558, 0.99}, {4, 30, 4.894e-6},
	} {
		if got := upperGammaQ(c.df/2, c.x/2); math.Abs(got-c.p) > 1e-3*c.p {
			t.Errorf("Q(df=%v, x=%v) = %v, want %v", c.df, c.x, got, c.p)
		}
	}
}
