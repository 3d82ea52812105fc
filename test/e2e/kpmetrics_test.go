package e2e

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestKubeProxyMetrics scrapes the real /metrics of a fresh miniproxy
// after a scripted set of changes and checks kube-proxy v1.37's metrics by
// name, labels and value: the health answer counters, the Services left
// without a local endpoint by a Local traffic policy, the pending-change
// gauges once synced, the rule counts of iptables mode (against what
// iptables-save lists in miniproxy's chains) and nftables mode's cleanup
// failure counter.
func TestKubeProxyMetrics(t *testing.T) {
	suite.ForEachMode(t, "kube-proxy v1.37 metrics: healthz/livez counts, no-local-endpoints, pending, iptables rules", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		c := me.Cluster
		row.Note("starting a node of its own")
		node, p := extraNode(t, ctx, me, "kpm")
		scrape := func() map[string]float64 {
			t.Helper()
			m, err := p.Metrics(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
		// waitMetric polls until every sample in want has its value.
		waitMetric := func(step string, want map[string]float64) {
			t.Helper()
			var m map[string]float64
			err := framework.WaitFor(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
				m = scrape()
				for k, v := range want {
					if got, ok := m[k]; !ok || got != v {
						return false, nil
					}
				}
				return true, nil
			})
			if err != nil {
				for k, v := range want {
					t.Errorf("%s: %s = %v (present %t), want %v", step, k, m[k], m[k] != 0 || hasKey(m, k), v)
				}
				t.FailNow()
			}
		}
		noLocal := func(policy string) string {
			return fmt.Sprintf(`kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="%s"}`, policy)
		}

		row.Note("health answers counted by code")
		m0 := scrape()
		for i := 0; i < 3; i++ {
			if code, body := nodeGet(ctx, node, "http://127.0.0.1:10256/healthz"); code != http.StatusOK {
				t.Fatalf("/healthz %d: %s", code, body)
			}
		}
		for i := 0; i < 2; i++ {
			if code, body := nodeGet(ctx, node, "http://127.0.0.1:10256/livez"); code != http.StatusOK {
				t.Fatalf("/livez %d: %s", code, body)
			}
		}
		hz, lz := `kubeproxy_proxy_healthz_total{code="200"}`, `kubeproxy_proxy_livez_total{code="200"}`
		waitMetric("health counters", map[string]float64{hz: m0[hz] + 3, lz: m0[lz] + 2})

		row.Note("Local traffic policies with no endpoint on this node")
		base := scrape()
		ns, err := c.NewNamespace(ctx, "kpm")
		if err != nil {
			t.Fatal(err)
		}
		itp := framework.ClusterIPService(ns, "itp")
		local := corev1.ServiceInternalTrafficPolicyLocal
		itp.Spec.InternalTrafficPolicy = &local
		etp := framework.ClusterIPService(ns, "etp")
		etp.Spec.Type = corev1.ServiceTypeNodePort
		etp.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		for _, svc := range []*corev1.Service{itp, etp} {
			if _, err := c.CreateService(ctx, svc); err != nil {
				t.Fatal(err)
			}
			// Endpoints on the suite's nodes only, never on this one.
			dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: svc.Name, Replicas: 1, Nodes: me.Nodes})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = dep.Delete() })
		}
		ports := float64(len(itp.Spec.Ports)) // each Service port counts
		waitMetric("no local endpoints", map[string]float64{
			noLocal("internal"): base[noLocal("internal")] + ports,
			noLocal("external"): base[noLocal("external")] + ports,
			"kubeproxy_sync_proxy_rules_service_changes_pending":  0,
			"kubeproxy_sync_proxy_rules_endpoint_changes_pending": 0,
		})

		switch me.Mode {
		case "iptables":
			row.Note("iptables rule counts match iptables-save")
			for _, table := range []string{"nat", "filter"} {
				total := fmt.Sprintf(`kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="%s"}`, table)
				last := fmt.Sprintf(`kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="%s"}`, table)
				var got, listed float64
				// A sync may land between the scrape and the listing: retry.
				err := framework.WaitFor(ctx, 30*time.Second, 500*time.Millisecond, func() (bool, error) {
					m := scrape()
					if _, ok := m[last]; !ok {
						return false, fmt.Errorf("no %s", last)
					}
					got = m[total]
					save, err := node.NS.Run(ctx, "iptables-save", "-t", table)
					if err != nil {
						return false, err
					}
					listed = float64(ownedRuleLines(save, table))
					return got == listed && got > 0, nil
				})
				if err != nil {
					t.Errorf("%s = %v, iptables-save lists %v rules in miniproxy's chains: %v", total, got, listed, err)
				}
			}
		case "nftables":
			waitMetric("nftables cleanup failures", map[string]float64{
				`kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family="IPv4"}`: 0,
			})
		}
		row.Note("")
	})
}

func hasKey(m map[string]float64, k string) bool { _, ok := m[k]; return ok }

// ownedRuleLines counts the "-A" lines of iptables-save output that are in
// miniproxy's chains of table.
func ownedRuleLines(save, table string) int {
	n := 0
	for _, line := range strings.Split(save, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "-A" && iptables.OwnedChain(table, f[1]) {
			n++
		}
	}
	return n
}
