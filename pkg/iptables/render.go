// Package iptables is miniproxy's iptables backend: a pure renderer from the
// model to iptables-restore input, and a thin applier that feeds it to
// iptables-restore --noflush in one atomic transaction per table set.
//
// Chain layout (nat table), in the style of kube-proxy:
//
//	PREROUTING, OUTPUT → KUBE-SERVICES      one rule per VIP:port (ClusterIP, externalIP, LB IP)
//	PREROUTING, OUTPUT → KUBE-NODEPORTS-DISPATCH → KUBE-NODEPORTS (local destinations only)
//	KUBE-SVC-x   cluster endpoints: statistic cascade 1/n, 1/(n-1), … → KUBE-SEP-y
//	KUBE-SVL-x   local endpoints (traffic policy Local)
//	KUBE-EXT-x   external traffic: masquerade / policy decision, then SVC or SVL
//	KUBE-FW-x    loadBalancerSourceRanges: allowed sources continue to KUBE-EXT-x
//	KUBE-SEP-y   hairpin masquerade mark + DNAT to one endpoint
//	POSTROUTING → KUBE-POSTROUTING          masquerade packets carrying the mark
//
// Unlike kube-proxy, the NodePort jump lives in its own chain hooked after
// KUBE-SERVICES, so rules inside KUBE-SERVICES never depend on their order.
// That lets a partial sync add and delete exactly the dispatch rules of the
// Services that changed (-A / -D) instead of rewriting a chain that holds one
// rule per Service: the work of one change does not grow with the cluster.
//
// # What miniproxy owns
//
// A node's netfilter tables are shared with kubelet, the CNI, Docker,
// firewalls and (before a takeover) kube-proxy. miniproxy owns exactly:
//
//   - Tables: none. It writes into the built-in nat and filter tables of
//     iptables (IPv4) and ip6tables (IPv6) and never creates, flushes or
//     deletes a table.
//   - Chains (ownedChain): in nat KUBE-SERVICES, KUBE-NODEPORTS,
//     KUBE-NODEPORTS-DISPATCH, KUBE-POSTROUTING, KUBE-MARK-MASQ and every
//     chain named KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-FW-*, KUBE-SEP-*;
//     in filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL,
//     KUBE-NODEPORTS and (IPv4 only) MINIPROXY-LOCALNET. Every rule inside
//     them is miniproxy's: a sync flushes and rewrites them. The KUBE- names
//     are kube-proxy's on purpose (same layout, same debugging habits), so
//     kube-proxy's chains of these names are treated as miniproxy's.
//   - Hooks: the jump rules of RenderBase's Hooks in the built-in chains
//     (PREROUTING, INPUT, FORWARD, OUTPUT, POSTROUTING), identified by their
//     full text (comment and target); they are checked with -C and inserted
//     with -I, never by rewriting a built-in chain. No other rule of a
//     built-in chain is ever touched.
//   - The sysctl net.ipv4.conf.all.route_localnet of the namespace it runs
//     in, set to 1 for NodePorts on 127.0.0.1; whether miniproxy changed it
//     from 0 is recorded in the kernel, as a comment rule in
//     MINIPROXY-LOCALNET, so that a later --cleanup can restore it.
//
// Everything else is someone else's and is never flushed or deleted: in
// particular KUBE-FIREWALL (kubelet's and kube-proxy's localnet guard),
// KUBE-KUBELET-CANARY, KUBE-PROXY-CANARY, KUBE-FORWARD, Docker's and CNIs'
// chains. miniproxy's own localnet guard has its own name for that reason:
// kubelet and kube-proxy jump to KUBE-FIREWALL from INPUT and OUTPUT, so a
// miniproxy that deleted "its" KUBE-FIREWALL when it did not need the guard
// failed every sync (CHAIN_DEL: busy), and one that flushed it rewrote
// kubelet's rules. Two guards with the same DROP rule are harmless.
//
// Someone else's object never makes a sync fail: a chain of ours that a
// sync or --cleanup deletes but that someone else's rule still jumps to is
// emptied and kept, and the log names it (restoreDropping).
package iptables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Chain names shared by every Service.
const (
	ChainServices         = "KUBE-SERVICES"
	ChainNodePorts        = "KUBE-NODEPORTS"
	ChainNodePortDispatch = "KUBE-NODEPORTS-DISPATCH"
	ChainPostrouting      = "KUBE-POSTROUTING"
	ChainMarkMasq         = "KUBE-MARK-MASQ"
	ChainExternalServices = "KUBE-EXTERNAL-SERVICES"
	ChainFirewall         = "KUBE-PROXY-FIREWALL"
	// ChainLocalnetGuard drops packets to 127/8 from off the node when
	// route_localnet is on (CVE-2020-8558). Not KUBE-FIREWALL: that chain
	// is kubelet's and kube-proxy's (see the package doc).
	ChainLocalnetGuard = "MINIPROXY-LOCALNET"
	chainPrefix        = "KUBE-"
)

// localnetRecord is the comment of the rule in ChainLocalnetGuard that says
// miniproxy turned route_localnet on (it was 0). The record lives in the
// kernel because the namespace's sysctl does too: a --cleanup process, or a
// restart with another config, reads it there.
const localnetRecord = "miniproxy set route_localnet=1 (was 0)"

// ownedPrefixes are the per-Service chains, all in the nat table.
var ownedPrefixes = []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"}

// OwnedChain reports whether the chain name of table is miniproxy's in
// iptables mode (the package doc's list), for components that must leave
// miniproxy's chains alone (pkg/takeover).
func OwnedChain(table, name string) bool { return ownedChain(Table(table), name) }

// ownedChain reports whether table/name is miniproxy's (the package doc's
// list). Only such chains are ever declared, flushed or deleted.
func ownedChain(table Table, name string) bool {
	switch table {
	case NAT:
		for _, p := range ownedPrefixes {
			if strings.HasPrefix(name, p) {
				return true
			}
		}
		switch name {
		case ChainServices, ChainNodePorts, ChainNodePortDispatch, ChainPostrouting, ChainMarkMasq:
			return true
		}
	case Filter:
		switch name {
		case ChainServices, ChainExternalServices, ChainFirewall, ChainNodePorts, ChainLocalnetGuard:
			return true
		}
	}
	return false
}

// Table is an iptables table name.
type Table string

// The two tables miniproxy writes.
const (
	NAT    Table = "nat"
	Filter Table = "filter"
)

// Hook is a jump from a built-in chain into one of miniproxy's chains.
// Hooks are not part of the restore input: they are ensured with -C / -I so
// that rules other components put in the built-in chains stay untouched.
type Hook struct {
	Table Table
	Chain string // built-in chain
	Args  []string
}

// Chain is one miniproxy chain and its rules (each a full "-A CHAIN ..." line).
type Chain struct {
	Table Table
	Name  string
	Rules []string
}

// ServiceRules is everything one service port contributes: chains it owns
// outright, and rules it appends to shared chains.
type ServiceRules struct {
	Chains []Chain
	// Shared are "-A SHARED-CHAIN ..." lines keyed by table. Their order
	// within a shared chain never matters.
	Shared map[Table][]string
}

// Base is the static structure: shared chains with their fixed rules, and the hooks.
type Base struct {
	Chains []Chain
	Hooks  []Hook
}

// Renderer renders one IP family.
type Renderer struct {
	Cfg    proxy.Config
	Family model.Family
	// RouteLocalnetSet means miniproxy turned route_localnet on in this
	// namespace: the localnet guard chain then carries localnetRecord.
	RouteLocalnetSet bool
}

func (r *Renderer) host(a netip.Addr) string {
	if r.Family == model.IPv6 {
		return a.String() + "/128"
	}
	return a.String() + "/32"
}

func (r *Renderer) markMasq() string {
	m := r.Cfg.MarkMasq()
	return fmt.Sprintf("0x%x/0x%x", m, m)
}

func (r *Renderer) localhostNodePorts() bool {
	return r.Family == model.IPv4 && r.Cfg.LocalhostNodePorts && !r.Cfg.NodePortPrimary && len(r.Cfg.NodePortAddresses) == 0
}

// RenderBase returns the shared chains and hooks for node.
func (r *Renderer) RenderBase(node model.Node) Base {
	ctNew := []string{"-m", "conntrack", "--ctstate", "NEW"}
	hooks := []Hook{
		{NAT, "PREROUTING", []string{"-m", "comment", "--comment", "kubernetes service portals", "-j", ChainServices}},
		{NAT, "OUTPUT", []string{"-m", "comment", "--comment", "kubernetes service portals", "-j", ChainServices}},
		{NAT, "PREROUTING", []string{"-m", "comment", "--comment", "kubernetes service nodeports", "-j", ChainNodePortDispatch}},
		{NAT, "OUTPUT", []string{"-m", "comment", "--comment", "kubernetes service nodeports", "-j", ChainNodePortDispatch}},
		{NAT, "POSTROUTING", []string{"-m", "comment", "--comment", "kubernetes postrouting rules", "-j", ChainPostrouting}},
		{Filter, "INPUT", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes externally-visible service portals", "-j", ChainExternalServices)},
		{Filter, "FORWARD", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes externally-visible service portals", "-j", ChainExternalServices)},
		{Filter, "OUTPUT", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes externally-visible service portals", "-j", ChainExternalServices)},
		{Filter, "FORWARD", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes service portals", "-j", ChainServices)},
		{Filter, "OUTPUT", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes service portals", "-j", ChainServices)},
		{Filter, "INPUT", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes load balancer firewall", "-j", ChainFirewall)},
		{Filter, "FORWARD", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes load balancer firewall", "-j", ChainFirewall)},
		{Filter, "OUTPUT", append(append([]string{}, ctNew...), "-m", "comment", "--comment", "kubernetes load balancer firewall", "-j", ChainFirewall)},
		{Filter, "INPUT", []string{"-m", "comment", "--comment", "kubernetes health check service ports", "-j", ChainNodePorts}},
	}
	mark := r.markMasq()
	post := []string{
		fmt.Sprintf("-A %s -m mark ! --mark %s -j RETURN", ChainPostrouting, mark),
		// Clear the mark so a packet re-entering the stack is not masqueraded twice.
		fmt.Sprintf("-A %s -j MARK --xor-mark 0x%x", ChainPostrouting, r.Cfg.MarkMasq()),
		fmt.Sprintf(`-A %s -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`, ChainPostrouting),
	}
	dispatch := r.nodePortDispatch(node)
	chains := []Chain{
		{NAT, ChainServices, nil},
		{NAT, ChainNodePorts, nil},
		{NAT, ChainNodePortDispatch, dispatch},
		{NAT, ChainPostrouting, post},
		{NAT, ChainMarkMasq, []string{fmt.Sprintf("-A %s -j MARK --or-mark 0x%x", ChainMarkMasq, r.Cfg.MarkMasq())}},
		{Filter, ChainServices, nil},
		{Filter, ChainExternalServices, nil},
		{Filter, ChainFirewall, nil},
		{Filter, ChainNodePorts, nil},
	}
	if r.localhostNodePorts() {
		// CVE-2020-8558: with route_localnet on, drop packets to 127/8 that
		// arrive from off the node and were not DNATed to a NodePort.
		rules := []string{
			fmt.Sprintf(`-A %s -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP`, ChainLocalnetGuard),
		}
		if r.RouteLocalnetSet {
			// A rule without a target: it only carries the record.
			rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment %q`, ChainLocalnetGuard, localnetRecord))
		}
		chains = append(chains, Chain{Filter, ChainLocalnetGuard, rules})
		hooks = append(hooks, localnetGuardHooks()...)
	}
	return Base{Chains: chains, Hooks: hooks}
}

// localnetGuardHooks are the jumps into ChainLocalnetGuard.
func localnetGuardHooks() []Hook {
	args := []string{"-m", "comment", "--comment", "miniproxy localnet guard", "-j", ChainLocalnetGuard}
	return []Hook{{Filter, "INPUT", args}, {Filter, "OUTPUT", args}}
}

func (r *Renderer) nodePortDispatch(node model.Node) []string {
	var out []string
	add := func(match string) {
		out = append(out, fmt.Sprintf(`-A %s %s-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j %s`, ChainNodePortDispatch, match, ChainNodePorts))
	}
	switch {
	case r.Cfg.NodePortPrimary:
		for _, a := range node.Addresses {
			if model.FamilyOf(a) == r.Family {
				add("-d " + r.host(a) + " ")
			}
		}
	case len(r.Cfg.NodePortAddresses) > 0:
		for _, p := range r.Cfg.NodePortAddresses {
			if model.FamilyOf(p.Addr()) != r.Family {
				continue
			}
			if p.Bits() == 0 {
				add("-m addrtype --dst-type LOCAL ")
			} else {
				add("-d " + p.String() + " -m addrtype --dst-type LOCAL ")
			}
		}
	default:
		if r.Family == model.IPv4 && !r.Cfg.LocalhostNodePorts {
			out = append(out, fmt.Sprintf("-A %s -d 127.0.0.0/8 -j RETURN", ChainNodePortDispatch))
		}
		if r.Family == model.IPv6 {
			// IPv6 has no route_localnet; ::1 can never be a NodePort address.
			out = append(out, fmt.Sprintf("-A %s -d ::1/128 -j RETURN", ChainNodePortDispatch))
		}
		add("-m addrtype --dst-type LOCAL ")
	}
	return out
}

// Names of a service port's chains.
type names struct {
	svc, svl, ext, fw string
	comment           string
}

func (r *Renderer) namesFor(sp *model.ServicePort) names {
	base := sp.Name.String()
	// The family is part of the hash so v4 and v6 chains of a dual-stack
	// Service never collide in a shared log or dump.
	fam := strconv.Itoa(int(r.Family))
	return names{
		svc:     chainPrefix + "SVC-" + model.ShortHash(fam, base),
		svl:     chainPrefix + "SVL-" + model.ShortHash(fam, base),
		ext:     chainPrefix + "EXT-" + model.ShortHash(fam, base),
		fw:      chainPrefix + "FW-" + model.ShortHash(fam, base),
		comment: strconv.Quote(base),
	}
}

func (r *Renderer) sepName(sp *model.ServicePort, ep model.Endpoint) string {
	return chainPrefix + "SEP-" + model.ShortHash(strconv.Itoa(int(r.Family)), sp.Name.String(), ep.String())
}

func (r *Renderer) inFamily(eps []model.Endpoint) []model.Endpoint {
	var out []model.Endpoint
	for _, ep := range eps {
		if model.FamilyOf(ep.IP) == r.Family {
			out = append(out, ep)
		}
	}
	return out
}

func (r *Renderer) addrs(in []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range in {
		if model.FamilyOf(a) == r.Family {
			out = append(out, a)
		}
	}
	return out
}

// RenderService returns the rules of one service port for this family.
// It returns an empty ServiceRules when the port has no address of this family.
func (r *Renderer) RenderService(sp *model.ServicePort, node model.Node) ServiceRules {
	out := ServiceRules{Shared: map[Table][]string{}}
	vip, hasVIP := sp.ClusterIP(r.Family)
	if !hasVIP {
		return out
	}
	n := r.namesFor(sp)
	elig := sp.Eligible(node)
	internal := r.inFamily(elig.Internal)
	external := r.inFamily(elig.External)
	cluster := r.inFamily(elig.Cluster)
	local := r.inFamily(elig.Local)
	// "Has endpoints" means usable ones (ready, or serving while
	// terminating), as kube-proxy's CategorizeEndpoints counts them and as
	// the nftables renderer decides: a Service whose endpoints are all
	// terminating and no longer serving rejects at once, it does not drop
	// as if it had endpoints elsewhere.
	hasEndpoints := len(cluster) > 0
	proto := sp.Protocol.Lower()
	// TCP gets a reset rather than kube-proxy's ICMP port-unreachable: the
	// kernel rate-limits ICMP errors per destination (icmp_ratelimit, ~1/s
	// after a small burst), so a client retrying an empty Service would
	// otherwise hang instead of failing at once. nftables mode does the same.
	reject := "REJECT"
	if sp.Protocol == model.TCP {
		reject = "REJECT --reject-with tcp-reset"
	}
	pm := fmt.Sprintf("-p %s -m %s --dport %d", proto, proto, sp.Port)
	comment := "-m comment --comment " + n.comment

	// Which chains exist: SVC when cluster endpoints are used by some
	// traffic, SVL when local endpoints are.
	usesSVC := (len(internal) > 0 && !sp.InternalPolicyLocal) || (len(external) > 0 && !sp.ExternalPolicyLocal) ||
		(sp.ExternalPolicyLocal && sp.HasExternal() && len(cluster) > 0)
	usesSVL := (sp.InternalPolicyLocal && len(local) > 0) || (sp.ExternalPolicyLocal && sp.HasExternal() && len(local) > 0)

	seps := map[string]bool{}
	addSEPs := func(eps []model.Endpoint) {
		for _, ep := range eps {
			name := r.sepName(sp, ep)
			if seps[name] {
				continue
			}
			seps[name] = true
			rules := []string{
				fmt.Sprintf("-A %s %s -s %s -j %s", name, comment, r.host(ep.IP), ChainMarkMasq),
			}
			affinity := ""
			if sp.AffinitySeconds > 0 {
				affinity = fmt.Sprintf("-m recent --name %s --set --rsource ", name)
			}
			rules = append(rules, fmt.Sprintf("-A %s %s -p %s %s-m %s -j DNAT --to-destination %s", name, comment, proto, affinity, proto, ep.AddrPort()))
			out.Chains = append(out.Chains, Chain{NAT, name, rules})
		}
	}
	balance := func(chain string, eps []model.Endpoint, pre []string) {
		rules := append([]string{}, pre...)
		if sp.AffinitySeconds > 0 {
			for _, ep := range eps {
				sep := r.sepName(sp, ep)
				rules = append(rules, fmt.Sprintf("-A %s %s -m recent --name %s --rcheck --seconds %d --reap -j %s", chain, comment, sep, sp.AffinitySeconds, sep))
			}
		}
		for i, ep := range eps {
			sep := r.sepName(sp, ep)
			if left := len(eps) - i; left > 1 {
				rules = append(rules, fmt.Sprintf("-A %s %s -m statistic --mode random --probability %0.10f -j %s", chain, comment, 1.0/float64(left), sep))
			} else {
				rules = append(rules, fmt.Sprintf("-A %s %s -j %s", chain, comment, sep))
			}
		}
		out.Chains = append(out.Chains, Chain{NAT, chain, rules})
		addSEPs(eps)
	}

	// ClusterIP dispatch goes to the internal chain: SVL under
	// internalTrafficPolicy Local, else SVC.
	internalChain := n.svc
	if sp.InternalPolicyLocal {
		internalChain = n.svl
	}
	// The ClusterIP masquerade rules head the internal chain, whichever it
	// is (as in kube-proxy): an ITP=Local ClusterIP reached from the node
	// or from off the node is masqueraded too.
	masqPre := func(chain string) []string {
		if chain != internalChain {
			return nil
		}
		var pre []string
		if r.Cfg.MasqueradeAll {
			pre = append(pre, fmt.Sprintf("-A %s %s -d %s %s -j %s", chain, comment, r.host(vip), pm, ChainMarkMasq))
		} else if locals := r.Cfg.LocalPrefixes(r.Family, node); len(locals) > 0 && r.Cfg.LocalMode != proxy.LocalModeNone {
			// Off-node sources reaching a ClusterIP (e.g. through a route to
			// the service CIDR) must be masqueraded so replies come back here.
			for _, p := range locals {
				pre = append(pre, fmt.Sprintf("-A %s %s ! -s %s -d %s %s -j %s", chain, comment, p, r.host(vip), pm, ChainMarkMasq))
			}
		}
		return pre
	}
	if usesSVC {
		balance(n.svc, cluster, masqPre(n.svc))
	}
	if usesSVL {
		balance(n.svl, local, masqPre(n.svl))
	}

	clusterMatch := fmt.Sprintf("%s -d %s %s", comment, r.host(vip), pm)
	if len(internal) > 0 {
		out.Shared[NAT] = append(out.Shared[NAT], fmt.Sprintf("-A %s %s -j %s", ChainServices, clusterMatch, internalChain))
	} else {
		target := "DROP"
		if !hasEndpoints {
			target = reject
		}
		out.Shared[Filter] = append(out.Shared[Filter], fmt.Sprintf("-A %s %s -j %s", ChainServices, clusterMatch, target))
	}

	if !sp.HasExternal() {
		return out
	}
	// External traffic: NodePorts, externalIPs, load-balancer IPs. With a
	// usable endpoint anywhere they go to the EXT chain, even under
	// externalTrafficPolicy Local without a local endpoint: pods and the
	// node itself still reach the cluster-wide endpoints there, as in
	// kube-proxy and nftables mode.
	extTarget := ""
	if hasEndpoints {
		extTarget = n.ext
		var rules []string
		if sp.ExternalPolicyLocal {
			// Pods and the node itself reaching the external address get
			// cluster-wide behaviour, as kube-proxy does: only traffic from
			// outside is restricted to (and keeps its source for) local endpoints.
			for _, p := range r.Cfg.LocalPrefixes(r.Family, node) {
				rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment "pod traffic for %s external destinations" -s %s -j %s`, n.ext, strings.Trim(n.comment, `"`), p, n.svc))
			}
			rules = append(rules,
				fmt.Sprintf(`-A %s -m comment --comment "masquerade LOCAL traffic for %s external destinations" -m addrtype --src-type LOCAL -j %s`, n.ext, strings.Trim(n.comment, `"`), ChainMarkMasq),
				fmt.Sprintf(`-A %s -m comment --comment "route LOCAL traffic for %s external destinations" -m addrtype --src-type LOCAL -j %s`, n.ext, strings.Trim(n.comment, `"`), n.svc))
			if len(external) > 0 {
				rules = append(rules, fmt.Sprintf("-A %s -j %s", n.ext, n.svl))
			}
		} else {
			rules = append(rules,
				fmt.Sprintf(`-A %s -m comment --comment "masquerade traffic for %s external destinations" -j %s`, n.ext, strings.Trim(n.comment, `"`), ChainMarkMasq),
				fmt.Sprintf("-A %s -j %s", n.ext, n.svc))
		}
		out.Chains = append(out.Chains, Chain{NAT, n.ext, rules})
	}
	// What the EXT chain did not DNAT is refused in the filter table: no
	// usable endpoint at all rejects, none for external traffic drops.
	// DNATed packets no longer have the external destination, so these
	// rules never see them.
	dropOrReject := "DROP"
	if !hasEndpoints {
		dropOrReject = reject
	}
	refuse := len(external) == 0
	natOrFilter := func(match string, natTarget string) {
		if extTarget != "" {
			out.Shared[NAT] = append(out.Shared[NAT], fmt.Sprintf("-A %s %s -j %s", ChainServices, match, natTarget))
		}
		if refuse {
			out.Shared[Filter] = append(out.Shared[Filter], fmt.Sprintf("-A %s %s -j %s", ChainExternalServices, match, dropOrReject))
		}
	}
	for _, ip := range r.addrs(sp.ExternalIPs) {
		natOrFilter(fmt.Sprintf(`-m comment --comment "%s external IP" -d %s %s`, strings.Trim(n.comment, `"`), r.host(ip), pm), extTarget)
	}
	lbIPs := r.addrs(sp.LoadBalancerIPs)
	var ranges []netip.Prefix
	for _, p := range sp.LoadBalancerSourceRanges {
		if model.FamilyOf(p.Addr()) == r.Family {
			ranges = append(ranges, p)
		}
	}
	// Source ranges only for this family; a Service whose ranges are all of
	// the other family allows nothing of this family, like kube-proxy.
	// RestrictsSources, not the list's length: a Service whose ranges all
	// failed to parse must admit nobody, not everybody.
	useFW := sp.RestrictsSources() && len(lbIPs) > 0
	if useFW && extTarget != "" {
		var rules []string
		for _, p := range ranges {
			rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment "%s loadbalancer IP" -s %s -j %s`, n.fw, strings.Trim(n.comment, `"`), p, n.ext))
		}
		// Traffic from the node to its own LB IP is allowed, as in kube-proxy.
		for _, ip := range lbIPs {
			rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment "%s loadbalancer IP" -s %s -j %s`, n.fw, strings.Trim(n.comment, `"`), r.host(ip), n.ext))
		}
		out.Chains = append(out.Chains, Chain{NAT, n.fw, rules})
	}
	for _, ip := range lbIPs {
		match := fmt.Sprintf(`-m comment --comment "%s loadbalancer IP" -d %s %s`, strings.Trim(n.comment, `"`), r.host(ip), pm)
		if useFW && extTarget != "" {
			natOrFilter(match, n.fw)
			// Sources not allowed were not DNATed, so their destination is
			// still the LB IP when the filter table sees them: drop there.
			out.Shared[Filter] = append(out.Shared[Filter], fmt.Sprintf("-A %s %s -j DROP", ChainFirewall, match))
		} else {
			natOrFilter(match, extTarget)
		}
	}
	if sp.NodePort > 0 {
		npm := fmt.Sprintf("-p %s -m %s --dport %d", proto, proto, sp.NodePort)
		if extTarget != "" {
			out.Shared[NAT] = append(out.Shared[NAT], fmt.Sprintf("-A %s %s %s -j %s", ChainNodePorts, comment, npm, extTarget))
		}
		if refuse {
			out.Shared[Filter] = append(out.Shared[Filter], fmt.Sprintf("-A %s %s -m addrtype --dst-type LOCAL %s -j %s", ChainExternalServices, comment, npm, dropOrReject))
		}
	}
	if sp.HealthCheckNodePort > 0 {
		out.Shared[Filter] = append(out.Shared[Filter], fmt.Sprintf(`-A %s -m comment --comment "%s health check node port" -m tcp -p tcp --dport %d -j ACCEPT`, ChainNodePorts, strings.Trim(n.comment, `"`), sp.HealthCheckNodePort))
	}
	return out
}
