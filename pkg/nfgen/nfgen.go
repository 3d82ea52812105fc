// Package nfgen reads the nf_tables ruleset generation of a network namespace.
//
// The kernel bumps the generation with every nf_tables commit by anyone:
// nft, iptables-nft, or miniproxy itself. A backend that records the
// generation right after its own commit and finds it unchanged later knows
// that nobody has touched any table in between, so a periodic drift check can
// end there instead of reading back a ruleset that costs seconds to list at
// 10,000 Services.
package nfgen

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Read returns the current generation of the namespace referred to by the
// open file descriptor netns (0: the caller's namespace).
func Read(netns int) (uint32, error) {
	nl, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netns})
	if err != nil {
		return 0, fmt.Errorf("nf_tables generation: dialing netlink: %w", err)
	}
	defer nl.Close()
	msgs, err := nl.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN),
			Flags: netlink.Request,
		},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, fmt.Errorf("nf_tables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, fmt.Errorf("nf_tables generation: decoding reply: %w", err)
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("nf_tables generation: no generation id in reply")
}
