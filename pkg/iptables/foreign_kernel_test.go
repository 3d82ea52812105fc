package iptables

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// variant is an iptables backend (the binaries the backend's commands are
// mapped to). The backend always asks for "iptables", "iptables-restore", …;
// on a node those are whatever the alternatives point at, here the test maps
// them explicitly so both backends are exercised.
type variant struct {
	name string
	bins map[string]string
}

var (
	variantNFT    = variant{"nft", map[string]string{"iptables": "iptables-nft", "iptables-save": "iptables-nft-save", "iptables-restore": "iptables-nft-restore", "ip6tables": "ip6tables-nft", "ip6tables-save": "ip6tables-nft-save", "ip6tables-restore": "ip6tables-nft-restore"}}
	variantLegacy = variant{"legacy", map[string]string{"iptables": "iptables-legacy", "iptables-save": "iptables-legacy-save", "iptables-restore": "iptables-legacy-restore", "ip6tables": "ip6tables-legacy", "ip6tables-save": "ip6tables-legacy-save", "ip6tables-restore": "ip6tables-legacy-restore"}}
)

func (v variant) bin(name string) string {
	if b, ok := v.bins[name]; ok {
		return b
	}
	return name
}

// runner runs the backend's commands in ns through this variant's binaries.
// lockFile, if set, replaces /run/xtables.lock (XTABLES_LOCKFILE, honoured by
// iptables ≥ 1.8.5), so that a test holding the lock never blocks the host's
// or another test's iptables-legacy.
func (v variant) runner(ns proxy.NetNS, lockFile string) Runner {
	var prefix []string
	if lockFile != "" {
		prefix = []string{"env", "XTABLES_LOCKFILE=" + lockFile}
	}
	run := ExecRunner(ns, prefix...)
	return func(ctx context.Context, stdin string, name string, args ...string) ([]byte, error) {
		return run(ctx, stdin, v.bin(name), args...)
	}
}

// logBuffer collects a backend's log for assertions, safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	os.Stderr.Write(p)
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// flab is a lab for a given variant and config, whose backend logs to a buffer.
type flab struct {
	*lab
	v    variant
	cfg  proxy.Config
	log  *logBuffer
	lock string
}

func newFLab(t *testing.T, v variant, c proxy.Config, podIPs ...string) *flab {
	t.Helper()
	netnstest.RequireRoot(t, v.bin("iptables-restore"), v.bin("iptables-save"), v.bin("iptables"), "sysctl")
	n := netnstest.NewNode(t, podIPs...)
	l := &flab{lab: &lab{node: n.NS, pods: n.Pods, client: n.Client}, v: v, cfg: c, log: &logBuffer{}}
	l.backend = l.newBackend(t)
	return l
}

// newBackend is a new miniproxy process on the same node.
func (l *flab) newBackend(t *testing.T) *Backend {
	t.Helper()
	c := l.cfg
	c.NetNS = proxy.NetNS(l.node.Path())
	b, err := New(slog.New(slog.NewTextHandler(l.log, nil)), c, l.v.runner(c.NetNS, l.lock))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// xt runs one of the variant's tools in the node namespace.
func (l *flab) xt(t *testing.T, name string, args ...string) string {
	t.Helper()
	return l.node.MustRun(t, append([]string{l.v.bin(name)}, args...)...)
}

// script runs "iptables ARGS" lines of the variant in the node namespace.
func (l *flab) script(t *testing.T, lines ...string) {
	t.Helper()
	for _, line := range lines {
		args, err := iptrace.SplitArgs(line)
		if err != nil {
			t.Fatal(err)
		}
		l.xt(t, "iptables", append([]string{"-w", "5"}, args...)...)
	}
}

func (l *flab) sysctl(t *testing.T, key string) string {
	t.Helper()
	return strings.TrimSpace(l.node.MustRun(t, "sysctl", "-n", key))
}

const routeLocalnet = "net.ipv4.conf.all.route_localnet"

// Other software's objects as they look on a real node: Docker's filter and
// nat chains with their jumps, kubelet's canaries and its localnet guard
// (KUBE-FIREWALL, jumped to from INPUT and OUTPUT; kube-proxy writes the same
// chain), and a CNI's per-container masquerade chain and forward chain.
var foreignChains = []string{"DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1", "KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "CNI-FORWARD", "CNI-0123456789abcdef01234567"}

func addForeignObjects(t *testing.T, l *flab) {
	t.Helper()
	l.script(t,
		// Docker.
		"-t filter -N DOCKER",
		"-t filter -N DOCKER-USER",
		"-t filter -N DOCKER-ISOLATION-STAGE-1",
		"-t filter -A DOCKER-USER -j RETURN",
		"-t filter -A DOCKER-ISOLATION-STAGE-1 -j RETURN",
		"-t filter -A FORWARD -j DOCKER-USER",
		"-t filter -A FORWARD -j DOCKER-ISOLATION-STAGE-1",
		"-t filter -A FORWARD -o docker0 -j DOCKER",
		"-t nat -N DOCKER",
		"-t nat -A DOCKER -i docker0 -j RETURN",
		"-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
		"-t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
		"-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
		// kubelet.
		"-t mangle -N KUBE-KUBELET-CANARY",
		"-t nat -N KUBE-KUBELET-CANARY",
		"-t filter -N KUBE-KUBELET-CANARY",
		"-t filter -N KUBE-FIREWALL",
		`-t filter -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP`,
		"-t filter -A INPUT -j KUBE-FIREWALL",
		"-t filter -A OUTPUT -j KUBE-FIREWALL",
		// A CNI (the bridge plugin's shapes).
		"-t nat -N CNI-0123456789abcdef01234567",
		`-t nat -A CNI-0123456789abcdef01234567 -d 10.88.0.0/16 -m comment --comment "name: bridge id: abc" -j ACCEPT`,
		`-t nat -A POSTROUTING -s 10.88.0.5/32 -m comment --comment "name: bridge id: abc" -j CNI-0123456789abcdef01234567`,
		"-t filter -N CNI-FORWARD",
		"-t filter -A CNI-FORWARD -s 10.88.0.0/16 -j ACCEPT",
		`-t filter -A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD`,
	)
}

var counters = regexp.MustCompile(` \[\d+:\d+\]$`)

// foreignState is every line of iptables-save (mangle, nat, filter) that
// belongs to someone else: the declarations and rules of foreignChains, and
// rules in built-in chains that do not jump to a chain of ours. Counters are
// stripped; the order of rules within a chain is kept.
func (l *flab) foreignState(t *testing.T) string {
	t.Helper()
	foreign := map[string]bool{}
	for _, c := range foreignChains {
		foreign[c] = true
	}
	builtin := map[string]bool{"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true}
	var out []string
	for _, table := range []string{"mangle", "nat", "filter"} {
		out = append(out, "*"+table)
		for _, line := range strings.Split(l.xt(t, "iptables-save", "-t", table), "\n") {
			line = counters.ReplaceAllString(strings.TrimSpace(line), "")
			f := strings.Fields(line)
			switch {
			case len(f) >= 1 && strings.HasPrefix(f[0], ":"):
				if foreign[f[0][1:]] || builtin[f[0][1:]] {
					out = append(out, line)
				}
			case len(f) >= 2 && f[0] == "-A" && foreign[f[1]]:
				out = append(out, line)
			case len(f) >= 2 && f[0] == "-A" && builtin[f[1]]:
				target := ""
				for i := range f {
					if f[i] == "-j" && i+1 < len(f) {
						target = f[i+1]
					}
				}
				if foreign[target] || !(strings.HasPrefix(target, "KUBE-") || strings.HasPrefix(target, "MINIPROXY-")) {
					out = append(out, line)
				}
			}
		}
	}
	return strings.Join(out, "\n")
}

func nodePortSP(name, vip string, nodePort int32, eps ...model.Endpoint) *model.ServicePort {
	sp := mt.SP("ns", name, "", vip, 80, eps...)
	sp.NodePort = nodePort
	return sp
}

// TestKernelForeignKubeFirewall (issue 15, defect 2): kubelet's KUBE-FIREWALL,
// jumped to from INPUT and OUTPUT, exists before miniproxy starts. With
// localhost NodePorts off (--nodeport-addresses, or
// --iptables-localhost-nodeports=false) miniproxy must still program
// everything, serve its NodePorts, and leave kubelet's chain and jumps alone.
func TestKernelForeignKubeFirewall(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*proxy.Config)
	}{
		{"nodeport-addresses", func(c *proxy.Config) { c.NodePortAddresses = mt.Prefixes("10.180.0.0/24") }},
		{"localhost-nodeports-false", func(c *proxy.Config) { c.LocalhostNodePorts = false }},
		{"localhost-nodeports", func(c *proxy.Config) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg()
			tc.edit(&c)
			l := newFLab(t, variantNFT, c, "10.180.0.5", "10.180.0.6")
			addForeignObjects(t, l)
			before := l.foreignState(t)
			snap := mt.Snap(nodePortSP("np", "172.30.0.3", 30080, mt.Ep("10.180.0.5", 8080, "node-a"), mt.Ep("10.180.0.6", 8080, "node-a")))
			l.sync(t, snap, true)
			if got := l.counts(t, "tcp", "10.180.0.1:30080", 20); got["poda"]+got["podb"] != 20 {
				t.Fatalf("NodePort on the node address: %v", got)
			}
			if after := l.foreignState(t); after != before {
				t.Fatalf("kubelet's / Docker's / the CNI's objects changed by a sync:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			// A restart: the new process's first sync lists the table again.
			l.backend = l.newBackend(t)
			l.sync(t, snap, true)
			if got := l.counts(t, "tcp", "10.180.0.1:30080", 5); got["poda"]+got["podb"] != 5 {
				t.Fatalf("NodePort after a restart: %v", got)
			}
			if after := l.foreignState(t); after != before {
				t.Fatalf("foreign objects changed by a restart's sync:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// TestKernelForeignKubeFirewallIPv6 (issue 15, defect 2): IPv6 never has
// localhost NodePorts, so a KUBE-FIREWALL in ip6tables (kube-proxy and
// kubelet make one per family) was always "stale" to the IPv6 sync.
func TestKernelForeignKubeFirewallIPv6(t *testing.T) {
	c := cfg()
	c.Families = []model.Family{model.IPv4, model.IPv6}
	c.ClusterCIDRs = append(c.ClusterCIDRs, mt.Prefixes("fd00:180::/64")...)
	l := newFLab(t, variantNFT, c, "10.180.0.5")
	netnstest.RequireRoot(t, "ip6tables", "ip6tables-save")
	for _, args := range []string{"-N KUBE-FIREWALL", "-A INPUT -j KUBE-FIREWALL", "-A OUTPUT -j KUBE-FIREWALL", "-A KUBE-FIREWALL -m rt --rt-type 0 -j DROP"} {
		l.xt(t, "ip6tables", append([]string{"-w", "5", "-t", "filter"}, strings.Fields(args)...)...)
	}
	before := l.xt(t, "ip6tables-save", "-t", "filter")
	v6 := mt.SP("ns", "v6", "", "fd00:30::10", 80, model.Endpoint{IP: netip.MustParseAddr("fd00:180::5"), Port: 8080, Ready: true, Serving: true, NodeName: "node-a"})
	v4 := mt.SP("ns", "v4", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	l.sync(t, mt.Snap(v4, v6), true)
	after := l.xt(t, "ip6tables-save", "-t", "filter")
	for _, want := range []string{":KUBE-FIREWALL", "-A INPUT -j KUBE-FIREWALL", "-A OUTPUT -j KUBE-FIREWALL", "-A KUBE-FIREWALL -m rt --rt-type 0 -j DROP"} {
		if !strings.Contains(after, want) {
			t.Errorf("ip6tables lost %q:\nbefore:\n%s\nafter:\n%s", want, before, after)
		}
	}
	if got := l.counts(t, "tcp", "172.30.0.3:80", 3); got["poda"] != 3 {
		t.Fatalf("IPv4 ClusterIP: %v", got)
	}
	if err := l.newBackend(t).Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if after := l.xt(t, "ip6tables-save", "-t", "filter"); !strings.Contains(after, "-A INPUT -j KUBE-FIREWALL") || strings.Contains(after, "KUBE-SERVICES") {
		t.Fatalf("ip6tables after cleanup:\n%s", after)
	}
}

// TestKernelForeignObjectsUntouched (issue 15 fault suite): Docker's,
// kubelet's and a CNI's chains and rules survive full syncs, partial syncs,
// a restart and --cleanup unchanged, with both iptables backends.
func TestKernelForeignObjectsUntouched(t *testing.T) {
	for _, v := range []variant{variantNFT, variantLegacy} {
		t.Run(v.name, func(t *testing.T) {
			l := newFLab(t, v, cfg(), "10.180.0.5", "10.180.0.6")
			addForeignObjects(t, l)
			before := l.foreignState(t)
			check := func(step string) {
				t.Helper()
				if after := l.foreignState(t); after != before {
					t.Fatalf("%s changed other software's objects:\nbefore:\n%s\nafter:\n%s", step, before, after)
				}
			}
			a := nodePortSP("a", "172.30.0.3", 30080, mt.Ep("10.180.0.5", 8080, "node-a"))
			b := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
			l.sync(t, mt.Snap(a, b), true)
			check("a full sync")
			if got := l.counts(t, "tcp", "172.30.0.4:80", 3); got["podb"] != 3 {
				t.Fatalf("ClusterIP after the full sync: %v", got)
			}
			b2 := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
			s2 := mt.Snap(a, b2)
			l.sync(t, s2, false)
			check("a partial sync")
			l.sync(t, mt.Snap(b2), false)
			check("a partial sync removing a Service")
			l.sync(t, s2, true)
			check("a second full sync")
			l.backend = l.newBackend(t)
			l.sync(t, mt.Snap(b2), true)
			check("a restart's first sync")
			if got := l.counts(t, "tcp", "172.30.0.4:80", 3); got["poda"] != 3 {
				t.Fatalf("ClusterIP after the restart: %v", got)
			}
			if err := l.newBackend(t).Cleanup(context.Background()); err != nil {
				t.Fatalf("cleanup: %v", err)
			}
			check("--cleanup")
			for _, table := range []string{"nat", "filter"} {
				for _, line := range strings.Split(l.xt(t, "iptables-save", "-t", table), "\n") {
					if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], ":") && ownedChain(Table(table), f[0][1:]) {
						t.Errorf("cleanup left our chain %s in %s", f[0][1:], table)
					}
				}
			}
		})
	}
}

// TestKernelForeignJumpIntoStaleChain: someone else's rule jumps to a chain
// of ours that a sync wants to delete. The sync must not fail: the chain is
// emptied and kept, the log says so, and cleanup likewise.
func TestKernelForeignJumpIntoStaleChain(t *testing.T) {
	l := newFLab(t, variantNFT, cfg(), "10.180.0.5", "10.180.0.6")
	a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	b := mt.SP("ns", "b", "", "172.30.0.4", 80, mt.Ep("10.180.0.6", 8080, "node-a"))
	l.sync(t, mt.Snap(a, b), true)
	svcA := l.backend.families[0].r.namesFor(a).svc
	l.script(t, "-t nat -N OTHER-AGENT", "-t nat -A OTHER-AGENT -d 192.0.2.1/32 -j "+svcA, "-t nat -A PREROUTING -j OTHER-AGENT")

	// A partial sync removes a.
	l.sync(t, mt.Snap(b), false)
	if !strings.Contains(l.log.String(), svcA) {
		t.Errorf("the log does not name the chain kept for someone else's jump:\n%s", l.log.String())
	}
	save := l.xt(t, "iptables-save", "-t", "nat")
	if !strings.Contains(save, "-A OTHER-AGENT -d 192.0.2.1/32 -j "+svcA) {
		t.Fatalf("the other agent's rule is gone:\n%s", save)
	}
	if strings.Contains(save, "-A "+svcA+" ") {
		t.Fatalf("the stale chain kept for the other agent still has rules:\n%s", save)
	}
	if got := l.counts(t, "tcp", "172.30.0.4:80", 3); got["podb"] != 3 {
		t.Fatalf("b after the partial sync: %v", got)
	}
	// A restart lists the stale chain as a leftover and wants it deleted.
	l.backend = l.newBackend(t)
	l.sync(t, mt.Snap(b), true)
	if got := l.counts(t, "tcp", "172.30.0.4:80", 3); got["podb"] != 3 {
		t.Fatalf("b after the restart: %v", got)
	}
	if err := l.newBackend(t).Cleanup(context.Background()); err != nil {
		t.Fatalf("cleanup with someone else's jump into our chain: %v", err)
	}
	save = l.xt(t, "iptables-save", "-t", "nat")
	if !strings.Contains(save, "-A OTHER-AGENT -d 192.0.2.1/32 -j "+svcA) || strings.Contains(save, "KUBE-SERVICES") {
		t.Fatalf("after cleanup:\n%s", save)
	}
}

// TestKernelCleanupRouteLocalnet (issue 15, defect 5): --cleanup must not
// leave route_localnet=1 without the localnet guard (CVE-2020-8558). What
// miniproxy set it restores; what someone else set keeps the guard.
func TestKernelCleanupRouteLocalnet(t *testing.T) {
	snap := mt.Snap(nodePortSP("np", "172.30.0.3", 30080, mt.Ep("10.180.0.5", 8080, "node-a")))
	guardPresent := func(t *testing.T, l *flab) bool {
		t.Helper()
		save := l.xt(t, "iptables-save", "-t", "filter")
		var chain, hook bool
		for _, line := range strings.Split(save, "\n") {
			if strings.Contains(line, "-d 127.0.0.0/8") && strings.Contains(line, "! --ctstate RELATED,ESTABLISHED,DNAT") && strings.HasSuffix(line, "-j DROP") {
				chain = true
			}
			if strings.HasPrefix(line, "-A INPUT ") && strings.Contains(line, "-j "+ChainLocalnetGuard) {
				hook = true
			}
		}
		return chain && hook
	}

	t.Run("set-by-miniproxy", func(t *testing.T) {
		l := newFLab(t, variantNFT, cfg(), "10.180.0.5")
		if v := l.sysctl(t, routeLocalnet); v != "0" {
			t.Fatalf("a new namespace has route_localnet=%s", v)
		}
		l.sync(t, snap, true)
		if v := l.sysctl(t, routeLocalnet); v != "1" || !guardPresent(t, l) {
			t.Fatalf("after a sync with localhost NodePorts: route_localnet=%s, guard %v", v, guardPresent(t, l))
		}
		// --cleanup is another process.
		if err := l.newBackend(t).Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
		if v := l.sysctl(t, routeLocalnet); v != "0" {
			t.Fatalf("cleanup removed the guard but left route_localnet=%s (CVE-2020-8558)", v)
		}
		if guardPresent(t, l) {
			t.Fatal("cleanup left the guard although it restored route_localnet=0")
		}
	})
	t.Run("set-by-someone-else", func(t *testing.T) {
		l := newFLab(t, variantNFT, cfg(), "10.180.0.5")
		l.node.MustRun(t, "sysctl", "-q", "-w", routeLocalnet+"=1")
		l.sync(t, snap, true)
		if err := l.newBackend(t).Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
		if v := l.sysctl(t, routeLocalnet); v != "1" {
			t.Fatalf("cleanup changed route_localnet=1 that miniproxy did not set: now %s", v)
		}
		if !guardPresent(t, l) {
			t.Fatal("cleanup removed the localnet guard while route_localnet stays 1 (CVE-2020-8558)")
		}
	})
	t.Run("restart-without-localhost-nodeports", func(t *testing.T) {
		l := newFLab(t, variantNFT, cfg(), "10.180.0.5")
		l.sync(t, snap, true)
		// The node is reconfigured with --nodeport-addresses and restarted.
		l.cfg.NodePortAddresses = mt.Prefixes("10.180.0.0/24")
		l.backend = l.newBackend(t)
		l.sync(t, snap, true)
		if v := l.sysctl(t, routeLocalnet); v != "0" {
			t.Fatalf("route_localnet=%s after miniproxy stopped needing it", v)
		}
		if guardPresent(t, l) {
			t.Fatal("guard left although route_localnet was restored")
		}
		if got := l.counts(t, "tcp", "10.180.0.1:30080", 3); got["poda"] != 3 {
			t.Fatalf("NodePort after the restart: %v", got)
		}
	})
}

// TestKernelXtablesLock (issue 15 fault suite): another process holds the
// xtables lock for 10 s. iptables-legacy takes it for every change: the sync
// waits, retries, says so in the log, and succeeds once the lock is free.
// iptables-nft does not use the lock at all (nf_tables commits are
// transactions): the sync goes through while the lock is still held.
//
// The lock is a private file (XTABLES_LOCKFILE), not /run/xtables.lock: that
// one is shared by every namespace of the host, and holding it for 10 s
// would stall every other legacy iptables user on the machine.
func TestKernelXtablesLock(t *testing.T) {
	netnstest.RequireRoot(t, "flock")
	for _, v := range []variant{variantLegacy, variantNFT} {
		t.Run(v.name, func(t *testing.T) {
			lock := filepath.Join(t.TempDir(), "xtables.lock")
			if err := os.WriteFile(lock, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			l := newFLab(t, v, cfg(), "10.180.0.5")
			l.lock = lock
			l.backend = l.newBackend(t)
			holder := exec.Command("flock", "--exclusive", lock, "sleep", "10")
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			released := make(chan struct{})
			go func() { _ = holder.Wait(); close(released) }()
			t.Cleanup(func() { _ = holder.Process.Kill(); <-released })
			// Wait (bounded) until the holder has the lock.
			for i := 0; ; i++ {
				if err := exec.Command("flock", "--nonblock", lock, "true").Run(); err != nil {
					break
				}
				if i == 100 {
					t.Fatal("the holder never took the lock")
				}
				time.Sleep(50 * time.Millisecond)
			}
			a := mt.SP("ns", "a", "", "172.30.0.3", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
			l.sync(t, mt.Snap(a), true)
			select {
			case <-released:
				if v.name == "nft" {
					t.Fatal("iptables-nft waited for the xtables lock")
				}
				if !strings.Contains(l.log.String(), "xtables lock") {
					t.Errorf("the log does not say the sync waited for the xtables lock:\n%s", l.log.String())
				}
			default:
				if v.name == "legacy" {
					t.Fatal("iptables-legacy synced while another process held the xtables lock; the test proves nothing")
				}
			}
			if got := l.counts(t, "tcp", "172.30.0.3:80", 3); got["poda"] != 3 {
				t.Fatalf("after the sync: %v", got)
			}
		})
	}
}
