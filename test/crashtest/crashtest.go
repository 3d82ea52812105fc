// Package crashtest SIGKILLs a real backend process at random points of a
// large sync and checks what the kernel holds afterwards. It is the fault
// suite's "miniproxy SIGKILLed at random points of a large sync" row for the
// modes this kernel has (iptables, nftables); the backends' kernel tests
// drive it (pkg/iptables, pkg/nftables: TestKernelCrash*).
//
// The process that is killed is the backend package's own test binary,
// started again inside a private network namespace (`ip netns exec NS
// <test binary> -test.run=^TestKernelCrashChild$`) with the environment
// naming what to sync. It builds the same snapshots as the parent and runs the
// backend exactly as cmd/miniproxy does (New + Sync in the namespace it runs
// in, full on the first sync), printing a line before and after each sync.
// The parent kills the child's whole process group (the agent and the
// iptables-restore it may be running, as a container runtime or the OOM
// killer of a cgroup would) after a random delay drawn over the measured
// duration of the sync it targets, samples the kernel, starts a fresh child
// that syncs the next snapshot (a restarted agent) and compares the kernel
// with a clean cold sync of that snapshot in a fresh namespace.
//
// The kernel's state is reduced by the backend to named units (a table, a
// Service's rules, the hooks, other software's objects) with canonical text,
// so the checks are plain comparisons:
//   - right after a kill, every unit is as it was before the killed sync or as
//     the killed sync wanted it (atomicity: a Service keeps its old rules or
//     has its new ones, never a half); units the backend commits together in
//     that kind of sync come from the same side;
//   - after the restart, the kernel equals the clean cold sync: nothing stale,
//     nothing duplicated, other software's objects unchanged.
package crashtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// Environment variables. The parent sets every parameter in the child's
// environment explicitly, so the child builds the same snapshots.
const (
	// EnvServices is the number of Services of snapshot A (default 1000;
	// `make e2e` sets 10000).
	EnvServices = "MINIPROXY_CRASH_SERVICES"
	// EnvTrials is the number of kill trials per mode (default 10, the fault suite's minimum; 3 with -short).
	EnvTrials = "MINIPROXY_CRASH_TRIALS"
	// EnvSeed fixes the random kill delays (default: time-based, printed).
	EnvSeed = "MINIPROXY_CRASH_SEED"
	// EnvResults is the results directory (default <repo>/e2e-results).
	EnvResults = "MINIPROXY_E2E_RESULTS"

	envSteps     = "MINIPROXY_CRASH_STEPS"
	envEndpoints = "MINIPROXY_CRASH_ENDPOINTS"
	envChanged   = "MINIPROXY_CRASH_CHANGED"
	// ChildTest is the test the child runs.
	ChildTest = "TestKernelCrashChild"
	lineTag   = "crashtest:"
)

// Params are the sizes of one run.
type Params struct {
	Services, Endpoints int
	// Changed is how many service ports B differs from A in (Change).
	Changed int
	Trials  int
	Seed    uint64
}

// Load reads the parameters from the environment, with smaller defaults under
// -short.
func Load(t testing.TB) Params {
	t.Helper()
	p := Params{Services: 1000, Endpoints: 3, Trials: 10, Seed: uint64(time.Now().UnixNano())}
	if testing.Short() {
		p.Trials = 3
	}
	for _, v := range []struct {
		env string
		dst *int
	}{{EnvServices, &p.Services}, {EnvTrials, &p.Trials}, {envEndpoints, &p.Endpoints}, {envChanged, &p.Changed}} {
		if s := os.Getenv(v.env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 {
				t.Fatalf("%s=%q: want a non-negative integer", v.env, s)
			}
			*v.dst = n
		}
	}
	if s := os.Getenv(EnvSeed); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", EnvSeed, s, err)
		}
		p.Seed = n
	}
	if p.Changed == 0 {
		// A few hundred at 10k: a rolling update of many Deployments,
		// so kills also land in partial syncs of some size.
		p.Changed = max(20, p.Services*3/100)
	}
	return p
}

func (p Params) env() []string {
	return []string{
		fmt.Sprintf("%s=%d", EnvServices, p.Services), fmt.Sprintf("%s=%d", envEndpoints, p.Endpoints),
		fmt.Sprintf("%s=%d", envChanged, p.Changed),
	}
}

// Change returns a snapshot that differs from a in n service ports, the
// kinds of change a busy cluster makes between two syncs: a quarter of them
// get a new endpoint in place of their first, a quarter are removed, a
// quarter lose every endpoint (a Deployment scaled to zero) and a quarter are
// new Services (namespace "crash", ClusterIPs 172.31.0.0/16, endpoints
// 10.251.0.0/16, outside both backends' scale generators). Unchanged ports
// are shared by pointer, as the watch layer shares them. Going back from the
// result to a exercises the reverse of each change.
func Change(a *model.Snapshot, n int) *model.Snapshot {
	b := &model.Snapshot{Node: a.Node, Services: make(map[model.ServicePortName]*model.ServicePort, len(a.Services)+n/4), Generation: a.Generation + 1}
	for k, v := range a.Services {
		b.Services[k] = v
	}
	sorted := a.Sorted()
	quarter := max(n/4, 1)
	step := max(len(sorted)/(3*quarter), 1)
	pick := 0
	next := func() *model.ServicePort {
		if pick >= len(sorted) {
			return nil
		}
		sp := sorted[pick]
		pick += step
		return sp
	}
	for i := 0; i < quarter; i++ {
		if sp := next(); sp != nil && len(sp.Endpoints) > 0 {
			cp := *sp
			cp.Endpoints = slices.Clone(sp.Endpoints)
			cp.Endpoints[0].IP = netip.AddrFrom4([4]byte{10, 250, byte(i >> 8), byte(i)})
			b.Services[cp.Name] = &cp
		}
		if sp := next(); sp != nil {
			delete(b.Services, sp.Name)
		}
		if sp := next(); sp != nil {
			cp := *sp
			cp.Endpoints = nil
			b.Services[cp.Name] = &cp
		}
		add := &model.ServicePort{
			Name:       model.ServicePortName{Namespace: "crash", Name: fmt.Sprintf("added-%d", i), Protocol: model.TCP},
			ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{172, 31, byte(i >> 8), byte(i)})},
			Port:       80, Protocol: model.TCP,
		}
		for j := 0; j < 3; j++ {
			k := i*3 + j
			add.Endpoints = append(add.Endpoints, model.Endpoint{
				IP:   netip.AddrFrom4([4]byte{10, 251, byte(k >> 8), byte(k)}),
				Port: 8080, Ready: true, Serving: true, NodeName: "node-b",
			})
		}
		b.Services[add.Name] = add
	}
	return b
}

// Snapshots builds A (of p.Services) and B = Change(A).
type Snapshots func(p Params) (a, b *model.Snapshot)

// SyncFunc is one backend sync, as the agent's runner calls it.
type SyncFunc func(ctx context.Context, snap *model.Snapshot, full bool) error

// Child runs the child side when this process was started as a crash child
// and returns without doing anything otherwise. newBackend must build the
// backend exactly as cmd/miniproxy does, acting on the namespace the process
// runs in.
func Child(t *testing.T, snaps Snapshots, newBackend func() (SyncFunc, error)) {
	steps := os.Getenv(envSteps)
	if steps == "" {
		return
	}
	p := Load(t)
	a, b := snaps(p)
	sync, err := newBackend()
	if err != nil {
		t.Fatalf("backend: %v", err)
	}
	in := bufio.NewScanner(os.Stdin)
	first := true
	for _, step := range strings.Split(steps, ",") {
		var snap *model.Snapshot
		switch step {
		case "A":
			snap = a
		case "B":
			snap = b
		case "pause":
			fmt.Printf("%s paused\n", lineTag)
			in.Scan()
			continue
		default:
			t.Fatalf("unknown step %q", step)
		}
		fmt.Printf("%s start %s\n", lineTag, step)
		start := time.Now()
		if err := sync(context.Background(), snap, first); err != nil {
			fmt.Printf("%s failed %s %v\n", lineTag, step, err)
			t.Fatalf("sync %s: %v", step, err)
		}
		fmt.Printf("%s synced %s %d\n", lineTag, step, time.Since(start).Microseconds())
		first = false
	}
}

// State is the kernel's state reduced to named units with canonical text.
type State map[string]string

// Phase is the kind of sync a kill targets.
type Phase string

const (
	// Cold: the first sync of a process in a namespace holding none of
	// its rules (a new node).
	Cold Phase = "cold"
	// First: the first sync of a process over a complete ruleset of the
	// other snapshot (a restart while Services changed).
	First Phase = "first"
	// Partial: a later sync of a running process (Services changed).
	Partial Phase = "partial"
)

// Mode is one backend (or backend variant) under test.
type Mode struct {
	Name string
	// Column is the e2e matrix's mode column ("iptables", "nftables");
	// Variant, if set, is added to the row's feature name.
	Column, Variant string
	// Env is added to the child's environment (e.g. a PATH that selects
	// iptables-legacy).
	Env []string
	// Foreign creates other software's objects in a fresh namespace.
	Foreign func(t testing.TB, ns *netnstest.NS)
	// Dump reads the namespace's state.
	Dump func(ctx context.Context, ns *netnstest.NS) (State, error)
	// Group says, for a kill during a sync of kind phase, which
	// transaction unit u is committed in (units of one group must all be
	// old or all new) and whether u is checked at all right after a kill
	// (objects a sync leaves unreferenced on purpose are checked only
	// after the restart).
	Group func(phase Phase, u string) (group string, check bool)
	// Guarantee is a sentence for the results file.
	Guarantee string
}

// Trial is one kill and restart.
type Trial struct {
	N          int
	Phase      Phase
	From, To   string // the kernel held From; the killed sync wanted To
	Window     time.Duration
	Delay      time.Duration
	Landed     string // "during sync of X" or "after sync of X"
	Sample     string // what the kernel held right after the kill
	Restart    time.Duration
	RestartAll time.Duration // process start to synced
	Err        string
}

// Report is one mode's run.
type Report struct {
	Column, Variant               string
	Mode                          string
	Params                        Params
	ColdSync, FirstSync, PartSync time.Duration
	Units                         int
	Trials                        []Trial
	Guarantee                     string
}

type event struct {
	kind, step string
	at         time.Time
	dur        time.Duration
	text       string
}

type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	events chan event
	mu     sync.Mutex
	out    strings.Builder
	done   chan struct{}
	start  time.Time
}

func (c *child) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.out.String()
	if len(s) > 4000 {
		s = "…" + s[len(s)-4000:]
	}
	return s
}

// startChild starts the test binary inside ns with the given steps.
func startChild(t testing.TB, m Mode, p Params, ns *netnstest.NS, steps string) *child {
	t.Helper()
	args := []string{"netns", "exec", ns.Name, os.Args[0], "-test.run=^" + ChildTest + "$", "-test.count=1"}
	cmd := exec.Command("ip", args...)
	cmd.Env = append(append(append(os.Environ(), p.env()...), m.Env...), envSteps+"="+steps)
	// Its own process group, so the kill takes the restore it may be
	// running along (ip netns exec execs the binary: same process).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c := &child{cmd: cmd, events: make(chan event, 16), done: make(chan struct{})}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = &lockedWriter{c: c}
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	c.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	t.Cleanup(func() { c.kill(); c.wait() })
	go func() {
		defer close(c.done)
		defer close(c.events)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			c.mu.Lock()
			c.out.WriteString(line + "\n")
			c.mu.Unlock()
			f := strings.Fields(strings.TrimPrefix(line, lineTag))
			if !strings.HasPrefix(line, lineTag) || len(f) == 0 {
				continue
			}
			e := event{kind: f[0], at: time.Now(), text: line}
			if len(f) > 1 {
				e.step = f[1]
			}
			if e.kind == "synced" && len(f) > 2 {
				us, _ := strconv.ParseInt(f[2], 10, 64)
				e.dur = time.Duration(us) * time.Microsecond
			}
			c.events <- e
		}
	}()
	return c
}

type lockedWriter struct{ c *child }

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	return w.c.out.Write(b)
}

func (c *child) kill() {
	if c.cmd.Process != nil {
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	}
}

func (c *child) wait() error {
	<-c.done
	return c.cmd.Wait()
}

// next waits for the child's next protocol line (bounded: a child that
// hangs fails the test instead of the suite's timeout).
func (c *child) next(t testing.TB, want string) event {
	t.Helper()
	select {
	case e, ok := <-c.events:
		if !ok {
			c.kill()
			err := c.wait()
			t.Fatalf("child exited (%v) while waiting for %q; output:\n%s", err, want, c.output())
		}
		if e.kind != want {
			t.Fatalf("child said %q, want %q; output:\n%s", e.text, want, c.output())
		}
		return e
	case <-time.After(10 * time.Minute):
		c.kill()
		t.Fatalf("child silent for 10 minutes waiting for %q; output:\n%s", want, c.output())
	}
	return event{}
}

// finish waits for a child to exit cleanly.
func (c *child) finish(t testing.TB) {
	t.Helper()
	for e := range c.events {
		t.Fatalf("unexpected child line %q", e.text)
	}
	if err := c.wait(); err != nil {
		t.Fatalf("child: %v; output:\n%s", err, c.output())
	}
}

// syncOnce runs a child that syncs steps (no kill) and returns the duration
// of its last sync.
func syncOnce(t testing.TB, m Mode, p Params, ns *netnstest.NS, steps ...string) (last time.Duration) {
	t.Helper()
	c := startChild(t, m, p, ns, strings.Join(steps, ","))
	for _, s := range steps {
		c.next(t, "start")
		last = c.next(t, "synced").dur
		_ = s
	}
	c.finish(t)
	return last
}

func dump(t testing.TB, m Mode, ns *netnstest.NS) State {
	t.Helper()
	s, err := m.Dump(context.Background(), ns)
	if err != nil {
		t.Fatalf("dump %s: %v", ns.Name, err)
	}
	return s
}

// Diff describes how got differs from want (empty if equal).
func Diff(got, want State) string {
	var b strings.Builder
	keys := unionKeys(got, want)
	n := 0
	for _, k := range keys {
		g, gok := got[k]
		w, wok := want[k]
		switch {
		case gok && !wok:
			fmt.Fprintf(&b, "extra unit %q:\n%s\n", k, clip(g))
		case !gok && wok:
			fmt.Fprintf(&b, "missing unit %q:\n%s\n", k, clip(w))
		case g != w:
			fmt.Fprintf(&b, "unit %q differs:\n%s\n", k, lineDiff(g, w))
		default:
			continue
		}
		if n++; n >= 8 {
			b.WriteString("…\n")
			break
		}
	}
	return b.String()
}

func unionKeys(states ...State) []string {
	seen := map[string]bool{}
	var keys []string
	for _, s := range states {
		for k := range s {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
	}
	sort.Strings(keys)
	return keys
}

func clip(s string) string {
	if len(s) > 1500 {
		return s[:1500] + "…"
	}
	return s
}

func lineDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	wset := map[string]int{}
	for _, l := range w {
		wset[l]++
	}
	gset := map[string]int{}
	for _, l := range g {
		gset[l]++
	}
	var b strings.Builder
	for _, l := range g {
		if wset[l] < gset[l] {
			fmt.Fprintf(&b, "  + %s\n", l)
			gset[l]--
		}
	}
	gset = map[string]int{}
	for _, l := range g {
		gset[l]++
	}
	for _, l := range w {
		if gset[l] < wset[l] {
			fmt.Fprintf(&b, "  - %s\n", l)
			wset[l]--
		}
	}
	if b.Len() == 0 {
		return "  (same lines, other order)\n"
	}
	return clip(b.String())
}

// Atomic checks a state sampled right after a kill of a sync of kind phase
// that went from before to target: every checked unit is as before or as
// target, and the units of one group all come from the same side. It
// returns a description of the sample ("old", "new", or the mix).
func Atomic(m Mode, phase Phase, got, before, target State) (string, error) {
	side := map[string]map[string]bool{} // group → sides seen
	var old, new, both int
	var errs []string
	for _, k := range unionKeys(got, before, target) {
		group, check := m.Group(phase, k)
		if !check {
			continue
		}
		g, b, w := got[k], before[k], target[k]
		var s string
		switch {
		case g == b && g == w:
			both++
			continue
		case g == b:
			s = "old"
			old++
		case g == w:
			s = "new"
			new++
		default:
			if len(errs) < 5 {
				want := "old " + lineDiff(g, b) + " new " + lineDiff(g, w)
				errs = append(errs, fmt.Sprintf("unit %q is neither as before nor as the sync wanted:\n%s", k, want))
			}
			continue
		}
		if side[group] == nil {
			side[group] = map[string]bool{}
		}
		side[group][s] = true
	}
	for group, s := range side {
		if len(s) > 1 && len(errs) < 8 {
			errs = append(errs, fmt.Sprintf("transaction %q is half applied: some units old, some new", group))
		}
	}
	desc := "old"
	switch {
	case new > 0 && old > 0:
		desc = fmt.Sprintf("mixed: %d units old, %d new", old, new)
	case new > 0:
		desc = "new"
	}
	if len(errs) > 0 {
		return desc, fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	return desc, nil
}

// Run measures the syncs, runs p.Trials kill trials and writes the results.
func Run(t *testing.T, m Mode, p Params, snaps Snapshots) *Report {
	t.Helper()
	rng := rand.New(rand.NewPCG(p.Seed, 0x6372617368))
	rep := &Report{Mode: m.Name, Column: m.Column, Variant: m.Variant, Params: p, Guarantee: m.Guarantee}
	t.Logf("%s: %d Services × %d endpoints, B differs in %d, %d trials, seed %d", m.Name, p.Services, p.Endpoints, p.Changed, p.Trials, p.Seed)

	// Every namespace gets the same foreign objects before miniproxy
	// runs in it, so states compare whole.
	fresh := func(t testing.TB) (*netnstest.NS, State) {
		ns := netnstest.New(t, "crash")
		m.Foreign(t, ns)
		return ns, dump(t, m, ns)
	}
	// The references: clean cold syncs of A and of B in fresh namespaces
	// (with the same foreign objects), and the durations the kill delays
	// are drawn over.
	main, _ := fresh(t)
	c := startChild(t, m, p, main, "A,pause,B,pause")
	c.next(t, "start")
	rep.ColdSync = c.next(t, "synced").dur
	c.next(t, "paused")
	golden := map[string]State{"A": dump(t, m, main)}
	fmt.Fprintln(c.stdin)
	c.next(t, "start")
	rep.PartSync = c.next(t, "synced").dur
	c.next(t, "paused")
	partialB := dump(t, m, main)
	fmt.Fprintln(c.stdin)
	c.finish(t)
	nsB, _ := fresh(t)
	syncOnce(t, m, p, nsB, "B")
	golden["B"] = dump(t, m, nsB)
	// Not needed any more, and it holds a large ruleset.
	_ = exec.Command("ip", "netns", "del", nsB.Name).Run()
	if d := Diff(partialB, golden["B"]); d != "" {
		t.Fatalf("a partial sync A→B does not produce what a cold sync of B does:\n%s", d)
	}
	// A restarted process over B, syncing A: the first-sync duration.
	rep.FirstSync = syncOnce(t, m, p, main, "A")
	if d := Diff(dump(t, m, main), golden["A"]); d != "" {
		t.Fatalf("a restart syncing A over B does not produce what a cold sync of A does:\n%s", d)
	}
	rep.Units = len(golden["A"])
	t.Logf("%s: cold sync %v, first sync over the other snapshot %v, partial sync A→B %v; %d units", m.Name, rep.ColdSync, rep.FirstSync, rep.PartSync, rep.Units)

	other := map[string]string{"A": "B", "B": "A"}
	cur := "A" // what main holds
	phases := []Phase{Cold, First, Partial}
	for i := 0; i < p.Trials; i++ {
		tr := Trial{N: i + 1, Phase: phases[i%len(phases)]}
		ns := main
		before := golden[cur]
		steps := ""
		switch tr.Phase {
		case Cold:
			tr.From, tr.To = "nothing", "A"
			steps = "A"
			tr.Window = rep.ColdSync
		case First:
			tr.From, tr.To = cur, other[cur]
			steps = tr.To
			tr.Window = rep.FirstSync
		case Partial:
			tr.From, tr.To = cur, other[cur]
			steps = cur + "," + tr.To
			tr.Window = rep.PartSync
		}
		restartTo := other[tr.From]
		if tr.Phase == Cold {
			restartTo = "B"
		}
		tr.Delay = time.Duration(rng.Int64N(int64(tr.Window) + 1))
		ok := t.Run(fmt.Sprintf("trial-%02d-%s", tr.N, tr.Phase), func(t *testing.T) {
			if tr.Phase == Cold {
				// Removed when the trial ends: each holds a large ruleset.
				ns, before = fresh(t)
			}
			c := startChild(t, m, p, ns, steps)
			if tr.Phase == Partial {
				c.next(t, "start")
				c.next(t, "synced")
			}
			st := c.next(t, "start")
			timer := time.NewTimer(time.Until(st.at.Add(tr.Delay)))
			tr.Landed = "during sync of " + tr.To
		wait:
			for {
				select {
				case <-timer.C:
					break wait
				case e, ok := <-c.events:
					if ok && e.kind == "synced" {
						tr.Landed = "after sync of " + tr.To
					}
					if !ok {
						break wait
					}
				}
			}
			c.kill()
			_ = c.wait()
			got := dump(t, m, ns)
			desc, err := Atomic(m, tr.Phase, got, before, golden[tr.To])
			tr.Sample = desc
			if err != nil {
				tr.Err = "half-applied state after the kill"
				t.Fatalf("after a kill %v into the %s sync %s→%s (%s): %v", tr.Delay, tr.Phase, tr.From, tr.To, tr.Landed, err)
			}
			// The restart: a fresh process, its first sync.
			c = startChild(t, m, p, ns, restartTo)
			c.next(t, "start")
			e := c.next(t, "synced")
			tr.Restart, tr.RestartAll = e.dur, e.at.Sub(c.start)
			c.finish(t)
			if d := Diff(dump(t, m, ns), golden[restartTo]); d != "" {
				tr.Err = "did not converge"
				t.Fatalf("after the restart the kernel differs from a clean cold sync of %s:\n%s", restartTo, d)
			}
		})
		if !ok && tr.Err == "" {
			tr.Err = "failed (see log)"
		}
		t.Logf("trial %2d %-7s %s→%s kill at %v of %v (%s): sample %s; restart sync %v (process start to synced %v) %s",
			tr.N, tr.Phase, tr.From, tr.To, tr.Delay.Round(time.Millisecond), tr.Window.Round(time.Millisecond), tr.Landed, tr.Sample,
			tr.Restart.Round(time.Millisecond), tr.RestartAll.Round(time.Millisecond), tr.Err)
		rep.Trials = append(rep.Trials, tr)
		if tr.Phase != Cold {
			cur = restartTo
		}
		if !ok {
			break
		}
	}
	return rep
}

// Write appends the report as Markdown to e2e-results/crash-<file>.md and the
// matrix row as JSON (crash-<file>.json, the matrix's Result fields).
func Write(t testing.TB, file string, reps ...*Report) {
	t.Helper()
	dir := os.Getenv(EnvResults)
	if dir == "" {
		dir = "e2e-results"
		if root, err := repoRoot(); err == nil {
			dir = filepath.Join(root, "e2e-results")
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Errorf("results: %v", err)
		return
	}
	var b strings.Builder
	type row struct {
		Feature string `json:"feature"`
		Mode    string `json:"mode"`
		Status  string `json:"status"`
		Reason  string `json:"reason,omitempty"`
		Test    string `json:"test,omitempty"`
	}
	var rows []row
	fmt.Fprintf(&b, "# SIGKILL at random points of a large sync: %s\n\nGenerated %s by `%s` (kernel %s).\n\n",
		file, time.Now().UTC().Format(time.RFC3339), t.Name(), kernel())
	for _, r := range reps {
		p := r.Params
		fmt.Fprintf(&b, "## %s\n\n%d Services × %d endpoints (A); B differs in %d service ports (¼ endpoint replaced, ¼ removed, ¼ scaled to zero, ¼ new). %d trials, seed %d (`%s=%d` repeats the delays).\n\n",
			r.Mode, p.Services, p.Endpoints, p.Changed, len(r.Trials), p.Seed, EnvSeed, p.Seed)
		fmt.Fprintf(&b, "Measured in the child process: cold sync %s, first sync of a new process over the other snapshot %s, partial sync A→B %s; the state has %d units.\n\n",
			ms(r.ColdSync), ms(r.FirstSync), ms(r.PartSync), r.Units)
		fmt.Fprintf(&b, "Guarantee checked right after each kill: %s\n\n", r.Guarantee)
		b.WriteString("| # | killed sync | from → to | kill at | of window | landed | kernel right after the kill | restart: sync | restart: process start → synced | result |\n|---|---|---|---|---|---|---|---|---|---|\n")
		failed := 0
		for _, tr := range r.Trials {
			res := "converged"
			if tr.Err != "" {
				res, failed = "**"+tr.Err+"**", failed+1
			}
			fmt.Fprintf(&b, "| %d | %s | %s → %s | %s | %s | %s | %s | %s | %s | %s |\n", tr.N, tr.Phase, tr.From, tr.To,
				ms(tr.Delay), ms(tr.Window), tr.Landed, tr.Sample, ms(tr.Restart), ms(tr.RestartAll), res)
		}
		b.WriteString("\n")
		feature := "fault: SIGKILL at random points of a large sync"
		if r.Variant != "" {
			feature += " (" + r.Variant + ")"
		}
		st := row{Feature: feature, Mode: r.Column, Status: "pass", Test: t.Name(),
			Reason: fmt.Sprintf("%d trials at %d Services × %d", len(r.Trials), p.Services, p.Endpoints)}
		if failed > 0 || t.Failed() {
			st.Status, st.Reason = "fail", fmt.Sprintf("%d of %d trials failed (%s)", failed, len(r.Trials), "crash-"+file+".md")
		}
		rows = append(rows, st)
	}
	if err := os.WriteFile(filepath.Join(dir, "crash-"+file+".md"), []byte(b.String()), 0o644); err != nil {
		t.Errorf("results: %v", err)
	}
	js, _ := json.MarshalIndent(rows, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "crash-"+file+".json"), js, 0o644); err != nil {
		t.Errorf("results: %v", err)
	}
}

func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}
