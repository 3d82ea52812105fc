// Package syncer is what one sync of the agent does, in order: take a
// snapshot of the watched state, program it through the backend, then report
// it (metrics, /healthz, healthCheckNodePorts, frontend conflicts), delete
// stale UDP conntrack entries, return memory after a bulk sync, and, after
// the first success, take over from kube-proxy and miniproxy's other modes.
// pkg/syncrunner decides when a sync runs; this package decides what it does.
//
// Only the backend's error fails a sync. What follows it is reporting or
// cleanup that the next sync retries: failing the sync for it would make the
// runner rewrite rules that are already right.
package syncer

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"

	"k8s.io/utils/clock"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/health"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/watch"
)

// BulkSync is the number of changed service ports from which a sync counts
// as bulk work worth returning memory after.
const BulkSync = 1000

// TakeoverAttempts bounds how many successful syncs retry a takeover that
// failed (the xtables lock held for long, say) before giving up.
const TakeoverAttempts = 5

// Source hands out the watched state (watch.Tracker): a snapshot and the
// changes it consumed.
type Source interface {
	Snapshot() (*model.Snapshot, watch.Pending)
}

// ProxyHealth learns of every successful sync (health.ProxyHealth, /healthz).
type ProxyHealth interface {
	Updated(t time.Time)
}

// ServiceHealth serves the healthCheckNodePorts of the synced snapshot
// (health.ServiceHealth).
type ServiceHealth interface {
	Sync(want map[int32]health.ServiceInfo) error
}

// Conflicts reports the frontend conflicts that began or ended
// (ConflictReporter).
type Conflicts interface {
	Report(ch model.FrontendChanges)
}

// Conntrack deletes stale UDP conntrack entries once the rules for snap are
// in the kernel (conntrack.Reconciler).
type Conntrack interface {
	Reconcile(ctx context.Context, snap *model.Snapshot, full bool) (conntrack.Stats, error)
}

// Config wires a Syncer. Backend, Source, Metrics and ProxyHealth are
// required; the others may be nil.
type Config struct {
	// Mode is the backend's mode ("iptables", "nftables", "ipvs"), for logs
	// and its sync-failure counter.
	Mode string
	// Families are the configured families (proxy.Config.Families).
	Families      []model.Family
	Backend       proxy.Backend
	Source        Source
	Metrics       *metrics.Metrics
	ProxyHealth   ProxyHealth
	ServiceHealth ServiceHealth
	Conflicts     Conflicts
	// Conntrack is nil when stale-flow cleanup is off or unavailable.
	Conntrack Conntrack
	// TakeOver runs after the first successful sync (this mode's rules are
	// in), and again after later successful syncs while it fails, at most
	// TakeoverAttempts times.
	TakeOver func(ctx context.Context) error
	Log      *slog.Logger
	// Clock times syncs (nil: the real clock).
	Clock clock.PassiveClock
}

// Syncer runs one sync at a time: Sync is a syncrunner.SyncFunc, and the
// runner never calls it concurrently.
type Syncer struct {
	cfg   Config
	log   *slog.Logger
	ctLog *slog.Logger
	clock clock.PassiveClock

	takeoverAttempts int
	takeoverDone     bool
	// freeOSMemory is debug.FreeOSMemory (a counter in tests).
	freeOSMemory func()
}

// New returns a Syncer and exports the mode's failure counter at zero for
// every configured family, and its drift-repair counter at zero.
func New(cfg Config) *Syncer {
	s := &Syncer{cfg: cfg, log: cfg.Log, clock: cfg.Clock, freeOSMemory: debug.FreeOSMemory}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.ctLog = s.log.With("component", "conntrack")
	if s.clock == nil {
		s.clock = clock.RealClock{}
	}
	cfg.Metrics.InitSyncFailures(cfg.Mode, familyLabels(cfg.Families)...)
	cfg.Metrics.DriftRepairs.WithLabelValues(cfg.Mode) // exported from the start, at 0
	return s
}

// Sync programs the current snapshot (full: reconcile against the kernel)
// and reports it; then takes over once (see Config.TakeOver).
func (s *Syncer) Sync(ctx context.Context, full bool) error {
	if err := s.sync(ctx, full); err != nil {
		return err
	}
	s.takeOver(ctx)
	return nil
}

func (s *Syncer) sync(ctx context.Context, full bool) error {
	m := s.cfg.Metrics
	start := s.clock.Now()
	snap, pending := s.cfg.Source.Snapshot()
	if s.cfg.Conflicts != nil {
		s.cfg.Conflicts.Report(pending.Conflicts)
	}
	m.ServiceChanges.Add(float64(pending.ServiceChanges))
	m.EndpointChanges.Add(float64(pending.EndpointChanges))
	res, err := s.cfg.Backend.Sync(ctx, snap, full)
	took := s.clock.Since(start)
	m.SyncDone(res.Full, start, took, err)
	if err != nil {
		// Logged (rate-limited) by the runner, which gets this error.
		m.SyncFailed(s.cfg.Mode, failedFamilies(s.cfg.Mode, s.cfg.Families, err)...)
		return fmt.Errorf("%s sync: %w", s.cfg.Mode, err)
	}
	now := s.clock.Now()
	for _, t := range pending.TriggerTimes {
		m.NetworkProgrammed(t, now)
	}
	m.ServicePorts.Set(float64(len(snap.Services)))
	if res.Drift > 0 {
		m.DriftRepairs.WithLabelValues(s.cfg.Mode).Inc()
		s.log.Warn("repaired rules changed by someone else", "mode", s.cfg.Mode, "objects", res.Drift)
	}
	recordSyncMetrics(m, s.cfg.Families, snap, res)
	s.cfg.ProxyHealth.Updated(now)
	if s.cfg.ServiceHealth != nil {
		if err := s.cfg.ServiceHealth.Sync(health.ServicePorts(snap)); err != nil {
			s.log.Warn("some health check node ports could not be opened", "err", err)
		}
	}
	s.reconcileConntrack(ctx, snap, res.Full)
	if res.Changed >= BulkSync {
		// A cold start or a resync of many Services leaves a heap several
		// times the steady state (render output, netlink or restore
		// buffers, the initial lists). Go returns it to the OS only
		// gradually; hand it back now so a node's RSS reflects what the
		// proxy keeps, not its peak. Costs one GC cycle, only after big syncs.
		s.freeOSMemory()
	}
	s.log.Info("synced", "mode", s.cfg.Mode, "full", res.Full, "changed", res.Changed, "services", len(snap.Services), "rules", res.Rules, "took", took.Round(time.Microsecond))
	return nil
}

// reconcileConntrack deletes stale UDP conntrack entries, against the
// kernel's table, so a UDP client that keeps its source port is not pinned to
// an endpoint that no longer exists — also right after a restart. A failure
// is logged and never fails the sync: the rules are already correct, only old
// flows linger, and the next sync tries again (an incomplete pass is never
// skipped).
func (s *Syncer) reconcileConntrack(ctx context.Context, snap *model.Snapshot, full bool) {
	if s.cfg.Conntrack == nil {
		return
	}
	st, err := s.cfg.Conntrack.Reconcile(ctx, snap, full)
	if err != nil {
		s.ctLog.Warn("conntrack reconcile incomplete; retried after the next sync", "deleted", st.Deleted, "err", err)
		return
	}
	if st.Deleted > 0 {
		s.ctLog.Info("deleted stale UDP conntrack entries", "deleted", st.Deleted, "listed", st.Listed)
	}
}

// takeOver runs Config.TakeOver after a successful sync until it succeeds,
// at most TakeoverAttempts times. It runs in the sync loop, so it never
// interleaves with a sync. Its failure never fails the sync.
func (s *Syncer) takeOver(ctx context.Context) {
	if s.cfg.TakeOver == nil || s.takeoverDone || s.takeoverAttempts >= TakeoverAttempts {
		return
	}
	s.takeoverAttempts++
	if err := s.cfg.TakeOver(ctx); err != nil {
		if s.takeoverAttempts == TakeoverAttempts {
			s.log.Error("giving up removing other proxies' and modes' leftovers; remove them by hand (see README, Replacing kube-proxy)", "attempts", s.takeoverAttempts, "err", err)
		} else {
			s.log.Warn("removing other proxies' and modes' leftovers failed; retrying after the next sync", "attempt", s.takeoverAttempts, "err", err)
		}
		return
	}
	s.takeoverDone = true
}
