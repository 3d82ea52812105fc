package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestNodeGoingAway: when this node's Node object gets the cluster
// autoscaler's ToBeDeletedByClusterAutoscaler taint, or a deletionTimestamp,
// /healthz answers 503 with nodeEligible false (so load balancers drain the
// node, as with kube-proxy v1.37), /livez stays 200; removing the taint
// brings /healthz back to 200. Changed through the apiserver on a node of
// its own, so no other test sees the taint.
func TestNodeGoingAway(t *testing.T) {
	suite.ForEachMode(t, "node going away (autoscaler taint, deletionTimestamp): /healthz 503, /livez 200", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := me.Cluster
		row.Note("starting a node of its own")
		node, _ := extraNode(t, ctx, me, "gone")
		nodes := c.Admin.CoreV1().Nodes()

		type health struct {
			code         int
			nodeEligible *bool
			body         string
		}
		get := func(path string) health {
			code, body := nodeGet(ctx, node, "http://127.0.0.1:10256"+path)
			var st struct {
				NodeEligible *bool `json:"nodeEligible"`
			}
			_ = json.Unmarshal([]byte(body), &st)
			return health{code, st.NodeEligible, body}
		}
		// wait polls until /healthz answers code with nodeEligible eligible;
		// /livez must answer 200 at every poll.
		wait := func(step string, code int, eligible bool, reason string) {
			t.Helper()
			var last health
			err := framework.WaitFor(ctx, 30*time.Second, 200*time.Millisecond, func() (bool, error) {
				if lv := get("/livez"); lv.code != http.StatusOK {
					return false, fmt.Errorf("/livez answered %d: %s", lv.code, lv.body)
				}
				last = get("/healthz")
				return last.code == code && last.nodeEligible != nil && *last.nodeEligible == eligible &&
					strings.Contains(last.body, reason), nil
			})
			if err != nil {
				t.Fatalf("%s: want /healthz %d with nodeEligible %t, last %d %s: %v", step, code, eligible, last.code, last.body, err)
			}
			t.Logf("%s: /healthz %d %s", step, last.code, last.body)
		}
		update := func(what string, change func(n *corev1.Node)) {
			t.Helper()
			n, err := nodes.Get(ctx, node.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			change(n)
			if _, err := nodes.Update(ctx, n, metav1.UpdateOptions{}); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		const taint = "ToBeDeletedByClusterAutoscaler"
		wait("before", http.StatusOK, true, "")

		row.Note("autoscaler taint added")
		update("add taint", func(n *corev1.Node) {
			n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: taint, Value: fmt.Sprint(time.Now().Unix()), Effect: corev1.TaintEffectNoSchedule})
		})
		wait("tainted", http.StatusServiceUnavailable, false, taint)

		row.Note("taint removed")
		update("remove taint", func(n *corev1.Node) {
			n.Spec.Taints = slices.DeleteFunc(n.Spec.Taints, func(x corev1.Taint) bool { return x.Key == taint })
		})
		wait("untainted", http.StatusOK, true, "")

		row.Note("Node deleted (held by a finalizer: deletionTimestamp set)")
		const fin = "e2e.miniproxy.io/hold"
		update("add finalizer", func(n *corev1.Node) { n.Finalizers = append(n.Finalizers, fin) })
		if err := nodes.Delete(ctx, node.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer ccancel()
			if n, err := nodes.Get(cctx, node.Name, metav1.GetOptions{}); err == nil {
				n.Finalizers = slices.DeleteFunc(n.Finalizers, func(f string) bool { return f == fin })
				_, _ = nodes.Update(cctx, n, metav1.UpdateOptions{})
			}
		})
		wait("deletionTimestamp", http.StatusServiceUnavailable, false, "being deleted")

		row.Note("finalizer released: Node gone")
		update("remove finalizer", func(n *corev1.Node) {
			n.Finalizers = slices.DeleteFunc(n.Finalizers, func(f string) bool { return f == fin })
		})
		wait("deleted", http.StatusServiceUnavailable, false, "was deleted")
		row.Note("")
	})
}
