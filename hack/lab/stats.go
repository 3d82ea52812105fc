package main

import "math"

// chiSquareUniform tests observed counts against equal expected counts and
// returns the statistic, degrees of freedom and the upper-tail p-value.
func chiSquareUniform(obs []float64) (stat float64, df int, p float64) {
	if len(obs) < 2 {
		return 0, 0, 1
	}
	total := 0.0
	for _, o := range obs {
		total += o
	}
	if total == 0 {
		return 0, len(obs) - 1, 1
	}
	e := total / float64(len(obs))
	for _, o := range obs {
		stat += (o - e) * (o - e) / e
	}
	df = len(obs) - 1
	return stat, df, upperGammaQ(float64(df)/2, stat/2)
}

// chiSquareCritical returns the statistic whose upper-tail probability is
// alpha for df degrees of freedom, by bisection on the survival function
// (monotone in x), so the report can print "critical value at 0.1%".
func chiSquareCritical(df int, alpha float64) float64 {
	lo, hi := 0.0, 1000.0
	for i := 0; i < 200; i++ {
		mid := (lo + hi) / 2
		if upperGammaQ(float64(df)/2, mid/2) > alpha {
			lo = mid
		} else {
			hi = mid
		}
	}
	return (lo + hi) / 2
}

// upperGammaQ is the regularized upper incomplete gamma function Q(a, x),
// the chi-square survival function at 2x with 2a degrees of freedom. It uses
// the power series for x < a+1 and Lentz's continued fraction otherwise.
func upperGammaQ(a, x float64) float64 {
	if x <= 0 {
		return 1
	}
	lg, _ := math.Lgamma(a)
	prefix := math.Exp(-x + a*math.Log(x) - lg)
	if x < a+1 {
		sum, term := 1/a, 1/a
		for n := 1; n < 1000; n++ {
			term *= x / (a + float64(n))
			sum += term
			if math.Abs(term) < math.Abs(sum)*1e-15 {
				break
			}
		}
		return 1 - prefix*sum
	}
	const tiny = 1e-300
	b := x + 1 - a
	c := 1 / tiny
	d := 1 / b
	h := d
	for i := 1; i < 1000; i++ {
		an := -float64(i) * (float64(i) - a)
		b += 2
		d = an*d + b
		if math.Abs(d) < tiny {
			d = tiny
		}
		c = b + an/c
		if math.Abs(c) < tiny {
			c = tiny
		}
		d = 1 / d
		delta := d * c
		h *= delta
		if math.Abs(delta-1) < 1e-15 {
			break
		}
	}
	return prefix * h
}
