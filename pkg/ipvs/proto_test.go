package ipvs

import (
	"net/netip"
	"testing"

	mobyipvs "github.com/moby/ipvs"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// TestProtocolRoundTrip: the protocol number written into a virtual server
// and into the nftables ownership record reads back as the same protocol
// from both, and an unknown protocol is nobody's Service.
func TestProtocolRoundTrip(t *testing.T) {
	for _, p := range []model.Protocol{model.TCP, model.UDP, model.SCTP} {
		k := Key{IP: netip.MustParseAddr("10.96.0.10"), Proto: p, Port: 53}
		if got, ok := keyOf(&mobyipvs.Service{Address: k.IP.AsSlice(), Protocol: uint16(protoNum(p)), Port: 53}); !ok || got != k {
			t.Errorf("%s: virtual server reads back as %v (%v)", p, got, ok)
		}
		if got, ok := decodeVIPKey(vipKey(k)); !ok || got != k {
			t.Errorf("%s: ownership record reads back as %v (%v)", p, got, ok)
		}
	}
	if _, ok := keyOf(&mobyipvs.Service{Address: netip.MustParseAddr("10.96.0.10").AsSlice(), Protocol: 1, Port: 0}); ok {
		t.Error("an ICMP virtual server was taken for a Service's")
	}
}
