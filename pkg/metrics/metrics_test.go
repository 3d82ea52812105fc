package metrics

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	srv := httptest.NewServer(Handler(reg))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading /metrics: %v", err)
	}
	return string(body)
}

func TestScrape(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	start := time.Unix(1_700_000_000, 0)
	m.SyncDone(true, start, 250*time.Millisecond, nil)
	m.SyncDone(false, start.Add(1500*time.Millisecond), 500*time.Millisecond, nil)
	m.SyncDone(false, start.Add(2*time.Second), 3*time.Millisecond, errors.New("restore failed"))
	m.Queued(start.Add(3 * time.Second))
	m.NetworkProgrammed(start, start.Add(1500*time.Millisecond))
	m.NetworkProgrammed(time.Time{}, start)          // no annotation: ignored
	m.NetworkProgrammed(start.Add(time.Hour), start) // clock skew: ignored
	m.ServiceChanges.Add(3)
	m.EndpointChanges.Inc()
	m.InitSyncFailures(BackendIPTables, "IPv4", "IPv6")
	m.SyncFailed(BackendIPTables, "IPv6")
	m.SyncFailed(BackendIPTables, "IPv6")
	m.SyncFailed(BackendNFTables, "IPv4")
	m.SyncFailed(BackendIPVS, "IPv4", "IPv6")
	m.SyncFailed("userspace", "IPv4") // unknown backend: counted nowhere
	m.ServicePorts.Set(42)
	m.DriftRepairs.WithLabelValues("nftables").Inc()

	body := scrape(t, reg)
	for _, want := range []string{
		"# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds",
		"# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
		"kubeproxy_sync_proxy_rules_duration_seconds_count 3",
		"kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
		"kubeproxy_sync_full_proxy_rules_duration_seconds_sum 0.25",
		"kubeproxy_sync_partial_proxy_rules_duration_seconds_count 2",
		// The failed sync must not move the timestamp: last success ended at +2s.
		"kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.700000002e+09",
		"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 1.700000003e+09",
		"# TYPE kubeproxy_network_programming_duration_seconds histogram",
		"kubeproxy_network_programming_duration_seconds_count 1",
		"kubeproxy_network_programming_duration_seconds_sum 1.5",
		`kubeproxy_network_programming_duration_seconds_bucket{le="0.001"} 0`,
		`kubeproxy_network_programming_duration_seconds_bucket{le="2"} 1`,
		`kubeproxy_network_programming_duration_seconds_bucket{le="300"} 1`,
		"kubeproxy_sync_proxy_rules_service_changes_total 3",
		"kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
		`kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 0`,
		`kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv6"} 2`,
		`kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 1`,
		`miniproxy_ipvs_sync_failures_total{ip_family="IPv4"} 1`,
		`miniproxy_ipvs_sync_failures_total{ip_family="IPv6"} 1`,
		`miniproxy_sync_failures_total{mode="full"} 0`,
		`miniproxy_sync_failures_total{mode="partial"} 1`,
		"miniproxy_service_ports 42",
		`miniproxy_sync_drift_repairs_total{mode="nftables"} 1`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}
}

func TestNoGlobalRegistration(t *testing.T) {
	// Two proxies with their own registries must not collide...
	if _, err := New(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if _, err := New(reg); err != nil {
		t.Fatal(err)
	}
	// ...while registering twice on one registry is reported, not a panic.
	if _, err := New(reg); err == nil {
		t.Fatal("second New on the same registry succeeded")
	}
}

func TestNetworkProgrammingBuckets(t *testing.T) {
	b := networkProgrammingBuckets
	if b[0] != 0.001 || b[len(b)-1] != 300 {
		t.Fatalf("buckets span %v..%v, want 0.001..300", b[0], b[len(b)-1])
	}
	for i := 1; i < len(b); i++ {
		if b[i] <= b[i-1] {
			t.Fatalf("buckets not increasing at %d: %v", i, b[i-1:i+1])
		}
	}
}

// TestConntrackReconciled checks kube-proxy v1.37's conntrack reconciler
// names and ip_family label.
func TestConntrackReconciled(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ConntrackReconciled("IPv4", 3*time.Millisecond, 2)
	m.ConntrackReconciled("IPv4", time.Millisecond, 1)
	body := scrape(t, reg)
	for _, want := range []string{
		`kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 3`,
		`kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv4"} 2`,
		`kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 2`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("missing %q in:\n%s", want, body)
		}
	}
}
