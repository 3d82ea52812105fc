package takeover

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// Variants of iptables: the nf_tables-backed one and the legacy one. Both
// can hold rules in one namespace at the same time.
const (
	VariantNFT    = "nft"
	VariantLegacy = "legacy"
)

// Self is what miniproxy itself runs as, which decides what of kube-proxy's
// is also miniproxy's (same names) and must stay.
type Self struct {
	// Mode is miniproxy's --proxy-mode: iptables, nftables or ipvs.
	Mode string
	// Variant is the iptables variant miniproxy's iptables binary is
	// (VariantNFT or VariantLegacy; empty when there is none).
	Variant string
	// Families are the IP families miniproxy programs.
	Families []model.Family
}

func (s Self) ownsXTables(variant string, f model.Family) bool {
	return s.Mode == "iptables" && variant != "" && variant == s.Variant && slices.Contains(s.Families, f)
}

// Listing is what the kernel holds, as far as a takeover cares.
type Listing struct {
	// XTables has one dump per iptables variant and family present.
	XTables []XTablesDump
	// NFTables are the nftables tables of every family.
	NFTables []NFTable
	// IPVS is nil where the kernel has no ip_vs.
	IPVS *IPVSListing
	// IPSets are the names of the namespace's ipsets.
	IPSets []string
}

// XTablesDump is the iptables-save output of one variant and family.
type XTablesDump struct {
	Variant string
	Family  model.Family
	Save    string
}

// NFTable is an nftables table.
type NFTable struct {
	Family string // ip, ip6, inet, arp, bridge, netdev
	Name   string
}

func (t NFTable) String() string { return t.Family + " " + t.Name }

// VirtualServer is an IPVS virtual server's key.
type VirtualServer struct {
	Protocol string // tcp, udp, sctp
	Addr     netip.Addr
	Port     uint16
}

func (v VirtualServer) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(v.Addr, v.Port), v.Protocol)
}

// IPVSListing is the IPVS state of the namespace.
type IPVSListing struct {
	// Dummy reports whether kube-ipvs0 exists; DummyAddrs are its addresses.
	Dummy      bool
	DummyAddrs []netip.Addr
	// VirtualServers are every virtual server in the kernel.
	VirtualServers []VirtualServer
	// NodePorts are the ports of kube-proxy's KUBE-NODE-PORT-* ipsets, by
	// protocol: kube-proxy's record of its NodePort virtual servers.
	NodePorts map[string][]uint16
}

// Plan is what a takeover removes.
type Plan struct {
	XTables        []XTablesRemoval
	NFTables       []NFTable
	VirtualServers []VirtualServer
	DeleteDummy    bool
	IPSets         []string
}

// Empty reports whether there is nothing to remove.
func (p *Plan) Empty() bool {
	return len(p.XTables) == 0 && len(p.NFTables) == 0 && len(p.VirtualServers) == 0 && !p.DeleteDummy && len(p.IPSets) == 0
}

// XTablesRemoval is what goes from one variant and family: one restore
// input per table, and what it removes (for the log).
type XTablesRemoval struct {
	Variant string
	Family  model.Family
	Tables  []TableRemoval
}

// TableRemoval is the --noflush restore input for one table and what it
// removes.
type TableRemoval struct {
	Table string
	// Chains are deleted; Emptied are flushed but kept because a rule of
	// a chain that stays still jumps to them.
	Chains  []string
	Emptied []string
	// Jumps are the built-in chains' rules deleted, as iptables-save
	// printed them ("-A INPUT ...").
	Jumps []string
	// Restore is the iptables-restore --noflush input.
	Restore string
}

// Kube-proxy's fixed chain names per table, v1.37 (iptables and IPVS modes).
var kubeProxyChains = map[string][]string{
	"nat": {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY",
		"KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"},
	"filter": {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL",
		"KUBE-PROXY-CANARY", "KUBE-NODE-PORT", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"},
	"mangle": {"KUBE-PROXY-CANARY"},
}

// kube-proxy's per-Service chains (iptables mode), all in nat.
var kubeProxyPrefixes = []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"}

// kubeProxyOnlyJumps are comments of kube-proxy's jumps into chains whose
// names miniproxy shares but whose jump text is not miniproxy's: they go
// even where the target chain stays (IPVS mode's firewall hook).
var kubeProxyOnlyJumps = []string{"kube-proxy firewall rules"}

// kubeProxyIPSets are kube-proxy IPVS mode's ipsets (IPv6: KUBE-6-...).
var kubeProxyIPSets = []string{"KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL",
	"KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-SOURCE-IP",
	"KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP",
	"KUBE-NODE-PORT-LOCAL-UDP", "KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
	"KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS"}

// nodePortSets maps kube-proxy's NodePort ipsets to their protocol.
var nodePortSets = map[string]string{
	"KUBE-NODE-PORT-TCP": "tcp", "KUBE-NODE-PORT-LOCAL-TCP": "tcp",
	"KUBE-NODE-PORT-UDP": "udp", "KUBE-NODE-PORT-LOCAL-UDP": "udp",
	"KUBE-NODE-PORT-SCTP-HASH": "sctp", "KUBE-NODE-PORT-LOCAL-SCTP-HASH": "sctp",
}

// KubeProxyTable is the name of kube-proxy's nftables tables (ip and ip6).
const KubeProxyTable = "kube-proxy"

// DummyInterface is kube-proxy's (and miniproxy IPVS mode's) dummy interface.
const DummyInterface = "kube-ipvs0"

var builtinChains = []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

// miniproxyOnlyChains are chains of miniproxy's iptables mode that
// kube-proxy does not have; on a node switched away from iptables mode they
// go with the shared names (the localnet guard is left to the iptables
// backend's Cleanup, which also restores route_localnet).
var miniproxyOnlyChains = map[string][]string{"nat": {iptables.ChainNodePortDispatch}}

// Owners, for the log: who may have created a removed object.
const (
	ownerKubeProxy = "kube-proxy"
	ownerShared    = "kube-proxy or miniproxy's iptables mode"
	ownerMiniproxy = "miniproxy's iptables mode"
)

// owner says whose a removable chain is.
func owner(table, name string) string {
	switch {
	case slices.Contains(miniproxyOnlyChains[table], name):
		return ownerMiniproxy
	case iptables.OwnedChain(table, name):
		return ownerShared
	}
	return ownerKubeProxy
}

// isKubeProxyChain reports whether table/name is one of kube-proxy's.
func isKubeProxyChain(table, name string) bool {
	if slices.Contains(kubeProxyChains[table], name) {
		return true
	}
	if table == "nat" {
		for _, p := range kubeProxyPrefixes {
			if strings.HasPrefix(name, p) {
				return true
			}
		}
	}
	return false
}

// Decide returns what of l is kube-proxy's and must go, given what
// miniproxy itself runs as. It is pure.
func Decide(self Self, l Listing) Plan {
	var p Plan
	for _, d := range l.XTables {
		if r := decideXTables(self, d); len(r.Tables) > 0 {
			p.XTables = append(p.XTables, r)
		}
	}
	for _, t := range l.NFTables {
		if t.Name == KubeProxyTable && (t.Family == "ip" || t.Family == "ip6") {
			p.NFTables = append(p.NFTables, t)
		}
	}
	if v := l.IPVS; v != nil {
		onDummy := map[netip.Addr]bool{}
		for _, a := range v.DummyAddrs {
			onDummy[a] = true
		}
		for _, vs := range v.VirtualServers {
			switch {
			case self.Mode == "ipvs":
				// kube-ipvs0 and what is on it are miniproxy's now; its full
				// sync removed the virtual servers it does not want. NodePort
				// virtual servers on node addresses cannot be told from the
				// ones miniproxy programs with the same key (see doc).
			case onDummy[vs.Addr]:
				p.VirtualServers = append(p.VirtualServers, vs)
			case slices.Contains(v.NodePorts[vs.Protocol], vs.Port):
				p.VirtualServers = append(p.VirtualServers, vs)
			}
		}
		p.DeleteDummy = v.Dummy && self.Mode != "ipvs"
	}
	for _, s := range l.IPSets {
		if slices.Contains(kubeProxyIPSets, strings.Replace(s, "KUBE-6-", "KUBE-", 1)) {
			p.IPSets = append(p.IPSets, s)
		}
	}
	sort.Strings(p.IPSets)
	return p
}

// saveTable is one table of an iptables-save dump.
type saveTable struct {
	name   string
	chains []string            // in dump order
	rules  map[string][]string // chain -> "-A CHAIN ..." lines
}

// parseSave splits iptables-save output into tables.
func parseSave(s string) []*saveTable {
	var out []*saveTable
	var cur *saveTable
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimRight(line, "\r")
		switch {
		case strings.HasPrefix(line, "*"):
			cur = &saveTable{name: line[1:], rules: map[string][]string{}}
			out = append(out, cur)
		case cur == nil || line == "" || strings.HasPrefix(line, "#") || line == "COMMIT":
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				cur.chains = append(cur.chains, f[0])
			}
		case strings.HasPrefix(line, "-A "):
			if f := strings.Fields(line); len(f) > 1 {
				cur.rules[f[1]] = append(cur.rules[f[1]], line)
			}
		}
	}
	return out
}

// ruleTarget returns the chain a rule jumps or goes to ("" if none).
func ruleTarget(rule string) string {
	f := strings.Fields(rule)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "-j" || f[i] == "-g" || f[i] == "--jump" || f[i] == "--goto" {
			return f[i+1]
		}
	}
	return ""
}

// ruleComment returns the rule's first comment, unquoted.
func ruleComment(rule string) string {
	i := strings.Index(rule, "--comment ")
	if i < 0 {
		return ""
	}
	rest := rule[i+len("--comment "):]
	if strings.HasPrefix(rest, `"`) {
		if j := strings.Index(rest[1:], `"`); j >= 0 {
			return rest[1 : j+1]
		}
		return rest[1:]
	}
	if f := strings.Fields(rest); len(f) > 0 {
		return f[0]
	}
	return ""
}

func decideXTables(self Self, d XTablesDump) XTablesRemoval {
	own := self.ownsXTables(d.Variant, d.Family)
	out := XTablesRemoval{Variant: d.Variant, Family: d.Family}
	for _, t := range parseSave(d.Save) {
		remove := map[string]bool{}
		for _, c := range t.chains {
			if own && iptables.OwnedChain(t.name, c) {
				continue
			}
			if isKubeProxyChain(t.name, c) || (!own && slices.Contains(miniproxyOnlyChains[t.name], c)) {
				remove[c] = true
			}
		}
		var jumps []string
		for _, b := range builtinChains {
			for _, r := range t.rules[b] {
				target := ruleTarget(r)
				if remove[target] || (strings.HasPrefix(target, "KUBE-") && slices.Contains(kubeProxyOnlyJumps, ruleComment(r))) {
					jumps = append(jumps, r)
				}
			}
		}
		if len(remove) == 0 && len(jumps) == 0 {
			continue
		}
		// A chain that stays (not built-in, not removed) but jumps to a
		// removed chain keeps it alive: empty it, do not delete it.
		referenced := map[string]bool{}
		for _, c := range t.chains {
			if remove[c] || slices.Contains(builtinChains, c) {
				continue
			}
			for _, r := range t.rules[c] {
				if x := ruleTarget(r); remove[x] {
					referenced[x] = true
				}
			}
		}
		tr := TableRemoval{Table: t.name, Jumps: jumps}
		var b strings.Builder
		fmt.Fprintf(&b, "*%s\n", t.name)
		for _, c := range t.chains {
			if remove[c] {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
		}
		for _, r := range jumps {
			b.WriteString("-D " + strings.TrimPrefix(r, "-A ") + "\n")
		}
		for _, c := range t.chains {
			switch {
			case !remove[c]:
			case referenced[c]:
				tr.Emptied = append(tr.Emptied, c)
			default:
				tr.Chains = append(tr.Chains, c)
				fmt.Fprintf(&b, "-X %s\n", c)
			}
		}
		b.WriteString("COMMIT\n")
		tr.Restore = b.String()
		out.Tables = append(out.Tables, tr)
	}
	return out
}

// perServiceChain reports whether a chain is one of kube-proxy's
// per-Service chains, which are logged as a count rather than one by one.
func perServiceChain(name string) bool {
	for _, p := range kubeProxyPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}
