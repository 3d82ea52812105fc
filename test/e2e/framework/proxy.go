package framework

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Proxy is one proxy process running in a node namespace: miniproxy, or
// upstream kube-proxy (StartKubeProxy) as the one miniproxy replaces.
type Proxy struct {
	Node  *Node
	Mode  string
	Args  []string
	Impl  string // "miniproxy" (default) or "kube-proxy"
	proc  *Process
	count int // restarts, for log file names
}

func (p *Proxy) impl() string {
	if p.Impl == "" {
		return "miniproxy"
	}
	return p.Impl
}

// KubeProxyHostSafeArgs keep upstream kube-proxy from changing machine-wide
// settings: nf_conntrack_max, its hash size and the conntrack timeouts are
// global to the host, not to the node namespace it runs in.
var KubeProxyHostSafeArgs = []string{
	"--conntrack-max-per-core=0",
	"--conntrack-tcp-timeout-established=0",
	"--conntrack-tcp-timeout-close-wait=0",
}

// StartKubeProxy starts upstream kube-proxy (hack/provision.sh builds it
// into the K8s bin dir) in mode on node, with miniproxy's identity and
// addresses, and waits until its /healthz says it has synced.
func (c *Cluster) StartKubeProxy(ctx context.Context, node *Node, mode string) (*Proxy, error) {
	bin := filepath.Join(c.Env.K8sBin, "kube-proxy")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%s missing: run hack/provision.sh (it builds kube-proxy with kube-apiserver)", bin)
	}
	args := []string{
		"--kubeconfig", c.CP.AdminKubeconfig,
		"--hostname-override", node.Name,
		"--proxy-mode", mode,
		"--cluster-cidr", ClusterCIDR,
		"--healthz-bind-address", fmt.Sprintf("0.0.0.0:%d", healthzPort),
		"--metrics-bind-address", "127.0.0.1:10249",
		"--v=1",
	}
	args = append(args, KubeProxyHostSafeArgs...)
	p := &Proxy{Node: node, Mode: mode, Impl: "kube-proxy", Args: append([]string{bin}, args...)}
	c.Env.Defer("stop kube-proxy on "+node.Name, func() error { return p.Stop() })
	return p, p.start(ctx)
}

// ProxyOptions adjust how miniproxy is started.
type ProxyOptions struct {
	Mode  string   // iptables | nftables | ipvs
	Extra []string // appended flags
}

// StartProxy starts bin/miniproxy in the node's namespace with the
// least-privilege kubeconfig and waits for /healthz to answer 200.
func (c *Cluster) StartProxy(ctx context.Context, node *Node, opts ProxyOptions) (*Proxy, error) {
	bin, err := c.Env.MiniproxyBin()
	if err != nil {
		return nil, err
	}
	args := []string{
		"--kubeconfig", c.ProxyKubeconfig,
		"--hostname-override", node.Name,
		"--proxy-mode", opts.Mode,
		"--cluster-cidr", ClusterCIDR,
		"--healthz-bind-address", fmt.Sprintf("0.0.0.0:%d", healthzPort),
		"--metrics-bind-address", "127.0.0.1:10249",
		"-v", "2",
	}
	args = append(args, opts.Extra...)
	p := &Proxy{Node: node, Mode: opts.Mode, Args: append([]string{bin}, args...)}
	c.Env.Defer("stop miniproxy on "+node.Name, func() error { return p.Stop() })
	if err := p.start(ctx); err != nil {
		return p, err
	}
	return p, nil
}

func (p *Proxy) start(ctx context.Context) error {
	e := p.Node.c.Env
	p.count++
	proc, err := e.start(p.Node.NS, fmt.Sprintf("%s-%s-%d", p.impl(), p.Node.Name, p.count), p.Args[0], p.Args[1:]...)
	if err != nil {
		return err
	}
	p.proc = proc
	return p.WaitHealthy(ctx, 120*time.Second)
}

// WaitHealthy polls /healthz inside the node namespace until it returns 200.
func (p *Proxy) WaitHealthy(ctx context.Context, timeout time.Duration) error {
	hc := &http.Client{Transport: &http.Transport{DialContext: p.Node.NS.DialContext, DisableKeepAlives: true}, Timeout: 2 * time.Second}
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", healthzPort)
	var last string
	err := poll(ctx, timeout, 100*time.Millisecond, func() (bool, error) {
		if exited, werr := p.proc.Exited(); exited {
			return false, fmt.Errorf("%s on %s exited: %v", p.impl(), p.Node.Name, werr)
		}
		resp, err := hc.Get(url)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		last = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return fmt.Errorf("%s on %s not healthy (last: %s): %w\n--- log ---\n%s", p.impl(), p.Node.Name, last, err, p.Logs())
	}
	return nil
}

// Stop sends SIGTERM and waits (SIGKILL after 15 s).
func (p *Proxy) Stop() error {
	if p.proc == nil {
		return nil
	}
	return p.proc.Stop(15 * time.Second)
}

// Restart stops the process and starts a new one with the same flags.
func (p *Proxy) Restart(ctx context.Context) error {
	if err := p.Stop(); err != nil {
		return err
	}
	return p.start(ctx)
}

// Logs returns the tail of the current process's log.
func (p *Proxy) Logs() string {
	if p.proc == nil {
		return "(not started)"
	}
	return p.proc.Logs(16000)
}

// LogPath is the current log file.
func (p *Proxy) LogPath() string {
	if p.proc == nil {
		return ""
	}
	return p.proc.LogPath
}

// Running reports whether the process is still alive.
func (p *Proxy) Running() bool {
	if p.proc == nil {
		return false
	}
	exited, _ := p.proc.Exited()
	return !exited
}

// Rules dumps the node's packet-filter state for mode: iptables-save (nft
// backend) and `nft list ruleset`, both run inside the node namespace. Tests
// search it for a Service's VIP or name to prove its rules are gone.
func (n *Node) Rules(ctx context.Context, mode string) (string, error) {
	var b strings.Builder
	cmds := [][]string{{"nft", "list", "ruleset"}}
	if mode == "iptables" {
		cmds = append(cmds, []string{"iptables-save"})
		// The legacy backend is only listed when the user says miniproxy
		// uses it, since listing registers legacy tables in the namespace.
		if os.Getenv("MINIPROXY_E2E_IPTABLES_LEGACY") != "" {
			cmds = append(cmds, []string{"iptables-legacy-save"})
		}
	}
	for _, c := range cmds {
		out, err := n.NS.Run(ctx, c...)
		if err != nil {
			return b.String(), err
		}
		fmt.Fprintf(&b, "### %s\n%s\n", strings.Join(c, " "), out)
	}
	return b.String(), nil
}
