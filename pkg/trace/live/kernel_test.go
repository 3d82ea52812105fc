package live

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/trace/tracetest"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

var update = flag.Bool("update", false, "write the captured rulesets to the nftjson and iptrace testdata")

// install programs the behaviour table's Services with one backend into a
// fresh namespace and returns a runner acting inside it.
func install(t *testing.T, mode string, cfg proxy.Config) (*netnstest.NS, Runner) {
	t.Helper()
	netnstest.RequireRoot(t, "nft", "iptables-restore", "iptables-save")
	ns := netnstest.New(t, "trace")
	var b proxy.Backend
	var err error
	cfg.NetNS = proxy.NetNS(ns.Path())
	switch mode {
	case "iptables":
		b, err = iptables.New(slog.New(slog.NewTextHandler(os.Stderr, nil)), cfg, nil)
	case "nftables":
		b, err = nftables.New(cfg)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if _, err := b.Sync(context.Background(), behavior.Snapshot(), true); err != nil {
		t.Fatal(err)
	}
	return ns, ExecRunner("ip", "netns", "exec", ns.Name)
}

// TestKernelBehaviorTable renders the shared behaviour table's Services with
// each backend into a private namespace, reads the live ruleset back as
// `miniproxy trace` does, and checks every case's trace against the table.
// With -update it stores the captured rulesets for the root-free tests.
func TestKernelBehaviorTable(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		for key, cfg := range tracetest.Configs() {
			t.Run(mode+"/"+key, func(t *testing.T) {
				ns, run := install(t, mode, cfg)
				ctx := context.Background()
				rs, err := Read(ctx, Options{Run: run}, model.IPv4)
				if err != nil {
					t.Fatal(err)
				}
				if *update {
					capture(t, ns, mode, key)
				}
				cases := behavior.Cases()
				if mode == "iptables" {
					cases = append(cases, behavior.LocalhostCase())
				}
				for _, tc := range cases {
					c := behavior.Config()
					if tc.Cfg != nil {
						tc.Cfg(&c)
					}
					if tracetest.ConfigKey(c) != key {
						continue
					}
					t.Run(tc.Name, func(t *testing.T) {
						res, err := Trace(rs, tracetest.Packet(tc.Packet), Options{})
						if err != nil {
							t.Fatal(err)
						}
						if len(res) != 1 || !strings.HasPrefix(res[0].Mode, mode) {
							t.Fatalf("want one %s trace, got %d: %+v", mode, len(res), res)
						}
						got, err := tracetest.ToBehavior(res[0])
						if err != nil {
							t.Fatalf("%s: %v", tc.Packet, err)
						}
						if got.Normalize().String() != tc.Want.String() {
							var b strings.Builder
							_ = res[0].WriteText(&b)
							t.Errorf("%s:\n  got  %s\n  want %s\n%s", tc.Packet, got.Normalize(), tc.Want, b.String())
						}
					})
				}
			})
		}
	}
}

func capture(t *testing.T, ns *netnstest.NS, mode, key string) {
	t.Helper()
	var path, text string
	switch mode {
	case "nftables":
		path = filepath.Join("..", "nftjson", "testdata", key+".json")
		text = ns.MustRun(t, "nft", "-j", "list", "ruleset")
	case "iptables":
		path = filepath.Join("..", "..", "iptables", "iptrace", "testdata", key+".txt")
		text = ns.MustRun(t, "iptables-save")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}
