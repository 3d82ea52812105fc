package syncer

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

func TestFailedFamilies(t *testing.T) {
	dual := []model.Family{model.IPv4, model.IPv6}
	for _, tc := range []struct {
		mode       string
		configured []model.Family
		err        string
		want       []string
	}{
		{"iptables", nil, "iptables IPv4 sync: restore: exit status 1", []string{"IPv4"}},
		{"iptables", []model.Family{model.IPv6}, "iptables IPv6 sync: x", []string{"IPv6"}},
		{"iptables", dual, "iptables sync: iptables IPv6 sync: chunk 2/3: restore (512 bytes): exit status 2", []string{"IPv6"}},
		{"iptables", dual, "iptables sync: iptables IPv4 sync: listing chains: exit status 4", []string{"IPv4"}},
		{"iptables", dual, "something without a family", []string{"IPv4", "IPv6"}},
		{"nftables", dual, "nftables sync: netlink receive: file exists", []string{"IPv4", "IPv6"}},
		{"nftables", nil, "nftables sync: netlink receive: file exists", []string{"IPv4"}},
		{"ipvs", dual, "ipvs sync: create virtual server: file exists", []string{"IPv4", "IPv6"}},
	} {
		if got := failedFamilies(tc.mode, tc.configured, errors.New(tc.err)); !slices.Equal(got, tc.want) {
			t.Errorf("failedFamilies(%s, %v, %q) = %v, want %v", tc.mode, tc.configured, tc.err, got, tc.want)
		}
	}
}

// TestFailedFamiliesFromIPTablesBackend pins the error format failedFamilies
// reads to the real iptables backend: a dual-stack sync whose ip6tables-restore
// fails is counted for IPv6 only, and the tool's message reaches the error.
// The backend runs against a fake command runner; no kernel is touched.
func TestFailedFamiliesFromIPTablesBackend(t *testing.T) {
	run := func(_ context.Context, stdin, name string, args ...string) ([]byte, error) {
		switch {
		case name == "iptables" && slices.Contains(args, "-V"):
			return []byte("iptables v1.8.9 (legacy)"), nil
		case name == "ip6tables-restore":
			return nil, errors.New("ip6tables-restore -w: exit status 1: ip6tables-restore: line 4 failed")
		}
		return nil, nil
	}
	b, err := iptables.New(slog.New(slog.DiscardHandler), proxy.Config{Families: []model.Family{model.IPv4, model.IPv6}}, run)
	if err != nil {
		t.Skipf("iptables backend unavailable here: %v", err)
	}
	_, err = b.Sync(context.Background(), &model.Snapshot{}, true)
	if err == nil {
		t.Fatal("sync succeeded with ip6tables-restore failing")
	}
	if !strings.Contains(err.Error(), "ip6tables-restore: line 4 failed") {
		t.Errorf("error lost the tool's message: %v", err)
	}
	if got := failedFamilies("iptables", []model.Family{model.IPv4, model.IPv6}, err); !slices.Equal(got, []string{"IPv6"}) {
		t.Errorf("failedFamilies = %v for %q, want [IPv6]", got, err)
	}
}
