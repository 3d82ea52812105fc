package main

import (
	"math"
	"testing"
)

// TestChiSquareUniform pins the statistic, degrees of freedom and p-value
// to the values the lab's hand-written implementation (an incomplete gamma
// series and continued fraction, replaced by gonum) gave for the same
// counts, so reports before and after the change compare. The rows include
// counts like the spread experiment's (1,000 draws over 3 and 10 endpoints).
func TestChiSquareUniform(t *testing.T) {
	for _, c := range []struct {
		obs  []float64
		chi2 float64
		df   int
		p    float64
	}{
		{[]float64{100, 100, 100}, 0, 2, 1},
		{[]float64{120, 100, 80}, 8, 2, 0.018315638888734182}, // df=2: p = exp(-x/2) exactly
		{[]float64{0, 0, 0, 0}, 0, 3, 1},
		{[]float64{5}, 0, 0, 1},
		{[]float64{}, 0, 0, 1},
		{[]float64{342, 331, 327}, 0.362, 2, 0.8344353586957896},
		{[]float64{310, 352, 338}, 2.7439999999999998, 2, 0.25359925350897405},
		{[]float64{95, 104, 99, 110, 87, 101, 93, 108, 102, 101}, 4.299999999999999, 9, 0.8905815111584136},
		{[]float64{80, 120, 95, 105, 110, 90, 130, 70, 100, 100}, 28.5, 9, 0.0007865788770983089},
		{[]float64{500, 250, 250}, 125.00000000000001, 2, 7.187781739060932e-28},
		{[]float64{1000, 0}, 1000, 1, 1.7958327848007363e-219},
	} {
		chi2, df, p := chiSquareUniform(c.obs)
		if !near(chi2, c.chi2, 1e-12) || df != c.df || !near(p, c.p, 1e-9) {
			t.Errorf("chiSquareUniform(%v) = %v, %d, %v; before: %v, %d, %v", c.obs, chi2, df, p, c.chi2, c.df, c.p)
		}
	}
}

// TestChiSquareCriticalAsBefore pins the 0.1% critical values to the
// hand-written bisection's; the 0.1% column of a chi-square table agrees to
// the third decimal (TestChiSquareCritical).
func TestChiSquareCriticalAsBefore(t *testing.T) {
	for df, before := range map[int]float64{
		1: 10.827566170662731, 2: 13.815510557964274, 3: 16.266236196238133, 4: 18.46682695290317,
		5: 20.515005652432876, 9: 27.877164871256575, 19: 43.820195964517524, 49: 85.35056460859309,
	} {
		if got := chiSquareCritical(df, 0.001); !near(got, before, 1e-9) {
			t.Errorf("critical(df=%d, 0.1%%) = %v; before: %v", df, got, before)
		}
	}
}

// near reports whether a and b agree to rel relative error.
func near(a, b, rel float64) bool {
	return math.Abs(a-b) <= rel*math.Max(math.Abs(a), math.Abs(b))
}
