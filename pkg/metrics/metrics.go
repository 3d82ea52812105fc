// Package metrics declares every Prometheus metric miniproxy exports, in one
// place. Names and meanings follow kube-proxy's (subsystem "kubeproxy") where
// miniproxy measures the same thing, so existing dashboards and alerts keep
// working; metrics kube-proxy has no equivalent for use the "miniproxy" prefix.
//
// Nothing is registered globally: New registers on the caller's Registerer, so
// tests and several proxies in one process never collide.
package metrics

import (
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const kubeProxySubsystem = "kubeproxy"

// Sync modes, the values of the "mode" label.
const (
	ModeFull    = "full"
	ModePartial = "partial"
)

// syncBuckets span 1ms to about 16s (1ms doubling 15 times), as kube-proxy's
// sync histograms do: a small sync takes milliseconds, a huge one seconds.
var syncBuckets = prometheus.ExponentialBuckets(0.001, 2, 15)

// networkProgrammingBuckets cover 1ms up to 5 minutes. Network programming
// latency includes controller and watch delays as well as the sync, so it needs
// fine buckets at the low end and coarse ones out to minutes.
var networkProgrammingBuckets = func() []float64 {
	b := []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5}
	for s := 1.0; s < 60; s++ { // 1s steps up to a minute
		b = append(b, s)
	}
	for s := 60.0; s < 120; s += 5 {
		b = append(b, s)
	}
	for s := 120.0; s <= 300; s += 30 {
		b = append(b, s)
	}
	return b
}()

// Metrics holds every metric. Fields may be used directly; the methods below
// cover the common combinations.
type Metrics struct {
	// SyncDuration is the time of every sync (kube-proxy: SyncProxyRules latency).
	SyncDuration prometheus.Histogram
	// SyncFullDuration and SyncPartialDuration split SyncDuration by kind.
	SyncFullDuration    prometheus.Histogram
	SyncPartialDuration prometheus.Histogram
	// LastSyncTimestamp is the Unix time of the last successful sync.
	LastSyncTimestamp prometheus.Gauge
	// LastQueuedTimestamp is the Unix time a sync was last requested.
	LastQueuedTimestamp prometheus.Gauge
	// NetworkProgrammingDuration is the time from an endpoint change in the
	// cluster (the EndpointSlice's last-change-trigger-time) until the rules
	// for it were programmed.
	NetworkProgrammingDuration prometheus.Histogram
	// ServiceChanges and EndpointChanges count Service and EndpointSlice
	// changes received from the apiserver.
	ServiceChanges  prometheus.Counter
	EndpointChanges prometheus.Counter
	// SyncFailures counts failed syncs by mode ("full" or "partial").
	SyncFailures *prometheus.CounterVec
	// ServicePorts is the number of service ports in the last synced snapshot.
	ServicePorts prometheus.Gauge

	// Conntrack reconciler (pkg/conntrack), kube-proxy v1.37's names,
	// labels and buckets (pkg/proxy/metrics): one observation per IP family
	// and pass, the deleted-entries counter added to by the same pass.
	ConntrackReconcileDuration *prometheus.HistogramVec
	ConntrackDeletedEntries    *prometheus.CounterVec

	// FrontendConflicts is the number of frontends (address, protocol, port)
	// a service port claims but does not get because another one owns it
	// (model.Frontends); FrontendConflictsTotal counts each such conflict
	// once, when it begins. Alert on the gauge; the counter shows churn.
	FrontendConflicts      prometheus.Gauge
	FrontendConflictsTotal prometheus.Counter
	// Failed syncs by backend, under kube-proxy v1.37's names and ip_family
	// label (values "IPv4", "IPv6"); see SyncFailed.
	//
	// IPTablesRestoreFailures counts failed iptables-mode syncs.
	IPTablesRestoreFailures *prometheus.CounterVec
	// NFTablesSyncFailures counts failed nftables-mode syncs.
	NFTablesSyncFailures *prometheus.CounterVec
	// IPVSSyncFailures counts failed IPVS-mode syncs. kube-proxy's IPVS mode
	// has no such counter (it counts only its iptables-restore failures,
	// and miniproxy's IPVS mode runs no iptables-restore), hence the
	// miniproxy prefix.
	IPVSSyncFailures *prometheus.CounterVec

	// IgnoredObjects counts odd or malformed parts of Services and
	// EndpointSlices left out or worked around, by reason (pkg/watch's
	// Reason constants); each is counted once when it appears.
	IgnoredObjects *prometheus.CounterVec
	// DriftRepairs counts full syncs that found miniproxy's rules changed
	// by someone else and repaired them, by proxy mode.
	DriftRepairs *prometheus.CounterVec

	// kube-proxy v1.37's names and labels (pkg/proxy/metrics), below.
	//
	// ServiceChangesPending and EndpointChangesPending are the Service and
	// EndpointSlice changes received and not yet taken by a sync, read
	// from WatchPending's source at each scrape.
	ServiceChangesPending  prometheus.GaugeFunc
	EndpointChangesPending prometheus.GaugeFunc
	// NoLocalEndpoints is, per traffic_policy ("internal", "external") and
	// ip_family, the service ports with that traffic policy Local, endpoints
	// somewhere in the cluster and none on this node, as of the last sync.
	NoLocalEndpoints *prometheus.GaugeVec
	// ProxyHealthz and ProxyLivez count the answers of /healthz and /livez
	// by HTTP status code.
	ProxyHealthz *prometheus.CounterVec
	ProxyLivez   *prometheus.CounterVec
	// IPTablesRulesTotal and IPTablesRulesLast are, per table and
	// ip_family, the rules in miniproxy's chains and the rules the last
	// sync wrote (iptables mode).
	IPTablesRulesTotal *prometheus.GaugeVec
	IPTablesRulesLast  *prometheus.GaugeVec
	// NFTablesCleanupFailures is kube-proxy's count of failed deletions of
	// stale chains, which it runs as a separate transaction before a sync.
	// miniproxy deletes stale objects in the sync's own batch, so such a
	// failure is a failed sync (NFTablesSyncFailures) and this stays 0; it
	// is exported (nftables mode) so kube-proxy's dashboards find it.
	NFTablesCleanupFailures *prometheus.CounterVec

	pending atomic.Pointer[func() (services, endpoints int)]
}

// Traffic policies, the values of NoLocalEndpoints' traffic_policy label.
const (
	TrafficPolicyInternal = "internal"
	TrafficPolicyExternal = "external"
)

// WatchPending sets where the pending-changes gauges are read from at each
// scrape: the number of Service and EndpointSlice changes received and not
// yet taken by a sync (normally (*watch.Tracker).PendingChanges).
func (m *Metrics) WatchPending(f func() (services, endpoints int)) { m.pending.Store(&f) }

func (m *Metrics) pendingChanges(endpoints bool) float64 {
	f := m.pending.Load()
	if f == nil {
		return 0
	}
	s, e := (*f)()
	if endpoints {
		return float64(e)
	}
	return float64(s)
}

// SetNoLocalEndpoints sets NoLocalEndpoints for family from one sync's
// counts (every family the proxy programs should be set each sync, zeros
// included, as kube-proxy does).
func (m *Metrics) SetNoLocalEndpoints(family string, internal, external int) {
	m.NoLocalEndpoints.WithLabelValues(TrafficPolicyInternal, family).Set(float64(internal))
	m.NoLocalEndpoints.WithLabelValues(TrafficPolicyExternal, family).Set(float64(external))
}

// HealthServed counts one answer of the proxy's health server: path is
// "/healthz" or "/livez", code the HTTP status.
func (m *Metrics) HealthServed(path string, code int) {
	switch path {
	case "/healthz":
		m.ProxyHealthz.WithLabelValues(strconv.Itoa(code)).Inc()
	case "/livez":
		m.ProxyLivez.WithLabelValues(strconv.Itoa(code)).Inc()
	}
}

// SetIPTablesRules records the rules of one table of one family after a
// sync (iptables mode): total in miniproxy's chains, last written.
func (m *Metrics) SetIPTablesRules(table, family string, total, last int) {
	m.IPTablesRulesTotal.WithLabelValues(table, family).Set(float64(total))
	m.IPTablesRulesLast.WithLabelValues(table, family).Set(float64(last))
}

// Backend modes, for SyncFailed.
const (
	BackendIPTables = "iptables"
	BackendNFTables = "nftables"
	BackendIPVS     = "ipvs"
)

// SyncFailed counts one failed sync of backend for each IP family in
// families ("IPv4", "IPv6"): the families whose rules that sync could not
// program. An unknown backend counts nowhere (SyncDone still counts it).
func (m *Metrics) SyncFailed(backend string, families ...string) {
	v := m.failureVec(backend)
	if v == nil {
		return
	}
	for _, f := range families {
		v.WithLabelValues(f).Inc()
	}
}

// InitSyncFailures exports backend's failure counter at zero for families,
// so a failure rate can be computed (and alerted on) before the first failure.
func (m *Metrics) InitSyncFailures(backend string, families ...string) {
	if v := m.failureVec(backend); v != nil {
		for _, f := range families {
			v.WithLabelValues(f)
		}
	}
	for _, f := range families {
		m.SetNoLocalEndpoints(f, 0, 0)
		if backend == BackendNFTables {
			m.NFTablesCleanupFailures.WithLabelValues(f)
		}
	}
}

func (m *Metrics) failureVec(backend string) *prometheus.CounterVec {
	switch backend {
	case BackendIPTables:
		return m.IPTablesRestoreFailures
	case BackendNFTables:
		return m.NFTablesSyncFailures
	case BackendIPVS:
		return m.IPVSSyncFailures
	}
	return nil
}

// New creates the metrics and registers them on reg.
func New(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_duration_seconds",
			Help:      "SyncProxyRules latency in seconds",
			Buckets:   syncBuckets,
		}),
		SyncFullDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_full_proxy_rules_duration_seconds",
			Help:      "SyncProxyRules latency in seconds for full resyncs",
			Buckets:   syncBuckets,
		}),
		SyncPartialDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_partial_proxy_rules_duration_seconds",
			Help:      "SyncProxyRules latency in seconds for partial resyncs",
			Buckets:   syncBuckets,
		}),
		LastSyncTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_last_timestamp_seconds",
			Help:      "The last time proxy rules were successfully synced",
		}),
		LastQueuedTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_last_queued_timestamp_seconds",
			Help:      "The last time a sync of proxy rules was queued",
		}),
		NetworkProgrammingDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "network_programming_duration_seconds",
			Help:      "In Cluster Network Programming Latency in seconds",
			Buckets:   networkProgrammingBuckets,
		}),
		ServiceChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_service_changes_total",
			Help:      "Cumulative proxy rules Service changes",
		}),
		EndpointChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_endpoint_changes_total",
			Help:      "Cumulative proxy rules Endpoint changes",
		}),
		SyncFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "miniproxy",
			Name:      "sync_failures_total",
			Help:      "Cumulative failed proxy rules syncs, by mode (full or partial)",
		}, []string{"mode"}),
		ServicePorts: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "miniproxy",
			Name:      "service_ports",
			Help:      "Number of service ports in the last successfully synced snapshot",
		}),
		FrontendConflicts: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "miniproxy",
			Name:      "service_frontend_conflicts",
			Help:      "Frontends (IP, protocol, port) claimed by a service port that another one owns; the loser's claim is not programmed",
		}),
		FrontendConflictsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "miniproxy",
			Name:      "service_frontend_conflicts_total",
			Help:      "Cumulative frontend conflicts, each counted once when it begins",
		}),
		IPTablesRestoreFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_iptables_restore_failures_total",
			Help:      "Cumulative proxy iptables restore failures",
		}, []string{"ip_family"}),
		NFTablesSyncFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Subsystem: kubeProxySubsystem,
			Name:      "sync_proxy_rules_nftables_sync_failures_total",
			Help:      "Cumulative proxy nftables sync failures",
		}, []string{"ip_family"}),
		IPVSSyncFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "miniproxy",
			Name:      "ipvs_sync_failures_total",
			Help:      "Cumulative IPVS-mode sync failures",
		}, []string{"ip_family"}),
		IgnoredObjects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "miniproxy",
			Name:      "ignored_objects_total",
			Help:      "Odd or malformed parts of Services and EndpointSlices left out or worked around, by reason; each counted once when it appears",
		}, []string{"reason"}),
		DriftRepairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "miniproxy",
			Name:      "sync_drift_repairs_total",
			Help:      "Cumulative full syncs that repaired proxy rules changed by someone else, by proxy mode",
		}, []string{"mode"}),
	}
	for _, c := range []prometheus.Collector{
		m.SyncDuration, m.SyncFullDuration, m.SyncPartialDuration,
		m.LastSyncTimestamp, m.LastQueuedTimestamp, m.NetworkProgrammingDuration,
		m.ServiceChanges, m.EndpointChanges,
		m.SyncFailures, m.ServicePorts,
		m.FrontendConflicts, m.FrontendConflictsTotal,
		m.IPTablesRestoreFailures, m.NFTablesSyncFailures, m.IPVSSyncFailures, m.IgnoredObjects, m.DriftRepairs,
	} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering metrics: %w", err)
		}
	}
	// Conntrack reconciler metrics, registered here so the block stays whole.
	m.ConntrackReconcileDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "conntrack_reconciler_sync_duration_seconds",
		Help:      "ReconcileConntrackFlowsLatency latency in seconds",
		Buckets:   syncBuckets,
	}, []string{"ip_family"})
	m.ConntrackDeletedEntries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "conntrack_reconciler_deleted_entries_total",
		Help:      "Cumulative conntrack flows deleted by conntrack reconciler",
	}, []string{"ip_family"})
	for _, c := range []prometheus.Collector{m.ConntrackReconcileDuration, m.ConntrackDeletedEntries} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering conntrack metrics: %w", err)
		}
	}
	// kube-proxy v1.37's pending-changes, no-local-endpoints, health and
	// iptables rule metrics, same names, help and labels.
	m.ServiceChangesPending = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_service_changes_pending",
		Help:      "Pending proxy rules Service changes",
	}, func() float64 { return m.pendingChanges(false) })
	m.EndpointChangesPending = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_endpoint_changes_pending",
		Help:      "Pending proxy rules Endpoint changes",
	}, func() float64 { return m.pendingChanges(true) })
	m.NoLocalEndpoints = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_no_local_endpoints_total",
		Help:      "Number of services with a Local traffic policy and no endpoints",
	}, []string{"traffic_policy", "ip_family"})
	m.ProxyHealthz = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "proxy_healthz_total",
		Help:      "Cumulative proxy healthz HTTP status",
	}, []string{"code"})
	m.ProxyLivez = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "proxy_livez_total",
		Help:      "Cumulative proxy livez HTTP status",
	}, []string{"code"})
	m.IPTablesRulesTotal = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_iptables_total",
		Help:      "Total number of iptables rules owned by kube-proxy",
	}, []string{"table", "ip_family"})
	m.IPTablesRulesLast = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_iptables_last",
		Help:      "Number of iptables rules written by kube-proxy in last sync",
	}, []string{"table", "ip_family"})
	m.NFTablesCleanupFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: kubeProxySubsystem,
		Name:      "sync_proxy_rules_nftables_cleanup_failures_total",
		Help:      "Cumulative proxy nftables cleanup failures",
	}, []string{"ip_family"})
	for _, c := range []prometheus.Collector{m.ServiceChangesPending, m.EndpointChangesPending, m.NoLocalEndpoints,
		m.ProxyHealthz, m.ProxyLivez, m.IPTablesRulesTotal, m.IPTablesRulesLast, m.NFTablesCleanupFailures} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering kube-proxy metrics: %w", err)
		}
	}
	// Export both label values from the start so a failure rate can be
	// computed (and alerted on) before the first failure happens.
	m.SyncFailures.WithLabelValues(ModeFull)
	m.SyncFailures.WithLabelValues(ModePartial)
	return m, nil
}

// SyncDone records a finished sync that started at start and took took.
// A successful sync moves the last-sync timestamp; a failed one counts as a
// failure of its mode. Durations are recorded either way, as kube-proxy does.
func (m *Metrics) SyncDone(full bool, start time.Time, took time.Duration, err error) {
	secs := took.Seconds()
	m.SyncDuration.Observe(secs)
	mode := ModePartial
	if full {
		mode = ModeFull
		m.SyncFullDuration.Observe(secs)
	} else {
		m.SyncPartialDuration.Observe(secs)
	}
	if err != nil {
		m.SyncFailures.WithLabelValues(mode).Inc()
		return
	}
	m.LastSyncTimestamp.Set(unixSeconds(start.Add(took)))
}

// ConntrackReconciled records one conntrack reconcile pass of family
// ("IPv4" or "IPv6", kube-proxy's ip_family values).
func (m *Metrics) ConntrackReconciled(family string, took time.Duration, deleted int) {
	m.ConntrackReconcileDuration.WithLabelValues(family).Observe(took.Seconds())
	m.ConntrackDeletedEntries.WithLabelValues(family).Add(float64(deleted))
}

// Queued records that a change is waiting for a sync.
func (m *Metrics) Queued(t time.Time) { m.LastQueuedTimestamp.Set(unixSeconds(t)) }

// NetworkProgrammed records the latency from a change's trigger time (the
// EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time) to now,
// when the rules for it became active. Zero or future trigger times are
// ignored: they come from missing annotations or skewed clocks.
func (m *Metrics) NetworkProgrammed(trigger, now time.Time) {
	if trigger.IsZero() || now.Before(trigger) {
		return
	}
	m.NetworkProgrammingDuration.Observe(now.Sub(trigger).Seconds())
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// Handler serves the metrics gathered by g (normally the *prometheus.Registry
// given to New) in the Prometheus exposition format, for /metrics.
func Handler(g prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{})
}
