package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/nftables"
)

// FuzzParseOptions feeds arbitrary command lines (arguments separated by
// newlines) and KubeProxyConfiguration files to the option parser. It must
// never panic, and whatever it accepts must be a configuration the proxy
// can run with: a known mode, sane sync periods, a shard count in range, a
// node name, and one that validates again unchanged. Without -fuzz it runs
// over the seeds and testdata/fuzz/FuzzParseOptions.
func FuzzParseOptions(f *testing.F) {
	f.Add("--hostname-override\nn1", "")
	f.Add("--hostname-override\nn1\n--cluster-cidr\n10.244.0.0/16,fd00:244::/56\n--proxy-mode\nnftables", "")
	f.Add("--hostname-override\nn1\n--nodeport-addresses\nprimary\n--min-sync-period\n2s", "")
	f.Add("--min-sync-period\n500ms", `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16
hostnameOverride: from-file
nodePortAddresses: ["primary"]
nftables:
  syncPeriod: 20s
  minSyncPeriod: 2s
iptables:
  masqueradeAll: true
  masqueradeBit: 40
`)
	f.Add("--hostname-override\nn1", "kind: KubeProxyConfiguration\nmode: ipvs\nipvs:\n  scheduler: mh\n  syncPeriod: -1s\n")
	f.Add("--hostname-override\nn1", "kind: Other\n")
	f.Fuzz(func(t *testing.T, argLines, config string) {
		var args []string
		if argLines != "" {
			args = strings.Split(argLines, "\n")
		}
		// --config is the fuzzer's file; a --config in the arguments
		// would read an arbitrary path.
		for _, a := range args {
			if strings.Contains(a, "config") {
				return
			}
		}
		if config != "" {
			path := filepath.Join(t.TempDir(), "kp.yaml")
			if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
				t.Fatal(err)
			}
			args = append(args, "--config", path)
		}
		o, err := parseOptions(args)
		if err != nil {
			return
		}
		if !slices.Contains(modes, o.Mode) {
			t.Fatalf("accepted mode %q", o.Mode)
		}
		if o.SyncPeriod <= 0 || o.MinSyncPeriod < 0 || o.MinSyncPeriod > o.SyncPeriod {
			t.Fatalf("accepted sync periods min %v max %v", o.MinSyncPeriod, o.SyncPeriod)
		}
		if o.NFTablesShards < 1 || o.NFTablesShards > nftables.MaxShards {
			t.Fatalf("accepted %d nftables shards", o.NFTablesShards)
		}
		if o.MasqueradeBit < 0 || o.MasqueradeBit > 31 {
			t.Fatalf("accepted masquerade bit %d", o.MasqueradeBit)
		}
		if o.nodeName == "" && !o.Cleanup {
			t.Fatal("accepted options without a node name")
		}
		if len(o.proxyConfig.Families) == 0 {
			t.Fatal("accepted options with no IP family")
		}
		before := *o
		if err := o.validate(); err != nil {
			t.Fatalf("accepted options fail validation the second time: %v", err)
		}
		if o.Mode != before.Mode || o.nodeName != before.nodeName || o.SyncPeriod != before.SyncPeriod {
			t.Fatalf("validate is not idempotent: %+v then %+v", before, *o)
		}
	})
}
