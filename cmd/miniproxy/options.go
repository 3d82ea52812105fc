package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	kpconfig "k8s.io/kube-proxy/config/v1alpha1"
	"sigs.k8s.io/yaml"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Options are miniproxy's settings, named after kube-proxy's flags.
type Options struct {
	Kubeconfig         string
	Master             string
	HostnameOverride   string
	Mode               string
	ClusterCIDR        string
	DetectLocalMode    string
	MinSyncPeriod      time.Duration
	SyncPeriod         time.Duration
	HealthzBindAddress string
	MetricsBindAddress string
	ConfigFile         string
	Cleanup            bool
	Verbosity          int
	NodePortAddresses  []string
	MasqueradeAll      bool
	MasqueradeBit      int32
	LocalhostNodePorts bool
	IPVSScheduler      string
	IPVSStrictARP      bool
	NFTablesShards     int
	ConntrackCleanup   bool
	Profiling          bool
	Version            bool

	// ignoredConfig are the --config fields set but not implemented
	// (ignoredConfigFields), warned about at startup.
	ignoredConfig []string

	// Derived by validate.
	proxyConfig proxy.Config
	nodeName    string
}

// Modes miniproxy can run.
var modes = []string{"iptables", "nftables", "ipvs"}

// parseOptions parses args (without the program name). Errors are the
// user's to fix: an unknown flag, a bad duration, a bad CIDR. Nothing here
// touches the kernel.
func parseOptions(args []string) (*Options, error) {
	o := &Options{}
	fs := pflag.NewFlagSet("miniproxy", pflag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "path to a kubeconfig file; empty means in-cluster configuration")
	fs.StringVar(&o.Master, "master", "", "address of the Kubernetes API server (overrides any value in kubeconfig)")
	fs.StringVar(&o.HostnameOverride, "hostname-override", "", "the name of this node; defaults to the hostname")
	fs.StringVar(&o.Mode, "proxy-mode", "iptables", "which proxy mode to use: iptables, nftables or ipvs")
	fs.StringVar(&o.ClusterCIDR, "cluster-cidr", "", "the CIDR range(s) of pods in the cluster (comma-separated, one per family)")
	fs.StringVar(&o.DetectLocalMode, "detect-local-mode", "", "how local (pod) traffic is detected: ClusterCIDR, NodeCIDR or None (default ClusterCIDR when --cluster-cidr is set, else None)")
	fs.DurationVar(&o.MinSyncPeriod, "min-sync-period", time.Second, "minimum interval between rule syncs")
	fs.DurationVar(&o.SyncPeriod, "sync-period", 30*time.Second, "maximum interval between full rule syncs (drift repair)")
	for _, alias := range []string{"iptables", "ipvs", "nftables"} {
		fs.DurationVar(&o.MinSyncPeriod, alias+"-min-sync-period", time.Second, "alias of --min-sync-period")
		fs.DurationVar(&o.SyncPeriod, alias+"-sync-period", 30*time.Second, "alias of --sync-period")
	}
	fs.StringVar(&o.HealthzBindAddress, "healthz-bind-address", "0.0.0.0:10256", "ip:port for the health check server; empty disables")
	fs.StringVar(&o.MetricsBindAddress, "metrics-bind-address", "127.0.0.1:10249", "ip:port for the metrics server; empty disables")
	fs.StringVar(&o.ConfigFile, "config", "", "a KubeProxyConfiguration file; flags given explicitly win")
	fs.BoolVar(&o.Cleanup, "cleanup", false, "remove every rule miniproxy created (all modes) and exit")
	fs.IntVarP(&o.Verbosity, "v", "v", 0, "log verbosity (0 info, 4+ debug)")
	fs.StringSliceVar(&o.NodePortAddresses, "nodeport-addresses", nil, "CIDRs of node addresses that accept NodePort traffic, or \"primary\"; empty means all local addresses")
	fs.BoolVar(&o.MasqueradeAll, "masquerade-all", false, "SNAT all traffic sent through service IPs")
	fs.Int32Var(&o.MasqueradeBit, "iptables-masquerade-bit", 14, "the fwmark bit (0-31) marking packets to SNAT")
	fs.BoolVar(&o.LocalhostNodePorts, "iptables-localhost-nodeports", true, "accept NodePort connections on 127.0.0.1 (iptables mode, IPv4)")
	fs.StringVar(&o.IPVSScheduler, "ipvs-scheduler", "rr", "IPVS scheduler: rr, wrr, lc, sh or mh")
	fs.IntVar(&o.NFTablesShards, "nftables-shards", 16, "spread Services over this many nftables tables (1-64) so one change is validated against a shard, not every Service (nftables mode)")
	fs.BoolVar(&o.IPVSStrictARP, "ipvs-strict-arp", false, "set arp_ignore/arp_announce so the node does not answer ARP for service IPs (ipvs mode)")
	fs.BoolVar(&o.Profiling, "profiling", false, "serve /debug/pprof on the metrics address")
	fs.BoolVar(&o.Version, "version", false, "print the version and exit")
	fs.BoolVar(&o.ConntrackCleanup, "conntrack-cleanup", true, "delete UDP conntrack entries of removed endpoints and services after each sync")

	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if o.Version {
		return o, nil // nothing else is read or checked
	}
	if o.ConfigFile != "" {
		if err := o.applyConfigFile(fs); err != nil {
			return nil, err
		}
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	return o, nil
}

// applyConfigFile reads a KubeProxyConfiguration; values apply only where the
// corresponding flag was not given on the command line.
func (o *Options) applyConfigFile(fs *pflag.FlagSet) error {
	data, err := os.ReadFile(o.ConfigFile)
	if err != nil {
		return fmt.Errorf("read --config: %w", err)
	}
	var c kpconfig.KubeProxyConfiguration
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return fmt.Errorf("parse --config %s: %w", o.ConfigFile, err)
	}
	if c.Kind != "" && c.Kind != "KubeProxyConfiguration" {
		return fmt.Errorf("--config %s: kind %q, want KubeProxyConfiguration", o.ConfigFile, c.Kind)
	}
	if o.ignoredConfig, err = ignoredConfigFields(data); err != nil {
		return fmt.Errorf("parse --config %s: %w", o.ConfigFile, err)
	}
	set := func(flag string, apply func()) {
		if !fs.Changed(flag) {
			apply()
		}
	}
	str := func(flag string, dst *string, v string) {
		if v != "" {
			set(flag, func() { *dst = v })
		}
	}
	dur := func(flag string, dst *time.Duration, v time.Duration) {
		// Any alias given on the command line wins over the file.
		if v == 0 {
			return
		}
		base := strings.TrimPrefix(strings.TrimPrefix(strings.TrimPrefix(flag, "iptables-"), "ipvs-"), "nftables-")
		for _, f := range []string{base, "iptables-" + base, "ipvs-" + base, "nftables-" + base} {
			if fs.Changed(f) {
				return
			}
		}
		*dst = v
	}
	str("kubeconfig", &o.Kubeconfig, c.ClientConnection.Kubeconfig)
	str("hostname-override", &o.HostnameOverride, c.HostnameOverride)
	str("proxy-mode", &o.Mode, string(c.Mode))
	str("cluster-cidr", &o.ClusterCIDR, c.ClusterCIDR)
	str("detect-local-mode", &o.DetectLocalMode, string(c.DetectLocalMode))
	str("healthz-bind-address", &o.HealthzBindAddress, c.HealthzBindAddress)
	str("metrics-bind-address", &o.MetricsBindAddress, c.MetricsBindAddress)
	str("ipvs-scheduler", &o.IPVSScheduler, c.IPVS.Scheduler)
	// Sync periods live per mode in the file; take the one of the chosen mode.
	switch o.Mode {
	case "ipvs":
		dur("sync-period", &o.SyncPeriod, c.IPVS.SyncPeriod.Duration)
		dur("min-sync-period", &o.MinSyncPeriod, c.IPVS.MinSyncPeriod.Duration)
	case "nftables":
		dur("sync-period", &o.SyncPeriod, c.NFTables.SyncPeriod.Duration)
		dur("min-sync-period", &o.MinSyncPeriod, c.NFTables.MinSyncPeriod.Duration)
	default:
		dur("sync-period", &o.SyncPeriod, c.IPTables.SyncPeriod.Duration)
		dur("min-sync-period", &o.MinSyncPeriod, c.IPTables.MinSyncPeriod.Duration)
	}
	if len(c.NodePortAddresses) > 0 {
		set("nodeport-addresses", func() { o.NodePortAddresses = c.NodePortAddresses })
	}
	if c.IPTables.MasqueradeAll {
		set("masquerade-all", func() { o.MasqueradeAll = true })
	}
	if c.IPTables.MasqueradeBit != nil {
		set("iptables-masquerade-bit", func() { o.MasqueradeBit = *c.IPTables.MasqueradeBit })
	}
	// nftables mode has its own copies of the two, as in kube-proxy.
	if o.Mode == "nftables" && c.NFTables.MasqueradeAll {
		set("masquerade-all", func() { o.MasqueradeAll = true })
	}
	if o.Mode == "nftables" && c.NFTables.MasqueradeBit != nil {
		set("iptables-masquerade-bit", func() { o.MasqueradeBit = *c.NFTables.MasqueradeBit })
	}
	if c.IPTables.LocalhostNodePorts != nil {
		set("iptables-localhost-nodeports", func() { o.LocalhostNodePorts = *c.IPTables.LocalhostNodePorts })
	}
	if c.EnableProfiling {
		set("profiling", func() { o.Profiling = true })
	}
	if c.IPVS.StrictARP {
		set("ipvs-strict-arp", func() { o.IPVSStrictARP = true })
	}
	return nil
}

func (o *Options) validate() error {
	var errs []error
	known := false
	for _, m := range modes {
		known = known || o.Mode == m
	}
	if !known {
		errs = append(errs, fmt.Errorf("--proxy-mode %q: want one of %s", o.Mode, strings.Join(modes, ", ")))
	}
	if o.MinSyncPeriod < 0 || o.SyncPeriod <= 0 {
		errs = append(errs, fmt.Errorf("--sync-period must be > 0 and --min-sync-period >= 0 (got %v, %v)", o.SyncPeriod, o.MinSyncPeriod))
	}
	if o.NFTablesShards < 1 || o.NFTablesShards > nftables.MaxShards {
		errs = append(errs, fmt.Errorf("--nftables-shards %d: want 1 to %d", o.NFTablesShards, nftables.MaxShards))
	}
	if o.MinSyncPeriod > o.SyncPeriod {
		errs = append(errs, fmt.Errorf("--min-sync-period %v is longer than --sync-period %v", o.MinSyncPeriod, o.SyncPeriod))
	}
	for _, a := range []struct{ flag, v string }{{"healthz-bind-address", o.HealthzBindAddress}, {"metrics-bind-address", o.MetricsBindAddress}} {
		if a.v == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.v); err != nil {
			errs = append(errs, fmt.Errorf("--%s %q: %w", a.flag, a.v, err))
		}
	}

	pc := proxy.Config{
		MasqueradeAll:      o.MasqueradeAll,
		MasqueradeBit:      int(o.MasqueradeBit),
		LocalhostNodePorts: o.LocalhostNodePorts,
		LocalMode:          proxy.LocalMode(o.DetectLocalMode),
	}
	families := map[model.Family]bool{model.IPv4: true}
	if o.ClusterCIDR != "" {
		// One CIDR per family, as kube-proxy requires: the local-traffic
		// check is "source not in the family's pod range", and a second
		// range of the same family would make every backend's rule
		// ambiguous (iptables would masquerade all pod traffic).
		seen := map[model.Family]netip.Prefix{}
		for _, s := range strings.Split(o.ClusterCIDR, ",") {
			p, err := netip.ParsePrefix(strings.TrimSpace(s))
			if err != nil {
				errs = append(errs, fmt.Errorf("--cluster-cidr %q: %w", s, err))
				continue
			}
			f := model.FamilyOf(p.Addr())
			if prev, dup := seen[f]; dup {
				errs = append(errs, fmt.Errorf("--cluster-cidr %q: at most one CIDR per IP family (%s and %s)", o.ClusterCIDR, prev, p.Masked()))
				continue
			}
			seen[f] = p.Masked()
			pc.ClusterCIDRs = append(pc.ClusterCIDRs, p.Masked())
			families[f] = true
		}
	}
	if pc.LocalMode == "" {
		pc.LocalMode = proxy.LocalModeNone
		if len(pc.ClusterCIDRs) > 0 {
			pc.LocalMode = proxy.LocalModeClusterCIDR
		}
	}
	if pc.LocalMode == proxy.LocalModeClusterCIDR && len(pc.ClusterCIDRs) == 0 {
		errs = append(errs, errors.New("--detect-local-mode=ClusterCIDR needs --cluster-cidr"))
	}
	for _, s := range o.NodePortAddresses {
		if s == "primary" {
			pc.NodePortPrimary = true
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nodeport-addresses %q: want a CIDR or \"primary\": %w", s, err))
			continue
		}
		pc.NodePortAddresses = append(pc.NodePortAddresses, p.Masked())
	}
	if pc.NodePortPrimary && len(pc.NodePortAddresses) > 0 {
		errs = append(errs, errors.New("--nodeport-addresses: \"primary\" cannot be combined with CIDRs"))
	}
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if families[f] {
			pc.Families = append(pc.Families, f)
		}
	}
	if err := pc.Validate(); err != nil {
		errs = append(errs, err)
	}
	o.proxyConfig = pc

	o.nodeName = strings.ToLower(strings.TrimSpace(o.HostnameOverride))
	if o.nodeName == "" && !o.Cleanup {
		h, err := os.Hostname()
		if err != nil {
			errs = append(errs, fmt.Errorf("no --hostname-override and no hostname: %w", err))
		}
		o.nodeName = strings.ToLower(h)
	}
	return errors.Join(errs...)
}
