package nftables

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// nla builds one netlink attribute (host byte order header, padded).
func nla(typ uint16, val []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(unix.NLA_HDRLEN+len(val)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, val...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func cat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// expr builds an NFTA_LIST_ELEM for expression name with data attributes.
func exprElem(name string, nested bool, data ...[]byte) []byte {
	dt := uint16(unix.NFTA_EXPR_DATA)
	if nested {
		dt |= unix.NLA_F_NESTED
	}
	return nla(unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM, cat(nla(unix.NFTA_EXPR_NAME, []byte(name+"\x00")), nla(dt, cat(data...))))
}

// TestCanonRuleKernelForm: a rule as the encoder sends it and as the kernel
// dumps it (attributes reordered, no nested flag, NFT_REG32_00 dumped as
// register 1, a zero-valued attribute added, a sent zero not echoed, the
// DNAT's maximum registers and flags filled in) have one canonical form; any
// changed value gives another.
func TestCanonRuleKernelForm(t *testing.T) {
	dnat := netip.MustParseAddrPort("10.180.0.1:8080")
	enc := newRuleEncoder(model.IPv4, "miniproxy")
	sent, err := enc.exprs(rs.Rule{rs.VMap{Key: rs.KeyDaddrProtoPort, Map: "service-ips"}, rs.DNAT{To: dnat}})
	if err != nil {
		t.Fatal(err)
	}
	sent = append([]byte(nil), sent...)
	kernel := func(addr []byte, port uint16, lookupSet string) []byte {
		return cat(
			exprElem("payload", false, nla(unix.NFTA_PAYLOAD_DREG, be32(1)), nla(unix.NFTA_PAYLOAD_BASE, be32(1)),
				nla(unix.NFTA_PAYLOAD_OFFSET, be32(16)), nla(unix.NFTA_PAYLOAD_LEN, be32(4))),
			exprElem("meta", false, nla(unix.NFTA_META_KEY, be32(unix.NFT_META_L4PROTO)), nla(unix.NFTA_META_DREG, be32(unix.NFT_REG32_01))),
			exprElem("payload", false, nla(unix.NFTA_PAYLOAD_DREG, be32(unix.NFT_REG32_02)), nla(unix.NFTA_PAYLOAD_BASE, be32(2)),
				nla(unix.NFTA_PAYLOAD_OFFSET, be32(2)), nla(unix.NFTA_PAYLOAD_LEN, be32(2))),
			exprElem("lookup", false, nla(unix.NFTA_LOOKUP_SET, []byte(lookupSet+"\x00")), nla(unix.NFTA_LOOKUP_SREG, be32(1)),
				nla(unix.NFTA_LOOKUP_DREG, be32(0)), nla(unix.NFTA_LOOKUP_FLAGS, be32(0))),
			exprElem("immediate", false, nla(unix.NFTA_IMMEDIATE_DREG, be32(1)), nla(unix.NFTA_IMMEDIATE_DATA, nla(unix.NFTA_DATA_VALUE, addr))),
			exprElem("immediate", false, nla(unix.NFTA_IMMEDIATE_DREG, be32(2)), nla(unix.NFTA_IMMEDIATE_DATA, nla(unix.NFTA_DATA_VALUE, binary.BigEndian.AppendUint16(nil, port)))),
			exprElem("nat", false, nla(unix.NFTA_NAT_TYPE, be32(unix.NFT_NAT_DNAT)), nla(unix.NFTA_NAT_FAMILY, be32(unix.NFPROTO_IPV4)),
				nla(unix.NFTA_NAT_REG_ADDR_MIN, be32(1)), nla(unix.NFTA_NAT_REG_ADDR_MAX, be32(1)),
				nla(unix.NFTA_NAT_REG_PROTO_MIN, be32(2)), nla(unix.NFTA_NAT_REG_PROTO_MAX, be32(2)),
				nla(unix.NFTA_NAT_FLAGS, be32(unix.NF_NAT_RANGE_MAP_IPS|unix.NF_NAT_RANGE_PROTO_SPECIFIED))),
		)
	}
	want := canonRule(nil, sent)
	if got := canonRule(nil, kernel(dnat.Addr().AsSlice(), dnat.Port(), "service-ips")); !bytes.Equal(got, want) {
		t.Fatalf("kernel form of the same rule has another canonical form:\n%x\n%x", got, want)
	}
	for name, k := range map[string][]byte{
		"DNAT address": kernel([]byte{10, 180, 0, 2}, dnat.Port(), "service-ips"),
		"DNAT port":    kernel(dnat.Addr().AsSlice(), 8081, "service-ips"),
		"lookup set":   kernel(dnat.Addr().AsSlice(), dnat.Port(), "service-nodeports"),
		"truncated":    kernel(dnat.Addr().AsSlice(), dnat.Port(), "service-ips")[:40],
	} {
		if bytes.Equal(canonRule(nil, k), want) {
			t.Errorf("a changed %s has the same canonical form", name)
		}
	}
}

func TestDumpedRegister(t *testing.T) {
	for in, want := range map[uint32]uint32{0: 0, 1: 1, 4: 4, unix.NFT_REG32_00: 1, unix.NFT_REG32_01: unix.NFT_REG32_01,
		unix.NFT_REG32_04: 2, unix.NFT_REG32_08: 3, unix.NFT_REG32_12: 4, unix.NFT_REG32_15: unix.NFT_REG32_15} {
		if got := dumpedRegister(in); got != want {
			t.Errorf("dumpedRegister(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestIsOurTable(t *testing.T) {
	for name, want := range map[string]bool{"miniproxy": true, "miniproxy-shard-00": true, "miniproxy-shard-63": true,
		"miniproxy-shard-7": false, "miniproxy-shard-007": false, "miniproxy-shard-00-backup": false,
		"miniproxy-shards": false, "miniproxy2": false, "miniproxy-ipvs": false, "miniproxy-shard-x1": false} {
		if got := rs.IsOurTable(name); got != want {
			t.Errorf("IsOurTable(%q) = %v, want %v", name, got, want)
		}
	}
}
