package ipvs

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// TableName is the nftables table (family inet) miniproxy's IPVS mode owns.
// Nothing outside it is ever touched.
const TableName = "miniproxy-ipvs"

// ownedSetName (+ "4" / "6") is the set in TableName that records every
// virtual server miniproxy may have created. No rule uses it: it is the
// ownership record a restarted process and --cleanup read back. A key is
// added before its virtual server is created and removed only after the
// virtual server is gone, so at every instant the kernel's record covers
// every virtual server miniproxy made (see Backend.Sync).
const ownedSetName = "owned-vs"

// Register numbers: NFT_REG32_00 onwards, so concatenated keys can be built
// field by field (each field padded to 4 bytes, as nft does).
const reg32base = 8

type famInfo struct {
	f       model.Family
	suffix  string
	nfproto byte
	addrT   nftables.SetDatatype
	alen    uint32
	saddr   uint32 // network header offsets
	daddr   uint32
}

var families = []famInfo{
	{model.IPv4, "4", unix.NFPROTO_IPV4, nftables.TypeIPAddr, 4, 12, 16},
	{model.IPv6, "6", unix.NFPROTO_IPV6, nftables.TypeIP6Addr, 16, 8, 24},
}

func (fi famInfo) vipType() nftables.SetDatatype {
	return nftables.MustConcatSetType(fi.addrT, nftables.TypeInetProto, nftables.TypeInetService)
}

// vipKey encodes addr . proto . port the way the kernel compares a
// concatenation: every field padded to a multiple of 4 bytes.
func vipKey(k Key) []byte {
	a := k.IP.AsSlice()
	b := make([]byte, 0, len(a)+8)
	b = append(b, a...)
	b = append(b, protoNum(k.Proto), 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, k.Port)
	return append(b, 0, 0)
}

func decodeVIPKey(b []byte) (Key, bool) {
	var alen int
	switch len(b) {
	case 12:
		alen = 4
	case 24:
		alen = 16
	default:
		return Key{}, false
	}
	ip, _ := netip.AddrFromSlice(b[:alen])
	p, ok := protoOf(uint16(b[alen]))
	if !ok {
		return Key{}, false
	}
	return Key{IP: ip, Proto: p, Port: binary.BigEndian.Uint16(b[alen+4:])}, true
}

// protoNum is p's IP protocol number, as IPVS and nftables keys carry it.
func protoNum(p model.Protocol) byte {
	switch p {
	case model.UDP:
		return unix.IPPROTO_UDP
	case model.SCTP:
		return unix.IPPROTO_SCTP
	default:
		return unix.IPPROTO_TCP
	}
}

// protoOf is protoNum's inverse; false for a protocol no Service uses.
func protoOf(num uint16) (model.Protocol, bool) {
	switch num {
	case unix.IPPROTO_TCP:
		return model.TCP, true
	case unix.IPPROTO_UDP:
		return model.UDP, true
	case unix.IPPROTO_SCTP:
		return model.SCTP, true
	}
	return "", false
}

// loadVIP puts daddr . l4proto . th dport into the concatenation registers.
func loadVIP(fi famInfo) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: reg32base, Base: expr.PayloadBaseNetworkHeader, Offset: fi.daddr, Len: fi.alen},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg32base + fi.alen/4},
		&expr.Payload{DestRegister: reg32base + fi.alen/4 + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
	}
}

func matchFamily(fi famInfo) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fi.nfproto}},
	}
}

func setMark(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^mark), Xor: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// prefixElems turns prefixes into interval-set elements [start, end+1).
func prefixElems(ps []netip.Prefix) []nftables.SetElement {
	var out []nftables.SetElement
	for _, p := range ps {
		p = p.Masked()
		start := p.Addr()
		last := lastAddr(p)
		out = append(out, nftables.SetElement{Key: start.AsSlice()})
		if next := last.Next(); next.IsValid() {
			out = append(out, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - uint(i%8))
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// batchSendBuffer is the send buffer of the nftables socket. A batch is one
// datagram, and a table write carries every virtual server in three or four
// sets (~30 bytes each), so the default buffer (~208 KiB) fails with
// EMSGSIZE past a few thousand virtual servers. It is a limit: only what a
// batch uses is allocated.
const batchSendBuffer = 64 << 20

// bigSendBuffer raises the socket's send buffer to batchSendBuffer
// (SO_SNDBUFFORCE, which needs CAP_NET_ADMIN, as the rest of the backend does;
// else SO_SNDBUF, capped by net.core.wmem_max).
func bigSendBuffer(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("nftables socket: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, batchSendBuffer); serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, batchSendBuffer)
		}
	}); err != nil {
		return fmt.Errorf("nftables socket: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("nftables socket send buffer: %w", serr)
	}
	return nil
}

// elemChunk bounds the elements per netlink message: the element list is one
// attribute, whose length is 16 bits, so a few thousand elements in one
// message overflow it and the kernel rejects the batch.
const elemChunk = 1024

// addSet queues the creation of s (a no-op if it exists) and its elements in
// messages of at most elemChunk elements. Interval sets (a few prefixes
// each) go in one message so no start/end pair is split.
func addSet(c *nftables.Conn, s *nftables.Set, elems []nftables.SetElement) error {
	if s.Interval {
		if err := c.AddSet(s, elems); err != nil {
			return fmt.Errorf("queue set %s: %w", s.Name, err)
		}
		return nil
	}
	if err := c.AddSet(s, nil); err != nil {
		return fmt.Errorf("queue set %s: %w", s.Name, err)
	}
	for len(elems) > 0 {
		n := min(len(elems), elemChunk)
		if err := c.SetAddElements(s, elems[:n]); err != nil {
			return fmt.Errorf("queue elements of set %s: %w", s.Name, err)
		}
		elems = elems[n:]
	}
	return nil
}

func ownedSet(t *nftables.Table, fi famInfo) *nftables.Set {
	return &nftables.Set{Table: t, Name: ownedSetName + fi.suffix, KeyType: fi.vipType(), Concatenation: true}
}

func keyElems(keys []Key, f model.Family) []nftables.SetElement {
	var out []nftables.SetElement
	for _, k := range keys {
		if model.FamilyOf(k.IP) == f {
			out = append(out, nftables.SetElement{Key: vipKey(k)})
		}
	}
	return out
}

// recordOwned adds keys to the ownership record in one batch, creating the
// table and the sets if they do not exist yet and leaving everything else in
// the table as it is (add without "exclusive" is a no-op on what exists).
func recordOwned(c *nftables.Conn, keys []Key) error {
	t := c.AddTable(&nftables.Table{Name: TableName, Family: nftables.TableFamilyINet})
	for _, fi := range families {
		if err := addSet(c, ownedSet(t, fi), keyElems(keys, fi.f)); err != nil {
			return err
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("record %d virtual servers in %s: %w", len(keys), TableName, err)
	}
	return nil
}

// queueTable queues, on c, the replacement of miniproxy's table by one
// rendered from f, the addresses bound to kube-ipvs0 and the ownership record
// owned. The caller's Flush sends it as one netlink batch, so the swap is
// atomic and the record is never absent. It returns the number of rules and
// set elements queued.
func queueTable(c *nftables.Conn, f *Filter, bound []netip.Addr, owned []Key) (int, error) {
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	// add + delete + add: replaces the table whether or not it exists,
	// inside one transaction.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	n := 0
	mark := f.MasqMark

	natPre := c.AddChain(&nftables.Chain{Name: "nat-prerouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-100)})
	natOut := c.AddChain(&nftables.Chain{Name: "nat-output", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(-100)})
	natPost := c.AddChain(&nftables.Chain{Name: "nat-postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityRef(100)})
	input := c.AddChain(&nftables.Chain{Name: "filter-input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityRef(0)})
	svc := c.AddChain(&nftables.Chain{Name: "services", Table: t})
	for _, ch := range []*nftables.Chain{natPre, natOut} {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: svc.Name}}})
		n++
	}
	// Masquerade what the services chain flagged, clearing the flag so a
	// packet that passes through another node's rules is judged afresh.
	c.AddRule(&nftables.Rule{Table: t, Chain: natPost, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mark), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(^mark), Xor: make([]byte, 4)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		&expr.Masq{},
	}})
	n++

	addSet := func(s *nftables.Set, elems []nftables.SetElement) error {
		n += len(elems)
		return addSet(c, s, elems)
	}
	lookup := func(s *nftables.Set, reg uint32, invert bool) *expr.Lookup {
		return &expr.Lookup{SourceRegister: reg, SetName: s.Name, SetID: s.ID, Invert: invert}
	}
	byFam := func(keys []Key, fi famInfo) []nftables.SetElement { return keyElems(keys, fi.f) }
	for _, fi := range families {
		if err := addSet(ownedSet(t, fi), byFam(owned, fi)); err != nil {
			return n, err
		}
		vipSet := func(name string) *nftables.Set {
			return &nftables.Set{Table: t, Name: name + fi.suffix, KeyType: fi.vipType(), Concatenation: true}
		}
		clusterVIPs, masqVIPs, allVIPs := vipSet("cluster-vips"), vipSet("masq-vips"), vipSet("all-vips")
		ipvsIPs := &nftables.Set{Table: t, Name: "ipvs-ips" + fi.suffix, KeyType: fi.addrT}
		for _, s := range []struct {
			set *nftables.Set
			el  []nftables.SetElement
		}{{clusterVIPs, byFam(f.ClusterVIPs, fi)}, {masqVIPs, byFam(f.MasqVIPs, fi)}, {allVIPs, byFam(f.AllVIPs, fi)}} {
			if err := addSet(s.set, s.el); err != nil {
				return n, err
			}
		}
		var ipEl []nftables.SetElement
		for _, a := range bound {
			if model.FamilyOf(a) == fi.f {
				ipEl = append(ipEl, nftables.SetElement{Key: a.AsSlice()})
			}
		}
		if err := addSet(ipvsIPs, ipEl); err != nil {
			return n, err
		}

		// Cluster IPs: masquerade unless the source is a local pod.
		var local []netip.Prefix
		for _, p := range f.LocalCIDRs {
			if model.FamilyOf(p.Addr()) == fi.f {
				local = append(local, p)
			}
		}
		switch {
		case f.MasqueradeAll:
			c.AddRule(&nftables.Rule{Table: t, Chain: svc, Exprs: concat(matchFamily(fi), loadVIP(fi),
				[]expr.Any{lookup(clusterVIPs, reg32base, false)}, setMark(mark))})
			n++
		case len(local) > 0:
			localSet := &nftables.Set{Table: t, Name: "local-cidrs" + fi.suffix, KeyType: fi.addrT, Interval: true}
			if err := addSet(localSet, prefixElems(local)); err != nil {
				return n, err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: svc, Exprs: concat(matchFamily(fi),
				[]expr.Any{
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fi.saddr, Len: fi.alen},
					lookup(localSet, 1, true),
				}, loadVIP(fi), []expr.Any{lookup(clusterVIPs, reg32base, false)}, setMark(mark))})
			n++
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: svc, Exprs: concat(matchFamily(fi), loadVIP(fi),
			[]expr.Any{lookup(masqVIPs, reg32base, false)}, setMark(mark))})
		n++

		// loadBalancerSourceRanges: anything else is dropped before IPVS
		// (which hooks LOCAL_IN at a later priority) sees it.
		for i, sr := range f.SourceRanges {
			if model.FamilyOf(sr.VIP.IP) != fi.f {
				continue
			}
			allowed := &nftables.Set{Table: t, Name: fmt.Sprintf("lb-src%s-%d", fi.suffix, i), KeyType: fi.addrT, Interval: true}
			if err := addSet(allowed, prefixElems(sr.Allowed)); err != nil {
				return n, err
			}
			one := &nftables.Set{Table: t, Name: fmt.Sprintf("lb-vip%s-%d", fi.suffix, i), KeyType: fi.vipType(), Concatenation: true}
			if err := addSet(one, []nftables.SetElement{{Key: vipKey(sr.VIP)}}); err != nil {
				return n, err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: concat(matchFamily(fi), loadVIP(fi),
				[]expr.Any{
					lookup(one, reg32base, false),
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fi.saddr, Len: fi.alen},
					lookup(allowed, 1, true),
					&expr.Verdict{Kind: expr.VerdictDrop},
				})})
			n++
		}

		// A service address answers only on service ports: new connections
		// to any other port are rejected, not delivered to node sockets.
		for _, p := range []model.Protocol{model.TCP, model.UDP, model.SCTP} {
			rej := &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH}
			if p == model.TCP {
				rej = &expr.Reject{Type: unix.NFT_REJECT_TCP_RST}
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: concat(matchFamily(fi),
				[]expr.Any{
					&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{protoNum(p)}},
					&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
					&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
						Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: make([]byte, 4)},
					&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fi.daddr, Len: fi.alen},
					lookup(ipvsIPs, 1, false),
				}, loadVIP(fi), []expr.Any{lookup(allVIPs, reg32base, true), rej})})
			n++
		}
	}
	return n, nil
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// readOwnedVIPs returns the virtual servers recorded in miniproxy's table, or
// nil when the table does not exist: the owned-vs sets, and the all-vips sets
// that were the record of earlier versions (every key in all-vips is in
// owned-vs when this version wrote the table, so reading both is harmless).
func readOwnedVIPs(c *nftables.Conn) ([]Key, error) {
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	found := false
	for _, x := range tables {
		if x.Name == TableName {
			found = true
		}
	}
	if !found {
		return nil, nil
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("list sets of %s: %w", TableName, err)
	}
	var out []Key
	for _, s := range sets {
		switch s.Name {
		case ownedSetName + "4", ownedSetName + "6", "all-vips4", "all-vips6":
		default:
			continue
		}
		els, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("read set %s: %w", s.Name, err)
		}
		for _, e := range els {
			if k, ok := decodeVIPKey(e.Key); ok {
				out = append(out, k)
			}
		}
	}
	return out, nil
}
