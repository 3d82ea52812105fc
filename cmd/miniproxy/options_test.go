package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

func TestParseOptionsErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--no-such-flag"}, "unknown flag"},
		{[]string{"--proxy-mode", "userspace"}, "--proxy-mode"},
		{[]string{"--cluster-cidr", "10.0.0.0/33"}, "--cluster-cidr"},
		{[]string{"--cluster-cidr", "10.0.0.0/16,10.1.0.0/16"}, "at most one CIDR per IP family"},
		{[]string{"--sync-period", "soon"}, "invalid argument"},
		{[]string{"--min-sync-period", "1m", "--sync-period", "10s"}, "longer than"},
		{[]string{"--nodeport-addresses", "192.168.0.0/24,nope"}, "--nodeport-addresses"},
		{[]string{"--detect-local-mode", "ClusterCIDR"}, "needs --cluster-cidr"},
		{[]string{"--detect-local-mode", "Magic", "--cluster-cidr", "10.0.0.0/8"}, "detect-local-mode"},
		{[]string{"--iptables-masquerade-bit", "40"}, "masquerade bit"},
		{[]string{"--healthz-bind-address", "10256"}, "--healthz-bind-address"},
		{[]string{"--nftables-shards", "0"}, "--nftables-shards"},
		{[]string{"--nftables-shards", "65"}, "--nftables-shards"},
		{[]string{"stray"}, "unexpected arguments"},
	}
	for _, tc := range cases {
		_, err := parseOptions(append([]string{"--hostname-override", "n1"}, tc.args...))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got error %v, want one mentioning %q", tc.args, err, tc.want)
		}
	}
}

func TestParseOptionsDefaultsAndAliases(t *testing.T) {
	o, err := parseOptions([]string{"--hostname-override", "Node-1", "--cluster-cidr", "10.244.0.0/16,fd00:244::/56", "--iptables-sync-period", "45s"})
	if err != nil {
		t.Fatal(err)
	}
	if o.Mode != "iptables" || o.MinSyncPeriod != time.Second || o.SyncPeriod != 45*time.Second {
		t.Errorf("got mode %s min %v sync %v", o.Mode, o.MinSyncPeriod, o.SyncPeriod)
	}
	if o.NFTablesShards != 16 {
		t.Errorf("nftables shards %d, want the default 16", o.NFTablesShards)
	}
	if o.HealthzBindAddress != "0.0.0.0:10256" || o.MetricsBindAddress != "127.0.0.1:10249" {
		t.Errorf("bind addresses %s %s", o.HealthzBindAddress, o.MetricsBindAddress)
	}
	if o.nodeName != "node-1" || o.proxyConfig.LocalMode != proxy.LocalModeClusterCIDR {
		t.Errorf("node %q local mode %q", o.nodeName, o.proxyConfig.LocalMode)
	}
	if len(o.proxyConfig.Families) != 2 || o.proxyConfig.Families[1] != model.IPv6 {
		t.Errorf("families %v, want dual-stack from the cluster CIDRs", o.proxyConfig.Families)
	}
}

func TestConfigFileAndFlagPrecedence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kp.yaml")
	cfg := `apiVersion: kubeproxy.config.k8s.io/v1alpha1
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
`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err := parseOptions([]string{"--config", path, "--min-sync-period", "500ms"})
	if err != nil {
		t.Fatal(err)
	}
	if o.Mode != "nftables" || o.nodeName != "from-file" || o.SyncPeriod != 20*time.Second {
		t.Errorf("file values not applied: %+v", o)
	}
	if o.MinSyncPeriod != 500*time.Millisecond {
		t.Errorf("explicit flag must win over the file: min-sync-period %v", o.MinSyncPeriod)
	}
	if !o.proxyConfig.NodePortPrimary || !o.proxyConfig.MasqueradeAll {
		t.Errorf("proxy config from file: %+v", o.proxyConfig)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("kind: KubeProxyConfiguration\nmdoe: iptables\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := parseOptions([]string{"--config", bad}); err == nil || !strings.Contains(err.Error(), "mdoe") {
		t.Errorf("a typo in the config file must be an error naming the field, got %v", err)
	}
}

func TestRunExitsOneOnBadFlags(t *testing.T) {
	if code := run([]string{"--proxy-mode=bogus"}); code != 1 {
		t.Fatalf("exit code %d, want 1", code)
	}
}

// --version answers without a valid configuration: an image check runs it
// with no cluster, node name or kernel access.
func TestVersionFlag(t *testing.T) {
	o, err := parseOptions([]string{"--version", "--proxy-mode=bogus"})
	if err != nil || !o.Version {
		t.Fatalf("parseOptions(--version) = %+v, %v; want Version and no error", o, err)
	}
	if code := run([]string{"--version"}); code != 0 {
		t.Fatalf("exit code %d, want 0", code)
	}
	if s := versionString(); !strings.HasPrefix(s, "miniproxy ") {
		t.Errorf("versionString() = %q, want a \"miniproxy \" prefix", s)
	}
}
