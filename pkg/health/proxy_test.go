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

var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func TestProxyHealth(t *testing.T) {
	const timeout = time.Minute
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	type op struct {
		queued  time.Duration // > 0: QueuedUpdate(now - queued)
		updated time.Duration // > 0: Updated(now - updated)
	}
	for _, tc := range []struct {
		name                string
		ops                 []op
		wantHealthz         int
		wantLivez           int
		wantReason          string // substring of the /healthz reason
		wantLastUpdatedNow  bool   // healthy answers report lastUpdated = now
		wantLastUpdatedWhen time.Duration
	}{
		{name: "fresh start", wantHealthz: 503, wantLivez: 200, wantReason: "no sync has completed"},
		{name: "change queued before first sync, not late", ops: []op{{queued: 10 * time.Second}},
			wantHealthz: 503, wantLivez: 200, wantReason: "no sync has completed"},
		// A change waiting is a readiness matter: /livez judges the sync
		// loop (TestLiveness), never the age of a queued change (issue 15,
		// defect 6: the first sync of a large node outlasts any such limit).
		{name: "first sync never happens", ops: []op{{queued: 2 * time.Minute}},
			wantHealthz: 503, wantLivez: 200, wantReason: "has waited 2m0s"},
		{name: "synced, idle for an hour", ops: []op{{updated: time.Hour}},
			wantHealthz: 200, wantLivez: 200, wantLastUpdatedNow: true},
		{name: "synced, change waiting just under the limit", ops: []op{{updated: time.Hour}, {queued: timeout - time.Millisecond}},
			wantHealthz: 200, wantLivez: 200, wantLastUpdatedNow: true},
		{name: "synced, change waiting exactly the limit", ops: []op{{updated: time.Hour}, {queued: timeout}},
			wantHealthz: 503, wantLivez: 200, wantReason: "limit 1m0s", wantLastUpdatedWhen: time.Hour},
		{name: "oldest queued change counts", ops: []op{{updated: time.Hour}, {queued: 70 * time.Second}, {queued: 5 * time.Second}},
			wantHealthz: 503, wantLivez: 200, wantReason: "waited 1m10s", wantLastUpdatedWhen: time.Hour},
		{name: "sync clears the queue", ops: []op{{queued: 70 * time.Second}, {updated: time.Second}},
			wantHealthz: 200, wantLivez: 200, wantLastUpdatedNow: true},
		{name: "queue after sync starts a new wait", ops: []op{{queued: 5 * time.Minute}, {updated: 4 * time.Minute}, {queued: 3 * time.Minute}},
			wantHealthz: 503, wantLivez: 200, wantReason: "waited 3m0s", wantLastUpdatedWhen: 4 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := NewProxyHealth(timeout, clocktesting.NewFakePassiveClock(now))
			for _, o := range tc.ops {
				if o.queued > 0 {
					h.QueuedUpdate(ago(o.queued))
				}
				if o.updated > 0 {
					h.Updated(ago(o.updated))
				}
			}
			for _, ep := range []struct {
				path string
				want int
			}{{"/healthz", tc.wantHealthz}, {"/livez", tc.wantLivez}} {
				rec := httptest.NewRecorder()
				h.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, ep.path, nil))
				if rec.Code != ep.want {
					t.Errorf("%s: status %d, want %d; body %s", ep.path, rec.Code, ep.want, rec.Body)
				}
				if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
					t.Errorf("%s: Content-Type %q", ep.path, ct)
				}
				if v := rec.Header().Get("X-Content-Type-Options"); v != "nosniff" {
					t.Errorf("%s: X-Content-Type-Options %q", ep.path, v)
				}
				var st Status
				if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
					t.Fatalf("%s: body %q: %v", ep.path, rec.Body, err)
				}
				if !st.CurrentTime.Equal(now) {
					t.Errorf("%s: currentTime %v, want %v", ep.path, st.CurrentTime, now)
				}
				if st.Healthy != (ep.want == http.StatusOK) {
					t.Errorf("%s: healthy=%t with status %d", ep.path, st.Healthy, ep.want)
				}
				if st.Healthy && st.Reason != "" {
					t.Errorf("%s: healthy with reason %q", ep.path, st.Reason)
				}
				if ep.path != "/healthz" {
					continue
				}
				if !strings.Contains(st.Reason, tc.wantReason) {
					t.Errorf("reason %q lacks %q", st.Reason, tc.wantReason)
				}
				switch {
				case tc.wantLastUpdatedNow && !st.LastUpdated.Equal(now):
					t.Errorf("lastUpdated %v, want now", st.LastUpdated)
				case tc.wantLastUpdatedWhen > 0 && !st.LastUpdated.Equal(ago(tc.wantLastUpdatedWhen)):
					t.Errorf("lastUpdated %v, want %v", st.LastUpdated, ago(tc.wantLastUpdatedWhen))
				}
			}
			if got, want := h.Healthy(), tc.wantHealthz == 200; got != want {
				t.Errorf("Healthy() = %t, want %t", got, want)
			}
		})
	}
}

func TestProxyHealthFollowsClock(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(now)
	h := NewProxyHealth(time.Minute, clk)
	h.Updated(now)
	h.QueuedUpdate(now)
	if !h.Healthz().Healthy {
		t.Fatal("unhealthy right after queueing")
	}
	clk.SetTime(now.Add(time.Minute))
	if st := h.Healthz(); st.Healthy {
		t.Fatalf("healthy with a change waiting a full timeout: %+v", st)
	}
	h.Updated(clk.Now())
	if st := h.Healthz(); !st.Healthy {
		t.Fatalf("unhealthy after the sync: %+v", st)
	}
}
