package ipvs

import (
	"net/netip"
	"slices"
	"sort"
)

func sameVS(a, b *VirtualServer) bool {
	return a.Key == b.Key && a.Scheduler == b.Scheduler && a.Persistence == b.Persistence &&
		slices.Equal(a.Reals, b.Reals)
}

func sameAddrs(a, b []netip.Addr) bool { return slices.Equal(a, b) }

func sameFilter(a, b *Filter) bool {
	if a.MasqueradeAll != b.MasqueradeAll || a.MasqMark != b.MasqMark ||
		!slices.Equal(a.ClusterVIPs, b.ClusterVIPs) || !slices.Equal(a.MasqVIPs, b.MasqVIPs) ||
		!slices.Equal(a.AllVIPs, b.AllVIPs) || !slices.Equal(a.LocalCIDRs, b.LocalCIDRs) ||
		len(a.SourceRanges) != len(b.SourceRanges) {
		return false
	}
	for i := range a.SourceRanges {
		if a.SourceRanges[i].VIP != b.SourceRanges[i].VIP || !slices.Equal(a.SourceRanges[i].Allowed, b.SourceRanges[i].Allowed) {
			return false
		}
	}
	return true
}

func sortedKeys(m map[Key]bool) []Key {
	out := make([]Key, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].less(out[j]) })
	return out
}
