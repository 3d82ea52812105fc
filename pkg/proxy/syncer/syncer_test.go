package syncer

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	testingclock "k8s.io/utils/clock/testing"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/health"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/watch"
)

// steps records, in order, what the fakes below were asked to do, so a
// test sees the order of the steps as well as their arguments.
type steps []string

func (e *steps) add(s string) { *e = append(*e, s) }

// fakeBackend returns res and err from every Sync; took advances the clock
// as if the sync took that long.
type fakeBackend struct {
	ev    *steps
	clk   *testingclock.FakeClock
	took  time.Duration
	res   proxy.Result
	err   error
	snaps []*model.Snapshot
	full  []bool
}

func (b *fakeBackend) Sync(_ context.Context, snap *model.Snapshot, full bool) (proxy.Result, error) {
	b.ev.add("backend.Sync")
	b.snaps, b.full = append(b.snaps, snap), append(b.full, full)
	b.clk.Step(b.took)
	r := b.res
	r.Full = r.Full || full
	return r, b.err
}
func (b *fakeBackend) Cleanup(context.Context) error { return nil }
func (b *fakeBackend) Close() error                  { return nil }

type fakeSource struct {
	ev      *steps
	snap    *model.Snapshot
	pending watch.Pending
}

func (s *fakeSource) Snapshot() (*model.Snapshot, watch.Pending) {
	s.ev.add("source.Snapshot")
	p := s.pending
	s.pending = watch.Pending{} // consumed, as the tracker's are
	return s.snap, p
}

type fakeProxyHealth struct {
	ev      *steps
	updated []time.Time
}

func (h *fakeProxyHealth) Updated(t time.Time) {
	h.ev.add("proxyHealth.Updated")
	h.updated = append(h.updated, t)
}

type fakeServiceHealth struct {
	ev   *steps
	want []map[int32]health.ServiceInfo
	err  error
}

func (h *fakeServiceHealth) Sync(want map[int32]health.ServiceInfo) error {
	h.ev.add("serviceHealth.Sync")
	h.want = append(h.want, want)
	return h.err
}

type fakeConflicts struct {
	ev  *steps
	got []model.FrontendChanges
}

func (c *fakeConflicts) Report(ch model.FrontendChanges) {
	c.ev.add("conflicts.Report")
	c.got = append(c.got, ch)
}

type fakeConntrack struct {
	ev   *steps
	full []bool
	err  error
}

func (c *fakeConntrack) Reconcile(_ context.Context, _ *model.Snapshot, full bool) (conntrack.Stats, error) {
	c.ev.add("conntrack.Reconcile")
	c.full = append(c.full, full)
	return conntrack.Stats{Deleted: 1}, c.err
}

// harness is a Syncer wired to fakes and real metrics on a fresh registry.
type harness struct {
	ev        steps
	clk       *testingclock.FakeClock
	m         *metrics.Metrics
	backend   *fakeBackend
	source    *fakeSource
	proxyH    *fakeProxyHealth
	svcH      *fakeServiceHealth
	conflicts *fakeConflicts
	ct        *fakeConntrack
	takeovers int
	takeErr   []error // returned by successive takeovers (nil when exhausted)
	freed     int
	s         *Syncer
}

func newHarness(t *testing.T, mode string, families ...model.Family) *harness {
	t.Helper()
	m, err := metrics.New(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{clk: testingclock.NewFakeClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)), m: m}
	h.backend = &fakeBackend{ev: &h.ev, clk: h.clk, took: 250 * time.Millisecond}
	h.source = &fakeSource{ev: &h.ev}
	h.proxyH = &fakeProxyHealth{ev: &h.ev}
	h.svcH = &fakeServiceHealth{ev: &h.ev}
	h.conflicts = &fakeConflicts{ev: &h.ev}
	h.ct = &fakeConntrack{ev: &h.ev}
	h.s = New(Config{Mode: mode, Families: families, Backend: h.backend, Source: h.source, Metrics: m,
		ProxyHealth: h.proxyH, ServiceHealth: h.svcH, Conflicts: h.conflicts, Conntrack: h.ct, Clock: h.clk,
		TakeOver: func(context.Context) error {
			h.ev.add("takeOver")
			h.takeovers++
			if len(h.takeErr) == 0 {
				return nil
			}
			err := h.takeErr[0]
			h.takeErr = h.takeErr[1:]
			return err
		}})
	h.s.freeOSMemory = func() { h.ev.add("freeOSMemory"); h.freed++ }
	return h
}

func (h *harness) sync(t *testing.T, full bool) error {
	t.Helper()
	h.ev = nil
	return h.s.Sync(context.Background(), full)
}

// localService has externalTrafficPolicy: Local and a health check node port
// with one ready endpoint on this node.
func localService() *model.Snapshot {
	sp := mt.SP("ns", "web", "http", "172.30.0.10", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	sp.ExternalPolicyLocal, sp.HealthCheckNodePort = true, 30999
	snap := mt.Snap(sp)
	snap.Node.Name = "node-a"
	return snap
}

func TestSyncSuccess(t *testing.T) {
	h := newHarness(t, "nftables", model.IPv4, model.IPv6)
	h.source.snap = localService()
	trigger := h.clk.Now().Add(-2 * time.Second)
	conflicts := model.FrontendChanges{Current: 1}
	h.source.pending = watch.Pending{ServiceChanges: 2, EndpointChanges: 3, TriggerTimes: []time.Time{trigger}, Conflicts: conflicts}
	h.backend.res = proxy.Result{Changed: 1, Rules: 7}
	start := h.clk.Now()

	if err := h.sync(t, true); err != nil {
		t.Fatal(err)
	}
	want := []string{"source.Snapshot", "conflicts.Report", "backend.Sync", "proxyHealth.Updated", "serviceHealth.Sync", "conntrack.Reconcile", "takeOver"}
	if strings.Join(h.ev, " ") != strings.Join(want, " ") {
		t.Errorf("steps %v, want %v", h.ev, want)
	}
	if len(h.backend.snaps) != 1 || h.backend.snaps[0] != h.source.snap || !h.backend.full[0] {
		t.Errorf("backend got %v (full %v), want the source's snapshot, full", h.backend.snaps, h.backend.full)
	}
	if len(h.conflicts.got) != 1 || h.conflicts.got[0].Current != 1 {
		t.Errorf("conflicts reported %v, want the pending ones", h.conflicts.got)
	}
	done := start.Add(h.backend.took)
	if len(h.proxyH.updated) != 1 || !h.proxyH.updated[0].Equal(done) {
		t.Errorf("healthz updated at %v, want %v", h.proxyH.updated, done)
	}
	if got := h.svcH.want; len(got) != 1 || got[0][30999] != (health.ServiceInfo{Namespace: "ns", Name: "web", LocalEndpoints: 1}) {
		t.Errorf("health check node ports %v, want 30999 with one local endpoint", got)
	}
	if len(h.ct.full) != 1 || !h.ct.full[0] {
		t.Errorf("conntrack reconciled %v, want once, full", h.ct.full)
	}
	for name, c := range map[string]struct {
		got, want float64
	}{
		"service changes":        {testutil.ToFloat64(h.m.ServiceChanges), 2},
		"endpoint changes":       {testutil.ToFloat64(h.m.EndpointChanges), 3},
		"service ports":          {testutil.ToFloat64(h.m.ServicePorts), 1},
		"last sync timestamp":    {testutil.ToFloat64(h.m.LastSyncTimestamp), float64(done.UnixNano()) / 1e9},
		"failed syncs":           {testutil.ToFloat64(h.m.SyncFailures.WithLabelValues(metrics.ModeFull)), 0},
		"nftables IPv6 failures": {testutil.ToFloat64(h.m.NFTablesSyncFailures.WithLabelValues("IPv6")), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", name, c.got, c.want)
		}
	}
	// The trigger was 2 s before the sync started, which took 250 ms.
	if n := testutil.CollectAndCount(h.m.NetworkProgrammingDuration); n != 1 {
		t.Errorf("network programming histogram has %d series, want 1", n)
	}
	if h.freed != 0 {
		t.Errorf("a sync of one service port returned memory to the OS")
	}
}

func TestSyncFailure(t *testing.T) {
	h := newHarness(t, "nftables", model.IPv4, model.IPv6)
	h.source.snap = localService()
	h.backend.err = errors.New("netlink receive: file exists")

	err := h.sync(t, false)
	if err == nil || !strings.Contains(err.Error(), "nftables sync: netlink receive: file exists") {
		t.Fatalf("error %v, want the backend's, naming the mode", err)
	}
	// Nothing is reported as programmed and nothing follows the backend.
	if want := []string{"source.Snapshot", "conflicts.Report", "backend.Sync"}; strings.Join(h.ev, " ") != strings.Join(want, " ") {
		t.Errorf("steps %v, want %v", h.ev, want)
	}
	for _, fam := range []string{"IPv4", "IPv6"} {
		if got := testutil.ToFloat64(h.m.NFTablesSyncFailures.WithLabelValues(fam)); got != 1 {
			t.Errorf("nftables %s failures = %v, want 1 (one transaction for both families)", fam, got)
		}
	}
	if got := testutil.ToFloat64(h.m.SyncFailures.WithLabelValues(metrics.ModePartial)); got != 1 {
		t.Errorf("partial sync failures = %v, want 1", got)
	}
	if got := testutil.ToFloat64(h.m.LastSyncTimestamp); got != 0 {
		t.Errorf("last sync timestamp moved to %v after a failure", got)
	}
}

// TestSyncFailureCountsIPTablesFamily: iptables names the family it failed
// in; only that one counts.
func TestSyncFailureCountsIPTablesFamily(t *testing.T) {
	h := newHarness(t, "iptables", model.IPv4, model.IPv6)
	h.source.snap = &model.Snapshot{}
	h.backend.err = errors.New("iptables sync: iptables IPv6 sync: restore: exit status 1")
	if err := h.sync(t, true); err == nil {
		t.Fatal("sync succeeded")
	}
	if v4, v6 := testutil.ToFloat64(h.m.IPTablesRestoreFailures.WithLabelValues("IPv4")), testutil.ToFloat64(h.m.IPTablesRestoreFailures.WithLabelValues("IPv6")); v4 != 0 || v6 != 1 {
		t.Errorf("iptables failures IPv4=%v IPv6=%v, want 0 and 1", v4, v6)
	}
}

// TestSyncReportingFailuresDoNotFail: health ports and conntrack are
// retried by the next sync; the rules are in, so the sync succeeded.
func TestSyncReportingFailuresDoNotFail(t *testing.T) {
	h := newHarness(t, "ipvs")
	h.source.snap = localService()
	h.svcH.err = errors.New("listen :30999: address in use")
	h.ct.err = errors.New("dump IPv4: interrupted")
	if err := h.sync(t, false); err != nil {
		t.Fatalf("sync failed for a reporting step: %v", err)
	}
	if len(h.proxyH.updated) != 1 {
		t.Errorf("healthz not updated after a successful sync")
	}
}

func TestSyncNoOptionalReporters(t *testing.T) {
	m, err := metrics.New(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	var ev steps
	clk := testingclock.NewFakeClock(time.Unix(1, 0))
	s := New(Config{Mode: "nftables", Backend: &fakeBackend{ev: &ev, clk: clk}, Source: &fakeSource{ev: &ev, snap: localService()},
		Metrics: m, ProxyHealth: &fakeProxyHealth{ev: &ev}, Clock: clk})
	if err := s.Sync(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if want := []string{"source.Snapshot", "backend.Sync", "proxyHealth.Updated"}; strings.Join(ev, " ") != strings.Join(want, " ") {
		t.Errorf("steps %v, want %v", ev, want)
	}
}

func TestBulkSyncReturnsMemory(t *testing.T) {
	h := newHarness(t, "nftables")
	h.source.snap = &model.Snapshot{}
	for _, tc := range []struct {
		changed int
		freed   int
	}{{BulkSync - 1, 0}, {BulkSync, 1}, {10 * BulkSync, 2}} {
		h.backend.res.Changed = tc.changed
		if err := h.sync(t, true); err != nil {
			t.Fatal(err)
		}
		if h.freed != tc.freed {
			t.Errorf("after a sync of %d changed ports: memory returned %d times, want %d", tc.changed, h.freed, tc.freed)
		}
	}
	if last := h.ev[len(h.ev)-1]; last != "freeOSMemory" {
		t.Errorf("last step %q: memory must be returned after everything else of the sync", last)
	}
}

func TestTakeOverAfterFirstSuccess(t *testing.T) {
	h := newHarness(t, "nftables")
	h.source.snap = &model.Snapshot{}
	h.backend.err = errors.New("boom")
	if err := h.sync(t, true); err == nil {
		t.Fatal("sync succeeded")
	}
	if h.takeovers != 0 {
		t.Fatalf("takeover ran before this mode's rules were in")
	}
	h.backend.err = nil
	h.takeErr = []error{errors.New("xtables lock busy")}
	for i, want := range []int{1, 2, 2, 2} {
		if err := h.sync(t, false); err != nil {
			t.Fatalf("sync %d failed: %v", i, err)
		}
		if h.takeovers != want {
			t.Errorf("after sync %d: %d takeovers, want %d (retried until it succeeds, then never again)", i, h.takeovers, want)
		}
	}
}

func TestTakeOverGivesUp(t *testing.T) {
	h := newHarness(t, "nftables")
	h.source.snap = &model.Snapshot{}
	for range 2 * TakeoverAttempts {
		h.takeErr = append(h.takeErr, errors.New("still failing"))
	}
	for i := 0; i < 2*TakeoverAttempts; i++ {
		if err := h.sync(t, false); err != nil {
			t.Fatalf("a failed takeover failed sync %d: %v", i, err)
		}
	}
	if h.takeovers != TakeoverAttempts {
		t.Errorf("%d takeover attempts, want %d", h.takeovers, TakeoverAttempts)
	}
}

func TestNewExportsFailureCountersAtZero(t *testing.T) {
	h := newHarness(t, "ipvs", model.IPv4, model.IPv6)
	if n := testutil.CollectAndCount(h.m.IPVSSyncFailures); n != 2 {
		t.Errorf("ipvs failure counter has %d series before any failure, want 2 (one per family)", n)
	}
}

func TestSyncCountsDriftRepairs(t *testing.T) {
	h := newHarness(t, "nftables")
	h.source.snap = &model.Snapshot{}
	if got := testutil.ToFloat64(h.m.DriftRepairs.WithLabelValues("nftables")); got != 0 {
		t.Fatalf("drift repairs = %v before any sync", got)
	}
	for _, drift := range []int{0, 3, 0} {
		h.backend.res.Drift = drift
		if err := h.sync(t, true); err != nil {
			t.Fatal(err)
		}
	}
	if got := testutil.ToFloat64(h.m.DriftRepairs.WithLabelValues("nftables")); got != 1 {
		t.Errorf("drift repairs = %v, want 1 (one sync repaired something)", got)
	}
}

// TestSyncSetsKubeProxyGauges: the per-table rule counts a backend reports
// reach kube-proxy's gauges after a successful sync.
func TestSyncSetsKubeProxyGauges(t *testing.T) {
	h := newHarness(t, "iptables", model.IPv4, model.IPv6)
	h.source.snap = &model.Snapshot{}
	h.backend.res.TableRules = []proxy.TableRules{{Family: model.IPv6, Table: "nat", Total: 40, Last: 7}}
	if err := h.sync(t, true); err != nil {
		t.Fatal(err)
	}
	if total, last := testutil.ToFloat64(h.m.IPTablesRulesTotal.WithLabelValues("nat", "IPv6")), testutil.ToFloat64(h.m.IPTablesRulesLast.WithLabelValues("nat", "IPv6")); total != 40 || last != 7 {
		t.Errorf("iptables nat IPv6 rules total=%v last=%v, want 40 and 7", total, last)
	}
}
