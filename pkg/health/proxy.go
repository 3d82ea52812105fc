// Package health serves miniproxy's health endpoints: the proxy's own /healthz
// and /livez (ProxyHealth), and the per-Service health-check node ports that
// external load balancers probe for externalTrafficPolicy: Local
// (ServiceHealth). The response shapes follow kube-proxy's so that load
// balancers and tooling built for kube-proxy work unchanged.
package health

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// ProxyHealth tracks whether syncs keep up with changes. The watch layer calls
// QueuedUpdate when a change arrives; the sync loop calls Updated after each
// successful sync.
type ProxyHealth struct {
	clk     clock.PassiveClock
	timeout time.Duration

	mu           sync.Mutex
	lastUpdated  time.Time // end of the last successful sync; zero if none
	oldestQueued time.Time // first change not yet covered by a sync; zero if none
}

// NewProxyHealth returns a tracker that reports unhealthy once a change has
// waited timeout or longer for a sync (kube-proxy uses 2 × sync-period).
// clk may be nil for the real clock.
func NewProxyHealth(timeout time.Duration, clk clock.PassiveClock) *ProxyHealth {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &ProxyHealth{clk: clk, timeout: timeout}
}

// QueuedUpdate records that a change arrived at t and waits for a sync. Only the
// oldest waiting change matters, so later calls before the next Updated are no-ops.
func (h *ProxyHealth) QueuedUpdate(t time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.oldestQueued.IsZero() {
		h.oldestQueued = t
	}
}

// Updated records that a sync finished successfully at t, covering every
// change queued so far.
func (h *ProxyHealth) Updated(t time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastUpdated = t
	h.oldestQueued = time.Time{}
}

// Status is the body of /healthz and /livez. LastUpdated and CurrentTime keep
// kube-proxy's field names; Healthy and Reason are additions.
type Status struct {
	LastUpdated time.Time `json:"lastUpdated"`
	CurrentTime time.Time `json:"currentTime"`
	Healthy     bool      `json:"healthy"`
	Reason      string    `json:"reason,omitempty"`
}

// check evaluates health now. needSync makes "never synced" unhealthy (the
// /healthz criterion); /livez only cares whether queued work is stuck, because
// restarting a proxy that has not finished its first sync would not help.
func (h *ProxyHealth) check(needSync bool) Status {
	h.mu.Lock()
	last, queued := h.lastUpdated, h.oldestQueued
	h.mu.Unlock()
	now := h.clk.Now()
	st := Status{LastUpdated: last, CurrentTime: now, Healthy: true}
	switch {
	case !queued.IsZero() && now.Sub(queued) >= h.timeout:
		st.Healthy = false
		st.Reason = fmt.Sprintf("a change queued at %s has waited %s for a sync (limit %s)",
			queued.UTC().Format(time.RFC3339), now.Sub(queued).Round(time.Millisecond), h.timeout)
	case needSync && last.IsZero():
		st.Healthy = false
		st.Reason = "no sync has completed yet"
	default:
		// kube-proxy reports lastUpdated as "now" while healthy: older
		// clients read it as "the proxy is recent", and a sync loop with
		// nothing to do would otherwise look stale.
		st.LastUpdated = now
	}
	return st
}

// Healthz returns the /healthz status: healthy once a sync has completed and
// while no change has waited longer than the timeout.
func (h *ProxyHealth) Healthz() Status { return h.check(true) }

// Livez returns the /livez status: unhealthy only when a change has waited
// longer than the timeout.
func (h *ProxyHealth) Livez() Status { return h.check(false) }

// Healthy reports the /healthz criterion, for the service health checks'
// serviceProxyHealthy field.
func (h *ProxyHealth) Healthy() bool { return h.Healthz().Healthy }

// Handler serves /healthz and /livez.
func (h *ProxyHealth) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/healthz", statusHandler(h.Healthz))
	mux.Handle("/livez", statusHandler(h.Livez))
	return mux
}

type statusHandler func() Status

func (f statusHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	st := f()
	code := http.StatusOK
	if !st.Healthy {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, st)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		// Only plain structs are marshalled here; this cannot happen.
		http.Error(w, fmt.Sprintf("encoding health status: %v", err), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = w.Write(append(body, '\n'))
}
