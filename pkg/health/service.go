package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// ServiceInfo is what one health-check node port reports.
type ServiceInfo struct {
	Namespace      string
	Name           string
	LocalEndpoints int
}

// ServicePorts returns the health-check node ports snap needs: one per Service
// with externalTrafficPolicy: Local and a healthCheckNodePort, counting the
// distinct IPs of that Service's ready endpoints on this node. Like kube-proxy,
// only ready endpoints count (not the terminating fallback), so a load
// balancer drains a node whose last local pod is terminating; and IPs are
// counted once across all ports of the Service.
func ServicePorts(snap *model.Snapshot) map[int32]ServiceInfo {
	ips := map[int32]map[netip.Addr]bool{}
	out := map[int32]ServiceInfo{}
	for _, sp := range snap.Services {
		if !sp.ExternalPolicyLocal || sp.HealthCheckNodePort == 0 {
			continue
		}
		port := sp.HealthCheckNodePort
		if ips[port] == nil {
			ips[port] = map[netip.Addr]bool{}
		}
		for _, ep := range sp.Endpoints {
			if ep.Ready && ep.NodeName != "" && ep.NodeName == snap.Node.Name {
				ips[port][ep.IP] = true
			}
		}
		out[port] = ServiceInfo{Namespace: sp.Name.Namespace, Name: sp.Name.Name, LocalEndpoints: len(ips[port])}
	}
	return out
}

// ServiceHealthOptions configures a ServiceHealth.
type ServiceHealthOptions struct {
	// Addresses are the IPs to listen on (kube-proxy uses the
	// --nodeport-addresses selection). Empty means every address (":port").
	Addresses []netip.Addr
	// ProxyHealthy reports whether the proxy itself is healthy; while it is
	// not, every port answers 503 (serviceProxyHealthy: false) so load
	// balancers move away from a node whose rules are stale. Nil means
	// always healthy. Typically (*ProxyHealth).Healthy.
	ProxyHealthy func() bool
	// Logger receives listen failures and closes. Nil discards.
	Logger *slog.Logger
}

// ServiceHealth runs one HTTP server per health-check node port.
type ServiceHealth struct {
	opts ServiceHealthOptions
	log  *slog.Logger

	mu      sync.Mutex
	servers map[int32]*portServer
}

// portServer answers for one health-check node port on every configured address.
type portServer struct {
	port  int32
	srv   *http.Server
	lns   []net.Listener
	owner *ServiceHealth

	mu   sync.Mutex
	info ServiceInfo
}

// NewServiceHealth returns a ServiceHealth with no ports open.
func NewServiceHealth(opts ServiceHealthOptions) *ServiceHealth {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &ServiceHealth{opts: opts, log: log, servers: map[int32]*portServer{}}
}

// Sync makes the open ports match want: it opens ports that are new, closes
// ports no longer wanted and updates the answers of the others in place (their
// listeners stay open, so probes never see a gap). A port that cannot be
// opened is skipped, reported in the returned error and retried on the next
// Sync; it never stops the other ports.
func (s *ServiceHealth) Sync(want map[int32]ServiceInfo) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for port, ps := range s.servers {
		if _, ok := want[port]; !ok {
			if err := ps.close(); err != nil {
				errs = append(errs, fmt.Errorf("closing health check port %d: %w", port, err))
			}
			delete(s.servers, port)
			s.log.Info("closed service health check port", "port", port)
		}
	}
	ports := make([]int32, 0, len(want))
	for port := range want {
		ports = append(ports, port)
	}
	slices.Sort(ports) // deterministic error order
	for _, port := range ports {
		info := want[port]
		if ps, ok := s.servers[port]; ok {
			ps.mu.Lock()
			ps.info = info
			ps.mu.Unlock()
			continue
		}
		ps, err := s.open(port, info)
		if err != nil {
			s.log.Error("cannot open service health check port", "port", port,
				"service", info.Namespace+"/"+info.Name, "err", err)
			errs = append(errs, err)
			continue
		}
		s.servers[port] = ps
		s.log.Info("opened service health check port", "port", port, "service", info.Namespace+"/"+info.Name)
	}
	return errors.Join(errs...)
}

// open listens on port on every address; if any address fails, none stay open,
// so a port is either fully served or retried as a whole.
func (s *ServiceHealth) open(port int32, info ServiceInfo) (*portServer, error) {
	hosts := []string{""}
	if len(s.opts.Addresses) > 0 {
		hosts = hosts[:0]
		for _, a := range s.opts.Addresses {
			hosts = append(hosts, a.String())
		}
	}
	var lc net.ListenConfig
	var lns []net.Listener
	for _, h := range hosts {
		addr := net.JoinHostPort(h, strconv.Itoa(int(port)))
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			for _, l := range lns {
				_ = l.Close()
			}
			return nil, fmt.Errorf("health check port %d for %s/%s: %w", port, info.Namespace, info.Name, err)
		}
		lns = append(lns, ln)
	}
	ps := &portServer{port: port, owner: s, info: info, lns: lns}
	ps.srv = &http.Server{Handler: ps}
	for _, ln := range lns {
		go func() {
			// Serve returns ErrServerClosed after Close; anything else
			// means the listener broke, which the next probe failure
			// will also show, so logging is enough.
			if err := ps.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("service health check server stopped", "addr", ln.Addr().String(), "err", err)
			}
		}()
	}
	return ps, nil
}

// close stops serving. The listeners are closed here as well as by the server:
// a Serve goroutine that has not started yet would close its listener only
// later, and a closed port must refuse connections as soon as Sync returns.
func (ps *portServer) close() error {
	err := ps.srv.Close()
	for _, ln := range ps.lns {
		if cerr := ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) && err == nil {
			err = cerr
		}
	}
	return err
}

// Ports returns the ports currently open, sorted.
func (s *ServiceHealth) Ports() []int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]int32, 0, len(s.servers))
	for p := range s.servers {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// Close closes every port.
func (s *ServiceHealth) Close() error {
	return s.Sync(nil)
}

// serviceResponse is kube-proxy's health-check body.
type serviceResponse struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

func (ps *portServer) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	ps.mu.Lock()
	info := ps.info
	ps.mu.Unlock()
	healthy := ps.owner.opts.ProxyHealthy == nil || ps.owner.opts.ProxyHealthy()

	var body serviceResponse
	body.Service.Namespace, body.Service.Name = info.Namespace, info.Name
	body.LocalEndpoints = info.LocalEndpoints
	body.ServiceProxyHealthy = healthy
	code := http.StatusServiceUnavailable
	if info.LocalEndpoints > 0 && healthy {
		code = http.StatusOK
	}
	// kube-proxy also advertises the count as a weight for load balancers
	// that can balance by it.
	w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(info.LocalEndpoints))
	writeJSON(w, code, body)
}
