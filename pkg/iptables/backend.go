package iptables

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nfgen"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Runner runs a command with optional stdin and returns its combined output.
// It must run the command in the backend's namespace (proxy.Config.NetNS);
// New's default, ExecRunner(cfg.NetNS), does. Tests replace it with fakes.
type Runner func(ctx context.Context, stdin string, name string, args ...string) ([]byte, error)

// ExecRunner runs commands in the network namespace ns (the caller's own when
// ns is zero), each prefixed by prefix (e.g. "env", "XTABLES_LOCKFILE=…").
// The process is started from a thread switched into ns and inherits it, so
// no "ip netns exec" process is needed.
func ExecRunner(ns proxy.NetNS, prefix ...string) Runner {
	return func(ctx context.Context, stdin string, name string, args ...string) ([]byte, error) {
		argv := append(append([]string{}, prefix...), name)
		argv = append(argv, args...)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		if stdin != "" {
			cmd.Stdin = strings.NewReader(stdin)
		}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := ns.Do(cmd.Start)
		if err == nil {
			err = cmd.Wait()
		}
		if err != nil {
			where := ""
			if !ns.Own() {
				where = " (netns " + string(ns) + ")"
			}
			return out.Bytes(), fmt.Errorf("%s%s: %w: %s", strings.Join(argv, " "), where, err, strings.TrimSpace(out.String()))
		}
		return out.Bytes(), nil
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
	// total counts, per table, the rules in our chains as last committed
	// (base chains, service chains, service rules in shared chains); last
	// counts the rules the last sync wrote. kube-proxy's
	// kubeproxy_sync_proxy_rules_iptables_total and _last.
	total, last map[Table]int
}

// ruleCounts adds the rules of chains and shared lines to n, per table.
func ruleCounts(n map[Table]int, sign int, chains []Chain, shared map[Table][]string) {
	for _, c := range chains {
		n[c.Table] += sign * len(c.Rules)
	}
	for t, lines := range shared {
		n[t] += sign * len(lines)
	}
}

// written counts the rules ("-A" lines) restore texts write, per table.
func written(texts ...*restoreText) map[Table]int {
	n := map[Table]int{}
	for _, t := range texts {
		for table, lines := range t.rules {
			n[table] += len(lines)
		}
	}
	return n
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
	// nsFile is cfg.NetNS, kept open for reading its generation (nil: the
	// caller's namespace).
	nsFile *os.File
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
	// legacy is set with iptables-legacy, which writes a whole table per
	// commit: a full sync is then one restore (see coldChunk).
	legacy bool
}

var _ proxy.Backend = (*Backend)(nil)

// New returns an iptables backend programming cfg.NetNS. run may be nil
// (ExecRunner(cfg.NetNS)). It checks that the binaries exist before anything
// touches the kernel.
func New(log *slog.Logger, cfg proxy.Config, run Runner) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if run == nil {
		run = ExecRunner(cfg.NetNS)
	}
	b := &Backend{log: log, cfg: cfg, run: run}
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
			f, err := cfg.NetNS.Open()
			if err != nil {
				return nil, fmt.Errorf("iptables backend: %w", err)
			}
			b.nsFile = f
			b.generation = func() (uint32, error) { return nfgen.Read(b.nsFD()) }
		} else {
			b.legacy = err == nil && strings.Contains(string(out), "legacy")
			log.Info("drift checks rewrite every chain: the generation shortcut needs iptables-nft", "version", strings.TrimSpace(string(out)))
		}
	}
	return b, nil
}

// nsFD is the descriptor nfgen reads the generation through (0: the
// caller's namespace).
func (b *Backend) nsFD() int {
	if b.nsFile == nil {
		return 0
	}
	return int(b.nsFile.Fd())
}

// Close implements proxy.Backend: it releases the namespace file. The
// backend holds no other handle (every command is its own process).
func (b *Backend) Close() error {
	if b.nsFile == nil {
		return nil
	}
	err := b.nsFile.Close()
	b.nsFile = nil
	// Read through fd 0 the generation would be the caller's namespace's.
	b.generation = func() (uint32, error) { return 0, errors.New("iptables backend closed") }
	return err
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
		for _, table := range []Table{NAT, Filter} {
			res.TableRules = append(res.TableRules, proxy.TableRules{Family: fs.r.Family, Table: string(table),
				Total: fs.total[table], Last: fs.last[table]})
		}
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
		var filter listing
		for _, table := range []Table{NAT, Filter} {
			l, err := b.list(ctx, fs, table, false)
			if err != nil {
				return 0, 0, err
			}
			for _, c := range l.owned {
				fs.leftover[table][c] = true
			}
			if table == Filter {
				filter = l
			}
		}
		b.prepareLocalnet(ctx, fs, filter)
		// prepareLocalnet may have decided the guard's record.
		base = fs.r.RenderBase(snap.Node)
	}
	chunk := coldChunk
	if b.legacy {
		chunk = 0
	}
	plan := renderFull(&fs.r, snap, base, fs.committedChains(), chunk)
	for i, c := range plan.chunks {
		if err := b.restore(ctx, fs, c.String()); err != nil {
			return 0, 0, fmt.Errorf("chunk %d/%d: %w", i+1, len(plan.chunks), err)
		}
	}
	if err := b.restoreDropping(ctx, fs, plan.final); err != nil {
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
	fs.total = map[Table]int{}
	ruleCounts(fs.total, 1, base.Chains, nil)
	for _, sr := range plan.services {
		ruleCounts(fs.total, 1, sr.Chains, sr.Shared)
	}
	fs.last = written(append(plan.chunks, plan.final)...)
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
		fs.last = nil
		return 0, 0, nil
	}
	if err := b.restoreDropping(ctx, fs, t); err != nil {
		return 0, 0, err
	}
	fs.last = written(t)
	for name, cur := range next {
		old := fs.rules(name)
		ruleCounts(fs.total, -1, old.Chains, old.Shared)
		ruleCounts(fs.total, 1, cur.Chains, cur.Shared)
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
//
// Not with iptables-legacy: it reads the whole table from the kernel and
// writes it back whole on every commit, so chunks make a full sync quadratic.
// At 10,000 Services × 3 (2-core VM at load ~10) a legacy cold start took
// 84 s in chunks and 16.6 s in one restore, a restart's full sync 151 s and
// 10.4 s. Legacy full syncs are therefore one restore (nat, then filter).
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
			if !p.want[table][name] && ownedChain(table, name) {
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
	if _, err := b.xt(ctx, text, fs.tools.restore, "--noflush", "-w", "5"); err != nil {
		return fmt.Errorf("restore (%d bytes): %w", len(text), err)
	}
	return nil
}

// restoreDropping applies t, which may delete chains of ours. A chain of
// ours that someone else's rule still jumps to cannot be deleted, and the
// kernel then refuses the whole transaction (CHAIN_DEL: busy): one foreign
// rule would stop every sync. So when a restore that deletes chains fails,
// the tables are listed, the chains that rules outside this transaction
// still jump to are kept (flushed: their rules are stale), the log names
// them, and the restore runs once more. Listing costs seconds on a large
// table, so it is done only after such a failure.
func (b *Backend) restoreDropping(ctx context.Context, fs *familyState, t *restoreText) error {
	err := b.restore(ctx, fs, t.String())
	if err == nil || ctx.Err() != nil {
		return err
	}
	retry := false
	for _, table := range []Table{NAT, Filter} {
		if len(t.remove[table]) == 0 {
			continue
		}
		l, lerr := b.list(ctx, fs, table, true)
		if lerr != nil {
			return errors.Join(err, lerr)
		}
		// A jump outlives this transaction unless its chain is flushed in
		// it or the rule itself is deleted (-D) by it.
		flushed := t.declared(table)
		deleted := map[[2]string]int{}
		for _, line := range t.deletes[table] {
			f := strings.Fields(line)
			for i := 2; i+1 < len(f); i++ {
				if f[i] == "-j" || f[i] == "-g" {
					deleted[[2]string{f[1], f[i+1]}]++
				}
			}
		}
		pinned := map[string]bool{}
		var from []string
		for _, name := range t.remove[table] {
			for _, c := range l.jumps[name] {
				if k := [2]string{c, name}; !flushed[c] && deleted[k] > 0 {
					deleted[k]--
				} else if !flushed[c] {
					pinned[name] = true
					from = append(from, c+" → "+name)
				}
			}
		}
		if len(pinned) == 0 {
			continue
		}
		sort.Strings(from)
		b.log.Warn("keeping chains of ours that rules outside this sync still jump to: emptied, not deleted",
			"family", fmt.Sprintf("IPv%d", fs.r.Family), "table", table, "jumps", from)
		t.keep(table, pinned)
		retry = true
	}
	if !retry {
		return err
	}
	if err2 := b.restore(ctx, fs, t.String()); err2 != nil {
		return fmt.Errorf("%w; again without deleting chains others jump to: %w", err, err2)
	}
	return nil
}

// lockAttempts bounds how often a command that found the xtables lock taken
// is retried. Each attempt waits up to 5 s for the lock (-w 5), so a sync
// waits about a minute for another program before it fails and the runner's
// backoff takes over.
const lockAttempts = 12

// xt runs an iptables tool and retries while another process holds the
// xtables lock. Only iptables-legacy takes that lock (/run/xtables.lock,
// shared by every network namespace of the host); iptables-nft commits
// nf_tables transactions and ignores it. The log says when a command waited,
// and when it got through.
func (b *Backend) xt(ctx context.Context, stdin, name string, args ...string) ([]byte, error) {
	for attempt := 1; ; attempt++ {
		out, err := b.run(ctx, stdin, name, args...)
		if err == nil {
			if attempt > 1 {
				b.log.Info("xtables lock acquired; command went through", "command", name, "attempts", attempt)
			}
			return out, nil
		}
		if !lockBusy(err) || attempt == lockAttempts || ctx.Err() != nil {
			return out, err
		}
		b.log.Warn("another process holds the xtables lock; retrying", "command", name, "attempt", attempt, "of", lockAttempts)
	}
}

// lockBusy reports whether err is iptables giving up on the xtables lock
// ("Another app is currently holding the xtables lock. Stopped waiting after 5s.").
func lockBusy(err error) bool {
	return err != nil && strings.Contains(err.Error(), "holding the xtables lock")
}

func (b *Backend) ensureHooks(ctx context.Context, fs *familyState, base Base) error {
	// Each missing hook is inserted at the top of its built-in chain, so walk
	// them backwards: on a clean node they end up in the order they are listed
	// (service portals before the NodePort dispatch), ahead of others' rules.
	for i := len(base.Hooks) - 1; i >= 0; i-- {
		h := base.Hooks[i]
		args := append([]string{"-w", "5", "-t", string(h.Table), "-C", h.Chain}, h.Args...)
		_, err := b.xt(ctx, "", fs.tools.iptables, args...)
		if err == nil {
			continue
		}
		if lockBusy(err) {
			// Not an answer: inserting now could duplicate the hook.
			return fmt.Errorf("hook %s/%s: %w", h.Table, h.Chain, err)
		}
		args = append([]string{"-w", "5", "-t", string(h.Table), "-I", h.Chain, "1"}, h.Args...)
		b.commits++
		if _, err := b.xt(ctx, "", fs.tools.iptables, args...); err != nil {
			return fmt.Errorf("hook %s/%s: %w", h.Table, h.Chain, err)
		}
	}
	return nil
}

// deleteHooks removes hooks (every copy of each, bounded).
func (b *Backend) deleteHooks(ctx context.Context, fs *familyState, hooks []Hook) {
	for _, h := range hooks {
		for i := 0; i < 10; i++ { // bounded: a hook is never inserted more than once, but be safe
			args := append([]string{"-w", "5", "-t", string(h.Table), "-D", h.Chain}, h.Args...)
			if _, err := b.xt(ctx, "", fs.tools.iptables, args...); err != nil {
				break
			}
		}
	}
}

// listing is what one iptables-save of a table says about our chains.
type listing struct {
	// owned are the chains of ours present (ownedChain).
	owned []string
	// localnetRecord: the localnet guard carries localnetRecord.
	localnetRecord bool
	// jumps maps each chain of ours to the chains with a rule that jumps
	// (-j) or goes (-g) to it; filled only when asked.
	jumps map[string][]string
}

func (b *Backend) list(ctx context.Context, fs *familyState, table Table, jumps bool) (listing, error) {
	var l listing
	if jumps {
		l.jumps = map[string][]string{}
	}
	out, err := b.run(ctx, "", fs.tools.save, "-t", string(table))
	if err != nil {
		// A table that was never used cannot be listed on some kernels; that
		// simply means there is nothing of ours in it.
		if strings.Contains(err.Error(), "does not exist") {
			return l, nil
		}
		return l, fmt.Errorf("list %s chains: %w", table, err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	guardRule := "-A " + ChainLocalnetGuard + " "
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if ownedChain(table, name) {
				l.owned = append(l.owned, name)
			}
		case strings.HasPrefix(line, guardRule) && strings.Contains(line, localnetRecord):
			l.localnetRecord = table == Filter
		case jumps && strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			for i := 2; i+1 < len(f); i++ {
				if (f[i] == "-j" || f[i] == "-g") && ownedChain(table, f[i+1]) {
					l.jumps[f[i+1]] = append(l.jumps[f[i+1]], f[1])
				}
			}
		}
	}
	return l, sc.Err()
}

// prepareLocalnet runs at a process's first sync of IPv4, before anything
// is written. With localhost NodePorts on, it decides whether the guard
// records that miniproxy turns route_localnet on: it does if a previous run
// recorded it, or if route_localnet is 0 now. With them off, a guard a
// previous run left is retired (retireLocalnet).
func (b *Backend) prepareLocalnet(ctx context.Context, fs *familyState, filter listing) {
	if fs.tools.sysctlLocalnet == "" {
		return
	}
	if fs.r.localhostNodePorts() {
		if filter.localnetRecord {
			fs.r.RouteLocalnetSet = true
			return
		}
		v, err := b.sysctl(ctx, fs)
		fs.r.RouteLocalnetSet = err == nil && v == "0"
		return
	}
	if !slices.Contains(filter.owned, ChainLocalnetGuard) {
		return
	}
	if b.retireLocalnet(ctx, fs, filter.localnetRecord) {
		// It must stay while route_localnet is on: keep it out of the stale set.
		delete(fs.leftover[Filter], ChainLocalnetGuard)
		return
	}
	// The hooks go first, or the chain could not be deleted.
	b.deleteHooks(ctx, fs, localnetGuardHooks())
}

// retireLocalnet is called before the localnet guard is removed, by a sync
// that no longer needs it or by --cleanup. The guard may only go if
// route_localnet goes back to 0 (CVE-2020-8558): if miniproxy recorded
// turning it on, it is turned off first; if someone else turned it on, the
// guard stays. It reports whether the guard must stay.
func (b *Backend) retireLocalnet(ctx context.Context, fs *familyState, recorded bool) (keep bool) {
	if recorded {
		if _, err := b.run(ctx, "", "sysctl", "-q", "-w", fs.tools.sysctlLocalnet+"=0"); err != nil {
			b.log.Warn("cannot restore route_localnet=0; keeping the localnet guard", "chain", ChainLocalnetGuard, "err", err)
			return true
		}
		b.log.Info("restored route_localnet=0, which miniproxy had turned on; removing the localnet guard", "chain", ChainLocalnetGuard)
		return false
	}
	v, err := b.sysctl(ctx, fs)
	if err != nil || v != "0" {
		b.log.Warn("route_localnet was not turned on by miniproxy and stays on: keeping the localnet guard (CVE-2020-8558)",
			"route_localnet", v, "chain", ChainLocalnetGuard, "err", err)
		return true
	}
	return false
}

// sysctl reads route_localnet in the namespace the commands run in.
func (b *Backend) sysctl(ctx context.Context, fs *familyState) (string, error) {
	out, err := b.run(ctx, "", "sysctl", "-n", fs.tools.sysctlLocalnet)
	return strings.TrimSpace(string(out)), err
}

// Cleanup implements proxy.Backend: it removes the hooks and every chain
// miniproxy owns (ownedChain), and nothing else. The localnet guard goes
// only if route_localnet goes back to 0 (retireLocalnet).
func (b *Backend) Cleanup(ctx context.Context) error {
	var errs []error
	for _, fs := range b.families {
		t := newRestoreText()
		keepGuard := false
		for _, table := range []Table{NAT, Filter} {
			l, err := b.list(ctx, fs, table, false)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if table == Filter && fs.tools.sysctlLocalnet != "" && slices.Contains(l.owned, ChainLocalnetGuard) {
				keepGuard = b.retireLocalnet(ctx, fs, l.localnetRecord)
			}
			for _, n := range l.owned {
				if !(keepGuard && table == Filter && n == ChainLocalnetGuard) {
					t.drop(table, n)
				}
			}
		}
		// The hooks of this config, and the guard's whatever this config
		// says (a previous run may have had localhost NodePorts on).
		var hooks []Hook
		for _, h := range fs.r.RenderBase(model.Node{}).Hooks {
			if h.Args[len(h.Args)-1] != ChainLocalnetGuard {
				hooks = append(hooks, h)
			}
		}
		if fs.tools.sysctlLocalnet != "" && !keepGuard {
			hooks = append(hooks, localnetGuardHooks()...)
		}
		b.deleteHooks(ctx, fs, hooks)
		if t.empty() {
			continue
		}
		if err := b.restoreDropping(ctx, fs, t); err != nil {
			errs = append(errs, fmt.Errorf("IPv%d cleanup: %w", fs.r.Family, err))
		}
	}
	b.synced, b.clean = false, false
	for _, fs := range b.families {
		fs.base = nil
	}
	return errors.Join(errs...)
}
