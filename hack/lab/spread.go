package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Spread is one distribution measurement.
type Spread struct {
	Proto       string          `json:"proto"`
	Endpoints   int             `json:"endpoints"`
	Connections int             `json:"connections"`
	Errors      int             `json:"errors"`
	Counts      []EndpointCount `json:"counts"`
	ChiSquare   float64         `json:"chi_square"`
	DF          int             `json:"degrees_of_freedom"`
	PValue      float64         `json:"p_value"`
	Critical001 float64         `json:"critical_value_0_1_percent"`
	Within001   bool            `json:"within_0_1_percent_critical_value"`
	Theory      []float64       `json:"theory_rule_probabilities"`
	ElapsedSec  float64         `json:"elapsed_seconds"`
}

// EndpointCount is one endpoint's share.
type EndpointCount struct {
	Name     string  `json:"name"`
	Node     string  `json:"node"`
	Count    int     `json:"count"`
	Share    float64 `json:"share"`
	Expected float64 `json:"expected"`
}

// ruleProbabilities is the per-rule probability each mode's rules carry for n
// endpoints. iptables: rule k is tried only by packets that missed rules
// 0..k-1 and matches with 1/(n-k), so each endpoint gets 1/n overall.
// nftables (miniproxy's shape, not upstream's single vmap): a cascade of
// `numgen random mod (n-k) 0` rules, a fresh draw per rule, so the same
// 1/(n-k) sequence. Both predict a uniform spread; the chi-square test checks it.
func ruleProbabilities(mode string, n int) []float64 {
	out := make([]float64, n)
	for k := range out {
		out[k] = 1 / float64(n-k)
	}
	return out
}

func (l *lab) spread(ctx context.Context, mr *ModeResult) error {
	vipTCP := l.vip(ctx, "web", "tcp")
	vipUDP := l.vip(ctx, "web", "udp")
	for _, n := range []int{3, 10} {
		l.p.step(fmt.Sprintf("%s: spread over %d endpoints", l.mode, n))
		if err := l.web.Scale(ctx, n); err != nil {
			return err
		}
		if err := l.waitSet(ctx, l.client, vipTCP, l.web.PodNames()); err != nil {
			return err
		}
		for _, proto := range []string{"tcp", "udp"} {
			t0 := time.Now()
			var c framework.Counts
			var err error
			if proto == "tcp" {
				c, err = l.client.TCPCounts(ctx, vipTCP, l.cfg.connections)
			} else {
				c, err = l.client.UDPCounts(ctx, vipUDP, l.cfg.connections)
			}
			if err != nil {
				return err
			}
			s := analyse(l.mode, proto, c, l.web.Pods(), time.Since(t0))
			mr.Spread = append(mr.Spread, s)
			l.p.log("%s %s n=%d: %s χ²=%.2f p=%.3f (%.1fs)", l.mode, proto, n, c, s.ChiSquare, s.PValue, s.ElapsedSec)
		}
	}
	return nil
}

func analyse(mode, proto string, c framework.Counts, pods []*framework.Pod, elapsed time.Duration) Spread {
	total := c.Total()
	s := Spread{Proto: proto, Endpoints: len(pods), Connections: total + c.Errors, Errors: c.Errors,
		Theory: ruleProbabilities(mode, len(pods)), ElapsedSec: elapsed.Seconds()}
	exp := float64(total) / float64(len(pods))
	var obs []float64
	for _, p := range pods {
		n := c.ByName[p.Name]
		obs = append(obs, float64(n))
		s.Counts = append(s.Counts, EndpointCount{Name: p.Name, Node: p.Node.Name, Count: n, Share: float64(n) / max(1, float64(total)), Expected: exp})
	}
	s.ChiSquare, s.DF, s.PValue = chiSquareUniform(obs)
	s.Critical001 = chiSquareCritical(s.DF, 0.001)
	s.Within001 = s.ChiSquare <= s.Critical001
	return s
}

// waitSet polls short TCP connections from pod to vip until the answers come
// from exactly the names in want (the rules for the current slice are in).
func (l *lab) waitSet(ctx context.Context, pod *framework.Pod, vip string, want []string) error {
	want = slices.Sorted(slices.Values(want))
	var last framework.Counts
	err := framework.WaitFor(ctx, 30*time.Second, 100*time.Millisecond, func() (bool, error) {
		c, err := pod.TCPCounts(ctx, vip, 12*len(want))
		last = c
		return err == nil && c.Errors == 0 && slices.Equal(c.Names(), want), err
	})
	if err != nil {
		return fmt.Errorf("%s from %s did not converge to %v (last: %s): %w", vip, pod.Name, want, last, err)
	}
	return nil
}
