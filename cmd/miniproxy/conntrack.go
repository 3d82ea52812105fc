package main

import (
	"context"
	"log/slog"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// conntrackCleaner deletes stale UDP conntrack entries after each successful
// sync, so a UDP client that keeps its source port is not pinned to an
// endpoint that no longer exists. A cleanup failure is logged and never fails
// the sync: the rules are already correct, only old flows linger.
type conntrackCleaner struct {
	log *slog.Logger
	c   *conntrack.Cleaner
}

func newConntrackCleaner(log *slog.Logger, o *Options) *conntrackCleaner {
	cc := &conntrackCleaner{log: log.With("component", "conntrack")}
	if !o.ConntrackCleanup {
		return cc
	}
	c, err := conntrack.New("")
	if err != nil {
		cc.log.Error("conntrack netlink unavailable; stale UDP flows will not be cleaned", "err", err)
		return cc
	}
	cc.c = c
	return cc
}

// clean must be called after the rules for cur are in the kernel; prev is the
// last snapshot that reached the kernel (nil on the first sync).
func (cc *conntrackCleaner) clean(ctx context.Context, prev, cur *model.Snapshot) {
	if cc.c == nil {
		return
	}
	w := conntrack.Stale(prev, cur)
	if w.Empty() {
		return
	}
	n, err := cc.c.Clean(ctx, w)
	if err != nil {
		cc.log.Warn("conntrack cleanup incomplete", "deleted", n, "err", err)
		return
	}
	cc.log.Debug("deleted stale conntrack entries", "deleted", n, "goneEndpoints", len(w.Gone), "openedFrontends", len(w.Opened))
}
