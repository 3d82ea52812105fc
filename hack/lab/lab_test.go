package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

func TestParseSelection(t *testing.T) {
	m, e, err := parseSelection("all", "grpc,spread")
	if err != nil || len(m) != 2 || m[0] != "iptables" || m[1] != "nftables" || len(e) != 2 || e[0] != "grpc" {
		t.Errorf("parseSelection(all, grpc,spread) = %v %v %v", m, e, err)
	}
	if _, _, err := parseSelection("iptabels", "all"); err == nil {
		t.Error("a misspelt mode is accepted")
	}
	if _, _, err := parseSelection("iptables", "spred"); err == nil {
		t.Error("a misspelt experiment is accepted")
	}
}

func TestRuleProbabilitiesGiveUniformShares(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		p := ruleProbabilities(mode, 4)
		reach := 1.0 // share of new connections that reach rule k
		for k, pk := range p {
			if share := reach * pk; share < 0.2499 || share > 0.2501 {
				t.Errorf("%s: endpoint %d gets %v, want 1/4", mode, k, share)
			}
			reach *= 1 - pk
		}
		if mode == "iptables" && p[len(p)-1] != 1 {
			t.Errorf("iptables last rule probability %v, want 1", p[len(p)-1])
		}
	}
}

func TestChiSquareCritical(t *testing.T) {
	// Table values of the 0.1% critical point.
	for df, want := range map[int]float64{2: 13.816, 9: 27.877} {
		if got := chiSquareCritical(df, 0.001); got < want-0.01 || got > want+0.01 {
			t.Errorf("critical(df=%d, 0.1%%) = %.3f, want %.3f", df, got, want)
		}
	}
}

// TestLabClaims runs the quick experiments (spread and gRPC without the
// scale-ups' plots) in iptables mode against a real cluster and asserts the
// study's claims. It needs root and the provisioned binaries.
func TestLabClaims(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the lab test starts a real cluster")
	}
	if err := framework.RequireRoot(); err != nil {
		t.Skip(err)
	}
	if _, err := os.Stat("../../bin/miniproxy"); err != nil {
		t.Skip("bin/miniproxy missing: run `make build`")
	}
	if _, err := os.Stat("../../bin/podserver"); err != nil {
		t.Skip("bin/podserver missing: run `make build`")
	}
	cache := os.Getenv("MINIPROXY_CACHE")
	if cache == "" {
		cache = "/var/cache/miniproxy"
	}
	if _, err := os.Stat(filepath.Join(cache, "k8s", "current", "kube-apiserver")); err != nil && os.Getenv("MINIPROXY_K8S_BIN") == "" {
		t.Skip("kube-apiserver not provisioned: run `bash hack/provision.sh`")
	}
	cfg := config{modes: []string{"iptables"}, experiments: []string{"spread", "grpc"}, out: t.TempDir(), connections: 1000,
		coredns: os.Getenv("MINIPROXY_COREDNS")}
	mr := &ModeResult{Mode: "iptables"}
	if err := runMode(cfg, "iptables", mr, &progress{start: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, s := range mr.Spread {
		if !s.Within001 {
			t.Errorf("%s over %d endpoints: χ²=%.2f beyond the 0.1%% critical value %.2f", s.Proto, s.Endpoints, s.ChiSquare, s.Critical001)
		}
	}
	if mr.GRPC == nil {
		t.Fatal("no gRPC results")
	}
	for _, h := range mr.GRPC.Histograms {
		switch h.Variant[0] {
		case 'a':
			if len(h.Counts) != 1 {
				t.Errorf("one channel reached %d pods, want 1: %v", len(h.Counts), h.Counts)
			}
		case 'c', 'f':
			if len(h.Counts) != 3 {
				t.Errorf("%s reached %d pods, want 3: %v", h.Variant, len(h.Counts), h.Counts)
			}
			for name, n := range h.Counts {
				if share := float64(n) / float64(h.RPCs); share < 0.25 || share > 0.42 {
					t.Errorf("%s: %s got %.1f%% of %d RPCs, want 25%%..42%%", h.Variant, name, 100*share, h.RPCs)
				}
			}
		}
	}
}
