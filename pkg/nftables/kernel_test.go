package nftables

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// richConfig is a dual-stack config with a ClusterCIDR local detector.
func richConfig() proxy.Config {
	return proxy.Config{
		Families:     []model.Family{model.IPv4, model.IPv6},
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16"), netip.MustParsePrefix("fd00:180::/64")},
		LocalMode:    proxy.LocalModeClusterCIDR,
	}
}

// newNSBackend creates a namespace and a backend bound to it.
func newNSBackend(t *testing.T, cfg proxy.Config) (*netnstest.NS, *Backend) {
	t.Helper()
	netnstest.RequireRoot(t, "nft")
	ns := netnstest.New(t, "nft")
	f, err := os.Open(ns.Path())
	if err != nil {
		t.Fatalf("open netns: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	b, err := New(cfg, WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	return ns, b
}

func mustSync(t *testing.T, b *Backend, snap *model.Snapshot, full bool) proxy.Result {
	t.Helper()
	res, err := b.Sync(context.Background(), snap, full)
	if err != nil {
		t.Fatalf("Sync(full=%v): %v", full, err)
	}
	return res
}

// TestKernelReadback applies the rich fixture and checks that Debian's nft
// reads back every object without errors or unknown expressions.
func TestKernelReadback(t *testing.T) {
	ns, b := newNSBackend(t, richConfig())
	// Someone else's table must survive everything we do.
	ns.MustRun(t, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
	snap := fixture.Rich()
	mustSync(t, b, snap, false)
	out := ns.MustRun(t, "nft", "list", "ruleset")
	t.Log(out)
	if strings.Contains(out, "unknown") || strings.Contains(out, "[invalid") {
		t.Errorf("nft output has unreadable expressions")
	}
	for _, want := range []string{
		"ip daddr . meta l4proto . th dport vmap @service-ips",
		"172.30.0.12 . tcp . 80 : goto service-",
		"numgen random mod 3",
		"dnat to 10.180.0.1:80",
		"masquerade fully-random",
		"update @affinity-",
		"reject with tcp reset",
		"fd00:30::60 . tcp . 80 : goto service-",
		"table ip other",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft list ruleset lacks %q", want)
		}
	}
	if err := b.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	out = ns.MustRun(t, "nft", "list", "tables")
	if strings.Contains(out, "miniproxy") || !strings.Contains(out, "table ip other") {
		t.Errorf("after Cleanup: %s", out)
	}
}
