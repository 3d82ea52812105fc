package conntrack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// FamilyLabel is kube-proxy's ip_family label value for f.
func FamilyLabel(f model.Family) string {
	if f == model.IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// Observer receives one family's reconcile: how long it took and how many
// entries it deleted (kube-proxy's kubeproxy_conntrack_reconciler_* metrics).
type Observer func(family string, took time.Duration, deleted int)

// Stats sums one Reconcile over the families.
type Stats struct {
	// Skipped is true when nothing UDP-related could be stale, so the
	// kernel was not asked at all.
	Skipped                bool
	Listed, Stale, Deleted int
}

// Reconciler deletes stale UDP conntrack entries after each successful sync,
// against the kernel's table, so it needs no history to be right: its first
// run after a restart cleans what the previous process left. It is not safe
// for concurrent use; the sync loop calls it from one goroutine.
type Reconciler struct {
	log     *slog.Logger
	c       *Cleaner
	cfg     proxy.Config
	observe Observer

	// State of the last pass, for the skip proof and for removed frontends.
	complete bool                                         // the last pass finished for every family
	done     map[model.ServicePortName]*model.ServicePort // UDP ports of the last pass
	node     model.Node                                   // node of the last pass
	// gone are removed ports whose frontends have not been reconciled
	// since (a failed pass keeps them for the next one).
	gone map[*model.ServicePort]struct{}
}

// NewReconciler returns a Reconciler that uses c, and closes it in Close.
// cfg gives the families to reconcile and the NodePort address selection
// (LocalhostNodePorts should be set only in iptables mode, the only one that
// serves loopback). observe may be nil.
func NewReconciler(log *slog.Logger, c *Cleaner, cfg proxy.Config, observe Observer) *Reconciler {
	if observe == nil {
		observe = func(string, time.Duration, int) {}
	}
	return &Reconciler{log: log, c: c, cfg: cfg, observe: observe, gone: map[*model.ServicePort]struct{}{}}
}

// Close releases the Cleaner's namespace handle.
func (r *Reconciler) Close() error { return r.c.Close() }

// udpPorts returns the tracked ports of snap.
func udpPorts(snap *model.Snapshot) map[model.ServicePortName]*model.ServicePort {
	out := map[model.ServicePortName]*model.ServicePort{}
	if snap == nil {
		return out
	}
	for n, sp := range snap.Services {
		if tracked(sp.Protocol) {
			out[n] = sp
		}
	}
	return out
}

func sameNode(a, b model.Node) bool {
	return a.Name == b.Name && a.Zone == b.Zone && slices.Equal(a.Addresses, b.Addresses)
}

// unchanged proves that no entry can have become stale since the last
// complete pass: every UDP port is the same value (the model shares an
// unchanged port by pointer between snapshots), none was added or removed,
// and the node inputs of eligibility are the same. Entries created since
// were created by rules for this same model, so they are DNATed to eligible
// endpoints. A full sync is never skipped: it may have repaired rules that
// someone removed, and flows created meanwhile bypassed them.
func (r *Reconciler) unchanged(cur map[model.ServicePortName]*model.ServicePort, node model.Node, full bool) bool {
	if !r.complete || full || !sameNode(r.node, node) || len(cur) != len(r.done) {
		return false
	}
	for n, sp := range cur {
		if r.done[n] != sp {
			return false
		}
	}
	return true
}

// Reconcile runs after the rules for snap are in the kernel. full is whether
// that sync was a full one.
func (r *Reconciler) Reconcile(ctx context.Context, snap *model.Snapshot, full bool) (Stats, error) {
	var st Stats
	cur := udpPorts(snap)
	var node model.Node
	if snap != nil {
		node = snap.Node
	}
	if r.unchanged(cur, node, full) {
		st.Skipped = true
		return st, nil
	}
	for n, sp := range r.done {
		if cur[n] != sp {
			r.gone[sp] = struct{}{}
		}
	}
	gone := make([]*model.ServicePort, 0, len(r.gone))
	for sp := range r.gone {
		gone = append(gone, sp)
	}

	err := r.pass(ctx, snap, gone, &st)
	r.done, r.node = cur, node
	r.complete = err == nil
	if r.complete {
		clear(r.gone)
	}
	return st, err
}

func (r *Reconciler) pass(ctx context.Context, snap *model.Snapshot, gone []*model.ServicePort, st *Stats) error {
	var local []netip.Addr
	var errs []error
	if snap != nil {
		var err error
		if local, err = r.c.LocalAddrs(); err != nil {
			// Without the addresses NodePort entries cannot be told
			// from others: skip them this time, clean the rest.
			errs = append(errs, err)
		}
	}
	var node model.Node
	if snap != nil {
		node = snap.Node
	}
	plan := NewPlan(snap, gone, NodePortDst(&r.cfg, node, local))
	if plan.Empty() {
		st.Skipped = true
		return errors.Join(errs...)
	}
	fams := r.cfg.Families
	if len(fams) == 0 {
		fams = []model.Family{model.IPv4}
	}
	for _, f := range fams {
		start := time.Now()
		res, err := r.c.Reconcile(ctx, f, protoNumber(model.UDP), plan)
		took := time.Since(start)
		r.observe(FamilyLabel(f), took, res.Deleted)
		st.Listed += res.Listed
		st.Stale += res.Stale
		st.Deleted += res.Deleted
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", FamilyLabel(f), err))
		}
		r.log.Debug("reconciled conntrack entries", "ipFamily", FamilyLabel(f), "listed", res.Listed,
			"stale", res.Stale, "deleted", res.Deleted, "took", took)
	}
	return errors.Join(errs...)
}
