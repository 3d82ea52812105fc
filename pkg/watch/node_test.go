package watch

import (
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestNodeEligibility(t *testing.T) {
	tr := NewTracker(slog.New(slog.NewTextHandler(io.Discard, nil)), "")
	check := func(step string, want bool, reason string) {
		t.Helper()
		ok, why := tr.NodeEligible()
		if ok != want || !strings.Contains(why, reason) {
			t.Errorf("%s: eligible=%t %q, want %t with %q", step, ok, why, want, reason)
		}
	}
	check("no Node seen yet", true, "")
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}
	tr.SetNode(node)
	check("plain Node", true, "")

	tainted := node.DeepCopy()
	tainted.Spec.Taints = []v1.Taint{{Key: "other", Effect: v1.TaintEffectNoSchedule},
		{Key: TaintToBeDeleted, Value: "1700000000", Effect: v1.TaintEffectNoSchedule}}
	tr.SetNode(tainted)
	check("autoscaler taint", false, TaintToBeDeleted)

	tr.SetNode(node)
	check("taint removed", true, "")

	other := node.DeepCopy()
	other.Spec.Taints = []v1.Taint{{Key: "node.kubernetes.io/unschedulable", Effect: v1.TaintEffectNoSchedule}}
	tr.SetNode(other)
	check("cordoned (another taint)", true, "")

	deleting := node.DeepCopy()
	deleting.DeletionTimestamp = &metav1.Time{Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	deleting.Finalizers = []string{"example.com/hold"}
	tr.SetNode(deleting)
	check("deletionTimestamp", false, "being deleted")

	tr.SetNode(node)
	tr.DeleteNode()
	check("Node deleted", false, "deleted")
}
