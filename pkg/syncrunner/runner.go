// Package syncrunner decides when miniproxy programs the kernel.
//
// A Runner calls one sync function, never concurrently with itself, under four
// rules:
//
//   - changes are coalesced: any number of Trigger calls between two syncs cause
//     one sync, started no sooner than MinInterval after the previous sync
//     started (--min-sync-period), so a burst of API events costs one rewrite;
//   - drift repair: a full sync runs at least every MaxInterval (--sync-period),
//     measured from the start of the previous full sync, so a stream of partial
//     syncs can never postpone it;
//   - a failed sync is retried with exponential backoff (RetryInitial doubling up
//     to RetryMax, never sooner than MinInterval), and the retry is full because
//     after a failure the backend's idea of what the kernel holds is unreliable;
//   - the first sync is full and starts as soon as Run is called, so the caller
//     should call Run only once its informers have synced.
//
// Every failed sync is logged, rate-limited: the first failure of a streak at
// once, then at most one line per FailureLogInterval carrying the error of the
// latest failure and how many failures were not logged since the previous line
// (those go to the debug level). The first success after failures is logged too
// ("sync succeeded after N failures"), so a log reader sees where an outage
// started and ended. Counting failures under a backend's metric names is the
// caller's business: the runner does not know the backend.
//
// Status also tells whether the loop is alive, for liveness checks: whether a
// sync is running and since when, when it last reported progress (Progress),
// and, while idle, when the loop will next wake up.
package syncrunner

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// Defaults applied by New to zero Config fields.
const (
	DefaultMaxInterval  = 30 * time.Second
	DefaultRetryInitial = 1 * time.Second
	DefaultRetryMax     = 30 * time.Second
	// DefaultFailureLogInterval spaces the log lines of a failure streak.
	DefaultFailureLogInterval = time.Minute
)

// Config says how often the sync function may and must run.
type Config struct {
	// MinInterval is the least time between the starts of two syncs
	// (--min-sync-period). Zero allows back-to-back syncs.
	MinInterval time.Duration
	// MaxInterval is the most time between the starts of two full syncs
	// (--sync-period). Zero means DefaultMaxInterval. It is raised to
	// MinInterval if smaller.
	MaxInterval time.Duration
	// RetryInitial is the delay after the first failed sync; it doubles
	// with every further consecutive failure. Zero means DefaultRetryInitial.
	RetryInitial time.Duration
	// RetryMax caps the retry delay. Zero means DefaultRetryMax.
	RetryMax time.Duration
	// Burst lets up to Burst syncs start back to back before MinInterval
	// spacing applies (a token bucket refilled at one token per
	// MinInterval), like kube-proxy's burstSyncs. Creating a Service and its
	// EndpointSlice are two events a few milliseconds apart: with Burst 2
	// both are programmed at once instead of the second waiting out
	// MinInterval. Zero or one means strict spacing.
	Burst int
	// Logger receives the failure and recovery lines. Nil discards them.
	Logger *slog.Logger
	// FailureLogInterval is the least time between two log lines of one
	// failure streak (the first failure is always logged at once). Zero
	// means DefaultFailureLogInterval.
	FailureLogInterval time.Duration
}

// SyncFunc programs the dataplane. full asks for a complete reconcile (first
// sync, periodic drift repair, or the first sync after a failure); otherwise
// the function may send only what changed.
type SyncFunc func(ctx context.Context, full bool) error

// Status describes the runner's recent history, for health checks and logs.
type Status struct {
	// LastAttempt is when the most recent sync started (zero before the first).
	LastAttempt time.Time
	// LastSuccess is when the most recent successful sync finished.
	LastSuccess time.Time
	// LastError is the error of the most recent sync, nil if it succeeded.
	LastError error
	// ConsecutiveFailures counts failed syncs since the last success.
	ConsecutiveFailures int
	// Syncs counts every completed call of the sync function.
	Syncs uint64
	// FailingSince is when the first failed sync of the current failure
	// streak started; zero while the last sync succeeded (or none ran).
	FailingSince time.Time

	// Liveness of the loop itself.

	// Started is true once Run has been called.
	Started bool
	// Running is true while the sync function runs; RunningSince is when
	// it was called.
	Running      bool
	RunningSince time.Time
	// LastProgress is the latest of RunningSince and the last Progress call
	// of the running sync (zero while idle).
	LastProgress time.Time
	// NextSync is, while the loop is idle, when it will start the next sync
	// at the latest (a Trigger can only bring it forward). Zero while a sync
	// runs or before Run.
	NextSync time.Time
}

// Runner schedules calls of a SyncFunc. Create it with New.
type Runner struct {
	cfg Config
	clk clock.WithTicker
	fn  SyncFunc

	// trigger has capacity one: a pending signal already means "sync soon",
	// so further Triggers have nothing to add and are dropped (coalescing).
	trigger chan struct{}

	mu     sync.Mutex
	status Status

	// Failure log state, touched only by Run's goroutine.
	log         *slog.Logger
	lastFailLog time.Time // when the current streak was last logged
	suppressed  int       // failures of the streak not logged since then

	// onWait, if set (tests only), is called each time the loop is about
	// to block, with the time of the next scheduled sync. The timer for
	// that time is already registered with the clock when it is called.
	onWait func(due time.Time)
}

// New returns a Runner that calls fn. clk is normally clock.RealClock{}.
func New(cfg Config, clk clock.WithTicker, fn SyncFunc) *Runner {
	if cfg.MinInterval < 0 {
		cfg.MinInterval = 0
	}
	if cfg.MaxInterval <= 0 {
		cfg.MaxInterval = DefaultMaxInterval
	}
	if cfg.MaxInterval < cfg.MinInterval {
		cfg.MaxInterval = cfg.MinInterval
	}
	if cfg.RetryInitial <= 0 {
		cfg.RetryInitial = DefaultRetryInitial
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = DefaultRetryMax
	}
	if cfg.RetryMax < cfg.RetryInitial {
		cfg.RetryMax = cfg.RetryInitial
	}
	if cfg.FailureLogInterval <= 0 {
		cfg.FailureLogInterval = DefaultFailureLogInterval
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Runner{cfg: cfg, clk: clk, fn: fn, trigger: make(chan struct{}, 1), log: log}
}

// Config returns the effective configuration (defaults applied).
func (r *Runner) Config() Config { return r.cfg }

// Trigger records that something changed. It never blocks and may be called
// from any goroutine (typically informer event handlers), before or during Run.
func (r *Runner) Trigger() {
	select {
	case r.trigger <- struct{}{}:
	default:
	}
}

// Progress records that the running sync is still advancing (for example
// after each chunk of a long restore), so that liveness checks can tell a long
// sync from a stuck one. It may be called from any goroutine; outside a sync it
// does nothing.
func (r *Runner) Progress() {
	now := r.clk.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status.Running && now.After(r.status.LastProgress) {
		r.status.LastProgress = now
	}
}

// LastSync returns when the last successful sync finished (zero if none has)
// and the error of the most recent sync (nil if it succeeded).
func (r *Runner) LastSync() (time.Time, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status.LastSuccess, r.status.LastError
}

// Status returns a copy of the runner's status.
func (r *Runner) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// schedule is the loop's private state; only Run's goroutine touches it.
type schedule struct {
	started       bool      // a sync has run
	lastStart     time.Time // start of the previous sync
	tokens        float64   // sync tokens left at tokensAt (see Config.Burst)
	tokensAt      time.Time
	lastFullStart time.Time // start of the previous full sync
	lastEnd       time.Time // end of the previous sync
	pending       bool      // a Trigger arrived since the previous sync started
	failures      int       // consecutive failures
}

// next returns when the next sync is due. The first sync is due at once.
func (r *Runner) next(s *schedule) time.Time {
	if !s.started {
		return time.Time{}
	}
	earliest := r.earliest(s)
	due := s.lastFullStart.Add(r.cfg.MaxInterval)
	if s.failures > 0 {
		// While failing, changes do not speed up retries: a trigger
		// would otherwise turn backoff into a retry every MinInterval.
		// The retry is a full sync, so it covers pending changes too.
		retry := s.lastEnd.Add(r.backoff(s.failures))
		if retry.Before(earliest) {
			retry = earliest
		}
		if retry.Before(due) {
			due = retry
		}
		return due
	}
	if s.pending && earliest.Before(due) {
		due = earliest
	}
	return due
}

// earliest is when the token bucket next holds a whole token.
func (r *Runner) earliest(s *schedule) time.Time {
	if r.cfg.MinInterval <= 0 {
		return s.lastStart
	}
	if s.tokens >= 1 {
		return s.tokensAt
	}
	return s.tokensAt.Add(time.Duration((1 - s.tokens) * float64(r.cfg.MinInterval)))
}

// take spends one token for a sync starting at now.
func (r *Runner) take(s *schedule, now time.Time) {
	burst := float64(max(r.cfg.Burst, 1))
	if !s.started {
		s.tokens = burst
	} else if r.cfg.MinInterval > 0 {
		s.tokens += float64(now.Sub(s.tokensAt)) / float64(r.cfg.MinInterval)
	}
	s.tokens = min(s.tokens, burst) - 1
	s.tokensAt = now
}

// backoff returns the delay after the n-th consecutive failure (n >= 1).
func (r *Runner) backoff(n int) time.Duration {
	d := r.cfg.RetryInitial
	for i := 1; i < n && d < r.cfg.RetryMax; i++ {
		d *= 2
	}
	if d > r.cfg.RetryMax {
		d = r.cfg.RetryMax
	}
	return d
}

// Run calls the sync function as scheduled until ctx is cancelled. It returns
// as soon as ctx is done and no sync is running; a running sync gets ctx and is
// expected to stop on cancellation.
func (r *Runner) Run(ctx context.Context) {
	var s schedule
	needFull := true // first sync
	r.mu.Lock()
	r.status.Started = true
	r.mu.Unlock()
	for {
		if ctx.Err() != nil {
			return
		}
		due := r.next(&s)
		if wait := due.Sub(r.clk.Now()); !due.IsZero() && wait > 0 {
			r.mu.Lock()
			r.status.NextSync = due
			r.mu.Unlock()
			timer := r.clk.NewTimer(wait)
			if r.onWait != nil {
				r.onWait(due)
			}
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-r.trigger:
				// Re-plan: the change may bring the next sync forward.
				timer.Stop()
				s.pending = true
				continue
			case <-timer.C():
			}
		}
		// Drain a trigger that raced with the timer: this sync covers it.
		select {
		case <-r.trigger:
		default:
		}

		now := r.clk.Now()
		full := needFull || !now.Before(s.lastFullStart.Add(r.cfg.MaxInterval))
		r.take(&s, now)
		s.started, s.lastStart, s.pending = true, now, false
		if full {
			s.lastFullStart = now
		}
		r.mu.Lock()
		r.status.LastAttempt = now
		r.status.Running, r.status.RunningSince, r.status.LastProgress = true, now, now
		r.status.NextSync = time.Time{}
		r.mu.Unlock()

		err := r.fn(ctx, full)
		end := r.clk.Now()
		s.lastEnd = end
		if err != nil && ctx.Err() != nil {
			// Shutting down: the sync was interrupted, not broken.
			r.mu.Lock()
			r.status.Running, r.status.LastProgress = false, time.Time{}
			r.mu.Unlock()
			return
		}

		r.mu.Lock()
		r.status.Syncs++
		r.status.Running, r.status.LastProgress = false, time.Time{}
		failingSince, streak := r.status.FailingSince, s.failures
		if err != nil {
			s.failures++
			needFull = true
			r.status.LastError = fmt.Errorf("sync (full=%t) failed: %w", full, err)
			r.status.ConsecutiveFailures = s.failures
			if failingSince.IsZero() {
				r.status.FailingSince = now
			}
		} else {
			s.failures = 0
			needFull = false
			r.status.LastError = nil
			r.status.ConsecutiveFailures = 0
			r.status.LastSuccess = end
			r.status.FailingSince = time.Time{}
		}
		st := r.status
		r.mu.Unlock()
		r.logOutcome(st, failingSince, streak, full, end.Sub(now), err)
	}
}

// logOutcome writes the failure and recovery lines (see the package doc). st
// is the status after this sync; failingSince and streak describe the failure
// streak before it (zero if the previous sync succeeded).
func (r *Runner) logOutcome(st Status, failingSince time.Time, streak int, full bool, took time.Duration, err error) {
	now := r.clk.Now()
	if err != nil {
		n := st.ConsecutiveFailures
		if n > 1 && now.Sub(r.lastFailLog) < r.cfg.FailureLogInterval {
			r.suppressed++
			r.log.Debug("sync failed again", "full", full, "consecutiveFailures", n, "err", err)
			return
		}
		attrs := []any{"full", full, "took", took, "consecutiveFailures", n, "retryIn", r.backoff(n)}
		msg := "sync failed"
		if n > 1 {
			msg = "sync still failing"
			attrs = append(attrs, "failingFor", now.Sub(st.FailingSince), "notLogged", r.suppressed)
		}
		r.log.Error(msg, append(attrs, "err", err)...)
		r.lastFailLog, r.suppressed = now, 0
		return
	}
	if streak == 0 {
		return
	}
	r.log.Info(fmt.Sprintf("sync succeeded after %d failures", streak), "full", full,
		"failingFor", now.Sub(failingSince), "notLogged", r.suppressed)
	r.lastFailLog, r.suppressed = time.Time{}, 0
}
