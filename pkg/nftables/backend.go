// Package nftables is miniproxy's nftables backend. It renders a snapshot to a
// typed ruleset (package ruleset) and applies it through netlink with
// github.com/google/nftables, one batch per sync.
//
// Contract with the rest of the node (see README.md): miniproxy owns the
// tables "ip miniproxy" and "ip6 miniproxy" and never touches any other table.
// It hooks nat prerouting/output at -100 (dstnat), nat postrouting at 100
// (srcnat) and filter prerouting/input/forward/output at -110.
package nftables

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	gnft "github.com/google/nftables"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Backend implements proxy.Backend with nftables.
type Backend struct {
	cfg   proxy.Config
	netns int // fd of nsFile, the target network namespace; 0 = the caller's
	// nsFile is cfg.NetNS, open for the backend's lifetime (netlink
	// sockets are opened in it per batch).
	nsFile *os.File
	// closed is set by Close: with the namespace file gone, netlink would
	// reach the caller's namespace instead, so every later call fails.
	closed bool
	// shards is how many tables the Services are spread over (1: all in
	// the main table); see ruleset.RenderSharded.
	shards int

	mu sync.Mutex
	// committed is what the last successful batch made the kernel hold,
	// compacted (rules are rendered again for the service ports a sync
	// changes). Nil means unknown (first sync): the next sync replaces
	// the tables.
	committed *rs.Ruleset
	// clean means the kernel held exactly committed at ruleset generation
	// gen (ours was the last commit in the namespace). A full sync that
	// finds the same generation has nothing to reconcile and skips listing
	// the table, which costs seconds at 10k Services (the kernel's rule dump
	// grows faster than linearly).
	clean bool
	gen   uint32
}

var _ proxy.Backend = (*Backend)(nil)

var errClosed = errors.New("nftables backend used after Close")

// Option configures a Backend.
type Option func(*Backend)

// WithShards spreads the Services over n shard tables per family (n <= 1:
// one table). A commit that adds a Service or changes its endpoints then
// makes the kernel validate one shard instead of every Service.
func WithShards(n int) Option { return func(b *Backend) { b.shards = max(n, 1) } }

// MaxShards bounds --nftables-shards: every shard adds two nat base chains
// that the first packet of every new connection passes.
const MaxShards = 64

// New returns an nftables backend for cfg, programming cfg.NetNS.
func New(cfg proxy.Config, opts ...Option) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("nftables backend: %w", err)
	}
	b := &Backend{cfg: cfg, shards: 1}
	for _, o := range opts {
		o(b)
	}
	if b.shards > MaxShards {
		return nil, fmt.Errorf("nftables backend: %d shards, at most %d", b.shards, MaxShards)
	}
	f, err := cfg.NetNS.Open()
	if err != nil {
		return nil, fmt.Errorf("nftables backend: %w", err)
	}
	if f != nil {
		b.nsFile, b.netns = f, int(f.Fd())
	}
	return b, nil
}

// Close implements proxy.Backend: it releases the namespace file (every
// netlink socket is closed after its batch).
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	if b.nsFile == nil {
		return nil
	}
	err := b.nsFile.Close()
	b.nsFile, b.netns = nil, 0
	return err
}

// Sync implements proxy.Backend.
func (b *Backend) Sync(ctx context.Context, snap *model.Snapshot, full bool) (proxy.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return proxy.Result{}, fmt.Errorf("nftables sync: %w", err)
	}
	if b.closed {
		return proxy.Result{}, errClosed
	}
	desired := rs.RenderSharded(snap, &b.cfg, b.committed, b.shards)
	g0, gerr := b.genID()
	// Full syncs need a look at the kernel unless nothing was committed
	// by anyone since our last commit.
	skipObserve := b.clean && gerr == nil && g0 == b.gen
	wasClean := skipObserve

	var plans []*plan
	changed := 0
	replaced := b.committed == nil
	var stale []*gnft.Table
	if replaced {
		// Tables of ours that this configuration does not render (say, a
		// previous run's shards) go in the same batch.
		var err error
		if stale, err = b.staleTables(desired); err != nil {
			return proxy.Result{Full: true}, fmt.Errorf("nftables sync: %w", err)
		}
	}
	perFamily := map[model.Family]int{}
	drift := 0
	chains := chainLists{}
	for _, t := range desired.Tables {
		var p *plan
		var prev *rs.Table
		if b.committed != nil {
			prev = b.committed.Lookup(t.Family, t.Name)
		}
		switch {
		case prev == nil:
			p = replacePlan(t)
		case full && !skipObserve:
			// Every object is compared: render the compacted ones once.
			all := t.Expanded()
			obs, err := b.observe(t.Family, t, all, chains)
			if err != nil {
				return proxy.Result{Full: full}, fmt.Errorf("nftables full sync: reading %s table %s: %w", famName(t.Family), t.Name, err)
			}
			p = reconcilePlan(prev, t, all, obs)
			// Drift is what the repair sends beyond the changes since
			// our last commit (which an incremental sync would send).
			drift += max(0, p.objects()-incrementalPlan(prev, t).objects())
		default:
			p = incrementalPlan(prev, t)
		}
		// Summed over a family's tables: a Service with objects in both
		// the main table and its shard counts twice.
		perFamily[t.Family] += p.services
		plans = append(plans, p)
	}
	for _, n := range perFamily {
		changed = max(changed, n)
	}
	if len(stale) > 0 {
		plans[0].dropTables = stale
	}
	msgs, batches, err := b.apply(ctx, plans)
	res := proxy.Result{Full: full || b.committed == nil, Changed: changed, Rules: msgs, Drift: drift}
	if err != nil {
		// The batch is atomic: the kernel still holds b.committed.
		b.clean = false
		return res, fmt.Errorf("nftables sync: %w", err)
	}
	// Keep what the next sync needs to find its changes, not the rules.
	for _, t := range desired.Tables {
		t.Compact()
	}
	b.committed = desired
	// Clean if the kernel matched before (known, or just reconciled or
	// replaced) and our batches are the only commits since g0.
	g1, err := b.genID()
	expect := g0 + uint32(batches)
	b.clean = gerr == nil && err == nil && g1 == expect && (wasClean || full || replaced)
	b.gen = g1
	return res, nil
}

// Cleanup deletes miniproxy's tables, and nothing else.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nftables cleanup: %w", err)
	}
	if b.closed {
		return errClosed
	}
	c, err := b.conn()
	if err != nil {
		return fmt.Errorf("nftables cleanup: %w", err)
	}
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		t := &gnft.Table{Name: rs.TableName, Family: tableFamily(f)}
		// Adding first makes the delete succeed whether or not the
		// table exists, in the same atomic batch.
		c.AddTable(t)
		c.DelTable(t)
		tables, err := c.ListTablesOfFamily(tableFamily(f))
		if err != nil {
			return fmt.Errorf("nftables cleanup: listing %s tables: %w", famName(f), err)
		}
		for _, x := range tables {
			if x.Name != rs.TableName && rs.IsOurTable(x.Name) {
				c.DelTable(x)
			}
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables cleanup: deleting tables: %w", err)
	}
	b.committed, b.clean = nil, false
	return nil
}

// staleTables lists tables of ours, in the families desired covers, that
// desired does not contain.
func (b *Backend) staleTables(desired *rs.Ruleset) ([]*gnft.Table, error) {
	c, err := b.conn()
	if err != nil {
		return nil, err
	}
	var out []*gnft.Table
	seen := map[model.Family]bool{}
	for _, t := range desired.Tables {
		if seen[t.Family] {
			continue
		}
		seen[t.Family] = true
		tables, err := c.ListTablesOfFamily(tableFamily(t.Family))
		if err != nil {
			return nil, fmt.Errorf("listing %s tables: %w", famName(t.Family), err)
		}
		for _, x := range tables {
			if rs.IsOurTable(x.Name) && desired.Lookup(t.Family, x.Name) == nil {
				out = append(out, x)
			}
		}
	}
	return out, nil
}

func famName(f model.Family) string {
	if f == model.IPv6 {
		return "ip6"
	}
	return "ip"
}

var errCanceled = errors.New("canceled before apply")
