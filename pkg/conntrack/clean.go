package conntrack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// ctnetlink message types and attributes (linux/netfilter/nfnetlink_conntrack.h).
const (
	ctGet    = 1 // IPCTNL_MSG_CT_GET
	ctDelete = 2 // IPCTNL_MSG_CT_DELETE

	ctaTupleOrig  = 1
	ctaTupleReply = 2
	ctaID         = 12
	ctaZone       = 18
	ctaFilter     = 25

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3

	ctaFilterOrigFlags = 1
	// filterProtoNum is CTA_FILTER_F_CTA_PROTO_NUM (net/netfilter/
	// nf_conntrack_netlink.c): the dump keeps entries whose original tuple
	// has the protocol given in CTA_TUPLE_ORIG. Linux 5.8 or later; older
	// kernels ignore the unknown attribute and dump everything, which the
	// in-memory protocol check then filters.
	filterProtoNum = 1 << 3
)

// Cleaner talks ctnetlink in one network namespace: one dump per family,
// filtered by protocol in the kernel, and one delete request per stale entry
// on the same socket (no conntrack(8) process per entry).
type Cleaner struct {
	// ns is the namespace file, kept open so every call reaches the same
	// namespace even if its /run/netns name is removed meanwhile. nil means
	// the namespace of the calling process.
	ns *os.File
}

// New returns a Cleaner for the network namespace ns (the zero value is
// miniproxy's own), the one its backend programs (proxy.Config.NetNS).
// It checks once that ctnetlink can be reached there, so a missing module or
// capability shows at start, not at the first endpoint change.
func New(ns proxy.NetNS) (*Cleaner, error) {
	f, err := ns.Open()
	if err != nil {
		return nil, fmt.Errorf("conntrack: %w", err)
	}
	c := &Cleaner{ns: f}
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

// dial opens a fresh ctnetlink socket per reconcile: a socket is cheap next
// to a dump, and a fresh one never carries leftovers of an interrupted dump.
func (c *Cleaner) dial() (*netlink.Conn, error) {
	cfg := &netlink.Config{}
	if c.ns != nil {
		cfg.NetNS = int(c.ns.Fd())
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("conntrack: dial ctnetlink: %w", err)
	}
	return conn, nil
}

// LocalAddrs lists the namespace's addresses (for NodePort destinations).
func (c *Cleaner) LocalAddrs() ([]netip.Addr, error) {
	var h *vnl.Handle
	var err error
	if c.ns != nil {
		h, err = vnl.NewHandleAt(netns.NsHandle(int(c.ns.Fd())), unix.NETLINK_ROUTE)
	} else {
		h, err = vnl.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		return nil, fmt.Errorf("conntrack: rtnetlink: %w", err)
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, vnl.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("conntrack: list addresses: %w", err)
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// Result is what one family's reconcile did.
type Result struct {
	// Listed is how many entries of the protocol the dump returned.
	Listed int
	// Stale is how many of them the plan marked; Deleted how many the
	// kernel removed (an entry that expired or was replaced meanwhile is
	// stale but not deleted, and is not an error).
	Stale, Deleted int
}

// Reconcile dumps the family's entries of protocol proto, deletes those the
// plan marks stale and reports what it did. A failed delete does not stop
// the others; all failures are returned joined.
func (c *Cleaner) Reconcile(ctx context.Context, f model.Family, proto uint8, p *Plan) (Result, error) {
	var res Result
	conn, err := c.dial()
	if err != nil {
		return res, err
	}
	defer conn.Close()
	entries, err := dump(conn, f, proto)
	if err != nil {
		return res, err
	}
	res.Listed = len(entries)
	var errs []error
	for i := range entries {
		e := &entries[i]
		if e.Proto != proto || !p.Stale(e) {
			continue
		}
		res.Stale++
		if err := ctx.Err(); err != nil {
			errs = append(errs, fmt.Errorf("conntrack: stopped after %d deletions: %w", res.Deleted, err))
			break
		}
		if err := del(conn, f, e); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // expired, deleted by someone else, or a new entry reuses the tuple
			}
			errs = append(errs, fmt.Errorf("conntrack: delete %s: %w", e, err))
			continue
		}
		res.Deleted++
	}
	return res, errors.Join(errs...)
}

func nfFamily(f model.Family) netfilter.ProtoFamily {
	if f == model.IPv6 {
		return netfilter.ProtoIPv6
	}
	return netfilter.ProtoIPv4
}

// dump lists the family's entries whose original protocol is proto. The
// kernel filters by family (nfgenmsg) and, through CTA_FILTER, by protocol,
// so a node with a large TCP table sends only its UDP entries.
func dump(conn *netlink.Conn, f model.Family, proto uint8) ([]Entry, error) {
	flags := make([]byte, 4)
	binary.NativeEndian.PutUint32(flags, filterProtoNum) // NLA_U32: host order
	req, err := netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysCTNetlink,
		MessageType: netfilter.MessageType(ctGet),
		Family:      nfFamily(f),
		Flags:       netlink.Request | netlink.Dump,
	}, []netfilter.Attribute{
		{Type: ctaTupleOrig, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaTupleProto, Nested: true, Children: []netfilter.Attribute{
				{Type: ctaProtoNum, Data: []byte{proto}},
			}},
		}},
		{Type: ctaFilter, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaFilterOrigFlags, Data: flags},
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("conntrack: build dump request: %w", err)
	}
	msgs, err := conn.Execute(req)
	if err != nil {
		return nil, fmt.Errorf("conntrack: dump %s: %w", FamilyLabel(f), err)
	}
	out := make([]Entry, 0, len(msgs))
	for _, m := range msgs {
		e, err := decode(m.Data)
		if err != nil {
			return nil, fmt.Errorf("conntrack: decode dumped entry: %w", err)
		}
		out = append(out, e)
	}
	return out, nil
}

// decode reads the few attributes the reconciler needs from one dumped
// entry (nfgenmsg header, then attributes), skipping counters, timestamps
// and the rest: a dump of a large table is decoded in one pass with no
// allocation per attribute.
func decode(b []byte) (Entry, error) {
	var e Entry
	if len(b) < 4 {
		return e, errors.New("short message")
	}
	ad, err := netlink.NewAttributeDecoder(b[4:])
	if err != nil {
		return e, err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch ad.Type() {
		case ctaTupleOrig:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				e.Proto, e.OrigSrc, e.OrigDst = decodeTuple(nad)
				return nil
			})
		case ctaTupleReply:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				_, e.ReplySrc, _ = decodeTuple(nad)
				return nil
			})
		case ctaID:
			e.ID = ad.Uint32()
		case ctaZone:
			e.Zone = ad.Uint16()
		}
	}
	return e, ad.Err()
}

func decodeTuple(ad *netlink.AttributeDecoder) (proto uint8, src, dst netip.AddrPort) {
	var sa, da netip.Addr
	var sp, dp uint16
	for ad.Next() {
		switch ad.Type() {
		case ctaTupleIP:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case ctaIPv4Src, ctaIPv6Src:
						sa, _ = netip.AddrFromSlice(nad.Bytes())
					case ctaIPv4Dst, ctaIPv6Dst:
						da, _ = netip.AddrFromSlice(nad.Bytes())
					}
				}
				return nil
			})
		case ctaTupleProto:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case ctaProtoNum:
						proto = nad.Uint8()
					case ctaProtoSrcPort:
						sp = nad.Uint16()
					case ctaProtoDstPort:
						dp = nad.Uint16()
					}
				}
				return nil
			})
		}
	}
	return proto, netip.AddrPortFrom(sa, sp), netip.AddrPortFrom(da, dp)
}

// del deletes one entry by its original tuple, zone and ID: if the entry
// expired and a new one reuses the tuple (the client's next datagram, now
// DNATed by the current rules), the ID differs and the kernel answers
// ENOENT instead of cutting the healthy new flow.
func del(conn *netlink.Conn, f model.Family, e *Entry) error {
	src, dst := ctaIPv4Src, ctaIPv4Dst
	if f == model.IPv6 {
		src, dst = ctaIPv6Src, ctaIPv6Dst
	}
	port := func(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }
	attrs := []netfilter.Attribute{
		{Type: ctaTupleOrig, Nested: true, Children: []netfilter.Attribute{
			{Type: ctaTupleIP, Nested: true, Children: []netfilter.Attribute{
				{Type: uint16(src), Data: e.OrigSrc.Addr().AsSlice()},
				{Type: uint16(dst), Data: e.OrigDst.Addr().AsSlice()},
			}},
			{Type: ctaTupleProto, Nested: true, Children: []netfilter.Attribute{
				{Type: ctaProtoNum, Data: []byte{e.Proto}},
				{Type: ctaProtoSrcPort, Data: port(e.OrigSrc.Port())},
				{Type: ctaProtoDstPort, Data: port(e.OrigDst.Port())},
			}},
		}},
		{Type: ctaID, Data: binary.BigEndian.AppendUint32(nil, e.ID)},
	}
	if e.Zone != 0 {
		attrs = append(attrs, netfilter.Attribute{Type: ctaZone, Data: port(e.Zone)})
	}
	req, err := netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysCTNetlink,
		MessageType: netfilter.MessageType(ctDelete),
		Family:      nfFamily(f),
		Flags:       netlink.Request | netlink.Acknowledge,
	}, attrs)
	if err != nil {
		return err
	}
	_, err = conn.Execute(req)
	return err
}

// String renders an entry as conntrack(8) would list its tuples.
func (e *Entry) String() string {
	return fmt.Sprintf("proto %d %s -> %s reply from %s", e.Proto, e.OrigSrc, e.OrigDst, e.ReplySrc)
}
