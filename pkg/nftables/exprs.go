package nftables

import (
	"fmt"
	"net/netip"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// Registers. Single values use the 16-byte register 1; concatenations use the
// 4-byte registers from NFT_REG32_00 on, one per 4-byte-padded component,
// which is the layout nft itself generates and decodes.
const (
	reg1    = 1
	reg2    = 2
	reg32_0 = 8
)

func tableFamily(f model.Family) gnft.TableFamily {
	if f == model.IPv6 {
		return gnft.TableFamilyIPv6
	}
	return gnft.TableFamilyIPv4
}

// addrPayload loads saddr or daddr of family f into reg.
func addrPayload(f model.Family, src bool, reg uint32) *expr.Payload {
	off, l := uint32(16), uint32(4)
	if src {
		off = 12
	}
	if f == model.IPv6 {
		off, l = 24, 16
		if src {
			off = 8
		}
	}
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l}
}

// ipsDstNAT is conntrack's IPS_DST_NAT status bit (`ct status dnat`).
const ipsDstNAT = 1 << 5

func native32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

// keyExprs loads the packet fields of key kind k starting at the concat
// registers and returns the first register.
func keyExprs(f model.Family, k rs.KeyKind) ([]expr.Any, uint32) {
	switch k {
	case rs.KeyAddr:
		return []expr.Any{addrPayload(f, true, reg1)}, reg1
	case rs.KeyDaddrProtoPort:
		next := uint32(reg32_0 + 1)
		if f == model.IPv6 {
			next = reg32_0 + 4
		}
		return []expr.Any{
			addrPayload(f, false, reg32_0),
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: next},
			&expr.Payload{DestRegister: next + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		}, reg32_0
	case rs.KeyProtoPort:
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg32_0},
			&expr.Payload{DestRegister: reg32_0 + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		}, reg32_0
	case rs.KeySaddrDaddr:
		next := uint32(reg32_0 + 1)
		if f == model.IPv6 {
			next = reg32_0 + 4
		}
		return []expr.Any{addrPayload(f, true, reg32_0), addrPayload(f, false, next)}, reg32_0
	}
	return nil, 0
}

func verdictKind(k rs.VerdictKind) expr.VerdictKind {
	switch k {
	case rs.Jump:
		return expr.VerdictJump
	case rs.Goto:
		return expr.VerdictGoto
	case rs.Return:
		return expr.VerdictReturn
	case rs.Drop:
		return expr.VerdictDrop
	}
	return expr.VerdictAccept
}

// ruleExprs translates one typed rule to netlink expressions.
func ruleExprs(f model.Family, r rs.Rule) ([]expr.Any, error) {
	var out []expr.Any
	for _, e := range r {
		switch e := e.(type) {
		case rs.MatchAddr:
			out = append(out, addrPayload(f, e.Src, reg1))
			p := e.Prefix.Masked()
			if p.Bits() != p.Addr().BitLen() {
				mask := netip.PrefixFrom(p.Addr(), p.Bits())
				out = append(out, &expr.Bitwise{SourceRegister: reg1, DestRegister: reg1,
					Len: uint32(len(p.Addr().AsSlice())), Mask: prefixMask(mask), Xor: make([]byte, len(p.Addr().AsSlice()))})
			}
			op := expr.CmpOpEq
			if e.Neg {
				op = expr.CmpOpNeq
			}
			out = append(out, &expr.Cmp{Op: op, Register: reg1, Data: p.Addr().AsSlice()})
		case rs.MatchFibLocal:
			out = append(out,
				&expr.Fib{Register: reg1, FlagSADDR: e.Src, FlagDADDR: !e.Src, ResultADDRTYPE: true},
				&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: native32(unix.RTN_LOCAL)})
		case rs.MatchL4Proto:
			out = append(out,
				&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{rs.ProtoNumber(e.Proto)}})
		case rs.MatchCtNew:
			out = append(out,
				&expr.Ct{Register: reg1, Key: expr.CtKeySTATE},
				&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
					Mask: native32(expr.CtStateBitNEW), Xor: native32(0)},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: native32(0)})
		case rs.MatchMarkClear:
			out = append(out,
				&expr.Meta{Key: expr.MetaKeyMARK, Register: reg1},
				&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4, Mask: native32(e.Bits), Xor: native32(0)},
				&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: native32(0)})
		case rs.MatchNumgen:
			out = append(out,
				&expr.Numgen{Register: reg1, Modulus: e.Mod, Type: unix.NFT_NG_RANDOM},
				&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: native32(0)})
		case rs.MatchSaddrInSet:
			out = append(out, addrPayload(f, true, reg1), &expr.Lookup{SourceRegister: reg1, SetName: e.Set})
		case rs.MatchKeyInSet:
			load, first := keyExprs(f, e.Key)
			out = append(out, load...)
			out = append(out, &expr.Lookup{SourceRegister: first, SetName: e.Set})
		case rs.MatchCtDNAT:
			out = append(out,
				&expr.Ct{Register: reg1, Key: expr.CtKeySTATUS},
				&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
					Mask: native32(ipsDstNAT), Xor: native32(0)},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: native32(0)})
		case rs.VMap:
			load, first := keyExprs(f, e.Key)
			out = append(out, load...)
			out = append(out, &expr.Lookup{SourceRegister: first, SetName: e.Map, IsDestRegSet: true, DestRegister: 0})
		case rs.Verdict:
			out = append(out, &expr.Verdict{Kind: verdictKind(e.Kind), Chain: e.Chain})
		case rs.SetMark:
			mask, xor := ^e.Bits, e.Bits // x | b == (x & ^b) ^ b
			if e.Xor {
				mask = ^uint32(0)
			}
			out = append(out,
				&expr.Meta{Key: expr.MetaKeyMARK, Register: reg1},
				&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4, Mask: native32(mask), Xor: native32(xor)},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg1})
		case rs.Masquerade:
			out = append(out, &expr.Masq{FullyRandom: true})
		case rs.DNAT:
			fam := uint32(unix.NFPROTO_IPV4)
			if f == model.IPv6 {
				fam = unix.NFPROTO_IPV6
			}
			out = append(out,
				&expr.Immediate{Register: reg1, Data: e.To.Addr().AsSlice()},
				&expr.Immediate{Register: reg2, Data: binaryutil.BigEndian.PutUint16(e.To.Port())},
				&expr.NAT{Type: expr.NATTypeDestNAT, Family: fam, RegAddrMin: reg1, RegProtoMin: reg2, Specified: true})
		case rs.Reject:
			if e.TCPReset {
				out = append(out, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
			} else {
				code := uint8(3) // ICMP port unreachable
				if f == model.IPv6 {
					code = 4 // ICMPv6 port unreachable
				}
				out = append(out, &expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: code})
			}
		case rs.UpdateSaddr:
			out = append(out, addrPayload(f, true, reg1),
				&expr.Dynset{SrcRegKey: reg1, SetName: e.Set, Operation: unix.NFT_DYNSET_OP_UPDATE})
		default:
			return nil, fmt.Errorf("no netlink encoding for expression %T", e)
		}
	}
	return out, nil
}

func prefixMask(p netip.Prefix) []byte {
	n := p.Addr().BitLen() / 8
	b := make([]byte, n)
	for i := 0; i < p.Bits(); i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return b
}

// setSpec returns the google/nftables set definition of s in table t.
func setSpec(t *gnft.Table, f model.Family, s *rs.Set) *gnft.Set {
	addrT := gnft.TypeIPAddr
	if f == model.IPv6 {
		addrT = gnft.TypeIP6Addr
	}
	g := &gnft.Set{Table: t, Name: s.Name}
	switch s.Key {
	case rs.KeyAddr:
		g.KeyType = addrT
	case rs.KeyDaddrProtoPort:
		g.KeyType = gnft.MustConcatSetType(addrT, gnft.TypeInetProto, gnft.TypeInetService)
		g.Concatenation = true
	case rs.KeyProtoPort:
		g.KeyType = gnft.MustConcatSetType(gnft.TypeInetProto, gnft.TypeInetService)
		g.Concatenation = true
	case rs.KeySaddrDaddr:
		g.KeyType = gnft.MustConcatSetType(addrT, addrT)
		g.Concatenation = true
	}
	if s.Verdict {
		g.IsMap = true
		g.DataType = gnft.TypeVerdict
	}
	if s.Timeout > 0 {
		g.HasTimeout, g.Dynamic, g.Timeout = true, true, s.Timeout
	}
	return g
}

// elementKey encodes an element key the way nft lays it out: each component
// of a concatenation padded to a multiple of 4 bytes.
func elementKey(k rs.KeyKind, e rs.Element) []byte {
	proto := []byte{rs.ProtoNumber(e.Proto), 0, 0, 0}
	port := []byte{byte(e.Port >> 8), byte(e.Port), 0, 0}
	switch k {
	case rs.KeyAddr:
		return e.Addr.AsSlice()
	case rs.KeyDaddrProtoPort:
		return append(append(e.Addr.AsSlice(), proto...), port...)
	case rs.KeyProtoPort:
		return append(proto, port...)
	case rs.KeySaddrDaddr:
		return append(e.Addr.AsSlice(), e.Addr.AsSlice()...)
	}
	return nil
}

func setElement(k rs.KeyKind, e rs.Element, verdict bool) gnft.SetElement {
	el := gnft.SetElement{Key: elementKey(k, e)}
	if verdict {
		el.VerdictData = &expr.Verdict{Kind: verdictKind(e.Verdict.Kind), Chain: e.Verdict.Chain}
	}
	return el
}
