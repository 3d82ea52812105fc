package framework

// Helpers for the lab (hack/lab): pods that run podserver with arbitrary
// arguments (gRPC servers with their own options), processes in any of the
// run's namespaces (CoreDNS in the control-plane namespace, a gRPC client in a
// pod), and routes that let the control-plane namespace answer pods.

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
)

// StartPodserver starts bin/podserver in the pod with args (for example
// "serve --name x --grpc 9090"). The process is stopped by Pod.Delete.
func (p *Pod) StartPodserver(args ...string) error {
	e := p.Node.c.Env
	proc, err := e.start(p.NS, "pod-"+p.Name, filepath.Join(e.BinDir, "podserver"), args...)
	if err != nil {
		return err
	}
	p.proc = proc
	return nil
}

// PodserverExited reports whether the pod's podserver has exited, with its
// log tail when it has.
func (p *Pod) PodserverExited() (bool, string) {
	if p.proc == nil {
		return false, ""
	}
	if exited, err := p.proc.Exited(); exited {
		return true, fmt.Sprintf("%v: %s", err, p.proc.Logs(2000))
	}
	return false, ""
}

// StartProcess runs bin with args inside ns (one of the run's namespaces);
// it is stopped on Env.Close, or earlier through the returned Process.
func (e *Env) StartProcess(ns *NetNS, name, bin string, args ...string) (*Process, error) {
	proc, err := e.start(ns, name, bin, args...)
	if err != nil {
		return nil, err
	}
	e.Defer("stop "+name, func() error { return proc.Stop(5 * time.Second) })
	return proc, nil
}

// RoutePodsFromControlPlane gives the control-plane namespace a route to
// every node's pod CIDR, so a server running there (CoreDNS) can answer
// pods directly, like a cluster DNS reachable from the pod network.
func (c *Cluster) RoutePodsFromControlPlane(ctx context.Context) error {
	for _, n := range c.Nodes() {
		if _, err := c.CP.NS.Run(ctx, "ip", "route", "replace", n.PodCIDR.String(), "via", n.IP.String()); err != nil {
			return err
		}
	}
	return nil
}
