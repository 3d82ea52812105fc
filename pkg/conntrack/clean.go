package conntrack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// protoNumber maps the model's protocols to IP protocol numbers.
func protoNumber(p model.Protocol) uint8 {
	switch p {
	case model.TCP:
		return syscall.IPPROTO_TCP
	case model.UDP:
		return syscall.IPPROTO_UDP
	case model.SCTP:
		return syscall.IPPROTO_SCTP
	}
	return 0
}

// Cleaner deletes conntrack entries in one network namespace over
// ctnetlink: one dump per Clean, matching in memory, one delete request per
// stale entry on the same socket (no conntrack(8) process per entry).
type Cleaner struct {
	// ns is the namespace file, kept open so every Clean dials into the same
	// namespace even if its /run/netns name is removed meanwhile. nil means
	// the namespace of the calling process.
	ns *os.File
}

// New returns a Cleaner for the network namespace at netnsPath (for example
// /run/netns/NAME, or /proc/PID/ns/net); "" means miniproxy's own namespace.
// It checks once that ctnetlink can be reached there, so a missing module or
// capability shows at start, not at the first endpoint change.
func New(netnsPath string) (*Cleaner, error) {
	c := &Cleaner{}
	if netnsPath != "" {
		f, err := os.Open(netnsPath)
		if err != nil {
			return nil, fmt.Errorf("conntrack: open netns %s: %w", netnsPath, err)
		}
		c.ns = f
	}
	conn, err := c.dial()
	if err != nil {
		c.Close()
		return nil, err
	}
	conn.Close()
	return c, nil
}

// Close releases the namespace handle.
func (c *Cleaner) Close() error {
	if c.ns == nil {
		return nil
	}
	err := c.ns.Close()
	c.ns = nil
	return err
}

// dial opens a fresh ctnetlink socket per Clean: a socket is cheap next to a
// dump, and a fresh one never carries leftovers of an interrupted dump.
func (c *Cleaner) dial() (*ct.Conn, error) {
	cfg := &netlink.Config{}
	if c.ns != nil {
		cfg.NetNS = int(c.ns.Fd())
	}
	conn, err := ct.Dial(cfg)
	if err != nil {
		return nil, fmt.Errorf("conntrack: dial ctnetlink: %w", err)
	}
	return conn, nil
}

// flowKey is a flow's original destination with its protocol; an invalid
// address is the NodePort wildcard.
type flowKey struct {
	proto uint8
	addr  netip.Addr
	port  uint16
}

// rule is one reason to delete a flow reaching a given frontend.
type rule struct {
	gone netip.AddrPort          // case (a): delete if the reply comes from here
	keep map[netip.AddrPort]bool // case (b): delete unless the reply comes from one of these
}

func (r *rule) match(replySrc netip.AddrPort) bool {
	if r.keep != nil {
		return !r.keep[replySrc]
	}
	return replySrc == r.gone
}

// index turns Work into a map from original destination to rules, so each
// dumped flow costs two map lookups whatever the size of the work.
func index(w Work) map[flowKey][]*rule {
	idx := map[flowKey][]*rule{}
	for _, g := range w.Gone {
		r := &rule{gone: g.Endpoint}
		p := protoNumber(g.Protocol)
		for _, f := range g.Frontends {
			k := flowKey{p, f.Addr.Unmap(), f.Port}
			idx[k] = append(idx[k], r)
		}
	}
	for _, o := range w.Opened {
		r := &rule{keep: make(map[netip.AddrPort]bool, len(o.Keep))}
		for _, ep := range o.Keep {
			r.keep[netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())] = true
		}
		k := flowKey{protoNumber(o.Protocol), o.Frontend.Addr.Unmap(), o.Frontend.Port}
		idx[k] = append(idx[k], r)
	}
	return idx
}

// stale reports whether a dumped flow matches the work.
func stale(idx map[flowKey][]*rule, f *ct.Flow) bool {
	o, r := f.TupleOrig, f.TupleReply
	key := flowKey{o.Proto.Protocol, o.IP.DestinationAddress.Unmap(), o.Proto.DestinationPort}
	reply := netip.AddrPortFrom(r.IP.SourceAddress.Unmap(), r.Proto.SourcePort)
	for _, k := range []flowKey{key, {key.proto, netip.Addr{}, key.port}} {
		for _, ru := range idx[k] {
			if ru.match(reply) {
				return true
			}
		}
	}
	return false
}

// Clean deletes the flows described by w and returns how many it deleted.
// Entries that vanish between dump and delete (expired, or deleted by someone
// else) are not errors. A failed delete does not stop the others; all
// failures are returned joined.
func (c *Cleaner) Clean(ctx context.Context, w Work) (int, error) {
	if w.Empty() {
		return 0, nil
	}
	conn, err := c.dial()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	// ctnetlink cannot filter dumps by L4 protocol, so the whole table (both
	// families) is read once and filtered here.
	flows, err := conn.Dump(nil)
	if err != nil {
		return 0, fmt.Errorf("conntrack: dump: %w", err)
	}
	idx := index(w)
	deleted := 0
	var errs []error
	for i := range flows {
		f := &flows[i]
		if !stale(idx, f) { // the index is keyed by protocol too
			continue
		}
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("conntrack: stopped after %d deletions: %w", deleted, err))
			break
		}
		// Only the original tuple (and zone) identify the entry; sending
		// the dumped counters and timers back would be pointless.
		del := ct.Flow{TupleOrig: f.TupleOrig, Zone: f.Zone}
		if err := conn.Delete(del); err != nil {
			if errors.Is(err, syscall.ENOENT) {
				continue
			}
			errs = append(errs, fmt.Errorf("conntrack: delete %s: %w", describe(f), err))
			continue
		}
		deleted++
	}
	return deleted, errors.Join(errs...)
}

func describe(f *ct.Flow) string {
	o, r := f.TupleOrig, f.TupleReply
	return fmt.Sprintf("proto %d %s -> %s reply from %s",
		o.Proto.Protocol,
		netip.AddrPortFrom(o.IP.SourceAddress, o.Proto.SourcePort),
		netip.AddrPortFrom(o.IP.DestinationAddress, o.Proto.DestinationPort),
		netip.AddrPortFrom(r.IP.SourceAddress, r.Proto.SourcePort))
}
