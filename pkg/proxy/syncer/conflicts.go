package syncer

import (
	"context"
	"fmt"
	"log/slog"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/events"

	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// ReasonFrontendConflict is the reason of the Warning Event put on a Service
// that loses a frontend to another (model.Frontends).
const ReasonFrontendConflict = "FrontendConflict"

// NewEventRecorder starts an events.k8s.io/v1 recorder (as kube-proxy's) that
// stops with ctx. The ClusterRole grants events.k8s.io events create and
// patch, which is all this sink uses.
func NewEventRecorder(ctx context.Context, client kubernetes.Interface) events.EventRecorder {
	b := events.NewBroadcaster(&events.EventSinkImpl{Interface: client.EventsV1()})
	b.StartRecordingToSink(ctx.Done())
	context.AfterFunc(ctx, b.Shutdown)
	return b.NewRecorder(scheme.Scheme, "miniproxy")
}

// ConflictReporter reports what the model decided about shared frontends:
// each conflict once, when it begins (log line, counter, Event on the
// losing Service), its end as a log line, and the number in force as a gauge.
// The model only returns the conflicts; reporting them is this layer's job.
type ConflictReporter struct {
	Log     *slog.Logger
	Metrics *metrics.Metrics
	// Recorder receives the Warning Events (nil: none are sent).
	Recorder events.EventRecorder
	// Node is this node's name, for the Event's message.
	Node string
	// Service finds the losing Service object (the Event needs its UID).
	Service func(types.NamespacedName) *v1.Service
}

// Report implements Conflicts.
func (r *ConflictReporter) Report(ch model.FrontendChanges) {
	r.Metrics.FrontendConflicts.Set(float64(ch.Current))
	for _, c := range ch.Appeared {
		r.Metrics.FrontendConflictsTotal.Inc()
		r.Log.Warn("frontend conflict: not programmed for the losing service port",
			"frontend", c.Frontend.String(), "loser", c.Loser.String(), "loserKind", c.LoserKind.String(),
			"winner", c.Winner.String(), "winnerKind", c.WinnerKind.String())
		if r.Recorder == nil {
			continue
		}
		svc := r.Service(types.NamespacedName{Namespace: c.Loser.Namespace, Name: c.Loser.Name})
		if svc == nil {
			continue
		}
		r.Recorder.Eventf(svc, nil, v1.EventTypeWarning, ReasonFrontendConflict, "Proxying", "%s", conflictNote(c, r.Node))
	}
	for _, c := range ch.Resolved {
		r.Log.Info("frontend conflict ended", "frontend", c.Frontend.String(), "loser", c.Loser.String(), "winner", c.Winner.String())
	}
}

// conflictNote is the Event's message (events.k8s.io caps notes at 1 kB;
// this stays far below).
func conflictNote(c model.Conflict, node string) string {
	why := "it is that Service's ClusterIP, which always wins"
	if c.WinnerKind != model.ClusterIPFrontend {
		why = "the older Service wins (ties: namespace, name, port name)"
	}
	port := c.Loser.Port
	if port == "" {
		port = "(unnamed)"
	}
	return fmt.Sprintf("%s %s of port %s is not programmed on node %s: %s/%s claims it as %s; %s. The rest of this Service is programmed.",
		c.LoserKind, c.Frontend, port, node, c.Winner.Namespace, c.Winner.Name, c.WinnerKind, why)
}
