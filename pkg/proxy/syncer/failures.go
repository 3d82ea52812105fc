package syncer

import (
	"strings"

	"github.com/miniproxy/miniproxy/pkg/conntrack"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// familyLabels returns the label values of the families a proxy programs
// (IPv4 when none is configured, as proxy.Config does).
func familyLabels(configured []model.Family) []string {
	if len(configured) == 0 {
		return []string{conntrack.FamilyLabel(model.IPv4)}
	}
	out := make([]string, 0, len(configured))
	for _, f := range configured {
		out = append(out, conntrack.FamilyLabel(f))
	}
	return out
}

// failedFamilies returns the ip_family values a failed sync of mode counts
// under. kube-proxy runs one proxier per family, each counting its own
// failures; miniproxy syncs every family in one call:
//   - nftables and IPVS send one transaction for all families, so a failure
//     programmed none of them: every configured family counts;
//   - iptables restores family after family and stops at the first failure,
//     which it names ("iptables IPv6 sync: …", pinned by
//     TestFailedFamiliesFromIPTablesBackend): that family counts, the ones
//     before it were committed and the ones after it were not attempted.
//     An error naming no family counts for every configured family.
func failedFamilies(mode string, configured []model.Family, err error) []string {
	all := familyLabels(configured)
	if mode != "iptables" || err == nil || len(all) == 1 {
		return all
	}
	msg := err.Error()
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if strings.Contains(msg, "iptables "+conntrack.FamilyLabel(f)+" sync:") {
			return []string{conntrack.FamilyLabel(f)}
		}
	}
	return all
}
