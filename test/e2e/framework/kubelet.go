package framework

// The kubelet test bed: real nodes. Next to the suite's kube-apiserver it
// runs kube-controller-manager and kube-scheduler, and on each node
// namespace containerd + runc + kubelet with the CNI reference plugins, all
// built from the Go module proxy (hack/provision.sh with
// MINIPROXY_K8S_TOOLS naming kubelet, kube-controller-manager and
// kube-scheduler, and MINIPROXY_NODE_TOOLS=1).
//
// Containment (what the host sees), per node:
//   - An "anchor" process holds the node's network namespace and a private
//     mount namespace (nsenter --net, then unshare -m --propagation private);
//     containerd, kubelet and ctr join both (nsenter -t <anchor> -m -n).
//     `ip netns exec` is not used for them: it remounts /sys, and /sys/fs/cgroup
//     disappears with it. Instead the anchor moves the cgroup tree aside,
//     mounts a sysfs of the node's network namespace and moves the tree back.
//   - /run, /var/lib and /var/log are per-node directories bound over the
//     host's inside that mount namespace (kubelet hardcodes
//     /var/lib/kubelet/device-plugins, CNI caches live in /var/lib/cni,
//     containerd's state in /run/containerd).
//   - kubelet writes six host-wide sysctls unless they already hold its
//     values: files with those values are bound over the /proc/sys entries in
//     the node's mount namespace, so it reads them, finds nothing to change
//     and writes nothing (the host's values are checked after a run).
//   - This host has no /lib/modules, which deploy/daemonset.yaml mounts as a
//     hostPath: an overlay over /usr/lib in the node's mount namespace gives
//     it an empty one, visible to that node only.
//   - Cgroups are host-global on cgroup v1: each node's kubelet gets its own
//     cgroupRoot (created in every hierarchy before it starts); teardown kills
//     what is left in it and removes the tree deepest-first.
//   - Everything else (containerd's images and snapshots, kubelet's pods and
//     logs, pod network namespaces) lives under the node's state directory in
//     the run's work dir, removed with it. Mounts exist only in the node's
//     mount namespace and go away when its last process exits.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// PauseImage is the sandbox image containerd is configured with (and the
// name the framework's own pause image is imported under).
const PauseImage = "registry.k8s.io/pause:3.10.2"

// KubeletSysctls are the host-wide settings kubelet would write
// (pkg/kubelet/cm setupKernelTunables) with the values it wants. Keys are
// paths under /proc/sys.
var KubeletSysctls = [][2]string{
	{"vm/overcommit_memory", "1"},
	{"vm/panic_on_oom", "0"},
	{"kernel/panic", "10"},
	{"kernel/panic_on_oops", "1"},
	{"kernel/keys/root_maxkeys", "1000000"},
	{"kernel/keys/root_maxbytes", "25000000"},
}

// HostSysctls reads the host's values of KubeletSysctls, to prove a run
// left them alone.
func HostSysctls() (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range KubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + kv[0])
		if err != nil {
			return nil, fmt.Errorf("read host sysctl: %w", err)
		}
		out[kv[0]] = strings.TrimSpace(string(b))
	}
	return out, nil
}

// NodeBinDir finds what hack/provision-node.sh built: $MINIPROXY_NODE_BIN,
// else $MINIPROXY_CACHE/node/current.
func NodeBinDir() (string, error) {
	dir := os.Getenv("MINIPROXY_NODE_BIN")
	if dir == "" {
		cache := os.Getenv("MINIPROXY_CACHE")
		if cache == "" {
			cache = "/var/cache/miniproxy"
		}
		dir = filepath.Join(cache, "node", "current")
	}
	for _, b := range []string{"containerd", "ctr", "containerd-shim-runc-v2", "runc", "cni/bridge", "cni/host-local", "cni/loopback"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("%s not provisioned (looked in %s): run `MINIPROXY_NODE_TOOLS=1 bash hack/provision.sh`", b, dir)
		}
	}
	return filepath.EvalSymlinks(dir)
}

// KubeletToolsMissing names the first control-plane or node binary the
// kubelet test bed needs that is not provisioned, or returns "".
func KubeletToolsMissing(k8sBin string) string {
	for _, b := range []string{"kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy"} {
		if _, err := os.Stat(filepath.Join(k8sBin, b)); err != nil {
			return b + " (MINIPROXY_K8S_TOOLS=\"kube-apiserver kube-proxy kubelet kube-controller-manager kube-scheduler\" bash hack/provision.sh)"
		}
	}
	if _, err := NodeBinDir(); err != nil {
		return err.Error()
	}
	return ""
}

// KubeletCluster is a Cluster whose nodes run kubelet.
type KubeletCluster struct {
	*Cluster
	NodeBin string
	Nodes   []*KubeletNode
}

// KubeletNode is one node namespace with containerd and kubelet in it. Node
// is its framework view (namespace, addresses), so the helpers written for
// namespace nodes (Rules, StartKubeProxy, TCPCountsFrom) work on it.
type KubeletNode struct {
	*Node
	Dir        string // per-node state (bound over /run, /var/lib, /var/log)
	CgroupRoot string // kubelet's cgroupRoot, e.g. /mpe-123-abcdef-n0

	kc         *KubeletCluster
	anchor     *Process
	containerd *Process
	kubelet    *Process
}

// StartKubeletCluster starts the control plane (StartCluster), then
// kube-controller-manager and kube-scheduler in the control-plane namespace,
// then n kubelet nodes, and returns once every node is Ready with its pod
// network configured.
func StartKubeletCluster(ctx context.Context, e *Env, n int) (*KubeletCluster, error) {
	if miss := KubeletToolsMissing(e.K8sBin); miss != "" {
		return nil, fmt.Errorf("kubelet test bed not provisioned: %s", miss)
	}
	nodeBin, err := NodeBinDir()
	if err != nil {
		return nil, err
	}
	c, err := StartCluster(ctx, e)
	if err != nil {
		return nil, err
	}
	kc := &KubeletCluster{Cluster: c, NodeBin: nodeBin}
	if err := kc.startControllers(ctx); err != nil {
		return nil, err
	}
	for i := 0; i < n; i++ {
		node, err := kc.addKubeletNode(ctx, i)
		if node != nil {
			kc.Nodes = append(kc.Nodes, node)
		}
		if err != nil {
			return nil, err
		}
	}
	if err := kc.waitNetworks(ctx); err != nil {
		return nil, err
	}
	return kc, nil
}

func (kc *KubeletCluster) startControllers(ctx context.Context) error {
	e, cp := kc.Env, kc.CP
	f := func(n string) string { return filepath.Join(cp.dir, n) }
	kcm, err := e.start(cp.NS, "kube-controller-manager", filepath.Join(e.K8sBin, "kube-controller-manager"),
		"--kubeconfig", cp.AdminKubeconfig,
		"--leader-elect=false",
		// Node IPAM hands out the pod CIDRs the bridge CNI uses.
		"--allocate-node-cidrs=true",
		"--cluster-cidr", ClusterCIDR,
		"--node-cidr-mask-size", "24",
		"--service-cluster-ip-range", ServiceCIDR,
		// kube-root-ca.crt in every namespace: projected ServiceAccount
		// volumes (the in-cluster config miniproxy uses) need it.
		"--root-ca-file", cp.pki.CAFile,
		"--service-account-private-key-file", f("sa.key"),
		"--configure-cloud-routes=false",
		"--bind-address", "127.0.0.1",
		"--v=1",
	)
	if err != nil {
		return err
	}
	e.Defer("stop kube-controller-manager", func() error { return kcm.Stop(10 * time.Second) })
	sched, err := e.start(cp.NS, "kube-scheduler", filepath.Join(e.K8sBin, "kube-scheduler"),
		"--kubeconfig", cp.AdminKubeconfig,
		"--leader-elect=false",
		"--bind-address", "127.0.0.1",
		"--v=1",
	)
	if err != nil {
		return err
	}
	e.Defer("stop kube-scheduler", func() error { return sched.Stop(10 * time.Second) })
	cp.procs = append(cp.procs, kcm, sched)
	return nil
}

// anchorScript prepares the node's private mount namespace and then holds
// it (and the node's network namespace) open. $1 is the node's state dir.
const anchorScript = `set -eu
D=$1
mkdir -p "$D/cgroup-aside" "$D/run" "$D/var-lib" "$D/var-log" "$D/lib-upper" "$D/lib-work" "$D/sysctl"
# A sysfs of this network namespace, with the host's cgroup tree kept.
mount -n --rbind /sys/fs/cgroup "$D/cgroup-aside"
mount -n -t sysfs sysfs /sys
mount -n --move "$D/cgroup-aside" /sys/fs/cgroup
# kubelet's host-wide sysctls: files holding the values it wants.
shift
for kv in "$@"; do
	k=${kv%%=*}; v=${kv#*=}
	f="$D/sysctl/$(echo "$k" | tr / .)"
	echo "$v" > "$f"
	mount -n --bind "$f" "/proc/sys/$k"
done
mount -n --bind "$D/run" /run
mount -n --bind "$D/var-lib" /var/lib
mount -n --bind "$D/var-log" /var/log
# /lib/modules (a hostPath in deploy/daemonset.yaml) is missing on this host.
mount -n -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$D/lib-upper,workdir=$D/lib-work" /usr/lib
mkdir -p /usr/lib/modules
touch "$D/anchor.ready"
exec sleep 2147483647
`

func (kc *KubeletCluster) addKubeletNode(ctx context.Context, idx int) (*KubeletNode, error) {
	e := kc.Env
	name := fmt.Sprintf("kl-node-%d", idx)
	ip := netip.AddrFrom4([4]byte{10, 250, 0, byte(10 + idx)})
	ns, err := newNetNS(ctx, fmt.Sprintf("%s-n%d", e.ID, idx))
	if err != nil {
		return nil, err
	}
	e.Defer("delete node ns "+name, ns.Delete)
	if err := attachUnderlay(ctx, kc.CP.Underlay, ns, fmt.Sprintf("u-n%d", idx), ip.String()); err != nil {
		return nil, err
	}
	if err := ns.RunAll(ctx,
		[]string{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		// Locally generated traffic to a VIP needs a route before the nat
		// OUTPUT hook can rewrite it; real nodes have a default route.
		[]string{"ip", "route", "add", ServiceCIDR, "dev", "eth0", "src", ip.String()},
	); err != nil {
		return nil, err
	}
	kn := &KubeletNode{
		Node: &Node{Name: name, Zone: "zone-a", NS: ns, IP: ip, Index: idx, c: kc.Cluster},
		Dir:  filepath.Join(e.WorkDir, "nodes", name),
		// Unique per run, so parallel runs and leftovers never collide.
		CgroupRoot: "/" + e.ID + fmt.Sprintf("-n%d", idx),
		kc:         kc,
	}
	if err := os.MkdirAll(kn.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("node dir: %w", err)
	}
	// Registered before anything starts, so a half-started node is torn
	// down too; it runs before the namespace is deleted (LIFO).
	e.Defer("tear down kubelet node "+name, kn.teardown)
	if err := kn.makeCgroupRoot(); err != nil {
		return kn, err
	}
	if err := kn.startAnchor(ctx); err != nil {
		return kn, err
	}
	if err := kn.startContainerd(ctx); err != nil {
		return kn, err
	}
	if err := kn.startKubelet(ctx); err != nil {
		return kn, err
	}
	kc.mu.Lock()
	kc.nodes = append(kc.nodes, kn.Node)
	kc.mu.Unlock()
	return kn, nil
}

// cgroupHierarchies lists the mounted cgroup hierarchies (v1 controllers,
// the named systemd one and the unified one of a hybrid host).
func cgroupHierarchies() ([]string, error) {
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil, fmt.Errorf("cgroup hierarchies: %w", err)
	}
	var out []string
	for _, ent := range ents {
		if ent.IsDir() && ent.Type()&os.ModeSymlink == 0 {
			out = append(out, filepath.Join("/sys/fs/cgroup", ent.Name()))
		}
	}
	return out, nil
}

// makeCgroupRoot creates the node's cgroupRoot in every hierarchy (kubelet
// refuses a cgroupRoot that does not exist); a cpuset cgroup needs its cpus
// and mems before a task may join it.
func (kn *KubeletNode) makeCgroupRoot() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := filepath.Join(h, kn.CgroupRoot)
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("cpuset: %w", err)
				}
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					return fmt.Errorf("cpuset %s: %w", f, err)
				}
			}
		}
	}
	return nil
}

// startIn starts argv inside the anchor's mount and network namespaces.
func (kn *KubeletNode) startIn(name string, env []string, argv ...string) (*Process, error) {
	lf, err := kn.kc.Env.logFile(name + ".log")
	if err != nil {
		return nil, err
	}
	args := append([]string{"-t", strconv.Itoa(kn.anchor.Cmd.Process.Pid), "-m", "-n", "--"}, argv...)
	cmd := exec.Command(absPath("nsenter"), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s on %s: %w", name, kn.Name, err)
	}
	p := &Process{Name: name, Cmd: cmd, LogPath: lf.Name(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// RunIn runs a command to completion inside the node's mount and network
// namespaces (ctr, crictl-like inspection).
func (kn *KubeletNode) RunIn(ctx context.Context, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	args := append([]string{"-t", strconv.Itoa(kn.anchor.Cmd.Process.Pid), "-m", "-n", "--"}, argv...)
	out, err := exec.CommandContext(ctx, absPath("nsenter"), args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s on %s: %w: %s", strings.Join(argv, " "), kn.Name, err, out)
	}
	return string(out), nil
}

func (kn *KubeletNode) startAnchor(ctx context.Context) error {
	lf, err := kn.kc.Env.logFile(kn.Name + "-anchor.log")
	if err != nil {
		return err
	}
	args := []string{"--net=" + kn.NS.Path(), "--", absPath("unshare"), "-m", "--propagation", "private", "--",
		"/bin/sh", "-c", anchorScript, "anchor", kn.Dir}
	for _, kv := range KubeletSysctls {
		args = append(args, kv[0]+"="+kv[1])
	}
	cmd := exec.Command(absPath("nsenter"), args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return fmt.Errorf("start anchor on %s: %w", kn.Name, err)
	}
	p := &Process{Name: kn.Name + "-anchor", Cmd: cmd, LogPath: lf.Name(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	kn.anchor = p
	return poll(ctx, 30*time.Second, 20*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("anchor on %s exited: %v: %s", kn.Name, werr, p.Logs(2000))
		}
		_, err := os.Stat(filepath.Join(kn.Dir, "anchor.ready"))
		return err == nil, nil
	})
}

func (kn *KubeletNode) startContainerd(ctx context.Context) error {
	nb := kn.kc.NodeBin
	cniConf := filepath.Join(kn.Dir, "cni-conf")
	if err := os.MkdirAll(cniConf, 0o755); err != nil {
		return fmt.Errorf("cni conf dir: %w", err)
	}
	cfg := fmt.Sprintf(`version = 3
# Inside the node's mount namespace: /var/lib and /run are the node's own.
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = %q
  [plugins.'io.containerd.cri.v1.runtime']
    # Root here lacks CAP_SYS_RESOURCE: it may not lower oom_score_adj.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = %q
        SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [%q]
      conf_dir = %q
`, PauseImage, filepath.Join(nb, "runc"), filepath.Join(nb, "cni"), cniConf)
	path := filepath.Join(kn.Dir, "containerd.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return fmt.Errorf("containerd config: %w", err)
	}
	p, err := kn.startIn(kn.Name+"-containerd", []string{"PATH=" + nb + ":" + os.Getenv("PATH")},
		filepath.Join(nb, "containerd"), "--config", path)
	if err != nil {
		return err
	}
	kn.containerd = p
	return poll(ctx, 60*time.Second, 100*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("containerd on %s exited: %v: %s", kn.Name, werr, p.Logs(4000))
		}
		_, err := kn.Ctr(ctx, "version")
		return err == nil, nil
	})
}

// Ctr runs ctr against the node's containerd (namespace k8s.io).
func (kn *KubeletNode) Ctr(ctx context.Context, args ...string) (string, error) {
	return kn.RunIn(ctx, append([]string{filepath.Join(kn.kc.NodeBin, "ctr"), "-a", "/run/containerd/containerd.sock", "-n", "k8s.io"}, args...)...)
}

// ImportImage imports an image archive (OCI layout or docker-archive) into
// the node's containerd, where kubelet finds it (imagePullPolicy
// IfNotPresent/Never: no registry is reachable).
func (kn *KubeletNode) ImportImage(ctx context.Context, archive string) error {
	if _, err := kn.Ctr(ctx, "images", "import", archive); err != nil {
		return err
	}
	return nil
}

func (kn *KubeletNode) startKubelet(ctx context.Context) error {
	e, cp := kn.kc.Env, kn.kc.CP
	certPEM, keyPEM, err := cp.pki.issue("kubelet-"+kn.Name, "system:node:"+kn.Name, []string{"system:nodes"}, nil, nil, false)
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(kn.Dir, "kubelet.kubeconfig")
	if err := writeKubeconfig(kubeconfig, cp.Server(), cp.pki.CertPEM, &clientcmdapi.AuthInfo{
		ClientCertificateData: certPEM, ClientKeyData: keyPEM,
	}); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host is cgroup v1 only.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %s
failSwapOn: false
# iptables belongs to the proxy under test.
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: %s
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# The test's disk use must not evict its pods.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
`, kn.CgroupRoot, kn.IP, cp.pki.CAFile)
	path := filepath.Join(kn.Dir, "kubelet.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return fmt.Errorf("kubelet config: %w", err)
	}
	p, err := kn.startIn(kn.Name+"-kubelet", []string{"PATH=" + kn.kc.NodeBin + ":" + os.Getenv("PATH")},
		filepath.Join(e.K8sBin, "kubelet"),
		"--config", path,
		"--kubeconfig", kubeconfig,
		"--hostname-override", kn.Name,
		"--node-ip", kn.IP.String(),
		"--node-labels", "topology.kubernetes.io/zone="+kn.Zone,
		"--v=2",
	)
	if err != nil {
		return err
	}
	kn.kubelet = p
	// Registered is enough here; Ready needs the CNI config, which needs
	// the pod CIDR the controller manager assigns on registration.
	return poll(ctx, 120*time.Second, 250*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("kubelet on %s exited: %v: %s", kn.Name, werr, p.Logs(6000))
		}
		_, err := kn.kc.Admin.CoreV1().Nodes().Get(ctx, kn.Name, metav1.GetOptions{})
		return err == nil, nil
	})
}

// waitNetworks waits for each node's pod CIDR, writes its bridge CNI
// config (as a CNI daemonset would), routes every node's pod CIDR via its
// node, and waits until every node is Ready.
func (kc *KubeletCluster) waitNetworks(ctx context.Context) error {
	for _, kn := range kc.Nodes {
		var cidr string
		err := poll(ctx, 60*time.Second, 250*time.Millisecond, func() (bool, error) {
			n, err := kc.Admin.CoreV1().Nodes().Get(ctx, kn.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			cidr = n.Spec.PodCIDR
			return cidr != "", nil
		})
		if err != nil {
			return fmt.Errorf("node %s got no pod CIDR from kube-controller-manager: %w", kn.Name, err)
		}
		pfx, err := netip.ParsePrefix(cidr)
		if err != nil {
			return fmt.Errorf("node %s pod CIDR %q: %w", kn.Name, cidr, err)
		}
		kn.PodCIDR = pfx
		conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
`, cidr)
		if err := os.WriteFile(filepath.Join(kn.Dir, "cni-conf", "10-e2e.conflist"), []byte(conf), 0o644); err != nil {
			return fmt.Errorf("cni config: %w", err)
		}
	}
	if err := kc.routeAll(ctx); err != nil {
		return err
	}
	for _, kn := range kc.Nodes {
		err := poll(ctx, 120*time.Second, 250*time.Millisecond, func() (bool, error) {
			if exited, werr := kn.kubelet.Exited(); exited {
				return false, fmt.Errorf("kubelet on %s exited: %v: %s", kn.Name, werr, kn.kubelet.Logs(6000))
			}
			n, err := kc.Admin.CoreV1().Nodes().Get(ctx, kn.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady {
					return c.Status == corev1.ConditionTrue, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("node %s not Ready: %w\n--- kubelet ---\n%s", kn.Name, err, kn.kubelet.Logs(6000))
		}
		kc.Env.Log("kubelet node %s Ready: ns %s node IP %s pods %s cgroupRoot %s", kn.Name, kn.NS.Name, kn.IP, kn.PodCIDR, kn.CgroupRoot)
	}
	return nil
}

// KubeletLogs returns the tail of the node's kubelet and containerd logs.
func (kn *KubeletNode) KubeletLogs(n int64) string {
	var b strings.Builder
	if kn.kubelet != nil {
		fmt.Fprintf(&b, "--- kubelet %s ---\n%s\n", kn.Name, kn.kubelet.Logs(n))
	}
	if kn.containerd != nil {
		fmt.Fprintf(&b, "--- containerd %s ---\n%s\n", kn.Name, kn.containerd.Logs(n))
	}
	return b.String()
}

// PodNetNS gives a pod's network namespace (made by containerd and the
// bridge CNI) a name under /run/netns, so the framework's in-process dialing
// works from inside it. pid is any process of the pod (Pod.Status has
// none: ContainerPID finds one). The name is removed at teardown; the
// namespace itself belongs to the pod.
func (kn *KubeletNode) PodNetNS(ctx context.Context, podName string, pid int) (*NetNS, error) {
	name := fmt.Sprintf("%s-n%d-%s", kn.kc.Env.ID, kn.Index, podName)
	if len(name) > 200 {
		name = name[:200]
	}
	ns := &NetNS{Name: name}
	if out, err := exec.CommandContext(ctx, ipBin(), "netns", "attach", name, strconv.Itoa(pid)).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns attach %s %d: %w: %s", name, pid, err, out)
	}
	kn.kc.Env.Defer("detach pod ns "+name, ns.Delete)
	return ns, nil
}

// ContainerPID returns the host pid of a running container of the pod,
// from containerd's task list.
func (kn *KubeletNode) ContainerPID(ctx context.Context, pod *corev1.Pod, container string) (int, error) {
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name != container || cs.ContainerID == "" {
			continue
		}
		id := strings.TrimPrefix(cs.ContainerID, "containerd://")
		out, err := kn.Ctr(ctx, "tasks", "ls")
		if err != nil {
			return 0, err
		}
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] == id {
				return strconv.Atoi(f[1])
			}
		}
		return 0, fmt.Errorf("container %s of %s/%s not in containerd's task list on %s", id, pod.Namespace, pod.Name, kn.Name)
	}
	return 0, fmt.Errorf("pod %s/%s has no running container %q", pod.Namespace, pod.Name, container)
}

// teardown stops kubelet, every container it started and containerd, ends
// the anchor (and with it the node's mounts) and removes the node's
// cgroups, deepest first.
func (kn *KubeletNode) teardown() error {
	var errs []error
	if kn.kubelet != nil {
		_ = kn.kubelet.Stop(10 * time.Second)
	}
	// Containers and shims outlive containerd and kubelet (shims are
	// reparented): kill every process in the node's cgroups and in its
	// mount namespace — all of them started by this node.
	killAll := func() int {
		pids := kn.cgroupPids()
		pids = append(pids, kn.mountNSPids()...)
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		return len(pids)
	}
	if kn.containerd != nil {
		_ = kn.containerd.Stop(5 * time.Second)
	}
	for i := 0; i < 100 && killAll() > 0; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if kn.anchor != nil {
		_ = kn.anchor.Stop(5 * time.Second)
	}
	for i := 0; i < 100 && killAll() > 0; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if err := kn.removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// cgroupPids lists the processes in the node's cgroup tree (any hierarchy).
func (kn *KubeletNode) cgroupPids() []int {
	hs, _ := cgroupHierarchies()
	seen := map[int]bool{}
	var out []int
	for _, h := range hs {
		root := filepath.Join(h, kn.CgroupRoot)
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && !seen[pid] && pid != os.Getpid() {
					seen[pid] = true
					out = append(out, pid)
				}
			}
			return nil
		})
	}
	return out
}

// mountNSPids lists the processes sharing the anchor's mount namespace
// (containerd, kubelet, shims, ctr), the anchor excluded.
func (kn *KubeletNode) mountNSPids() []int {
	if kn.anchor == nil {
		return nil
	}
	apid := kn.anchor.Cmd.Process.Pid
	want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", apid))
	if err != nil {
		return nil
	}
	self, _ := os.Readlink("/proc/self/ns/mnt")
	if want == self {
		return nil // the anchor has not unshared (yet): nothing is ours
	}
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == apid {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && l == want {
			out = append(out, pid)
		}
	}
	return out
}

// removeCgroups removes the node's cgroup tree in every hierarchy,
// children before parents.
func (kn *KubeletNode) removeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		root := filepath.Join(h, kn.CgroupRoot)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		// Deepest first: longer paths are never parents of shorter ones.
		slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
		for _, d := range dirs {
			var rerr error
			for i := 0; i < 50; i++ {
				if rerr = syscall.Rmdir(d); rerr == nil || errors.Is(rerr, syscall.ENOENT) {
					rerr = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if rerr != nil {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", d, rerr))
			}
		}
	}
	return errors.Join(errs...)
}

// ConnectFrom opens (and closes) one TCP connection from ns to addr: for
// servers that do not speak the podserver line protocol (the apiserver).
func ConnectFrom(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}

// KubeletLogCount counts the failed-probe lines of the node's kubelet log
// (kubelet logs each failed probe at -v=2) that hold every one of subs.
func (kn *KubeletNode) KubeletLogCount(subs ...string) int {
	if kn.kubelet == nil {
		return 0
	}
	b, err := os.ReadFile(kn.kubelet.LogPath)
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.Contains(l, "Probe failed") {
			continue
		}
		all := true
		for _, s := range subs {
			all = all && strings.Contains(l, s)
		}
		if all {
			n++
		}
	}
	return n
}

// HTTPStatusFrom GETs url from inside ns and returns the status code.
func HTTPStatusFrom(ctx context.Context, ns *NetNS, url string) (int, error) {
	hc := &http.Client{Transport: &http.Transport{DialContext: ns.DialContext, DisableKeepAlives: true}, Timeout: 2 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// KubeletTestBedMissing names what is not provisioned for the kubelet test
// bed (looking where NewEnv and NodeBinDir look), or returns "".
func KubeletTestBedMissing() string {
	k8sBin, err := k8sBinDir()
	if err != nil {
		return err.Error()
	}
	return KubeletToolsMissing(k8sBin)
}
