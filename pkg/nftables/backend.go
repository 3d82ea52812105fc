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
	"sync"

	gnft "github.com/google/nftables"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Backend implements proxy.Backend with nftables.
type Backend struct {
	cfg   proxy.Config
	netns int // fd of the target network namespace; 0 = the caller's

	mu sync.Mutex
	// committed is what the last successful batch made the kernel hold.
	// Nil means unknown (first sync): the next sync replaces the tables.
	committed *rs.Ruleset
	// fps caches rule fingerprints of rendered chains for full syncs.
	fps fpCache
	// clean means the kernel held exactly committed at ruleset generation
	// gen (ours was the last commit in the namespace). A full sync that
	// finds the same generation has nothing to reconcile and skips listing
	// the table, which costs seconds at 10k Services (the kernel's rule dump
	// grows faster than linearly).
	clean bool
	gen   uint32
	// rotor is where the next full sync's window of rule checks starts.
	rotor map[model.Family]int
}

var _ proxy.Backend = (*Backend)(nil)

// Option configures a Backend.
type Option func(*Backend)

// WithNetNSFd makes every netlink operation target the network namespace
// referred to by fd (e.g. an open /run/netns/NAME). The caller keeps fd open.
func WithNetNSFd(fd int) Option { return func(b *Backend) { b.netns = fd } }

// New returns an nftables backend for cfg.
func New(cfg proxy.Config, opts ...Option) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("nftables backend: %w", err)
	}
	b := &Backend{cfg: cfg, fps: fpCache{}, rotor: map[model.Family]int{}}
	for _, o := range opts {
		o(b)
	}
	return b, nil
}

// Render returns the ruleset this backend would program for snap (pure).
func (b *Backend) Render(snap *model.Snapshot) *rs.Ruleset {
	return rs.Render(snap, &b.cfg, nil)
}

// Sync implements proxy.Backend.
func (b *Backend) Sync(ctx context.Context, snap *model.Snapshot, full bool) (proxy.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return proxy.Result{}, fmt.Errorf("nftables sync: %w", err)
	}
	desired := rs.Render(snap, &b.cfg, b.committed)
	g0, gerr := b.genID()
	// Full syncs need a look at the kernel unless nothing was committed
	// by anyone since our last commit.
	skipObserve := b.clean && gerr == nil && g0 == b.gen
	wasClean := skipObserve

	var plans []*plan
	changed := 0
	replaced := b.committed == nil
	for _, t := range desired.Tables {
		var p *plan
		switch {
		case b.committed == nil || b.committed.Table(t.Family) == nil:
			p = replacePlan(t)
			changed = len(t.Services)
		case full && !skipObserve:
			obs, err := b.observe(t.Family, t)
			if err != nil {
				return proxy.Result{Full: full}, fmt.Errorf("nftables full sync: reading %s table: %w", famName(t.Family), err)
			}
			p = reconcilePlan(b.committed.Table(t.Family), t, obs, b.fps)
		default:
			p = incrementalPlan(b.committed.Table(t.Family), t)
		}
		if p.services > changed {
			changed = p.services
		}
		plans = append(plans, p)
	}
	msgs, err := b.apply(ctx, plans)
	res := proxy.Result{Full: full || b.committed == nil, Changed: changed, Rules: msgs}
	if err != nil {
		// The batch is atomic: the kernel still holds b.committed.
		b.clean = false
		return res, fmt.Errorf("nftables sync: %w", err)
	}
	b.committed = desired
	if full {
		b.fps.prune(desired.Tables)
	}
	// Clean if the kernel matched before (known, or just reconciled or
	// replaced) and our batch is the only commit since g0.
	g1, err := b.genID()
	expect := g0
	if msgs > 0 {
		expect = g0 + 1
	}
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
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables cleanup: deleting tables: %w", err)
	}
	b.committed, b.clean = nil, false
	return nil
}

func famName(f model.Family) string {
	if f == model.IPv6 {
		return "ip6"
	}
	return "ip"
}

var errCanceled = errors.New("canceled before apply")
