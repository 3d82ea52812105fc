package syncrunner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// logRecord is one captured log line with its attributes rendered as text.
type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

// captureHandler keeps every record (any level) for the test to inspect.
type captureHandler struct {
	mu      *sync.Mutex
	records *[]logRecord
}

func newCapture() (*slog.Logger, func() []logRecord) {
	h := captureHandler{mu: &sync.Mutex{}, records: &[]logRecord{}}
	return slog.New(h), func() []logRecord {
		h.mu.Lock()
		defer h.mu.Unlock()
		return append([]logRecord(nil), *h.records...)
	}
}

func (h captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h captureHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h captureHandler) WithGroup(string) slog.Handler            { return h }
func (h captureHandler) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		return true
	})
	h.mu.Lock()
	*h.records = append(*h.records, rec)
	h.mu.Unlock()
	return nil
}

// above returns the records at level >= least, as "LEVEL msg k=v…" lines
// with only the keys asked for, so expectations stay readable.
func above(recs []logRecord, least slog.Level, keys ...string) []string {
	var out []string
	for _, r := range recs {
		if r.level < least {
			continue
		}
		line := r.level.String() + " " + r.msg
		for _, k := range keys {
			if v, ok := r.attrs[k]; ok {
				line += " " + k + "=" + v
			}
		}
		out = append(out, line)
	}
	return out
}

// TestFailureLogging drives a failure streak of 10 syncs through backoff
// (1s, 2s, 4s, … capped at 30s) and a recovery. Failures end at +0, +1, +3,
// +7, +15, +31, +61, +91, +121, +151 s; with one line per minute allowed, the
// 1st, 7th (+61 s, 5 not logged) and 9th (+121 s, 1 not logged) are logged at
// error level, the others at debug level, and the success says how long the
// streak lasted.
func TestFailureLogging(t *testing.T) {
	log, records := newCapture()
	h := start(t, Config{MaxInterval: time.Hour, RetryInitial: time.Second, RetryMax: 30 * time.Second,
		FailureLogInterval: time.Minute, Logger: log})
	kernelErr := errors.New("iptables-restore: line 7 failed: CHAIN_DEL failed (Device or resource busy): chain KUBE-FIREWALL")
	h.expectCall(true)
	h.finish(fmt.Errorf("iptables IPv4 sync: %w", kernelErr))
	var at time.Duration
	for i := 2; i <= 10; i++ {
		at = h.nextWait()
		h.at(at)
		h.expectCall(true)
		h.finish(fmt.Errorf("iptables IPv4 sync: %w", kernelErr))
	}
	if at != 151*time.Second {
		t.Fatalf("10th failure at +%v, want +151s (backoff changed?)", at)
	}
	at = h.nextWait()
	h.at(at)
	h.expectCall(true)
	h.finish(nil)
	h.nextWait()

	got := above(records(), slog.LevelInfo, "consecutiveFailures", "notLogged", "failingFor")
	want := []string{
		"ERROR sync failed consecutiveFailures=1",
		"ERROR sync still failing consecutiveFailures=7 notLogged=5 failingFor=1m1s",
		"ERROR sync still failing consecutiveFailures=9 notLogged=1 failingFor=2m1s",
		"INFO sync succeeded after 10 failures notLogged=1 failingFor=3m1s",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("log lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Every logged failure carries the tool's message; the unlogged ones
	// are still there at debug level.
	debug := 0
	for _, r := range records() {
		if r.level == slog.LevelDebug {
			debug++
		}
		if r.level >= slog.LevelError && !strings.Contains(r.attrs["err"], "CHAIN_DEL failed (Device or resource busy)") {
			t.Errorf("%q lacks the kernel message: err=%q", r.msg, r.attrs["err"])
		}
	}
	if debug != 7 {
		t.Errorf("%d debug lines for unlogged failures, want 7", debug)
	}
}

// A success that ends no failure streak logs nothing (the caller logs its
// own per-sync line), and a new streak after a recovery is logged at once.
func TestFailureLoggingNewStreak(t *testing.T) {
	log, records := newCapture()
	h := start(t, Config{MaxInterval: time.Hour, FailureLogInterval: time.Hour, Logger: log})
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(time.Hour)
	h.r.Trigger()
	h.expectCall(false)
	h.finish(errors.New("netlink: file exists"))
	h.at(h.nextWait())
	h.expectCall(true)
	h.finish(nil)
	h.expectWait(time.Hour + time.Second)
	h.r.Trigger()
	h.expectCall(false)
	h.finish(errors.New("netlink: file exists"))
	h.nextWait()
	got := above(records(), slog.LevelInfo, "consecutiveFailures")
	want := []string{
		"ERROR sync failed consecutiveFailures=1",
		"INFO sync succeeded after 1 failures",
		"ERROR sync failed consecutiveFailures=1",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("log lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestStatusLiveness checks the fields liveness checks read: running since,
// progress, the idle loop's next wake-up, and the failure streak's start.
func TestStatusLiveness(t *testing.T) {
	h := start(t, Config{MaxInterval: time.Hour, RetryInitial: time.Second})
	h.expectCall(true)
	st := h.r.Status()
	if !st.Started || !st.Running || !st.RunningSince.Equal(t0) || !st.LastProgress.Equal(t0) || !st.NextSync.IsZero() {
		t.Fatalf("during the first sync: %+v", st)
	}
	h.at(100 * time.Second)
	h.r.Progress()
	if st := h.r.Status(); !st.LastProgress.Equal(t0.Add(100*time.Second)) || !st.RunningSince.Equal(t0) {
		t.Fatalf("after Progress at +100s: %+v", st)
	}
	h.finish(errors.New("boom"))
	h.expectWait(101 * time.Second)
	st = h.r.Status()
	if st.Running || !st.LastProgress.IsZero() || !st.NextSync.Equal(t0.Add(101*time.Second)) || !st.FailingSince.Equal(t0) {
		t.Fatalf("idle after a failure: %+v", st)
	}
	h.r.Progress() // outside a sync: ignored
	if st := h.r.Status(); !st.LastProgress.IsZero() {
		t.Fatalf("Progress while idle recorded: %+v", st)
	}
	h.at(101 * time.Second)
	h.expectCall(true)
	if st := h.r.Status(); !st.FailingSince.Equal(t0) {
		t.Fatalf("streak start moved during the retry: %+v", st)
	}
	h.finish(nil)
	h.expectWait(101*time.Second + time.Hour)
	if st := h.r.Status(); !st.FailingSince.IsZero() || st.ConsecutiveFailures != 0 {
		t.Fatalf("after recovery: %+v", st)
	}
}
