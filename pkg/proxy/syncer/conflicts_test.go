package syncer

import (
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"

	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
)

func TestConflictReporter(t *testing.T) {
	m, err := metrics.New(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	rec := events.NewFakeRecorder(10)
	loser := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "young", UID: "u1"}}
	r := &ConflictReporter{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: m, Recorder: rec, Node: "node-a",
		Service: func(k types.NamespacedName) *v1.Service {
			if k.Name == "young" {
				return loser
			}
			return nil
		}}
	c := model.Conflict{
		Frontend:  model.Frontend{Addr: netip.MustParseAddr("198.51.100.1"), Protocol: model.TCP, Port: 80},
		Loser:     model.ServicePortName{Namespace: "ns", Name: "young", Port: "http", Protocol: model.TCP},
		LoserKind: model.LoadBalancerFrontend, Winner: model.ServicePortName{Namespace: "ns", Name: "old", Port: "http", Protocol: model.TCP},
		WinnerKind: model.LoadBalancerFrontend,
	}
	r.Report(model.FrontendChanges{Appeared: []model.Conflict{c}, Current: 1})
	r.Report(model.FrontendChanges{Current: 1}) // later syncs report nothing new
	if got := testutil.ToFloat64(m.FrontendConflictsTotal); got != 1 {
		t.Errorf("conflicts_total = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.FrontendConflicts); got != 1 {
		t.Errorf("conflicts gauge = %v, want 1", got)
	}
	if len(rec.Events) != 1 {
		t.Fatalf("%d events, want 1", len(rec.Events))
	}
	ev := <-rec.Events
	for _, want := range []string{"Warning", ReasonFrontendConflict, "198.51.100.1:80/TCP", "ns/old", "node-a", "older Service wins"} {
		if !strings.Contains(ev, want) {
			t.Errorf("event %q lacks %q", ev, want)
		}
	}
	r.Report(model.FrontendChanges{Resolved: []model.Conflict{c}})
	if got := testutil.ToFloat64(m.FrontendConflicts); got != 0 {
		t.Errorf("conflicts gauge after resolution = %v, want 0", got)
	}
}
