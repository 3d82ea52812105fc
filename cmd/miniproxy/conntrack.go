package main

import (
	"log/slog"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/metrics"
)

// newConntrackReconciler returns the reconciler that deletes stale UDP
// conntrack entries after each successful sync (pkg/conntrack, called by
// pkg/proxy/syncer), or nil when --conntrack-cleanup is off or ctnetlink is
// unavailable. The caller closes it.
func newConntrackReconciler(log *slog.Logger, o *Options, m *metrics.Metrics) *conntrack.Reconciler {
	if !o.ConntrackCleanup {
		return nil
	}
	log = log.With("component", "conntrack")
	c, err := conntrack.New(o.proxyConfig.NetNS)
	if err != nil {
		log.Error("conntrack netlink unavailable; stale UDP flows will not be cleaned", "err", err)
		return nil
	}
	cfg := o.proxyConfig
	// Only iptables mode serves NodePorts on loopback; elsewhere a flow to
	// 127.0.0.1:NodePort is not DNATed and is none of our business.
	cfg.LocalhostNodePorts = cfg.LocalhostNodePorts && o.Mode == "iptables"
	return conntrack.NewReconciler(log, c, cfg, m.ConntrackReconciled)
}
