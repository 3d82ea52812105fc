package health

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// A node going away fails /healthz (so load balancers drain it) and nothing
// else: /livez and the Service health checks' serviceProxyHealthy stay as
// the proxy is. The answers are counted by path and code.
func TestNodeEligibility(t *testing.T) {
	h := NewProxyHealth(time.Minute, clocktesting.NewFakePassiveClock(now))
	h.Updated(now.Add(-time.Second))
	eligible, reason := true, ""
	h.WatchNode(func() (bool, string) { return eligible, reason })
	counts := map[string]int{}
	h.CountResponses(func(path string, code int) { counts[path+" "+http.StatusText(code)]++ })
	get := func(path string) (int, Status) {
		rec := httptest.NewRecorder()
		h.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		var st Status
		if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
			t.Fatalf("%s: %q: %v", path, rec.Body, err)
		}
		return rec.Code, st
	}

	for _, tc := range []struct {
		eligible bool
		reason   string
	}{
		{true, ""},
		{false, "taint " + ToBeDeletedTaint},
		{false, "being deleted"},
		{true, ""}, // the taint removed again
	} {
		eligible, reason = tc.eligible, tc.reason
		code, st := get("/healthz")
		wantCode := http.StatusOK
		if !tc.eligible {
			wantCode = http.StatusServiceUnavailable
		}
		if code != wantCode || st.Healthy != tc.eligible {
			t.Errorf("eligible=%t: /healthz %d healthy=%t, want %d", tc.eligible, code, st.Healthy, wantCode)
		}
		if st.NodeEligible == nil || *st.NodeEligible != tc.eligible {
			t.Errorf("eligible=%t: nodeEligible %v", tc.eligible, st.NodeEligible)
		}
		if !tc.eligible && !strings.Contains(st.Reason, tc.reason) {
			t.Errorf("reason %q does not name %q", st.Reason, tc.reason)
		}
		if code, st := get("/livez"); code != http.StatusOK || st.NodeEligible != nil {
			t.Errorf("eligible=%t: /livez %d nodeEligible %v, want 200 and no node field", tc.eligible, code, st.NodeEligible)
		}
		if !h.Healthy() {
			t.Errorf("eligible=%t: serviceProxyHealthy false; the node must not count there", tc.eligible)
		}
	}
	want := map[string]int{"/healthz OK": 2, "/healthz Service Unavailable": 2, "/livez OK": 4}
	for k, n := range want {
		if counts[k] != n {
			t.Errorf("served %s: %d, want %d (all: %v)", k, counts[k], n, counts)
		}
	}
}
