package main

import (
	"gonum.org/v1/gonum/stat"
	"gonum.org/v1/gonum/stat/distuv"
)

// chiSquareUniform tests observed counts against equal expected counts and
// returns the statistic, degrees of freedom and the upper-tail p-value.
func chiSquareUniform(obs []float64) (chi2 float64, df int, p float64) {
	if len(obs) < 2 {
		return 0, 0, 1
	}
	total := 0.0
	for _, o := range obs {
		total += o
	}
	df = len(obs) - 1
	if total == 0 {
		return 0, df, 1
	}
	exp := make([]float64, len(obs))
	for i := range exp {
		exp[i] = total / float64(len(obs))
	}
	chi2 = stat.ChiSquare(obs, exp)
	return chi2, df, distuv.ChiSquared{K: float64(df)}.Survival(chi2)
}

// chiSquareCritical returns the statistic whose upper-tail probability is
// alpha for df degrees of freedom, so the report can print "critical value
// at 0.1%".
func chiSquareCritical(df int, alpha float64) float64 {
	return distuv.ChiSquared{K: float64(df)}.Quantile(1 - alpha)
}
