// Command miniproxy is a node agent that replaces kube-proxy: it watches
// Services and EndpointSlices and programs them into the kernel through an
// iptables, nftables or IPVS backend.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/clock"

	"github.com/miniproxy/miniproxy/pkg/health"
	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/ipvs"
	"github.com/miniproxy/miniproxy/pkg/metrics"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/syncer"
	"github.com/miniproxy/miniproxy/pkg/syncrunner"
	"github.com/miniproxy/miniproxy/pkg/watch"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) > 0 && args[0] == "trace" {
		return runTrace(args[1:], os.Stdout, os.Stderr)
	}
	o, err := parseOptions(args)
	if errors.Is(err, pflag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "miniproxy: %v\n", err)
		return 1
	}
	if o.Version {
		fmt.Println(versionString())
		return 0
	}
	level := slog.LevelInfo
	if o.Verbosity >= 4 {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	o.warnIgnoredConfig(log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if o.Cleanup {
		return cleanup(ctx, log, o)
	}
	backend, err := newBackend(log, o)
	if err != nil {
		log.Error("cannot start the proxy backend", "mode", o.Mode, "err", err)
		return 1
	}
	defer func() {
		if err := backend.Close(); err != nil {
			log.Warn("closing the backend", "err", err)
		}
	}()
	if err := serve(ctx, log, o, backend); err != nil {
		log.Error("miniproxy stopped", "err", err)
		return 1
	}
	return 0
}

func newBackend(log *slog.Logger, o *Options) (proxy.Backend, error) {
	switch o.Mode {
	case "iptables":
		return iptables.New(log.With("backend", "iptables"), o.proxyConfig, nil)
	case "nftables":
		return nftables.New(o.proxyConfig, nftables.WithShards(o.NFTablesShards))
	case "ipvs":
		return ipvs.New(o.proxyConfig, ipvs.Options{Scheduler: o.IPVSScheduler, StrictARP: o.IPVSStrictARP})
	}
	return nil, fmt.Errorf("unknown mode %q", o.Mode)
}

// cleanup removes what every mode may have left, like kube-proxy --cleanup.
// A mode whose kernel support or tools are missing has nothing to clean.
func cleanup(ctx context.Context, log *slog.Logger, o *Options) int {
	code := 0
	for _, mode := range modes {
		oo := *o
		oo.Mode = mode
		b, err := newBackend(log, &oo)
		if err != nil {
			log.Info("nothing to clean for mode", "mode", mode, "reason", err)
			continue
		}
		err = b.Cleanup(ctx)
		_ = b.Close()
		if err != nil {
			log.Error("cleanup failed", "mode", mode, "err", err)
			code = 1
			continue
		}
		log.Info("cleaned up", "mode", mode)
	}
	return code
}

func kubeClient(o *Options) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if o.Kubeconfig == "" && o.Master == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags(o.Master, o.Kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	cfg.UserAgent = "miniproxy"
	// Watches dominate; these only bound the initial lists and retries.
	cfg.QPS, cfg.Burst = 50, 100
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	return kubernetes.NewForConfig(cfg)
}

func serve(ctx context.Context, log *slog.Logger, o *Options, backend proxy.Backend) error {
	client, err := kubeClient(o)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m, err := metrics.New(reg)
	if err != nil {
		return err
	}
	proxyHealth := health.NewProxyHealth(2*o.SyncPeriod, nil)
	svcHealth := health.NewServiceHealth(health.ServiceHealthOptions{
		// Health check ports listen on every address, as kube-proxy does by
		// default; --nodeport-addresses CIDRs are not listenable addresses.
		ProxyHealthy: proxyHealth.Healthy,
		Logger:       log.With("component", "service-health"),
	})
	defer svcHealth.Close()

	servers := []*http.Server{}
	if o.HealthzBindAddress != "" {
		servers = append(servers, &http.Server{Addr: o.HealthzBindAddress, Handler: proxyHealth.Handler(), ReadHeaderTimeout: 5 * time.Second})
	}
	if o.MetricsBindAddress != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler(reg))
		mux.Handle("/healthz", proxyHealth.Handler())
		if o.Profiling {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		servers = append(servers, &http.Server{Addr: o.MetricsBindAddress, Handler: mux, ReadHeaderTimeout: 5 * time.Second})
	}
	for _, s := range servers {
		ln, err := net.Listen("tcp", s.Addr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", s.Addr, err)
		}
		go func() {
			if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server failed", "addr", s.Addr, "err", err)
			}
		}()
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		for _, s := range servers {
			_ = s.Shutdown(sctx)
		}
	}()

	tracker := watch.NewTracker(log.With("component", "watch"), "")
	tracker.CountIgnored(func(reason string) { m.IgnoredObjects.WithLabelValues(reason).Inc() })
	// kube-proxy's node eligibility, health answer counts and pending changes.
	proxyHealth.WatchNode(tracker.NodeEligible)
	proxyHealth.CountResponses(m.HealthServed)
	m.WatchPending(tracker.PendingChanges)
	sc := syncer.Config{Mode: o.Mode, Families: o.proxyConfig.Families, Backend: backend, Source: tracker,
		Metrics: m, ProxyHealth: proxyHealth, ServiceHealth: svcHealth, Log: log,
		Conflicts: &syncer.ConflictReporter{Log: log.With("component", "frontends"), Metrics: m,
			Recorder: syncer.NewEventRecorder(ctx, client), Node: o.nodeName, Service: tracker.Service},
		// After the first successful sync: remove kube-proxy's leftovers and
		// this node's other miniproxy modes' objects (takeover.go).
		TakeOver: func(ctx context.Context) error { return takeOver(ctx, log, o) }}
	if ct := newConntrackReconciler(log, o, m); ct != nil {
		defer ct.Close()
		sc.Conntrack = ct
	}
	syncFn := syncer.New(sc).Sync
	// Burst 2 as kube-proxy: a Service and its EndpointSlice arrive as two
	// events; both are programmed without waiting out min-sync-period.
	runner := syncrunner.New(syncrunner.Config{MinInterval: o.MinSyncPeriod, MaxInterval: o.SyncPeriod, Burst: 2,
		Logger: log.With("component", "sync", "mode", o.Mode)}, clock.RealClock{}, syncFn)
	// /livez judges whether the loop is alive; a long iptables cold start
	// shows it is by reporting every restore chunk.
	proxyHealth.WatchLoop(runner.Status, 0)
	if ib, ok := backend.(*iptables.Backend); ok {
		ib.OnRestore = func(model.Family, string) { runner.Progress() }
	}

	onChange := func() {
		now := time.Now()
		proxyHealth.QueuedUpdate(now)
		m.Queued(now)
		runner.Trigger()
	}
	log.Info("starting", "mode", o.Mode, "node", o.nodeName, "families", o.proxyConfig.Families,
		"minSyncPeriod", o.MinSyncPeriod, "syncPeriod", o.SyncPeriod)
	watchStart := time.Now()
	if err := watch.Start(ctx, client, o.nodeName, tracker, onChange); err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	log.Info("informers synced", "took", time.Since(watchStart).Round(time.Millisecond))
	if o.proxyConfig.LocalMode == proxy.LocalModeNodeCIDR {
		// The detector needs this node's pod CIDR; wait (bounded) for the Node.
		deadline := time.Now().Add(30 * time.Second)
		for !tracker.HasNode() && time.Now().Before(deadline) && ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
		if !tracker.HasNode() {
			log.Warn("Node object not found; NodeCIDR local detection has no CIDR yet", "node", o.nodeName)
		}
	}
	runner.Run(ctx)
	// Rules stay in place on shutdown: a restarting proxy must not blackhole traffic.
	log.Info("shutting down; rules left in place")
	return nil
}
