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

	"github.com/miniproxy/miniproxy/pkg/syncrunner"
)

// DefaultStuckAfter is how long the sync loop may show no sign of life before
// /livez fails: a running sync that reports no progress, or an idle loop that
// has not woken up this long after its next sync was due. It is a stuck
// detector, not a deadline for a sync: a long sync that keeps reporting
// progress (the iptables cold start reports every restore chunk) stays live
// however long it takes in total. Five minutes is well above the longest
// single step measured (one nftables batch of 44k Services: 9 s; one
// iptables-restore chunk: seconds).
const DefaultStuckAfter = 5 * time.Minute

// ProxyHealth answers /healthz and /livez.
//
// /healthz (readiness, and the serviceProxyHealthy of the Service health
// checks) says "this node's rules are current": 200 once a sync has
// completed, while no change has waited timeout or longer for a sync, syncs
// have not been failing for timeout or longer, and /livez is 200.
//
// /livez says "the sync loop is alive, so a restart cannot help": 200 before
// the loop starts (informers listing), while a sync runs and reports
// progress, while the loop waits for its next sync, and while failed syncs
// are retried; 503 only when a running sync has shown no progress for
// stuckAfter, or the idle loop is stuckAfter late for its next sync. Queued
// changes do not count: changes arrive during the initial list, and a cold
// start of tens of thousands of Services takes longer than any fixed
// deadline derived from the sync period. Failed syncs do not count either: a
// restart would run the same full sync against the same kernel and objects,
// and a crash loop would only hide the logged error.
//
// /healthz also fails while this node is going away (WatchNode): its Node
// object is being deleted, was deleted, or carries the cluster autoscaler's
// ToBeDeletedByClusterAutoscaler taint, as kube-proxy's does since v1.28, so
// that load balancers drain the node before it disappears. /livez and the
// serviceProxyHealthy of the Service health checks ignore the node, as
// kube-proxy's do: the proxy itself is fine.
//
// The watch layer calls QueuedUpdate when a change arrives; the sync function
// calls Updated after each successful sync; WatchLoop connects the runner.
type ProxyHealth struct {
	clk        clock.PassiveClock
	timeout    time.Duration
	stuckAfter time.Duration

	mu           sync.Mutex
	lastUpdated  time.Time // end of the last successful sync; zero if none
	oldestQueued time.Time // first change not yet covered by a sync; zero if none
	loop         func() syncrunner.Status
	node         func() (eligible bool, reason string)
	served       func(path string, code int)
}

// ToBeDeletedTaint is the taint the cluster autoscaler puts on a node it is
// about to delete (kube-proxy's healthcheck.ToBeDeletedTaint).
const ToBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

// WatchNode makes /healthz fail while eligible reports false, with its
// reason (normally (*watch.Tracker).NodeEligible).
func (h *ProxyHealth) WatchNode(eligible func() (bool, string)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.node = eligible
}

// CountResponses sets a function called with the path ("/healthz" or
// "/livez") and status code of every answer served, for kube-proxy's
// kubeproxy_proxy_healthz_total and kubeproxy_proxy_livez_total.
func (h *ProxyHealth) CountResponses(served func(path string, code int)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.served = served
}

// NewProxyHealth returns a tracker whose /healthz fails once a change has
// waited timeout or longer for a sync, or syncs have failed for that long
// (kube-proxy uses 2 × sync-period). clk may be nil for the real clock.
func NewProxyHealth(timeout time.Duration, clk clock.PassiveClock) *ProxyHealth {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &ProxyHealth{clk: clk, timeout: timeout, stuckAfter: DefaultStuckAfter}
}

// WatchLoop makes /livez (and so /healthz) judge the sync loop whose status
// status returns, normally (*syncrunner.Runner).Status. stuckAfter <= 0 means
// DefaultStuckAfter. Until WatchLoop is called the loop counts as not started.
func (h *ProxyHealth) WatchLoop(status func() syncrunner.Status, stuckAfter time.Duration) {
	if stuckAfter <= 0 {
		stuckAfter = DefaultStuckAfter
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.loop, h.stuckAfter = status, stuckAfter
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
	// NodeEligible is kube-proxy's field, in /healthz answers only: false
	// while this node is going away (see ProxyHealth).
	NodeEligible *bool  `json:"nodeEligible,omitempty"`
	Healthy      bool   `json:"healthy"`
	Reason       string `json:"reason,omitempty"`
}

// healthzStatus is the /healthz answer: the proxy's readiness, and the
// node's eligibility (see ProxyHealth).
func (h *ProxyHealth) healthzStatus() Status {
	st := h.check(true)
	h.mu.Lock()
	node := h.node
	h.mu.Unlock()
	eligible, reason := true, ""
	if node != nil {
		eligible, reason = node()
	}
	st.NodeEligible = &eligible
	if !eligible && st.Healthy {
		st.Healthy = false
		st.Reason = "node not eligible: " + reason
		// As for any unhealthy answer: the time of the last sync.
		h.mu.Lock()
		st.LastUpdated = h.lastUpdated
		h.mu.Unlock()
	}
	return st
}

// check evaluates the proxy's health now; ready selects the /healthz
// criteria, otherwise only liveness is judged. The node is not judged here.
func (h *ProxyHealth) check(ready bool) Status {
	h.mu.Lock()
	last, queued, loop, stuckAfter := h.lastUpdated, h.oldestQueued, h.loop, h.stuckAfter
	h.mu.Unlock()
	var ls syncrunner.Status
	if loop != nil {
		ls = loop()
	}
	now := h.clk.Now()
	st := Status{LastUpdated: last, CurrentTime: now, Healthy: true}
	fail := func(format string, args ...any) Status {
		st.Healthy = false
		st.Reason = fmt.Sprintf(format, args...)
		return st
	}
	since := func(t time.Time) time.Duration { return now.Sub(t).Round(time.Millisecond) }
	switch {
	case ls.Running && now.Sub(ls.LastProgress) >= stuckAfter:
		return fail("sync loop stuck: a sync started at %s has shown no progress for %s (limit %s)",
			ls.RunningSince.UTC().Format(time.RFC3339), since(ls.LastProgress), stuckAfter)
	case ls.Started && !ls.Running && !ls.NextSync.IsZero() && now.Sub(ls.NextSync) >= stuckAfter:
		return fail("sync loop stuck: the sync due at %s has not started %s later (limit %s)",
			ls.NextSync.UTC().Format(time.RFC3339), since(ls.NextSync), stuckAfter)
	case !ready:
	case !queued.IsZero() && now.Sub(queued) >= h.timeout:
		return fail("a change queued at %s has waited %s for a sync (limit %s)",
			queued.UTC().Format(time.RFC3339), since(queued), h.timeout)
	case !ls.FailingSince.IsZero() && now.Sub(ls.FailingSince) >= h.timeout:
		return fail("syncs have failed for %s (%d in a row, limit %s); last error: %v",
			since(ls.FailingSince), ls.ConsecutiveFailures, h.timeout, ls.LastError)
	case last.IsZero() && ls.Running:
		return fail("no sync has completed yet (the first has run for %s)", since(ls.RunningSince))
	case last.IsZero():
		return fail("no sync has completed yet")
	}
	// kube-proxy reports lastUpdated as "now" while healthy: older clients
	// read it as "the proxy is recent", and a sync loop with nothing to do
	// would otherwise look stale.
	st.LastUpdated = now
	return st
}

// Healthz returns the /healthz status (see ProxyHealth).
func (h *ProxyHealth) Healthz() Status { return h.healthzStatus() }

// Livez returns the /livez status (see ProxyHealth).
func (h *ProxyHealth) Livez() Status { return h.check(false) }

// Healthy reports the /healthz criterion without the node's eligibility, for
// the service health checks' serviceProxyHealthy field (kube-proxy's
// Health().Healthy): a node going away drains through /healthz, while its
// Services' health checks keep reporting the local endpoints.
func (h *ProxyHealth) Healthy() bool { return h.check(true).Healthy }

// Handler serves /healthz and /livez.
func (h *ProxyHealth) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/healthz", statusHandler{h: h, path: "/healthz", status: h.Healthz})
	mux.Handle("/livez", statusHandler{h: h, path: "/livez", status: h.Livez})
	return mux
}

type statusHandler struct {
	h      *ProxyHealth
	path   string
	status func() Status
}

func (s statusHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	st := s.status()
	code := http.StatusOK
	if !st.Healthy {
		code = http.StatusServiceUnavailable
	}
	s.h.mu.Lock()
	served := s.h.served
	s.h.mu.Unlock()
	if served != nil {
		served(s.path, code)
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
