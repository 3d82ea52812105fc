package nftables

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// Rules are most of a cold start's messages (~70k at 10k Services), and
// google/nftables' Conn.AddRule spent about as much CPU wrapping each rule
// (attribute slices, several appends and copies per message) as encoding
// its expressions. ruleEncoder builds the NFT_MSG_NEWRULE message itself:
// the expressions are still encoded by the library (expr.Marshal), the
// envelope is written into one exact-size buffer, and the encoding of the
// typed expressions that repeat across Services (protocol match, mark,
// numgen, jumps to static chains) is kept and reused. The result is
// byte-for-byte what Conn.AddRule produces (TestRuleEncoderMatchesLibrary).

const newRuleType = netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWRULE)

type ruleEncoder struct {
	f     model.Family
	table string
	cache map[rs.Expr][]byte // list elements of one typed expression
	elems []byte             // scratch: the list elements of one rule
	dnat  *dnatTemplate      // nil until the first DNAT; see dnatTemplate
}

// dnatTemplate is the encoding of one DNAT with the offsets of its address
// and port bytes. Every endpoint has a DNAT (50k at 10k Services × 5) and
// they differ only in those bytes, so copying and patching the template
// replaces three library marshals per endpoint (a fifth of a cold start's
// allocations).
type dnatTemplate struct {
	b          []byte
	addr, port int
	ok         bool // false: the sentinel was not found once; use the library
}

// Sentinels whose bytes occur nowhere else in a DNAT's encoding (checked).
var (
	dnatSentinel4 = netip.AddrPortFrom(netip.AddrFrom4([4]byte{0xa5, 0x5a, 0xc3, 0x3c}), 0xe77e)
	dnatSentinel6 = netip.AddrPortFrom(netip.AddrFrom16([16]byte{0xa5, 0x5a, 0xc3, 0x3c, 0xa5, 0x5a, 0xc3, 0x3c, 0xa5, 0x5a, 0xc3, 0x3c, 0xa5, 0x5a, 0xc3, 0x3c}), 0xe77e)
)

func (e *ruleEncoder) dnatTemplate() *dnatTemplate {
	if e.dnat != nil {
		return e.dnat
	}
	e.dnat = &dnatTemplate{}
	sent := dnatSentinel4
	if e.f == model.IPv6 {
		sent = dnatSentinel6
	}
	b, err := e.marshalExpr(nil, rs.DNAT{To: sent})
	if err != nil {
		return e.dnat
	}
	addr, port := sent.Addr().AsSlice(), []byte{byte(sent.Port() >> 8), byte(sent.Port())}
	if bytes.Count(b, addr) != 1 || bytes.Count(b, port) != 1 {
		return e.dnat
	}
	e.dnat.b, e.dnat.addr, e.dnat.port, e.dnat.ok = b, bytes.Index(b, addr), bytes.Index(b, port), true
	return e.dnat
}

func newRuleEncoder(f model.Family, table string) *ruleEncoder {
	return &ruleEncoder{f: f, table: table, cache: map[rs.Expr][]byte{}}
}

// reusable reports whether the encoding of e is likely shared by many
// rules; per-endpoint values (DNAT targets, host addresses, affinity sets)
// are not worth keeping.
func reusable(e rs.Expr) bool {
	switch e := e.(type) {
	case rs.DNAT, rs.UpdateSaddr, rs.MatchSaddrInSet:
		return false
	case rs.MatchAddr:
		return e.Prefix.Bits() != e.Prefix.Addr().BitLen()
	case rs.Verdict:
		// Static chains only; service chain names are unique.
		return e.Chain == "" || e.Chain == rs.ChainMarkForMasq || e.Chain == rs.ChainReject
	}
	return true
}

func putAttrHeader(b []byte, l int, typ uint16) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	return binary.NativeEndian.AppendUint16(b, typ)
}

func pad(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// appendExpr appends the NFTA_LIST_ELEM attributes of one typed expression.
func (e *ruleEncoder) appendExpr(dst []byte, x rs.Expr) ([]byte, error) {
	if b, ok := e.cache[x]; ok {
		return append(dst, b...), nil
	}
	if d, ok := x.(rs.DNAT); ok && model.FamilyOf(d.To.Addr()) == e.f {
		if t := e.dnatTemplate(); t.ok {
			start := len(dst)
			dst = append(dst, t.b...)
			a := d.To.Addr().As16()
			copy(dst[start+t.addr:], a[16-d.To.Addr().BitLen()/8:])
			binary.BigEndian.PutUint16(dst[start+t.port:], d.To.Port())
			return dst, nil
		}
	}
	start := len(dst)
	dst, err := e.marshalExpr(dst, x)
	if err != nil {
		return dst, err
	}
	if reusable(x) {
		e.cache[x] = append([]byte(nil), dst[start:]...)
	}
	return dst, nil
}

// marshalExpr appends x's list elements as the library encodes them.
func (e *ruleEncoder) marshalExpr(dst []byte, x rs.Expr) ([]byte, error) {
	exprs, err := ruleExprs(e.f, rs.Rule{x})
	if err != nil {
		return dst, err
	}
	for _, ex := range exprs {
		b, err := expr.Marshal(byte(tableFamily(e.f)), ex)
		if err != nil {
			return dst, fmt.Errorf("encoding %T: %w", ex, err)
		}
		dst = putAttrHeader(dst, unix.NLA_HDRLEN+len(b), unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM)
		dst = pad(append(dst, b...))
	}
	return dst, nil
}

// exprs returns the NFTA_LIST_ELEM attributes of r's expressions, as sent
// in NFTA_RULE_EXPRESSIONS. The slice is scratch space, valid until the next
// call.
func (e *ruleEncoder) exprs(r rs.Rule) ([]byte, error) {
	e.elems = e.elems[:0]
	for _, x := range r {
		var err error
		if e.elems, err = e.appendExpr(e.elems, x); err != nil {
			return nil, err
		}
	}
	return e.elems, nil
}

// rule returns the message appending r to chain.
func (e *ruleEncoder) rule(chain string, r rs.Rule) (netlink.Message, error) {
	if _, err := e.exprs(r); err != nil {
		return netlink.Message{}, fmt.Errorf("chain %s: %w", chain, err)
	}
	strAttr := func(s string) int { return (unix.NLA_HDRLEN + len(s) + 1 + 3) &^ 3 }
	size := 4 + strAttr(e.table) + strAttr(chain) + unix.NLA_HDRLEN + len(e.elems)
	b := make([]byte, 0, size)
	b = append(b, byte(tableFamily(e.f)), unix.NFNETLINK_V0, 0, 0)
	for _, a := range []struct {
		typ uint16
		s   string
	}{{unix.NFTA_RULE_TABLE, e.table}, {unix.NFTA_RULE_CHAIN, chain}} {
		b = putAttrHeader(b, unix.NLA_HDRLEN+len(a.s)+1, a.typ)
		b = pad(append(append(b, a.s...), 0))
	}
	b = putAttrHeader(b, unix.NLA_HDRLEN+len(e.elems), unix.NLA_F_NESTED|unix.NFTA_RULE_EXPRESSIONS)
	b = append(b, e.elems...)
	return netlink.Message{
		Header: netlink.Header{Type: newRuleType,
			Flags: netlink.Request | netlink.Acknowledge | netlink.Create | netlink.Echo | unix.NLM_F_APPEND},
		Data: b,
	}, nil
}
