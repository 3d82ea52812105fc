package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// The kube-proxy v1.37 metrics added for issue 20: names, label sets and
// values after a scripted set of calls, read from a real /metrics scrape.
func TestKubeProxyMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.InitSyncFailures(BackendNFTables, "IPv4", "IPv6")
	svc, eps := 0, 0
	m.WatchPending(func() (int, int) { return svc, eps })
	svc, eps = 2, 5
	m.SetNoLocalEndpoints("IPv4", 3, 1)
	m.HealthServed("/healthz", 200)
	m.HealthServed("/healthz", 200)
	m.HealthServed("/healthz", 503)
	m.HealthServed("/livez", 200)
	m.HealthServed("/other", 200) // not counted
	m.SetIPTablesRules("nat", "IPv4", 120, 7)
	m.SetIPTablesRules("filter", "IPv4", 4, 0)

	body := scrape(t, reg)
	for _, want := range []string{
		"kubeproxy_sync_proxy_rules_service_changes_pending 2",
		"kubeproxy_sync_proxy_rules_endpoint_changes_pending 5",
		`kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="internal"} 3`,
		`kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 1`,
		`kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv6",traffic_policy="internal"} 0`,
		`kubeproxy_proxy_healthz_total{code="200"} 2`,
		`kubeproxy_proxy_healthz_total{code="503"} 1`,
		`kubeproxy_proxy_livez_total{code="200"} 1`,
		`kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 120`,
		`kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"} 7`,
		`kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="filter"} 4`,
		`kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family="IPv6"} 0`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(body, `code="200"} 3`) {
		t.Error("a path other than /healthz and /livez was counted")
	}
	// The pending gauges follow their source at each scrape.
	svc, eps = 0, 0
	body = scrape(t, reg)
	for _, want := range []string{"kubeproxy_sync_proxy_rules_service_changes_pending 0", "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0"} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q after the sync took the changes", want)
		}
	}
}
