package nftables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The full-sync read-back compares every rule of every chain of ours with
// what miniproxy would write, expression by expression, including every
// value (addresses, ports, marks, set names, jump targets). Two things make
// that cheap enough to do on every full sync at 10k Services
// (bench/results/nftables-drift.md):
//   - dumper reads with one dump request per chain on a raw socket with a
//     reused buffer: the kernel's whole-table rule dump restarts its walk for
//     every reply buffer (minutes at 30k Services), a per-chain dump is a hash
//     lookup plus the chain's rules; the library's GetRules allocates a typed
//     expression per attribute.
//   - canonical form: the kernel does not dump rules byte for byte as they
//     were sent (attribute order, the nested flag, registers renumbered,
//     zero-valued attributes added or left out), so both sides are brought
//     to one canonical form and compared as bytes, with nothing decoded into
//     typed values.

// dumper runs netlink dump requests on one NETLINK_NETFILTER socket.
type dumper struct {
	nl  *netlink.Conn
	raw syscall.RawConn
	buf []byte
	req []byte
	seq uint32
}

func newDumper(netns int) (*dumper, error) {
	nl, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netns})
	if err != nil {
		return nil, fmt.Errorf("dialing netlink: %w", err)
	}
	raw, err := nl.SyscallConn()
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("netlink raw conn: %w", err)
	}
	// A drift check must not hang a sync forever on a kernel that does
	// not answer; a full read at 10k Services takes about a second.
	if err := nl.SetReadDeadline(time.Now().Add(5 * time.Minute)); err != nil {
		nl.Close()
		return nil, fmt.Errorf("netlink read deadline: %w", err)
	}
	// The kernel sizes dump replies after the largest buffer a reader
	// offered (capped at 32 KiB of payload per reply).
	return &dumper{nl: nl, raw: raw, buf: make([]byte, 64<<10)}, nil
}

func (d *dumper) Close() error { return d.nl.Close() }

// errDumpInterrupted: the ruleset changed while a dump was running, so what
// was read may be a mix of two generations.
var errDumpInterrupted = errors.New("dump interrupted by a concurrent commit")

// dump sends one NFT_MSG_GET* dump request with the given attributes and
// calls fn with the attributes of every reply message (after the nfgenmsg
// header). The slice passed to fn is only valid during the call.
func (d *dumper) dump(msg uint16, family byte, attrs []byte, fn func(attrs []byte) error) error {
	d.seq++
	l := unix.NLMSG_HDRLEN + 4 + len(attrs)
	d.req = d.req[:0]
	d.req = binary.NativeEndian.AppendUint32(d.req, uint32(l))
	d.req = binary.NativeEndian.AppendUint16(d.req, uint16(unix.NFNL_SUBSYS_NFTABLES<<8|msg))
	d.req = binary.NativeEndian.AppendUint16(d.req, uint16(unix.NLM_F_REQUEST|unix.NLM_F_DUMP))
	d.req = binary.NativeEndian.AppendUint32(d.req, d.seq)
	d.req = binary.NativeEndian.AppendUint32(d.req, 0)
	d.req = append(d.req, family, unix.NFNETLINK_V0, 0, 0)
	d.req = append(d.req, attrs...)
	var werr error
	if err := d.raw.Write(func(fd uintptr) bool {
		werr = unix.Sendto(int(fd), d.req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return !errors.Is(werr, unix.EAGAIN)
	}); err != nil {
		return fmt.Errorf("sending dump request: %w", err)
	}
	if werr != nil {
		return fmt.Errorf("sending dump request: %w", os.NewSyscallError("sendto", werr))
	}
	var ferr error // fn's first error; the dump is still read to its end
	intr := false
	for {
		var n int
		var rerr error
		if err := d.raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), d.buf, 0)
			return !errors.Is(rerr, unix.EAGAIN)
		}); err != nil {
			return fmt.Errorf("reading dump: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("reading dump: %w", os.NewSyscallError("recvfrom", rerr))
		}
		b := d.buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			ml := int(binary.NativeEndian.Uint32(b))
			if ml < unix.NLMSG_HDRLEN || ml > len(b) {
				return errors.New("reading dump: truncated netlink message")
			}
			typ := binary.NativeEndian.Uint16(b[4:])
			flags := binary.NativeEndian.Uint16(b[6:])
			seq := binary.NativeEndian.Uint32(b[8:])
			body := b[unix.NLMSG_HDRLEN:ml]
			b = b[min(len(b), (ml+3)&^3):]
			if seq != d.seq {
				continue // a late answer to an earlier request
			}
			if flags&unix.NLM_F_DUMP_INTR != 0 {
				intr = true
			}
			switch typ {
			case unix.NLMSG_DONE:
				if intr && ferr == nil {
					ferr = errDumpInterrupted
				}
				return ferr
			case unix.NLMSG_ERROR:
				if len(body) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(body)); errno != 0 {
						return syscall.Errno(errno)
					}
				}
				return ferr
			}
			if len(body) < 4 || ferr != nil {
				continue
			}
			ferr = fn(body[4:])
		}
	}
}

// attr is one netlink attribute: its type without the nested and
// byte-order flags, and its payload.
type attr struct {
	typ uint16
	val []byte
}

// nextAttr splits the first attribute off b. ok is false at the end of b
// or on a malformed attribute.
func nextAttr(b []byte) (a attr, rest []byte, ok bool) {
	if len(b) < unix.NLA_HDRLEN {
		return a, nil, false
	}
	l := int(binary.NativeEndian.Uint16(b))
	if l < unix.NLA_HDRLEN || l > len(b) {
		return a, nil, false
	}
	a.typ = binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
	a.val = b[unix.NLA_HDRLEN:l]
	return a, b[min(len(b), (l+3)&^3):], true
}

// findAttr returns the payload of the first attribute of type typ in b.
func findAttr(b []byte, typ uint16) ([]byte, bool) {
	for {
		a, rest, ok := nextAttr(b)
		if !ok {
			return nil, false
		}
		if a.typ == typ {
			return a.val, true
		}
		b = rest
	}
}

// canonRule appends the canonical form of one rule's expression list (the
// payload of NFTA_RULE_EXPRESSIONS: NFTA_LIST_ELEM attributes) to dst. The
// same rule gives the same bytes whether it comes from ruleEncoder or from a
// kernel dump; any difference in an expression's name or in any of its
// values gives different bytes.
func canonRule(dst, list []byte) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0) // length of this rule's form, set below
	for b := list; len(b) > 0; {
		el, rest, ok := nextAttr(b)
		if !ok {
			// Not something we could have sent: keep the raw bytes,
			// which never equal a well-formed canonical form.
			dst = append(dst, 0xff)
			dst = append(dst, b...)
			break
		}
		b = rest
		name, _ := findAttr(el.val, unix.NFTA_EXPR_NAME)
		data, _ := findAttr(el.val, unix.NFTA_EXPR_DATA)
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		dst = append(dst, byte(len(name)))
		dst = append(dst, name...)
		dst = canonAttrs(dst, string(name), data, 0)
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start))
	return dst
}

// maxAttrs bounds the attributes of one expression (the largest we use has
// 7); an expression with more is copied raw, so it compares unequal.
const maxAttrs = 16

// canonAttrs appends the attributes of an expression's data (depth 0) or of
// a nested NFTA_DATA (depth 1, 2) sorted by type. At depth 0, registers are
// renumbered as the kernel dumps them and zero-valued scalars are left out
// (the kernel adds some, e.g. lookup flags and the bitwise operation, and
// does not echo others, e.g. the lookup's set id); zeros inside a nested
// data value (an address, a verdict code) are kept.
func canonAttrs(dst []byte, expr string, b []byte, depth int) []byte {
	var as [maxAttrs]attr
	n := 0
	for len(b) > 0 {
		a, rest, ok := nextAttr(b)
		if !ok || n == maxAttrs {
			dst = append(dst, 0xff)
			return append(dst, b...)
		}
		as[n] = a
		n++
		b = rest
	}
	var natFlags [4]byte
	if expr == "nat" && depth == 0 {
		n = canonNAT(&as, n, natFlags[:])
	}
	// Insertion sort: a handful of attributes.
	for i := 1; i < n; i++ {
		for j := i; j > 0 && as[j].typ < as[j-1].typ; j-- {
			as[j], as[j-1] = as[j-1], as[j]
		}
	}
	countAt, count := len(dst), 0
	dst = append(dst, 0) // attributes written, set below
	for _, a := range as[:n] {
		var reg [4]byte
		val := a.val
		nested := false
		if depth == 0 {
			switch {
			case isRegister(expr, a.typ) && len(val) == 4:
				binary.BigEndian.PutUint32(reg[:], dumpedRegister(binary.BigEndian.Uint32(val)))
				val = reg[:]
			case isData(expr, a.typ):
				nested = true
			case allZero(val):
				continue
			}
		} else if depth == 1 && a.typ == unix.NFTA_DATA_VERDICT {
			nested = true
		}
		count++
		dst = binary.BigEndian.AppendUint16(dst, a.typ)
		if nested {
			dst = append(dst, 'n')
			dst = canonAttrs(dst, expr, val, depth+1)
			continue
		}
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(val)))
		dst = append(dst, val...)
	}
	dst[countAt] = byte(count)
	return dst
}

// nftaBitwiseData is NFTA_BITWISE_DATA (the shift amount), missing from
// x/sys/unix.
const nftaBitwiseData = 7

// canonNAT completes a nat expression's attributes as the kernel stores them
// (nft_nat_init): a missing maximum register is the minimum one, and the
// flags include "map addresses" and "protocol specified" when there is an
// address or a port register. flags is storage for the completed flags.
func canonNAT(as *[maxAttrs]attr, n int, flags []byte) int {
	find := func(typ uint16) int {
		for i, a := range as[:n] {
			if a.typ == typ {
				return i
			}
		}
		return -1
	}
	var f uint32
	fi := find(unix.NFTA_NAT_FLAGS)
	if fi >= 0 && len(as[fi].val) == 4 {
		f = binary.BigEndian.Uint32(as[fi].val)
	}
	for _, r := range [...]struct {
		min, max uint16
		flag     uint32
	}{
		{unix.NFTA_NAT_REG_ADDR_MIN, unix.NFTA_NAT_REG_ADDR_MAX, unix.NF_NAT_RANGE_MAP_IPS},
		{unix.NFTA_NAT_REG_PROTO_MIN, unix.NFTA_NAT_REG_PROTO_MAX, unix.NF_NAT_RANGE_PROTO_SPECIFIED},
	} {
		i := find(r.min)
		if i < 0 {
			continue
		}
		f |= r.flag
		if find(r.max) < 0 && n < maxAttrs {
			as[n] = attr{typ: r.max, val: as[i].val}
			n++
		}
	}
	if f == 0 {
		return n
	}
	binary.BigEndian.PutUint32(flags, f)
	if fi >= 0 {
		as[fi].val = flags
	} else if n < maxAttrs {
		as[n] = attr{typ: unix.NFTA_NAT_FLAGS, val: flags}
		n++
	}
	return n
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// dumpedRegister is the register number the kernel dumps for r
// (nft_dump_register): the 4-byte registers NFT_REG32_00, _04, _08, _12
// share their storage with the 16-byte registers 1 … 4 and are dumped as
// those.
func dumpedRegister(r uint32) uint32 {
	if r >= unix.NFT_REG32_00 && r <= unix.NFT_REG32_15 && (r-unix.NFT_REG32_00)%4 == 0 {
		return 1 + (r-unix.NFT_REG32_00)/4
	}
	return r
}

// isRegister reports whether attribute typ of expression expr holds a
// register number (linux/netfilter/nf_tables.h).
func isRegister(expr string, typ uint16) bool {
	switch expr {
	case "immediate", "numgen", "fib", "cmp":
		return typ == 1 // *_DREG, CMP_SREG
	case "payload":
		return typ == unix.NFTA_PAYLOAD_DREG || typ == unix.NFTA_PAYLOAD_SREG
	case "meta":
		return typ == unix.NFTA_META_DREG || typ == unix.NFTA_META_SREG
	case "bitwise":
		return typ == unix.NFTA_BITWISE_SREG || typ == unix.NFTA_BITWISE_DREG
	case "lookup":
		return typ == unix.NFTA_LOOKUP_SREG || typ == unix.NFTA_LOOKUP_DREG
	case "ct":
		return typ == unix.NFTA_CT_DREG || typ == unix.NFTA_CT_SREG
	case "nat":
		return typ >= unix.NFTA_NAT_REG_ADDR_MIN && typ <= unix.NFTA_NAT_REG_PROTO_MAX
	case "masq":
		return typ == unix.NFTA_MASQ_REG_PROTO_MIN || typ == unix.NFTA_MASQ_REG_PROTO_MAX
	case "dynset":
		return typ == unix.NFTA_DYNSET_SREG_KEY || typ == unix.NFTA_DYNSET_SREG_DATA
	}
	return false
}

// isData reports whether attribute typ of expression expr is a nested
// NFTA_DATA (a value or a verdict).
func isData(expr string, typ uint16) bool {
	switch expr {
	case "immediate":
		return typ == unix.NFTA_IMMEDIATE_DATA
	case "cmp":
		return typ == unix.NFTA_CMP_DATA
	case "bitwise":
		return typ == unix.NFTA_BITWISE_MASK || typ == unix.NFTA_BITWISE_XOR || typ == nftaBitwiseData
	}
	return false
}
