package iptables

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"reflect"
	"sort"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nfgen"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Runner runs a command with optional stdin and returns its combined output.
// The agent runs commands directly; tests prefix "ip netns exec NS".
type Runner func(ctx context.Context, stdin string, name string, args ...string) ([]byte, error)

// ExecRunner runs commands on this host (in the caller's network namespace).
func ExecRunner(prefix ...string) Runner {
	return func(ctx context.Context, stdin string, name string, args ...string) ([]byte, error) {
		argv := append(append([]string{}, prefix...), name)
		argv = append(argv, args...)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		if stdin != "" {
			cmd.Stdin = strings.NewReader(stdin)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return out, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
		}
		return out, nil
	}
}

// familyState is what was last committed to the kernel for one family.
type familyState struct {
	r        Renderer
	tools    tools
	base     *Base
	services map[model.ServicePortName]committedService
	// leftover are the service-owned chains a previous run left, listed at
	// this process's first sync and deleted by its first full sync. Later
	// full syncs find stale chains from services (rendered again), because
	// listing a large table costs seconds and keeping 60k chain names costs
	// megabytes.
	leftover map[Table]map[string]bool
}

type tools struct{ save, restore, iptables, sysctlLocalnet string }

// committedService is what the backend keeps of a service port whose rules
// are in the kernel: the model value and node they were rendered from. A
// later change needs the old chain names (to drop the ones that go) and
// shared lines (deleted with -D by their exact text); rendering is pure, so
// they are rendered again then rather than kept. Kept, they were about 20 MB
// of strings at 10k Services × 5 endpoints, for the few ports that change.
type committedService struct {
	sp   *model.ServicePort
	node *model.Node
}

// committedChains returns the service-owned chains the kernel should hold:
// the leftovers of a previous run and every committed service port's.
func (fs *familyState) committedChains() map[Table]map[string]bool {
	out := map[Table]map[string]bool{NAT: {}, Filter: {}}
	for t, names := range fs.leftover {
		for n := range names {
			out[t][n] = true
		}
	}
	for name := range fs.services {
		for _, c := range fs.rules(name).Chains {
			out[c.Table][c.Name] = true
		}
	}
	return out
}

// rules returns the rules name was committed with (none if it was not).
func (fs *familyState) rules(name model.ServicePortName) ServiceRules {
	c, ok := fs.services[name]
	if !ok {
		return ServiceRules{}
	}
	return fs.r.RenderService(c.sp, *c.node)
}

// Backend is the iptables proxy.Backend.
type Backend struct {
	log      *slog.Logger
	cfg      proxy.Config
	run      Runner
	families []*familyState
	prev     *model.Snapshot
	// synced is false until a full sync has succeeded; every sync until then,
	// and after any failure, is full.
	synced bool
	// OnRestore, if set, is called with every restore input (tests, debugging).
	OnRestore func(family model.Family, text string)
	// FailRestore counts restore failures (for the restore-failures metric).
	FailRestore func()

	// generation reads the nf_tables ruleset generation when iptables is
	// the nf_tables variant (nil with iptables-legacy, whose rules the
	// generation does not cover).
	generation func() (uint32, error)
	netns      int
	// clean means the kernel held exactly what we last committed at
	// generation gen: every commit since the last full sync was ours. A
	// periodic full sync that finds gen unchanged has nothing to repair;
	// rewriting 10,000 Services' chains instead takes 8-18 s here, and every
	// change queued behind it waits that long.
	clean bool
	gen   uint32
	// commits counts the nf_tables commits this sync made (one per table
	// section of a restore, one per inserted hook).
	commits uint32
}

// Option configures a Backend.
type Option func(*Backend)

// WithNetNSFd names the network namespace the runner's commands act in (an
// open /run/netns/NAME), so that the backend reads that namespace's ruleset
// generation. Without it the caller's namespace is read, which is right for
// the agent, whose commands run where it runs.
func WithNetNSFd(fd int) Option { return func(b *Backend) { b.netns = fd } }

// New returns an iptables backend. It checks that the binaries exist before
// anything touches the kernel.
func New(log *slog.Logger, cfg proxy.Config, run Runner, opts ...Option) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if run == nil {
		run = ExecRunner()
	}
	b := &Backend{log: log, cfg: cfg, run: run}
	for _, o := range opts {
		o(b)
	}
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if !cfg.HasFamily(f) {
			continue
		}
		t := tools{save: "iptables-save", restore: "iptables-restore", iptables: "iptables", sysctlLocalnet: "net.ipv4.conf.all.route_localnet"}
		if f == model.IPv6 {
			t = tools{save: "ip6tables-save", restore: "ip6tables-restore", iptables: "ip6tables"}
		}
		for _, bin := range []string{t.save, t.restore, t.iptables} {
			if _, err := exec.LookPath(bin); err != nil {
				return nil, fmt.Errorf("iptables mode needs %s: %w (install the iptables package)", bin, err)
			}
		}
		b.families = append(b.families, &familyState{
			r: Renderer{Cfg: cfg, Family: f}, tools: t,
			services: map[model.ServicePortName]committedService{},
			leftover: map[Table]map[string]bool{NAT: {}, Filter: {}},
		})
	}
	if len(b.families) > 0 {
		// Only iptables-nft keeps its rules in nf_tables; ask the binary.
		out, err := run(context.Background(), "", b.families[0].tools.iptables, "-V")
		if err == nil && strings.Contains(string(out), "nf_tables") {
			b.generation = func() (uint32, error) { return nfgen.Read(b.netns) }
		} else {
			log.Info("drift checks rewrite every chain: the generation shortcut needs iptables-nft", "version", strings.TrimSpace(string(out)))
		}
	}
	return b, nil
}

// Sync implements proxy.Backend.
func (b *Backend) Sync(ctx context.Context, snap *model.Snapshot, full bool) (proxy.Result, error) {
	// A requested full sync is reported as full even when the generation
	// check settles it, as in the nftables backend: it is the periodic
	// reconcile, just a cheap one.
	res := proxy.Result{Full: full}
	mustFull := !b.synced || b.prev == nil
	g0, gerr := b.readGen()
	wasClean := b.clean && gerr == nil && g0 == b.gen
	if full && !mustFull && wasClean {
		// A drift check, and nobody committed anything since our last
		// commit: the kernel holds what we wrote. Only the pending changes
		// need programming.
		full = false
		b.log.Debug("full sync: nf_tables generation unchanged since our last commit, nothing to repair", "generation", g0)
	}
	full = full || mustFull
	b.commits = 0
	res.Full = res.Full || full
	var changed []model.ServicePortName
	if !full {
		changed = snap.Diff(b.prev)
	}
	for _, fs := range b.families {
		base := fs.r.RenderBase(snap.Node)
		famFull := full || fs.base == nil || !reflect.DeepEqual(*fs.base, base)
		var n, lines int
		var err error
		if famFull {
			n, lines, err = b.syncFull(ctx, fs, snap, base)
		} else {
			n, lines, err = b.syncPartial(ctx, fs, snap, changed)
		}
		if err != nil {
			b.synced, b.clean = false, false
			if b.FailRestore != nil {
				b.FailRestore()
			}
			return res, fmt.Errorf("iptables IPv%d sync: %w", fs.r.Family, err)
		}
		res.Changed += n
		res.Rules += lines
		res.Full = res.Full || famFull
	}
	if full && !mustFull && gerr == nil && !wasClean {
		// Someone else committed to nf_tables since our last known-clean
		// state and this full sync rewrote every chain of ours. Whether
		// that commit touched our chains is not known without reading
		// them back (seconds at 10k Services), so it counts as a repair.
		res.Drift = 1
	}
	b.prev = snap
	b.synced = true
	// Clean if the kernel matched before this sync (known, or a full sync
	// just rewrote it) and every commit since g0 was one of ours.
	g1, err := b.readGen()
	b.clean = gerr == nil && err == nil && g1 == g0+b.commits && (wasClean || full)
	b.gen = g1
	return res, nil
}

func (b *Backend) readGen() (uint32, error) {
	if b.generation == nil {
		return 0, errors.New("no nf_tables generation with iptables-legacy")
	}
	return b.generation()
}

func (b *Backend) syncFull(ctx context.Context, fs *familyState, snap *model.Snapshot, base Base) (int, int, error) {
	if fs.base == nil {
		// First sync of this process: learn which of our chains a previous
		// run left, so stale ones are removed. Later full syncs rely on
		// memory, because listing a large table costs seconds.
		for _, table := range []Table{NAT, Filter} {
			names, err := b.listChains(ctx, fs, table)
			if err != nil {
				return 0, 0, err
			}
			for _, c := range names {
				fs.leftover[table][c] = true
			}
		}
	}
	plan := renderFull(&fs.r, snap, base, fs.committedChains(), coldChunk)
	for i, c := range plan.chunks {
		if err := b.restore(ctx, fs, c.String()); err != nil {
			return 0, 0, fmt.Errorf("chunk %d/%d: %w", i+1, len(plan.chunks), err)
		}
	}
	if err := b.restore(ctx, fs, plan.final.String()); err != nil {
		return 0, 0, err
	}
	if err := b.ensureHooks(ctx, fs, base); err != nil {
		return 0, 0, err
	}
	if fs.r.localhostNodePorts() && fs.tools.sysctlLocalnet != "" {
		// Only inside the network namespace this process runs in (the node's).
		if _, err := b.run(ctx, "", "sysctl", "-q", "-w", fs.tools.sysctlLocalnet+"=1"); err != nil {
			b.log.Warn("cannot enable route_localnet; NodePorts on 127.0.0.1 will not answer", "err", err)
		}
	}
	fs.base = &base
	node := snap.Node
	fs.services = make(map[model.ServicePortName]committedService, len(plan.services))
	for name := range plan.services {
		fs.services[name] = committedService{sp: snap.Services[name], node: &node}
	}
	fs.leftover = map[Table]map[string]bool{NAT: {}, Filter: {}}
	return len(plan.services), plan.lines(), nil
}

func (b *Backend) syncPartial(ctx context.Context, fs *familyState, snap *model.Snapshot, changed []model.ServicePortName) (int, int, error) {
	t := newRestoreText()
	next := map[model.ServicePortName]ServiceRules{}
	for _, name := range changed {
		old := fs.rules(name)
		var cur ServiceRules
		if sp := snap.Services[name]; sp != nil {
			cur = fs.r.RenderService(sp, snap.Node)
		}
		next[name] = cur
		keep := map[string]bool{}
		for _, c := range cur.Chains {
			t.chain(c)
			keep[c.Name] = true
		}
		for _, c := range old.Chains {
			if !keep[c.Name] {
				t.drop(c.Table, c.Name)
			}
		}
		for _, table := range []Table{NAT, Filter} {
			del, add := sharedDelta(old.Shared[table], cur.Shared[table])
			t.deletes[table] = append(t.deletes[table], del...)
			t.rules[table] = append(t.rules[table], add...)
		}
	}
	if t.empty() {
		return 0, 0, nil
	}
	if err := b.restore(ctx, fs, t.String()); err != nil {
		return 0, 0, err
	}
	node := snap.Node
	for name := range next {
		if sp := snap.Services[name]; sp == nil {
			delete(fs.services, name)
		} else {
			fs.services[name] = committedService{sp: sp, node: &node}
		}
	}
	return len(changed), t.lines, nil
}

// coldChunk is how many service ports go into one restore of their own
// chains during a full sync. iptables-nft's --noflush restore grows much
// faster than linearly with the chains (and jumps between them) of one
// transaction: measured here, 4,000 Services' service chains took 43 s in one
// restore and 2.8 s in chunks of 500; a whole 10,000 × 5 cold start takes
// 9-12 s in chunks of 200-500 instead of minutes. Each chunk is atomic and holds every chain of
// its services, so no rule ever jumps to a chain that is not there yet; the
// dispatch chains are switched over in one final restore.
const coldChunk = 200

// fullPlan is the pure part of a full sync.
type fullPlan struct {
	// chunks create or refill the services' own chains; they are not yet
	// (or still, by their old content) referenced while they run.
	chunks []*restoreText
	// final rewrites the shared chains, hooks' targets, and deletes stale chains.
	final    *restoreText
	services map[model.ServicePortName]ServiceRules
	want     map[Table]map[string]bool
}

func (p *fullPlan) lines() int {
	n := p.final.lines
	for _, c := range p.chunks {
		n += c.lines
	}
	return n
}

// renderFull plans a full sync that declares every wanted chain and removes
// every stale one in existing. chunk 0 puts everything in final (one
// transaction, as the goldens show it); otherwise the services' own chains go
// into restores of at most chunk service ports each.
func renderFull(r *Renderer, snap *model.Snapshot, base Base, existing map[Table]map[string]bool, chunk int) *fullPlan {
	p := &fullPlan{final: newRestoreText(), services: make(map[model.ServicePortName]ServiceRules, len(snap.Services)),
		want: map[Table]map[string]bool{NAT: {}, Filter: {}}}
	for _, c := range base.Chains {
		p.final.chain(c)
		p.want[c.Table][c.Name] = true
	}
	cur := p.final
	for i, sp := range snap.Sorted() {
		if chunk > 0 && i%chunk == 0 {
			cur = newRestoreText()
			// Endpoint chains jump to KUBE-MARK-MASQ; declaring it with its
			// one fixed rule in every chunk keeps each chunk self-contained.
			for _, c := range base.Chains {
				if c.Name == ChainMarkMasq {
					cur.chain(c)
				}
			}
			p.chunks = append(p.chunks, cur)
		}
		sr := r.RenderService(sp, snap.Node)
		p.services[sp.Name] = sr
		for _, c := range sr.Chains {
			cur.chain(c)
			p.want[c.Table][c.Name] = true
		}
		for _, table := range []Table{NAT, Filter} {
			p.final.rules[table] = append(p.final.rules[table], sr.Shared[table]...)
		}
	}
	for _, table := range []Table{NAT, Filter} {
		var stale []string
		for name := range existing[table] {
			if !p.want[table][name] && ownedChain(name) {
				stale = append(stale, name)
			}
		}
		sort.Strings(stale)
		for _, name := range stale {
			p.final.drop(table, name)
		}
	}
	return p
}

func (b *Backend) restore(ctx context.Context, fs *familyState, text string) error {
	if b.OnRestore != nil {
		b.OnRestore(fs.r.Family, text)
	}
	// iptables-nft commits each table section on its own.
	b.commits += uint32(strings.Count(text, "\nCOMMIT\n"))
	if _, err := b.run(ctx, text, fs.tools.restore, "--noflush", "-w", "5"); err != nil {
		return fmt.Errorf("restore (%d bytes): %w", len(text), err)
	}
	return nil
}

func (b *Backend) ensureHooks(ctx context.Context, fs *familyState, base Base) error {
	// Each missing hook is inserted at the top of its built-in chain, so walk
	// them backwards: on a clean node they end up in the order they are listed
	// (service portals before the NodePort dispatch), ahead of others' rules.
	for i := len(base.Hooks) - 1; i >= 0; i-- {
		h := base.Hooks[i]
		args := append([]string{"-w", "5", "-t", string(h.Table), "-C", h.Chain}, h.Args...)
		if _, err := b.run(ctx, "", fs.tools.iptables, args...); err == nil {
			continue
		}
		args = append([]string{"-w", "5", "-t", string(h.Table), "-I", h.Chain, "1"}, h.Args...)
		b.commits++
		if _, err := b.run(ctx, "", fs.tools.iptables, args...); err != nil {
			return fmt.Errorf("hook %s/%s: %w", h.Table, h.Chain, err)
		}
	}
	return nil
}

func (b *Backend) listChains(ctx context.Context, fs *familyState, table Table) ([]string, error) {
	out, err := b.run(ctx, "", fs.tools.save, "-t", string(table))
	if err != nil {
		// A table that was never used cannot be listed on some kernels; that
		// simply means there is nothing of ours in it.
		if strings.Contains(err.Error(), "does not exist") {
			return nil, nil
		}
		return nil, fmt.Errorf("list %s chains: %w", table, err)
	}
	var names []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, ":KUBE-") {
			name, _, _ := strings.Cut(line[1:], " ")
			names = append(names, name)
		}
	}
	return names, sc.Err()
}

var ownedPrefixes = []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"}

func ownedChain(name string) bool {
	for _, p := range ownedPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	switch name {
	case ChainServices, ChainNodePorts, ChainNodePortDispatch, ChainPostrouting, ChainMarkMasq,
		ChainExternalServices, ChainFirewall, ChainLocalnetGuard:
		return true
	}
	return false
}

// Cleanup implements proxy.Backend: it removes the hooks and every chain of
// miniproxy's naming scheme, and nothing else.
func (b *Backend) Cleanup(ctx context.Context) error {
	var errs []error
	for _, fs := range b.families {
		base := fs.r.RenderBase(model.Node{})
		hooks := base.Hooks
		// The localhost guard hook may exist even if this config would not create it.
		hooks = append(hooks, Hook{Filter, "INPUT", []string{"-j", ChainLocalnetGuard}}, Hook{Filter, "OUTPUT", []string{"-j", ChainLocalnetGuard}})
		for _, h := range hooks {
			for i := 0; i < 10; i++ { // bounded: a hook is never inserted more than once, but be safe
				args := append([]string{"-w", "5", "-t", string(h.Table), "-D", h.Chain}, h.Args...)
				if _, err := b.run(ctx, "", fs.tools.iptables, args...); err != nil {
					break
				}
			}
		}
		t := newRestoreText()
		for _, table := range []Table{NAT, Filter} {
			names, err := b.listChains(ctx, fs, table)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			for _, n := range names {
				if ownedChain(n) {
					t.drop(table, n)
				}
			}
		}
		if t.empty() {
			continue
		}
		if err := b.restore(ctx, fs, t.String()); err != nil {
			errs = append(errs, fmt.Errorf("IPv%d cleanup: %w", fs.r.Family, err))
		}
	}
	b.synced, b.clean = false, false
	for _, fs := range b.families {
		fs.base = nil
	}
	return errors.Join(errs...)
}
