package syncrunner

import (
	"context"
	"errors"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// failsafe bounds how long a broken runner can hang a test. It is never part
// of an assertion: every expected event arrives through a channel.
const failsafe = 10 * time.Second

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// harness runs a Runner on a fake clock. The sync function reports each call
// on calls and blocks until the test answers on results, so the test decides
// exactly when a sync ends and with what outcome.
type harness struct {
	t       *testing.T
	clk     *clocktesting.FakeClock
	r       *Runner
	calls   chan bool
	results chan error
	waits   chan time.Time
	cancel  context.CancelFunc
	done    chan struct{}
}

func start(t *testing.T, cfg Config) *harness {
	t.Helper()
	h := &harness{
		t:       t,
		clk:     clocktesting.NewFakeClock(t0),
		calls:   make(chan bool),
		results: make(chan error),
		waits:   make(chan time.Time, 1000),
		done:    make(chan struct{}),
	}
	h.r = New(cfg, h.clk, func(ctx context.Context, full bool) error {
		select {
		case h.calls <- full:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case err := <-h.results:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	h.r.onWait = func(due time.Time) { h.waits <- due }
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() {
		defer close(h.done)
		h.r.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-h.done:
		case <-time.After(failsafe):
			t.Error("Run did not return after cancel")
		}
	})
	return h
}

// expectCall waits for the next sync and checks its full flag. Wait reports
// made before the call are stale once it happens, so they are dropped.
func (h *harness) expectCall(wantFull bool) {
	h.t.Helper()
	select {
	case full := <-h.calls:
		if full != wantFull {
			h.t.Fatalf("sync at %v: full=%t, want %t", h.clk.Now().Sub(t0), full, wantFull)
		}
	case <-time.After(failsafe):
		h.t.Fatalf("no sync called (clock at +%v)", h.clk.Now().Sub(t0))
	}
	for {
		select {
		case <-h.waits:
		default:
			return
		}
	}
}

// finish ends the running sync with err.
func (h *harness) finish(err error) {
	h.t.Helper()
	select {
	case h.results <- err:
	case <-time.After(failsafe):
		h.t.Fatal("sync function not running")
	}
}

// nextWait returns the next time the runner blocks until.
func (h *harness) nextWait() time.Duration {
	h.t.Helper()
	select {
	case due := <-h.waits:
		return due.Sub(t0)
	case full := <-h.calls:
		h.t.Fatalf("unexpected sync (full=%t) at +%v", full, h.clk.Now().Sub(t0))
	case <-time.After(failsafe):
		h.t.Fatal("runner never blocked")
	}
	return 0
}

func (h *harness) expectWait(want time.Duration) {
	h.t.Helper()
	if got := h.nextWait(); got != want {
		h.t.Fatalf("next sync scheduled at +%v, want +%v", got, want)
	}
}

// at moves the fake clock to t0+d.
func (h *harness) at(d time.Duration) { h.clk.SetTime(t0.Add(d)) }

func TestFirstSyncIsImmediateAndFull(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(30 * time.Second)
	if last, err := h.r.LastSync(); !last.Equal(t0) || err != nil {
		t.Fatalf("LastSync() = %v, %v; want %v, nil", last, err, t0)
	}
}

func TestBurstOfTriggersCoalesces(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(30 * time.Second)

	for range 50 {
		h.r.Trigger()
	}
	// Each re-plan must target min-sync-period after the first sync.
	if got := h.nextWait(); got != time.Second {
		t.Fatalf("after triggers: scheduled at +%v, want +1s", got)
	}
	h.at(time.Second)
	h.expectCall(false)
	h.finish(nil)
	// All 50 changes were covered by that one sync: nothing is pending, so
	// the next sync is the periodic full one (a leftover trigger would give +2s).
	h.expectWait(30 * time.Second)
	if n := h.r.Status().Syncs; n != 2 {
		t.Fatalf("Syncs = %d, want 2", n)
	}
}

func TestTriggerDuringSyncCausesOneMoreSync(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.r.Trigger() // arrives while the first sync runs: it may not be covered
	h.r.Trigger()
	h.finish(nil)
	// The runner first plans the periodic sync, then sees the trigger.
	h.expectWait(30 * time.Second)
	h.expectWait(time.Second)
	h.at(time.Second)
	h.expectCall(false)
	h.finish(nil)
	h.expectWait(30 * time.Second)
}

func TestMinInterval(t *testing.T) {
	h := start(t, Config{MinInterval: 5 * time.Second, MaxInterval: time.Minute})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(time.Minute)

	h.at(2 * time.Second)
	h.r.Trigger()
	h.expectWait(5 * time.Second) // not at once: 5s after the last start
	h.at(5 * time.Second)
	h.expectCall(false)
	h.finish(nil)
	h.expectWait(time.Minute)

	h.at(8 * time.Second)
	h.r.Trigger()
	h.expectWait(10 * time.Second)

	// A change long after the last sync is applied at once.
	h.at(30 * time.Second)
	h.expectCall(false)
	h.finish(nil)
	h.expectWait(time.Minute)
	h.at(40 * time.Second)
	h.r.Trigger()
	h.expectCall(false)
	h.finish(nil)
}

func TestPeriodicFullSyncNotPostponedByPartials(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(30 * time.Second)

	// Partial syncs at +10s and +20s must not push the full one back.
	for _, at := range []time.Duration{10 * time.Second, 20 * time.Second} {
		h.at(at)
		h.r.Trigger()
		h.expectCall(false)
		h.finish(nil)
		h.expectWait(30 * time.Second)
	}
	h.at(30 * time.Second)
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(60 * time.Second)
	h.at(60 * time.Second)
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(90 * time.Second)
}

func TestBackoffSequenceAndReset(t *testing.T) {
	h := start(t, Config{
		MinInterval:  500 * time.Millisecond,
		MaxInterval:  time.Minute,
		RetryInitial: time.Second,
		RetryMax:     8 * time.Second,
	})
	boom := errors.New("iptables-restore: exit status 1")

	// Failures at +0, +1, +3, +7, +15: delays 1, 2, 4, 8, then capped at 8.
	h.expectCall(true)
	h.finish(boom)
	for i, want := range []time.Duration{1, 3, 7, 15, 23} {
		due := want * time.Second
		h.expectWait(due)
		if i == 1 {
			// A change while failing does not bring the retry forward.
			h.r.Trigger()
			h.expectWait(due)
		}
		h.at(due)
		h.expectCall(true) // every retry is full
		if want == 23 {
			break
		}
		h.finish(boom)
	}
	st := h.r.Status() // settled: the runner is inside the sync function
	if st.ConsecutiveFailures != 5 || !errors.Is(st.LastError, boom) || !st.LastSuccess.IsZero() {
		t.Fatalf("status while failing = %+v", st)
	}

	h.finish(nil) // success at +23s resets everything
	h.expectWait(23*time.Second + time.Minute)
	if last, err := h.r.LastSync(); err != nil || !last.Equal(t0.Add(23*time.Second)) {
		t.Fatalf("LastSync() = %v, %v", last, err)
	}
	h.r.Trigger()
	h.expectWait(23*time.Second + 500*time.Millisecond)
	h.at(24 * time.Second)
	h.expectCall(false) // back to partial syncs

	// The next failure starts the backoff from RetryInitial again.
	h.finish(boom)
	h.expectWait(25 * time.Second)
	h.at(25 * time.Second)
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(25*time.Second + time.Minute) // status is settled once the runner waits again
	if st := h.r.Status(); st.ConsecutiveFailures != 0 || st.LastError != nil {
		t.Fatalf("status after recovery = %+v", st)
	}
}

func TestBackoffNeverSoonerThanMinInterval(t *testing.T) {
	h := start(t, Config{MinInterval: 5 * time.Second, MaxInterval: time.Minute, RetryInitial: time.Second})
	h.expectCall(true)
	h.finish(errors.New("boom"))
	h.expectWait(5 * time.Second)
	h.at(5 * time.Second)
	h.expectCall(true)
	h.finish(errors.New("boom"))
	h.expectWait(10 * time.Second) // 2s backoff, but 5s since the start
}

func TestBackoffMeasuredFromEndOfSlowSync(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: time.Minute, RetryInitial: 2 * time.Second})
	h.expectCall(true)
	h.at(10 * time.Second) // the failing sync took 10s
	h.finish(errors.New("boom"))
	h.expectWait(12 * time.Second)
}

func TestCancelWhileWaiting(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(30 * time.Second)
	h.cancel()
	select {
	case <-h.done:
	case <-time.After(failsafe):
		t.Fatal("Run did not return after cancel")
	}
	h.r.Trigger() // must not block or panic after Run returned
}

func TestCancelDuringSync(t *testing.T) {
	h := start(t, Config{MinInterval: time.Second, MaxInterval: 30 * time.Second})
	h.expectCall(true)
	h.cancel() // the sync function sees ctx.Done and returns ctx.Err()
	select {
	case <-h.done:
	case <-time.After(failsafe):
		t.Fatal("Run did not return after cancel")
	}
	// An interrupted sync is not recorded as a failure.
	if st := h.r.Status(); st.ConsecutiveFailures != 0 || st.LastError != nil {
		t.Fatalf("status after cancel = %+v", st)
	}
}

func TestDefaults(t *testing.T) {
	r := New(Config{MinInterval: 2 * time.Minute}, clocktesting.NewFakeClock(t0), nil)
	got := r.Config()
	want := Config{MinInterval: 2 * time.Minute, MaxInterval: 2 * time.Minute, RetryInitial: time.Second, RetryMax: 30 * time.Second, FailureLogInterval: time.Minute}
	if got != want {
		t.Fatalf("Config() = %+v, want %+v", got, want)
	}
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 5: 16 * time.Second, 6: 30 * time.Second, 100: 30 * time.Second} {
		if got := r.backoff(n); got != want {
			t.Errorf("backoff(%d) = %v, want %v", n, got, want)
		}
	}
}

// TestBurst: with Burst 2, a second change right after a sync is applied at
// once; a third must wait until the bucket has refilled a whole token.
func TestBurst(t *testing.T) {
	h := start(t, Config{MinInterval: 4 * time.Second, MaxInterval: time.Minute, Burst: 2})
	h.expectCall(true) // t=0, tokens 2 → 1
	h.finish(nil)
	h.expectWait(time.Minute)

	h.at(100 * time.Millisecond)
	h.r.Trigger()
	h.expectCall(false) // at once: tokens 1.025 → 0.025
	h.finish(nil)
	h.expectWait(time.Minute)

	h.at(200 * time.Millisecond)
	h.r.Trigger()
	// 0.025 tokens at +100ms; a whole token 0.975 × 4s later = +4s.
	h.expectWait(4 * time.Second)
	h.at(4 * time.Second)
	h.expectCall(false)
	h.finish(nil)

	// After a long quiet period the bucket is full again (capped at 2).
	h.expectWait(time.Minute)
	h.at(30 * time.Second)
	h.r.Trigger()
	h.expectCall(false)
	h.finish(nil)
	h.expectWait(time.Minute)
	h.at(30*time.Second + time.Millisecond)
	h.r.Trigger()
	h.expectCall(false)
	h.finish(nil)
}
