// Package takeover removes what kube-proxy left in the kernel when miniproxy
// replaces it, once miniproxy's own rules are in.
//
// kube-proxy leaves its rules in place on SIGTERM (so that a restart does not
// cut traffic). A node whose kube-proxy DaemonSet was replaced by miniproxy's
// therefore still holds kube-proxy's last ruleset, and a Service deleted
// after the swap keeps answering through it. Upstream kube-proxy avoids this
// for its own modes by cleaning up after the modes it is not running when it
// starts; miniproxy does the same for every kube-proxy mode, by default,
// after its first successful sync (its rules first, so no connection finds
// an empty node).
//
// # What is removed (and nothing else)
//
// The names are kube-proxy v1.37's (pkg/proxy/{iptables,ipvs,nftables}):
//
//   - xtables, in both the nft and the legacy variant of iptables and of
//     ip6tables: in nat KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING,
//     KUBE-MARK-MASQ, KUBE-PROXY-CANARY, KUBE-NODE-PORT, KUBE-LOAD-BALANCER
//     and every KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-FW-*, KUBE-SEP-*
//     chain; in filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD,
//     KUBE-NODEPORTS, KUBE-PROXY-FIREWALL, KUBE-PROXY-CANARY, KUBE-NODE-PORT,
//     KUBE-SOURCE-RANGES-FIREWALL, KUBE-IPVS-FILTER, KUBE-IPVS-OUT-FILTER; in
//     mangle KUBE-PROXY-CANARY. With them go the rules of the built-in chains
//     (PREROUTING, INPUT, FORWARD, OUTPUT, POSTROUTING) that jump to one of
//     them. A removed chain that a kept chain (not a built-in one) still
//     jumps to is emptied and kept, so someone else's rule never breaks.
//   - In iptables mode, the chains of these names in the variant miniproxy
//     itself writes (the one its iptables binary is) are miniproxy's
//     (pkg/iptables, "What miniproxy owns"): its full sync already replaced
//     their contents, and they stay. Only kube-proxy's other chains there
//     (KUBE-FORWARD, KUBE-PROXY-CANARY, the IPVS-mode chains) and kube-proxy
//     IPVS's "kube-proxy firewall rules" jumps go. A family miniproxy does
//     not program (ip6tables on an IPv4-only miniproxy) is not its own.
//   - Where miniproxy does not run iptables mode in that variant and
//     family, its own KUBE-NODEPORTS-DISPATCH (nat) and the hooks into it go
//     too: with the shared names they are a previous iptables-mode run's.
//     Its localnet guard MINIPROXY-LOCALNET is left to the iptables
//     backend's Cleanup, which restores route_localnet with it.
//   - nftables: the tables named kube-proxy of families ip and ip6.
//   - IPVS, only where the kernel has ip_vs: kube-proxy's kube-ipvs0 dummy
//     interface and the virtual servers on its addresses, and kube-proxy's
//     NodePort virtual servers (a node address with a port listed in its
//     KUBE-NODE-PORT-* ipsets), unless miniproxy runs in IPVS mode (then
//     kube-ipvs0 and the virtual servers on it are miniproxy's, and its full
//     sync already removed the ones it does not want).
//   - ipsets: kube-proxy IPVS mode's (KUBE-CLUSTER-IP, KUBE-NODE-PORT-TCP, …
//     and their KUBE-6- IPv6 twins), after the chains that match on them.
//
// Never touched: kubelet's KUBE-FIREWALL and KUBE-KUBELET-CANARY (kube-proxy
// writes a KUBE-FIREWALL too, but the two cannot be told apart, and the
// chain only guards 127.0.0.0/8), any other chain, any other table, any
// other rule of a built-in chain, any other interface or virtual server.
//
// # Shape
//
// Decide is pure: given a Listing of what is in the kernel it returns the
// Plan of what goes, and is unit-tested without root. List and Apply are the
// thin kernel side: iptables-save / iptables-restore --noflush per variant and
// family (one transaction per table), netlink for nftables, IPVS and the
// dummy interface, the ipset binary for ipsets. The legacy variant is only
// listed where the namespace already has legacy tables
// (/proc/net/ip_tables_names), since listing it otherwise registers them.
package takeover
