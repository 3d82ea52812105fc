package nftables

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"

	gnft "github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// elemChunk bounds the elements per netlink message: the element list is one
// nested attribute whose length field is 16 bits, so a message must stay
// well under 64 KiB whatever the chain names' length.
const elemChunk = 200

// conn opens a plain connection (listing, cleanup).
func (b *Backend) conn() (*gnft.Conn, error) {
	var opts []gnft.ConnOption
	if b.netns != 0 {
		opts = append(opts, gnft.WithNetNSFd(b.netns))
	}
	c, err := gnft.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink connection: %w", err)
	}
	return c, nil
}

// setBuf sets a socket buffer, forcing past the sysctl maximum when allowed
// (CAP_NET_ADMIN) and falling back to the capped value otherwise.
func setBuf(fd, force, plain, n int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, force, n); err == nil {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, plain, n); err != nil {
		return fmt.Errorf("setting socket buffer to %d bytes: %w", n, err)
	}
	return nil
}

// size estimates the message count and bytes of a plan.
func (p *plan) size() (msgs, bytes int) {
	if p.replace {
		msgs += 3
	}
	msgs += len(p.dropTables) + len(p.addSets) + len(p.addChains) + len(p.flushChains) + 2*len(p.delChains) + len(p.delSets)
	bytes += 300 * msgs
	for _, c := range p.writeChains {
		msgs += len(c.Rules)
		bytes += 700 * len(c.Rules)
	}
	for _, m := range []map[string][]rs.Element{p.addElems, p.delElems} {
		for _, es := range m {
			msgs += (len(es) + elemChunk - 1) / elemChunk
			bytes += 300 * len(es)
		}
	}
	return msgs, bytes
}

// apply sends the plans and returns the number of messages. Normally they
// go as one batch, so the kernel moves from the committed ruleset to the
// desired one atomically. When every plan replaces its table (a cold start,
// when nothing of ours is known to be in place) each table goes in its own
// batch instead, encoded while the kernel commits the previous one: the
// tables do not reference each other, a half-done cold start is repaired
// by the next sync replacing everything again, and the Go side's encoding
// (about a third of a cold start) then overlaps the kernel's work. It also
// bounds the peak batch buffer to one table's. It also returns how many
// batches it committed (each moves the ruleset generation by one).
func (b *Backend) apply(ctx context.Context, plans []*plan) (msgs, batches int, err error) {
	pipeline := len(plans) > 2
	for _, p := range plans {
		pipeline = pipeline && p.replace
	}
	if !pipeline {
		body, size, err := encode(plans)
		if err != nil || len(body) == 0 {
			return 0, 0, err
		}
		n, err := b.send(ctx, body, size)
		return n, 1, err
	}
	type encoded struct {
		body []netlink.Message
		size int
		err  error
	}
	next := make(chan encoded, 1)
	stop := make(chan struct{})
	// On an early return the encoder may be in the middle of a plan:
	// wait for it to finish before returning. The library's AddSet bumps a
	// package-level set ID without a lock, so an encoder outliving this
	// call races with the next sync's (seen under -race after a refused
	// batch).
	defer func() {
		close(stop)
		for range next {
		}
	}()
	go func() {
		defer close(next)
		for _, p := range plans {
			body, size, err := encode([]*plan{p})
			select {
			case next <- encoded{body, size, err}:
			case <-stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	for e := range next {
		if e.err != nil {
			return msgs, batches, e.err
		}
		if len(e.body) == 0 {
			continue
		}
		n, err := b.send(ctx, e.body, e.size)
		msgs += n
		if err != nil {
			return msgs, batches, err
		}
		batches++
	}
	return msgs, batches, nil
}

// send writes one encoded batch.
func (b *Backend) send(ctx context.Context, body []netlink.Message, size int) (int, error) {
	if len(body) == 0 {
		return 0, nil
	}
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("%w: %w", errCanceled, err)
	}
	// Acks are requested for the last message only (see batch.go), so
	// the receive buffer needs little; the send buffer holds the batch.
	bs := &batchSender{netns: b.netns, sndbuf: size + (1 << 20), rcvbuf: 1 << 20}
	if err := bs.send(body); err != nil {
		return len(body), fmt.Errorf("netlink batch of %d messages: %w", len(body), err)
	}
	return len(body), nil
}

// encode builds the messages of plans, in one batch's order, and estimates
// the batch's size in bytes.
func encode(plans []*plan) ([]netlink.Message, int, error) {
	msgs, size := 0, 0
	for _, p := range plans {
		m, s := p.size()
		msgs, size = msgs+m, size+s
	}
	if msgs == 0 {
		return nil, 0, nil
	}
	// Order: every table's objects, then all rules, then every table's
	// elements and deletions (see emitHead/emitTail).
	head, err := newCapture()
	if err != nil {
		return nil, 0, err
	}
	tail, err := newCapture()
	if err != nil {
		return nil, 0, err
	}
	type job struct {
		family model.Family
		table  string
		chain  *rs.Chain
	}
	var jobs []job
	for _, p := range plans {
		if err := p.emitHead(head.conn); err != nil {
			return nil, 0, fmt.Errorf("building %s batch: %w", famName(p.family), err)
		}
		if err := p.emitTail(tail.conn); err != nil {
			return nil, 0, fmt.Errorf("building %s batch: %w", famName(p.family), err)
		}
		for _, c := range p.writeChains {
			jobs = append(jobs, job{p.family, p.tableName, c})
		}
	}
	workers := min(runtime.GOMAXPROCS(0), max(1, len(jobs)/2000))
	parts := make([][]netlink.Message, workers)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			type encKey struct {
				f     model.Family
				table string
			}
			encs := map[encKey]*ruleEncoder{}
			for i := w; i < len(jobs); i += workers {
				j := jobs[i]
				enc := encs[encKey{j.family, j.table}]
				if enc == nil {
					enc = newRuleEncoder(j.family, j.table)
					encs[encKey{j.family, j.table}] = enc
				}
				for _, r := range j.chain.Rules {
					m, err := enc.rule(j.chain.Name, r)
					if err != nil {
						errs[w] = err
						return
					}
					parts[w] = append(parts[w], m)
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, 0, fmt.Errorf("building batch: %w", err)
	}
	body, err := head.messages()
	if err != nil {
		return nil, 0, err
	}
	for _, p := range parts {
		body = append(body, p...)
	}
	t, err := tail.messages()
	if err != nil {
		return nil, 0, err
	}
	body = append(body, t...)
	return body, size, nil
}

func sortedKeys(m map[string][]rs.Element) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func chainSpec(t *gnft.Table, c *rs.Chain) *gnft.Chain {
	g := &gnft.Chain{Name: c.Name, Table: t}
	if c.Base != nil {
		g.Type = gnft.ChainTypeFilter
		if c.Base.Type == rs.TypeNAT {
			g.Type = gnft.ChainTypeNAT
		}
		switch c.Base.Hook {
		case rs.HookPrerouting:
			g.Hooknum = gnft.ChainHookPrerouting
		case rs.HookInput:
			g.Hooknum = gnft.ChainHookInput
		case rs.HookForward:
			g.Hooknum = gnft.ChainHookForward
		case rs.HookOutput:
			g.Hooknum = gnft.ChainHookOutput
		case rs.HookPostrouting:
			g.Hooknum = gnft.ChainHookPostrouting
		}
		g.Priority = gnft.ChainPriorityRef(gnft.ChainPriority(c.Base.Priority))
		accept := gnft.ChainPolicyAccept
		g.Policy = &accept
	}
	return g
}

// emitHead queues the table, new sets, new chains and flushes of chains to
// be rewritten: everything rules may refer to.
func (p *plan) emitHead(c *gnft.Conn) error {
	t := p.table()
	for _, x := range p.dropTables {
		c.DelTable(x)
	}
	if p.replace {
		// add+delete+add: atomically replaces a leftover table (e.g.
		// from a previous run) and works when there is none.
		c.AddTable(t)
		c.DelTable(t)
		c.AddTable(t)
	}
	for _, s := range p.addSets {
		if err := c.AddSet(setSpec(t, p.family, s), nil); err != nil {
			return fmt.Errorf("set %s: %w", s.Name, err)
		}
	}
	for _, ch := range p.addChains {
		c.AddChain(chainSpec(t, ch))
	}
	for _, name := range p.flushChains {
		c.FlushChain(&gnft.Chain{Name: name, Table: t})
	}
	return nil
}

func (p *plan) table() *gnft.Table {
	return &gnft.Table{Name: p.tableName, Family: tableFamily(p.family)}
}

// emitTail queues element changes, then deletions of stale chains and sets,
// which come last because rules and elements that referred to them must be
// gone first.
func (p *plan) emitTail(c *gnft.Conn) error {
	t := p.table()
	elems := func(m map[string][]rs.Element, del bool) error {
		for _, name := range sortedKeys(m) {
			s, ok := p.sets[name]
			if !ok {
				return fmt.Errorf("elements for unknown map %s", name)
			}
			spec := setSpec(t, p.family, s)
			es := m[name]
			for i := 0; i < len(es); i += elemChunk {
				j := min(i+elemChunk, len(es))
				ge := make([]gnft.SetElement, 0, j-i)
				for _, e := range es[i:j] {
					ge = append(ge, setElement(s.Key, e, s.Verdict))
				}
				var err error
				if del {
					err = c.SetDeleteElements(spec, ge)
				} else {
					err = c.SetAddElements(spec, ge)
				}
				if err != nil {
					return fmt.Errorf("map %s: %w", name, err)
				}
			}
		}
		return nil
	}
	if err := elems(p.delElems, true); err != nil {
		return err
	}
	if err := elems(p.addElems, false); err != nil {
		return err
	}
	// Flush every stale chain before deleting any: chains may jump to
	// each other, and a chain can only go once nothing refers to it.
	for _, name := range p.delChains {
		c.FlushChain(&gnft.Chain{Name: name, Table: t})
	}
	for _, name := range p.delChains {
		c.DelChain(&gnft.Chain{Name: name, Table: t})
	}
	for _, name := range p.delSets {
		c.DelSet(&gnft.Set{Name: name, Table: t})
	}
	return nil
}
