package framework

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Fixed address conventions (IPv4 now; every prefix has an IPv6 twin
// reserved for dual-stack: underlay fd00:250::/64, pods fd00:244:<n>::/64,
// services fd00:96::/112, so adding a family is adding a column, not a
// redesign). All of them exist only inside this run's namespaces.
const (
	UnderlayPrefix = "10.250.0.0/24"
	ControlPlaneIP = "10.250.0.2"
	ClusterCIDR    = "10.244.0.0/16"
	ServiceCIDR    = "10.96.0.0/16"
	APIServerPort  = 6443
	etcdClientPort = 2379
	healthzPort    = 10256
)

// ControlPlane is etcd + kube-apiserver running in their own namespace.
type ControlPlane struct {
	NS       *NetNS
	Underlay *NetNS
	dir      string
	pki      *pki

	// AdminConfig talks to the apiserver as system:masters from the test
	// process (its Dial enters the control-plane namespace).
	AdminConfig *rest.Config
	Admin       kubernetes.Interface
	// AdminKubeconfig is usable by kubectl run inside any of the run's
	// namespaces (server is the underlay address).
	AdminKubeconfig string

	procs []*Process
}

// Server is the apiserver URL as seen from the underlay.
func (cp *ControlPlane) Server() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(ControlPlaneIP, fmt.Sprint(APIServerPort)))
}

// Process is a child process with its log file.
type Process struct {
	Name    string
	Cmd     *exec.Cmd
	LogPath string
	done    chan struct{}
	err     error
}

// start runs bin in ns with output to <WorkDir>/<name>.log.
func (e *Env) start(ns *NetNS, name, bin string, args ...string) (*Process, error) {
	lf, err := e.logFile(name + ".log")
	if err != nil {
		return nil, err
	}
	cmd := ns.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s in %s: %w", name, ns.Name, err)
	}
	p := &Process{Name: name, Cmd: cmd, LogPath: lf.Name(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// Exited reports whether the process ended, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Stop sends SIGTERM to the process group, then SIGKILL after grace.
func (p *Process) Stop(grace time.Duration) error {
	if exited, _ := p.Exited(); exited {
		return nil
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
		_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s did not exit within %v of SIGTERM; killed", p.Name, grace)
	}
}

// Logs returns the tail of the process log.
func (p *Process) Logs(n int64) string { return tail(p.LogPath, n) }

// StartControlPlane creates the underlay and control-plane namespaces and
// starts etcd and kube-apiserver, returning once /readyz answers ok.
func (e *Env) StartControlPlane(ctx context.Context) (*ControlPlane, error) {
	t0 := time.Now()
	cp := &ControlPlane{dir: filepath.Join(e.WorkDir, "controlplane")}
	if err := os.MkdirAll(cp.dir, 0o700); err != nil {
		return nil, fmt.Errorf("control plane dir: %w", err)
	}
	var err error
	if cp.Underlay, err = newNetNS(ctx, e.ID+"-ul"); err != nil {
		return nil, err
	}
	e.Defer("delete underlay ns", cp.Underlay.Delete)
	if err := cp.Underlay.RunAll(ctx,
		[]string{"ip", "link", "add", "br0", "type", "bridge"},
		[]string{"ip", "link", "set", "br0", "up"},
	); err != nil {
		return nil, err
	}
	if cp.NS, err = newNetNS(ctx, e.ID+"-cp"); err != nil {
		return nil, err
	}
	e.Defer("delete control-plane ns", cp.NS.Delete)
	if err := attachUnderlay(ctx, cp.Underlay, cp.NS, "u-cp", ControlPlaneIP); err != nil {
		return nil, err
	}

	if cp.pki, err = newPKI(cp.dir); err != nil {
		return nil, err
	}
	if err := cp.startEtcd(ctx, e); err != nil {
		return nil, err
	}
	if err := cp.startAPIServer(ctx, e); err != nil {
		return nil, err
	}
	e.Log("control plane ready in %v (apiserver %s in netns %s)", time.Since(t0).Round(time.Millisecond), cp.Server(), cp.NS.Name)
	return cp, nil
}

// attachUnderlay connects ns to the underlay bridge with address ip/24. The
// veth is created inside the underlay namespace and its peer moved straight
// into ns, so nothing ever appears in the root namespace.
func attachUnderlay(ctx context.Context, ul, ns *NetNS, port, ip string) error {
	if err := ul.RunAll(ctx,
		[]string{"ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.Name},
		[]string{"ip", "link", "set", port, "master", "br0", "up"},
	); err != nil {
		return err
	}
	return ns.RunAll(ctx,
		[]string{"ip", "addr", "add", ip + "/24", "dev", "eth0"},
		[]string{"ip", "link", "set", "eth0", "up"},
	)
}

func (cp *ControlPlane) startEtcd(ctx context.Context, e *Env) error {
	data := filepath.Join(cp.dir, "etcd")
	local := fmt.Sprintf("http://127.0.0.1:%d", etcdClientPort)
	peer := "http://127.0.0.1:2380"
	p, err := e.start(cp.NS, "etcd", e.Etcd,
		"--name", "e2e",
		"--data-dir", data,
		"--listen-client-urls", local,
		"--advertise-client-urls", local,
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", "e2e="+peer,
		"--logger", "zap", "--log-outputs", "stderr",
		// The data lives as long as the run; snapshots only cost time.
		"--snapshot-count", "100000",
	)
	if err != nil {
		return err
	}
	cp.procs = append(cp.procs, p)
	e.Defer("stop etcd", func() error { return p.Stop(10 * time.Second) })
	hc := &http.Client{Transport: &http.Transport{DialContext: cp.NS.DialContext}, Timeout: 2 * time.Second}
	err = poll(ctx, 60*time.Second, 100*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("etcd exited: %v\n%s", werr, p.Logs(4000))
		}
		resp, err := hc.Get(local + "/health")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return fmt.Errorf("etcd not healthy: %w\n%s", err, p.Logs(4000))
	}
	return nil
}

func (cp *ControlPlane) startAPIServer(ctx context.Context, e *Env) error {
	ips := []net.IP{net.ParseIP(ControlPlaneIP), net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}
	dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	if _, _, err := cp.pki.issue("apiserver", "kube-apiserver", nil, ips, dns, true); err != nil {
		return err
	}
	adminCert, adminKey, err := cp.pki.issue("admin", "e2e-admin", []string{"system:masters"}, nil, nil, false)
	if err != nil {
		return err
	}
	saKey, saPub, err := cp.pki.serviceAccountKeys()
	if err != nil {
		return err
	}
	f := func(n string) string { return filepath.Join(cp.dir, n) }
	p, err := e.start(cp.NS, "kube-apiserver", filepath.Join(e.K8sBin, "kube-apiserver"),
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", etcdClientPort),
		"--etcd-prefix", "/registry",
		"--bind-address", "0.0.0.0",
		"--secure-port", fmt.Sprint(APIServerPort),
		"--advertise-address", ControlPlaneIP,
		// Dual-stack service range (IPv4 primary): Services default to
		// single-stack IPv4 as before; tests ask for IPv6 or dual-stack
		// explicitly (see ext_dualstack.go).
		"--service-cluster-ip-range", ServiceCIDR+","+ServiceCIDRv6,
		"--client-ca-file", cp.pki.CAFile,
		"--tls-cert-file", f("apiserver.crt"),
		"--tls-private-key-file", f("apiserver.key"),
		"--cert-dir", cp.dir,
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey,
		"--authorization-mode", "Node,RBAC",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=1",
	)
	if err != nil {
		return err
	}
	cp.procs = append(cp.procs, p)
	e.Defer("stop kube-apiserver", func() error {
		// Its graceful shutdown drains watches and can outlast the grace
		// period on a loaded machine; being killed at teardown says nothing
		// about miniproxy, so it is logged, not failed.
		if err := p.Stop(30 * time.Second); err != nil {
			e.Log("teardown: %v", err)
		}
		return nil
	})

	cp.AdminConfig = &rest.Config{
		Host: cp.Server(),
		TLSClientConfig: rest.TLSClientConfig{
			CAData: cp.pki.CertPEM, CertData: adminCert, KeyData: adminKey,
		},
		Dial:  cp.NS.DialContext,
		QPS:   100,
		Burst: 200,
	}
	if cp.Admin, err = kubernetes.NewForConfig(cp.AdminConfig); err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	cp.AdminKubeconfig = f("admin.kubeconfig")
	if err := writeKubeconfig(cp.AdminKubeconfig, cp.Server(), cp.pki.CertPEM, &clientcmdapi.AuthInfo{
		ClientCertificateData: adminCert, ClientKeyData: adminKey,
	}); err != nil {
		return err
	}

	rc := cp.Admin.Discovery().RESTClient()
	var last string
	err = poll(ctx, 180*time.Second, 250*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("kube-apiserver exited: %v", werr)
		}
		body, err := rc.Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			last = fmt.Sprintf("%v %s", err, body)
			return false, nil
		}
		return strings.TrimSpace(string(body)) == "ok", nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver not ready (last: %s): %w\n%s", last, err, p.Logs(6000))
	}
	return nil
}

// writeKubeconfig writes a single-context kubeconfig.
func writeKubeconfig(path, server string, ca []byte, auth *clientcmdapi.AuthInfo) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["user"] = auth
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "user"}
	cfg.CurrentContext = "e2e"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

// errTimeout marks a poll that ran out of time.
var errTimeout = errors.New("timed out")

// poll calls cond every interval until it returns true, returns an error, or
// the timeout (or ctx) ends; the loop is always bounded.
func poll(ctx context.Context, timeout, interval time.Duration, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %v: %w", timeout, errTimeout)
		case <-time.After(interval):
		}
	}
}
