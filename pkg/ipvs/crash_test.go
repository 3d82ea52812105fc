package ipvs

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/guest/glab"
)

// The crash tests run the backend in a child process (this test binary,
// re-executed as TestCrashChild) and SIGKILL it, then start a fresh backend
// on the same namespace, as a restarted miniproxy (or `miniproxy --cleanup`)
// would be.

// crashChildEnv carries a childSpec (JSON) to TestCrashChild.
const crashChildEnv = "MINIPROXY_IPVS_CRASH_CHILD"

// Sizes of the large-sync crash test, overridable from the environment (the
// host's TestGuest forwards them into the guest).
const (
	crashServicesEnv = "MINIPROXY_IPVS_CRASH_SERVICES"
	crashTrialsEnv   = "MINIPROXY_IPVS_CRASH_TRIALS"
	crashSeedEnv     = "MINIPROXY_IPVS_CRASH_SEED"
)

type childSpec struct {
	NetNS    string `json:"netns"`
	Services int    `json:"services"`
	Seed     uint64 `json:"seed"`
	// NodePortCIDR restricts NodePorts (--nodeport-addresses); empty: all.
	NodePortCIDR string `json:"nodeport_cidr,omitempty"`
	// KillAfterVirtualServers SIGKILLs the child once its virtual servers
	// exist, before addresses are bound and the nftables table is written.
	KillAfterVirtualServers bool `json:"kill_after_virtual_servers,omitempty"`
}

func (s childSpec) config() proxy.Config {
	cfg := proxy.Config{NetNS: proxy.NetNS(s.NetNS), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(glab.ClusterNet)}}
	if s.NodePortCIDR != "" {
		cfg.NodePortAddresses = []netip.Prefix{netip.MustParsePrefix(s.NodePortCIDR)}
	}
	return cfg
}

// TestCrashChild is the process the crash tests kill. It does nothing unless
// started by them.
func TestCrashChild(t *testing.T) {
	raw := os.Getenv(crashChildEnv)
	if raw == "" {
		t.Skip("helper process of the IPVS crash tests")
	}
	var spec childSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		t.Fatalf("child spec: %v", err)
	}
	be, err := New(spec.config(), Options{})
	if err != nil {
		t.Fatalf("child backend: %v", err)
	}
	if spec.KillAfterVirtualServers {
		be.afterVirtualServers = func() {
			_ = unix.Kill(os.Getpid(), unix.SIGKILL)
			select {} // the signal is on its way
		}
	}
	s := crashSnap(spec.Services, spec.Seed)
	fmt.Println("SYNC-START")
	_, err = be.Sync(context.Background(), s, true)
	if err != nil {
		fmt.Println("SYNC-DONE", err)
		t.Fatal(err)
	}
	fmt.Println("SYNC-DONE ok")
}

// crashSnap is n NodePort Services (ClusterIP 10.96.x.y, NodePort 30000+i),
// each with 1–3 endpoints. Seed 0 keeps every Service; any other seed drops
// about a quarter and varies the endpoints, so two seeds differ in which
// virtual servers exist and in their real servers.
func crashSnap(n int, seed uint64) *model.Snapshot {
	var sps []*model.ServicePort
	for i := 0; i < n; i++ {
		r := rand.New(rand.NewPCG(seed, uint64(i)))
		if seed != 0 && r.IntN(4) == 0 {
			continue
		}
		sp := service(fmt.Sprintf("svc-%d", i), fmt.Sprintf("10.96.%d.%d", 1+i/250, 1+i%250), model.TCP, 0)
		sp.NodePort = int32(30000 + i)
		first := r.IntN(8)
		for j := 0; j < 1+r.IntN(3); j++ {
			sp.Endpoints = append(sp.Endpoints, model.Endpoint{IP: netip.MustParseAddr(glab.PodIP((first + j) % 8)),
				Port: glab.PodPort, Ready: true, Serving: true, NodeName: "node1"})
		}
		sps = append(sps, sp)
	}
	return snap(sps...)
}

// childNSPath names the lab's node namespace for another process.
func (l *lab) childNSPath() string {
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(l.Node))
}

// runChild runs TestCrashChild with spec. With killAfter >= 0 the child is
// SIGKILLed that long after it starts its sync (unless it finished first).
// It reports whether SIGKILL ended the child and how long a finished sync
// took.
func runChild(t *testing.T, spec childSpec, killAfter time.Duration) (killed bool, took time.Duration) {
	t.Helper()
	exe, err := os.Executable()
	glab.Must(t, err, "own executable")
	js, _ := json.Marshal(spec)
	cmd := exec.Command(exe, "-test.run", "^TestCrashChild$", "-test.count", "1", "-test.timeout", "5m")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+string(js))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	glab.Must(t, err, "child stdout")
	glab.Must(t, cmd.Start(), "start child")
	var (
		start   time.Time
		timer   *time.Timer
		lines   []string
		syncErr string
	)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		lines = append(lines, line)
		switch {
		case line == "SYNC-START":
			start = time.Now()
			if killAfter >= 0 {
				timer = time.AfterFunc(killAfter, func() { _ = cmd.Process.Signal(syscall.SIGKILL) })
			}
		case strings.HasPrefix(line, "SYNC-DONE"):
			took = time.Since(start)
			if line != "SYNC-DONE ok" {
				syncErr = line
			}
		}
	}
	if timer != nil {
		timer.Stop()
	}
	werr := cmd.Wait()
	var ee *exec.ExitError
	if errors.As(werr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true, 0
		}
	}
	if werr != nil || syncErr != "" {
		t.Fatalf("child failed (%v, %s):\nstdout: %s\nstderr: %s", werr, syncErr, strings.Join(lines, "\n"), stderr.String())
	}
	return false, took
}

// foreignVS is a virtual server other software made, with its real servers.
type foreignVS struct {
	svc   *mobyipvs.Service
	reals map[netip.AddrPort]int
}

// addForeigns creates virtual servers miniproxy does not own, the way
// keepalived or Docker's swarm mode would: on a node address (with a real
// server), on an address the node does not have, a UDP one on a port in the
// NodePort range no Service uses, and a firewall-mark one.
func (l *lab) addForeigns(t *testing.T) []foreignVS {
	t.Helper()
	h := l.ipvsHandle(t)
	v4 := func(ip string, proto uint16, port uint16) *mobyipvs.Service {
		return &mobyipvs.Service{Address: net.ParseIP(ip).To4(), Protocol: proto, Port: port,
			AddressFamily: unix.AF_INET, SchedName: "rr", Netmask: 0xffffffff}
	}
	fs := []foreignVS{
		{v4(glab.NodeIP, unix.IPPROTO_TCP, 9999), map[netip.AddrPort]int{netip.MustParseAddrPort(glab.PodIP(0) + ":7000"): 3}},
		{v4("172.31.255.1", unix.IPPROTO_TCP, 80), map[netip.AddrPort]int{netip.MustParseAddrPort(glab.PodIP(1) + ":7000"): 1}},
		{v4(glab.NodeIP, unix.IPPROTO_UDP, 32000), nil},
		{&mobyipvs.Service{FWMark: 77, AddressFamily: unix.AF_INET, SchedName: "rr", Netmask: 0xffffffff}, nil},
	}
	for _, f := range fs {
		glab.Must(t, h.NewService(f.svc), "foreign virtual server")
		for a, w := range f.reals {
			glab.Must(t, h.NewDestination(f.svc, ipvsDest(a, w)), "foreign real server")
		}
	}
	return fs
}

// checkForeign fails unless every foreign virtual server is present with
// exactly its own real servers.
func checkForeign(t *testing.T, h *mobyipvs.Handle, fs []foreignVS, when string) {
	t.Helper()
	for _, f := range fs {
		name := fmt.Sprintf("%s:%d/%d fwmark %d", net.IP(f.svc.Address), f.svc.Port, f.svc.Protocol, f.svc.FWMark)
		if !h.IsServicePresent(f.svc) {
			t.Fatalf("%s: someone else's virtual server %s was removed", when, name)
		}
		ds, err := h.GetDestinations(f.svc)
		glab.Must(t, err, "foreign real servers")
		got := map[netip.AddrPort]int{}
		for _, d := range ds {
			a, _ := netip.AddrFromSlice(d.Address)
			got[netip.AddrPortFrom(a.Unmap(), d.Port)] = d.Weight
		}
		if len(got) != len(f.reals) {
			t.Fatalf("%s: real servers of someone else's %s changed: %v, want %v", when, name, got, f.reals)
		}
		for a, w := range f.reals {
			if got[a] != w {
				t.Fatalf("%s: real servers of someone else's %s changed: %v, want %v", when, name, got, f.reals)
			}
		}
	}
}

// ownedLeft lists the virtual servers in the kernel that are not foreign.
func ownedLeft(t *testing.T, h *mobyipvs.Handle, fs []foreignVS) []Key {
	t.Helper()
	svcs, err := h.GetServices()
	glab.Must(t, err, "list virtual servers")
	foreign := map[Key]bool{}
	for _, f := range fs {
		if k, ok := keyOf(f.svc); ok {
			foreign[k] = true
		}
	}
	var out []Key
	for _, s := range svcs {
		if k, ok := keyOf(s); ok && !foreign[k] {
			out = append(out, k)
		}
	}
	slices.SortFunc(out, func(a, b Key) int {
		if a.less(b) {
			return -1
		}
		if b.less(a) {
			return 1
		}
		return 0
	})
	return out
}

// checkConverged fails unless the kernel holds exactly the virtual servers
// be last synced (besides the foreign ones), each with exactly its real
// servers: nothing duplicate, stale or missing.
func checkConverged(t *testing.T, h *mobyipvs.Handle, be *Backend, fs []foreignVS, when string) {
	t.Helper()
	left := ownedLeft(t, h, fs)
	if len(left) != len(be.lastVS) {
		var stale []string
		for _, k := range left {
			if be.lastVS[k] == nil {
				stale = append(stale, k.String())
			}
		}
		t.Fatalf("%s: %d virtual servers in the kernel, %d wanted; stale: %v", when, len(left), len(be.lastVS), stale)
	}
	for _, k := range left {
		vs := be.lastVS[k]
		if vs == nil {
			t.Fatalf("%s: stale virtual server %s", when, k)
		}
		ds, err := h.GetDestinations(ipvsService(k, nil))
		glab.Must(t, err, "real servers")
		got := map[netip.AddrPort]int{}
		for _, d := range ds {
			a, _ := netip.AddrFromSlice(d.Address)
			got[netip.AddrPortFrom(a.Unmap(), d.Port)] = d.Weight
		}
		for _, rs := range vs.Reals {
			if got[rs.Addr] != rs.Weight {
				t.Fatalf("%s: %s real servers %v, want %v", when, k, got, vs.Reals)
			}
			delete(got, rs.Addr)
		}
		// A real server left over from before the crash may only remain
		// draining (weight 0), as after any endpoint removal.
		for a, w := range got {
			if w != 0 {
				t.Fatalf("%s: %s keeps stale real server %s at weight %d", when, k, a, w)
			}
		}
	}
	checkForeign(t, h, fs, when)
}

func restartSync(t *testing.T, cfg proxy.Config, nsPath string, s *model.Snapshot) *Backend {
	t.Helper()
	cfg.NetNS = proxy.NetNS(nsPath)
	be, err := New(cfg, Options{})
	glab.Must(t, err, "restarted backend")
	t.Cleanup(func() { _ = be.Close() })
	if _, err := be.Sync(context.Background(), s, true); err != nil {
		t.Fatalf("first sync after restart: %v", err)
	}
	return be
}

// testCrashBetweenCreateAndRecord kills the backend after it created its
// virtual servers and before it bound addresses or wrote its nftables table,
// then checks that a restart, and separately --cleanup, remove every virtual
// server it made (NodePort ones on node addresses included) and nothing else.
func testCrashBetweenCreateAndRecord(t *testing.T) {
	l := newLab(t, 3, Options{})
	fs := l.addForeigns(t)
	h := l.ipvsHandle(t)
	spec := childSpec{NetNS: l.childNSPath(), Services: 10, KillAfterVirtualServers: true}
	crash := func() {
		t.Helper()
		if killed, _ := runChild(t, spec, -1); !killed {
			t.Fatalf("the child finished its sync; it should have been killed after creating its virtual servers")
		}
		// 10 ClusterIPs + 10 NodePorts on each of the node's 5 addresses.
		if n := len(ownedLeft(t, h, fs)); n != 60 {
			t.Fatalf("after the kill: %d virtual servers of the child's, want 60", n)
		}
	}

	crash()
	// The restarted process's snapshot no longer has those Services.
	be := restartSync(t, l.cfg, glab.NSPath(l.Node), snap())
	if left := ownedLeft(t, h, fs); len(left) != 0 {
		t.Fatalf("a restart after a SIGKILL between creating and recording leaked %d virtual servers: %v", len(left), left)
	}
	checkForeign(t, h, fs, "after restart")

	crash()
	glab.Must(t, be.Close(), "close")
	be2, err := New(l.cfg, Options{})
	glab.Must(t, err, "cleanup backend")
	defer be2.Close()
	glab.Must(t, be2.Cleanup(context.Background()), "--cleanup")
	if left := ownedLeft(t, h, fs); len(left) != 0 {
		t.Fatalf("--cleanup after a SIGKILL between creating and recording left %d virtual servers: %v", len(left), left)
	}
	checkForeign(t, h, fs, "after --cleanup")
}

// testForeignVirtualServersSurvive checks that other software's virtual
// servers (never in miniproxy's record) survive full and partial syncs, a
// crash and restart, and --cleanup, real servers included.
func testForeignVirtualServersSurvive(t *testing.T) {
	l := newLab(t, 3, Options{})
	fs := l.addForeigns(t)
	h := l.ipvsHandle(t)
	both := snap(service("web", vip, model.TCP, 3, func(sp *model.ServicePort) { sp.NodePort = 30080 }),
		service("dns", "10.96.0.11", model.UDP, 2, func(sp *model.ServicePort) { sp.NodePort = 30053 }))
	l.sync(both, true)
	checkConverged(t, h, l.be, fs, "full sync")
	l.sync(snap(service("web", vip, model.TCP, 2, func(sp *model.ServicePort) { sp.NodePort = 30080 })), false)
	checkConverged(t, h, l.be, fs, "partial sync removing a Service")
	l.sync(snap(), true)
	checkConverged(t, h, l.be, fs, "full sync of nothing")
	if killed, _ := runChild(t, childSpec{NetNS: l.childNSPath(), Services: 5, KillAfterVirtualServers: true}, -1); !killed {
		t.Fatalf("child not killed")
	}
	checkForeign(t, h, fs, "after a crash")
	be := restartSync(t, l.cfg, glab.NSPath(l.Node), both)
	checkConverged(t, h, be, fs, "restart")
	glab.Must(t, be.Cleanup(context.Background()), "--cleanup")
	if left := ownedLeft(t, h, fs); len(left) != 0 {
		t.Fatalf("--cleanup left %v", left)
	}
	checkForeign(t, h, fs, "after --cleanup")
	nh, err := netlink.NewHandleAt(l.Node, unix.NETLINK_ROUTE)
	glab.Must(t, err, "netlink")
	defer nh.Close()
	if _, err := nh.LinkByName(DefaultInterface); err == nil {
		t.Fatalf("--cleanup left %s", DefaultInterface)
	}
}

// testSIGKILLDuringLargeSync kills a backend at random moments of a large
// full sync, restarts with a different snapshot, and checks the kernel holds
// exactly what was wanted, then that --cleanup leaves only foreign objects.
func testSIGKILLDuringLargeSync(t *testing.T) {
	n := envInt(crashServicesEnv, 300)
	trials := envInt(crashTrialsEnv, 10)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		glab.Must(t, err, crashSeedEnv)
		seed = v
	}
	t.Logf("%d Services (a ClusterIP and a NodePort virtual server each), %d trials, %s=%d", n, trials, crashSeedEnv, seed)
	l := newLab(t, 0, Options{})
	fs := l.addForeigns(t)
	h := l.ipvsHandle(t)
	spec := childSpec{NetNS: l.childNSPath(), Services: n, NodePortCIDR: glab.NodeIP + "/32"}
	cfg := spec.config()

	// An uninterrupted sync measures how long the window to kill in is.
	spec.Seed = 1
	_, full := runChild(t, spec, -1)
	be := restartSync(t, cfg, glab.NSPath(l.Node), crashSnap(n, 1))
	checkConverged(t, h, be, fs, "uninterrupted sync")
	t.Logf("uninterrupted full sync of %d virtual servers: %v", len(be.lastVS), full.Round(time.Millisecond))
	glab.Must(t, be.Close(), "close")

	rng := rand.New(rand.NewPCG(seed, 0))
	killed := 0
	for i := 0; i < trials; i++ {
		spec.Seed = uint64(2*i + 2)
		after := time.Duration(rng.Int64N(int64(full) + 1))
		k, _ := runChild(t, spec, after)
		if k {
			killed++
		}
		when := fmt.Sprintf("trial %d (SIGKILL %v after sync start, landed mid-sync: %v)", i, after.Round(time.Millisecond), k)
		// The restarted process sees yet another version of the Services.
		start := time.Now()
		be := restartSync(t, cfg, glab.NSPath(l.Node), crashSnap(n, uint64(2*i+3)))
		took := time.Since(start)
		checkConverged(t, h, be, fs, when)
		t.Logf("%s: restart synced %d virtual servers in %v, converged", when, len(be.lastVS), took.Round(time.Millisecond))
		glab.Must(t, be.Close(), "close")
	}
	t.Logf("%d of %d trials killed mid-sync (the rest finished before their random moment)", killed, trials)
	be = restartSync(t, cfg, glab.NSPath(l.Node), crashSnap(n, 1))
	glab.Must(t, be.Cleanup(context.Background()), "--cleanup")
	if left := ownedLeft(t, h, fs); len(left) != 0 {
		t.Fatalf("--cleanup left %d virtual servers: %v", len(left), left)
	}
	checkForeign(t, h, fs, "after --cleanup")
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
