package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestSharedFrontendConflict is issue 15's first defect as a user meets it:
// two LoadBalancer Services with loadBalancerSourceRanges report the same
// ingress IP (the younger first, and the younger sorts first by namespace,
// so neither event order nor name order can produce the right answer by
// luck). The older Service must serve the LB IP, the younger keep its
// NodePort, a Service created afterwards must answer, and the younger must
// carry a Warning Event FrontendConflict. Before the frontend rule, nftables
// mode refused every batch from then on and the later Service never answered.
func TestSharedFrontendConflict(t *testing.T) {
	suite.ForEachMode(t, "two Services sharing an LB IP: older wins, Event on the loser, node keeps syncing", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		x := extClient(t, ctx, c, 0)
		lbIP := extTestIP(me.Mode, netip.MustParseAddr("198.51.100.10"), 5)
		lb := func(svc *corev1.Service) {
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.LoadBalancerSourceRanges = []string{netip.PrefixFrom(x.IP, 32).String()}
		}
		node := me.Nodes[0]

		row.Note("creating the older Service")
		older := newExtSvc(t, ctx, me, "cfz", 1, me.Nodes, lb)
		// creationTimestamp has one-second resolution: make the ages differ.
		for {
			now := metav1.Now().Rfc3339Copy()
			if now.After(older.svc.CreationTimestamp.Time) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		row.Note("creating the younger Service")
		younger := newExtSvc(t, ctx, me, "cfa", 1, me.Nodes, lb)
		if !older.svc.CreationTimestamp.Before(&younger.svc.CreationTimestamp) {
			t.Fatalf("creation timestamps %v, %v: want the first Service older", older.svc.CreationTimestamp, younger.svc.CreationTimestamp)
		}
		for _, s := range []*extSvc{younger, older} {
			if _, err := c.SetLoadBalancerIngress(ctx, s.ns, s.svc.Name, nil, lbIP); err != nil {
				t.Fatal(err)
			}
		}
		extUpstream(t, ctx, c, lbIP, node)
		extRoute(t, ctx, x, lbIP, node)

		row.Note("LB IP served by the older Service")
		addr := extHostPort(lbIP, framework.SvcPort)
		if got, err := extWaitExactly(ctx, x.NS, addr, older.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("shared LB IP %s: want exactly the older Service's pods %v, last %v: %v", addr, older.dep.PodNames(), got, err)
		}

		row.Note("the younger Service keeps its NodePort")
		np := extHostPort(node.IP, younger.nodePort(t, "tcp"))
		if got, err := extWaitExactly(ctx, x.NS, np, younger.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("younger Service's NodePort %s: want %v, last %v: %v", np, younger.dep.PodNames(), got, err)
		}

		row.Note("a Service created afterwards answers")
		later := newExtSvc(t, ctx, me, "cflater", 1, me.Nodes, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeNodePort })
		lnp := extHostPort(node.IP, later.nodePort(t, "tcp"))
		if got, err := extWaitExactly(ctx, x.NS, lnp, later.dep.PodNames(), 60*time.Second); err != nil {
			t.Fatalf("Service created after the conflict, NodePort %s: want %v, last %v: %v", lnp, later.dep.PodNames(), got, err)
		}
		// And the LB IP still belongs to the older one.
		if got, err := extWaitExactly(ctx, x.NS, addr, older.dep.PodNames(), 30*time.Second); err != nil {
			t.Fatalf("shared LB IP %s after more syncs: want %v, last %v: %v", addr, older.dep.PodNames(), got, err)
		}

		row.Note("Warning Event FrontendConflict on the younger Service")
		var notes []string
		err := framework.WaitFor(ctx, 60*time.Second, 500*time.Millisecond, func() (bool, error) {
			notes = nil
			for _, s := range []*extSvc{younger, older} {
				evs, err := c.Admin.EventsV1().Events(s.ns).List(ctx, metav1.ListOptions{})
				if err != nil {
					return false, err
				}
				for _, e := range evs.Items {
					if e.Reason == "FrontendConflict" {
						notes = append(notes, fmt.Sprintf("%s %s/%s (%s): %s", e.Type, e.Regarding.Namespace, e.Regarding.Name, e.Regarding.UID, e.Note))
					}
				}
			}
			return len(notes) > 0, nil
		})
		if err != nil {
			t.Fatalf("no FrontendConflict Event: %v", err)
		}
		for _, n := range notes {
			if !strings.HasPrefix(n, corev1.EventTypeWarning+" "+younger.ns+"/"+younger.svc.Name+" ("+string(younger.svc.UID)+")") {
				t.Errorf("FrontendConflict Event not on the younger Service: %s", n)
			}
			if !strings.Contains(n, lbIP.String()) || !strings.Contains(n, older.ns+"/"+older.svc.Name) {
				t.Errorf("Event note does not name the IP and the winner: %s", n)
			}
		}
		t.Logf("events: %s", strings.Join(notes, "\n"))
		row.Note("")
	})
}
