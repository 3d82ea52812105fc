package main

import (
	"context"
	"log/slog"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// conntrackReconciler deletes stale UDP conntrack entries after each
// successful sync, against the kernel's table (pkg/conntrack), so a UDP
// client that keeps its source port is not pinned to an endpoint that no
// longer exists — also right after a restart. A failure is logged and never
// fails the sync: the rules are already correct, only old flows linger, and
// the next sync tries again (an incomplete pass is never skipped).
type conntrackReconciler struct {
	log *slog.Logger
	r   *conntrack.Reconciler
}

func newConntrackReconciler(log *slog.Logger, o *Options, m *metrics.Metrics) *conntrackReconciler {
	cr := &conntrackReconciler{log: log.With("component", "conntrack")}
	if !o.ConntrackCleanup {
		return cr
	}
	c, err := conntrack.New("")
	if err != nil {
		cr.log.Error("conntrack netlink unavailable; stale UDP flows will not be cleaned", "err", err)
		return cr
	}
	cfg := o.proxyConfig
	// Only iptables mode serves NodePorts on loopback; elsewhere a flow to
	// 127.0.0.1:NodePort is not DNATed and is none of our business.
	cfg.LocalhostNodePorts = cfg.LocalhostNodePorts && o.Mode == "iptables"
	cr.r = conntrack.NewReconciler(cr.log, c, cfg, m.ConntrackReconciled)
	return cr
}

// reconcile must be called after the rules for snap are in the kernel; full
// is whether that sync was a full one.
func (cr *conntrackReconciler) reconcile(ctx context.Context, snap *model.Snapshot, full bool) {
	if cr.r == nil {
		return
	}
	st, err := cr.r.Reconcile(ctx, snap, full)
	if err != nil {
		cr.log.Warn("conntrack reconcile incomplete; retried after the next sync", "deleted", st.Deleted, "err", err)
		return
	}
	if st.Deleted > 0 {
		cr.log.Info("deleted stale UDP conntrack entries", "deleted", st.Deleted, "listed", st.Listed)
	}
}
