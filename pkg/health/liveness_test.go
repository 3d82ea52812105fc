package health

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/miniproxy/miniproxy/pkg/syncrunner"
)

// failsafe bounds how long a broken runner can hang a test; never an assertion.
const failsafe = 10 * time.Second

// The shipped settings: --sync-period 30s, so /healthz allows a change to
// wait 2 × 30 s.
const (
	syncPeriod = 30 * time.Second
	timeout    = 2 * syncPeriod
)

// loopHarness runs a real syncrunner.Runner on a fake clock whose sync function
// blocks until the test ends it, wired to a ProxyHealth as cmd/miniproxy
// wires them (Updated after a successful sync, WatchLoop on the runner).
type loopHarness struct {
	t       *testing.T
	clk     *clocktesting.FakeClock
	r       *syncrunner.Runner
	h       *ProxyHealth
	calls   chan bool
	results chan error
}

func startLoop(t *testing.T) *loopHarness {
	t.Helper()
	lh := &loopHarness{t: t, clk: clocktesting.NewFakeClock(now), calls: make(chan bool), results: make(chan error)}
	lh.h = NewProxyHealth(timeout, lh.clk)
	lh.r = syncrunner.New(syncrunner.Config{MinInterval: time.Second, MaxInterval: syncPeriod}, lh.clk, func(ctx context.Context, full bool) error {
		select {
		case lh.calls <- full:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case err := <-lh.results:
			if err == nil {
				lh.h.Updated(lh.clk.Now())
			}
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	lh.h.WatchLoop(lh.r.Status, 0)
	return lh
}

// run starts the loop (cmd/miniproxy does so once the informers synced).
func (lh *loopHarness) run() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		lh.r.Run(ctx)
	}()
	lh.t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(failsafe):
			lh.t.Error("Run did not return after cancel")
		}
	})
}

func (lh *loopHarness) expectSync() {
	lh.t.Helper()
	select {
	case <-lh.calls:
	case <-time.After(failsafe):
		lh.t.Fatal("no sync started")
	}
}

// probeProxy returns the HTTP status of path and the reason in its body.
func probeProxy(t *testing.T, h *ProxyHealth, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func expectProbe(t *testing.T, h *ProxyHealth, at time.Duration, path string, code int, reason string) {
	t.Helper()
	got, body := probeProxy(t, h, path)
	if got != code || !strings.Contains(body, reason) {
		t.Fatalf("+%v %s: %d %s; want %d with %q", at, path, got, body, code, reason)
	}
}

// A cold start far longer than 2 × sync-period (the 44k-Service iptables one
// took 99 s), with changes queued during the initial list, stays live while
// the sync reports progress; it is not ready until the sync completes.
// Before issue 15's fix /livez failed 60 s after the first queued change.
func TestLivenessLongColdStart(t *testing.T) {
	lh := startLoop(t)
	// The informers' initial list queues changes before the loop starts.
	lh.h.QueuedUpdate(now)
	expectProbe(t, lh.h, 0, "/livez", 200, `"healthy":true`)
	expectProbe(t, lh.h, 0, "/healthz", 503, "no sync has completed yet")
	lh.run()
	lh.expectSync()
	// Ten minutes of cold start: twice DefaultStuckAfter, ten times the
	// /healthz limit, with progress (a restore chunk) every 20 s.
	for at := 20 * time.Second; at <= 10*time.Minute; at += 20 * time.Second {
		lh.clk.SetTime(now.Add(at))
		lh.r.Progress()
		expectProbe(t, lh.h, at, "/livez", 200, `"healthy":true`)
		expectProbe(t, lh.h, at, "/healthz", 503, "")
	}
	lh.results <- nil
	// Once the sync is recorded the loop waits again: ready and live.
	for i := 0; ; i++ {
		if code, _ := probeProxy(t, lh.h, "/healthz"); code == 200 {
			break
		}
		if i > 1000 {
			t.Fatal("/healthz never became 200 after the first sync")
		}
		time.Sleep(time.Millisecond)
	}
	expectProbe(t, lh.h, 10*time.Minute, "/livez", 200, `"healthy":true`)
}

// A sync that stops reporting progress is stuck: /livez fails after
// DefaultStuckAfter without progress, and /healthz with it.
func TestLivenessStuckSync(t *testing.T) {
	lh := startLoop(t)
	lh.run()
	lh.expectSync()
	lh.clk.SetTime(now.Add(time.Minute))
	lh.r.Progress()
	last := time.Minute + DefaultStuckAfter
	lh.clk.SetTime(now.Add(last - time.Millisecond))
	expectProbe(t, lh.h, last-time.Millisecond, "/livez", 200, `"healthy":true`)
	lh.clk.SetTime(now.Add(last))
	expectProbe(t, lh.h, last, "/livez", 503, "sync loop stuck: a sync started at 2026-03-01T12:00:00Z has shown no progress for 5m0s (limit 5m0s)")
	expectProbe(t, lh.h, last, "/healthz", 503, "sync loop stuck")
	// Progress revives it: the check is about signs of life, not a deadline.
	lh.r.Progress()
	expectProbe(t, lh.h, last, "/livez", 200, `"healthy":true`)
	lh.results <- errors.New("stop")
}

// TestLivenessStates covers the remaining states from a loop status as the
// runner reports it.
func TestLivenessStates(t *testing.T) {
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	restoreErr := errors.New(`sync (full=true) failed: iptables IPv4 sync: restore: exit status 1: iptables-restore: line 12 failed`)
	for _, tc := range []struct {
		name       string
		updated    time.Duration // > 0: last successful sync that long ago
		queued     time.Duration // > 0: oldest queued change that long ago
		loop       *syncrunner.Status
		healthz    int
		healthzWhy string
		livez      int
		livezWhy   string
	}{
		{name: "informers still listing (loop not started), apiserver slow or down",
			queued: 10 * time.Minute, loop: &syncrunner.Status{},
			healthz: 503, healthzWhy: "has waited 10m0s", livez: 200},
		{name: "idle, next sync due later",
			updated: 10 * time.Second, loop: &syncrunner.Status{Started: true, NextSync: now.Add(20 * time.Second)},
			healthz: 200, livez: 200},
		{name: "apiserver unreachable: no changes arrive, periodic full syncs succeed from the cache",
			updated: 25 * time.Second, loop: &syncrunner.Status{Started: true, NextSync: now.Add(5 * time.Second), Syncs: 40},
			healthz: 200, livez: 200},
		{name: "idle loop a little late (busy machine)",
			updated: time.Minute, loop: &syncrunner.Status{Started: true, NextSync: ago(30 * time.Second)},
			healthz: 200, livez: 200},
		{name: "idle loop stuck: its sync is overdue by the limit",
			updated: 10 * time.Minute, loop: &syncrunner.Status{Started: true, NextSync: ago(DefaultStuckAfter)},
			healthz: 503, healthzWhy: "sync loop stuck: the sync due at", livez: 503, livezWhy: "has not started 5m0s later"},
		{name: "failing briefly after a success: retried, still ready",
			updated: 40 * time.Second, loop: &syncrunner.Status{Started: true, NextSync: now.Add(2 * time.Second),
				FailingSince: ago(timeout - time.Millisecond), ConsecutiveFailures: 3, LastError: restoreErr},
			healthz: 200, livez: 200},
		{name: "failing for 2 × sync-period: not ready, still live (a restart cannot help)",
			updated: 5 * time.Minute, loop: &syncrunner.Status{Started: true, NextSync: now.Add(30 * time.Second),
				FailingSince: ago(timeout), ConsecutiveFailures: 7, LastError: restoreErr},
			healthz: 503, healthzWhy: "syncs have failed for 1m0s (7 in a row, limit 1m0s); last error: sync (full=true) failed: iptables IPv4 sync: restore: exit status 1: iptables-restore: line 12 failed",
			livez: 200},
		{name: "first sync failing for an hour: not ready, live",
			loop: &syncrunner.Status{Started: true, NextSync: now.Add(30 * time.Second),
				FailingSince: ago(time.Hour), ConsecutiveFailures: 125, LastError: restoreErr},
			healthz: 503, healthzWhy: "syncs have failed for 1h0m0s", livez: 200},
		{name: "long resync with a change waiting past the limit: not ready, live",
			updated: 3 * time.Minute, queued: 2 * time.Minute,
			loop:    &syncrunner.Status{Started: true, Running: true, RunningSince: ago(2 * time.Minute), LastProgress: ago(time.Second)},
			healthz: 503, healthzWhy: "has waited 2m0s", livez: 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := NewProxyHealth(timeout, clocktesting.NewFakePassiveClock(now))
			if tc.updated > 0 {
				h.Updated(ago(tc.updated))
			}
			if tc.queued > 0 {
				h.QueuedUpdate(ago(tc.queued))
			}
			if tc.loop != nil {
				st := *tc.loop
				h.WatchLoop(func() syncrunner.Status { return st }, 0)
			}
			if tc.healthz == 200 {
				tc.healthzWhy = `"healthy":true`
			}
			if tc.livez == 200 {
				tc.livezWhy = `"healthy":true`
			}
			expectProbe(t, h, 0, "/healthz", tc.healthz, tc.healthzWhy)
			expectProbe(t, h, 0, "/livez", tc.livez, tc.livezWhy)
			if got := h.Healthy(); got != (tc.healthz == 200) {
				t.Errorf("Healthy() = %t with /healthz %d", got, tc.healthz)
			}
		})
	}
}
