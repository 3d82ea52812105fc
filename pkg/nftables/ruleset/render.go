package ruleset

import (
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// Names of the static objects. Per-service objects are named
// <kind>-<hash>-<namespace>/<name>/<proto>/<port>, readable and stable.
const (
	ChainNatPrerouting    = "nat-prerouting"
	ChainNatOutput        = "nat-output"
	ChainNatPostrouting   = "nat-postrouting"
	ChainFilterPrerouting = "filter-prerouting"
	ChainFilterInput      = "filter-input"
	ChainFilterForward    = "filter-forward"
	ChainFilterOutput     = "filter-output"
	ChainServices         = "services"
	ChainEndpointsCheck   = "endpoints-check"
	ChainFirewallCheck    = "firewall-check"
	ChainMarkForMasq      = "mark-for-masquerade"
	ChainMasquerading     = "masquerading"
	ChainReject           = "reject-chain"

	// MapServiceIPs dispatches ClusterIP / externalIP / LB IP traffic:
	// daddr . proto . port → goto the service's chain. One lookup per
	// packet, whatever the number of Services.
	MapServiceIPs = "service-ips"
	// MapServiceNodePorts dispatches NodePort traffic: proto . port → goto.
	MapServiceNodePorts = "service-nodeports"
	// MapNoEndpointIPs / MapNoEndpointNodePorts send traffic for service
	// ports without usable endpoints to reject (none at all) or drop (none
	// for this traffic policy), from filter chains where reject is allowed.
	MapNoEndpointIPs       = "no-endpoint-services"
	MapNoEndpointNodePorts = "no-endpoint-nodeports"
	// MapFirewallIPs sends LB IP traffic of services with
	// loadBalancerSourceRanges to the service's firewall chain.
	MapFirewallIPs = "firewall-ips"
	// SetClusterIPs holds daddr . proto . port of every ClusterIP that
	// MapServiceIPs sends to a service chain. Traffic to them from outside
	// the local pod range (all traffic with --masquerade-all) is marked
	// for masquerade by one rule in ChainServices, before dispatch. The
	// mark used to be the first rule of every service chain; as set
	// elements, which the kernel loads many to a message and never
	// validates, 10k Services cost 10k rules fewer to load. Matching on
	// the ClusterIP key keeps the mark off external traffic that an
	// ETP=Local chain sends on to the service chain, as kube-proxy's
	// per-chain "ip daddr <VIP> … jump mark-for-masquerade" does.
	SetClusterIPs = "cluster-ips"
)

// Priorities. nft 1.0.6 rejects the name "dstnat" on the output hook, so
// plain numbers are used everywhere (dstnat = -100, srcnat = 100).
const (
	prioDstNAT       = -100
	prioSrcNAT       = 100
	prioBeforeDstNAT = -110 // filter chains that must see the original VIP
)

// Render computes the full ruleset for snap under cfg in one table per
// family (no shards). See RenderSharded.
func Render(snap *model.Snapshot, cfg *proxy.Config, prev *Ruleset) *Ruleset {
	return RenderSharded(snap, cfg, prev, 1)
}

// RenderSharded computes the full ruleset for snap under cfg. When prev is
// non-nil, the objects of service ports whose *model.ServicePort pointer is
// unchanged are reused from prev, so an incremental render costs O(changed).
//
// With shards > 1 the Services' dispatch maps and chains are spread over
// that many shard tables per family, each with its own nat prerouting and
// output base chains, and the main table keeps everything else (filter
// checks, no-endpoint and firewall maps, masquerading). The kernel validates
// the whole table a commit touches whenever the batch adds a jump, a DNAT or
// a mark (README, "Known limits"); sharding makes that walk one shard's
// Services instead of all of them.
func RenderSharded(snap *model.Snapshot, cfg *proxy.Config, prev *Ruleset, shards int) *Ruleset {
	fams := cfg.Families
	if len(fams) == 0 {
		fams = []model.Family{model.IPv4}
	}
	shards = max(shards, 1)
	rs := &Ruleset{}
	for _, f := range fams {
		rs.Tables = append(rs.Tables, renderFamily(f, snap, cfg, prev, shards)...)
	}
	return rs
}

// ShardTableName is the name of shard i's table.
func ShardTableName(i int) string { return fmt.Sprintf("%s-shard-%02d", TableName, i) }

// IsOurTable reports whether a table of this name (in family ip or ip6) is
// miniproxy's: the main table or any shard of any shard count, so leftovers
// can be removed — exactly the names ShardTableName makes (two decimal
// digits; at most 64 shards), so that another program's table whose name
// only starts like ours ("miniproxy-shard-00-backup") is never deleted.
func IsOurTable(name string) bool {
	if name == TableName {
		return true
	}
	n, ok := strings.CutPrefix(name, TableName+"-shard-")
	return ok && len(n) == 2 && n[0] >= '0' && n[0] <= '9' && n[1] >= '0' && n[1] <= '9'
}

// ShardOf is the shard (0 … shards-1) that holds a service port: by its
// name, so it stays there while the shard count does not change.
func ShardOf(name model.ServicePortName, shards int) int {
	// FNV-1a of name.String() ("ns/name:port/proto"), computed without
	// building the string: a cold render calls this once per service port.
	h := uint32(2166136261)
	add := func(s string) {
		for i := 0; i < len(s); i++ {
			h = (h ^ uint32(s[i])) * 16777619
		}
	}
	add(name.Namespace)
	add("/")
	add(name.Name)
	add(":")
	add(name.Port)
	add("/")
	add(string(name.Protocol))
	return int(h % uint32(shards))
}

// mainOnly are the maps that stay in the main table when sharded: the filter
// chains that look them up are not per shard.
var mainOnly = map[string]bool{MapNoEndpointIPs: true, MapNoEndpointNodePorts: true, MapFirewallIPs: true}

// shardStatic are the static objects every shard table carries, and the
// main table only when not sharded.
var shardStatic = map[string]bool{ChainNatPrerouting: true, ChainNatOutput: true, ChainServices: true,
	MapServiceIPs: true, MapServiceNodePorts: true, SetClusterIPs: true}

// TableKey identifies the inputs, besides the service ports themselves, that
// every object of a table depends on; when it changes nothing can be reused.
func tableKey(f model.Family, snap *model.Snapshot, cfg *proxy.Config, shards int) string {
	n := snap.Node
	return fmt.Sprintf("%d|%s|%v|%v|%v|%v|%d", f, n.Name, n.Zone, n.Addresses, n.PodCIDRs, cfg.LocalPrefixes(f, n), shards)
}

func renderFamily(f model.Family, snap *model.Snapshot, cfg *proxy.Config, prev *Ruleset, shards int) []*Table {
	key := tableKey(f, snap, cfg, shards)
	local := cfg.LocalPrefixes(f, snap.Node)
	masq := clusterIPMasq(cfg, local)
	chains, sets := staticObjects(f, snap.Node, cfg, masq)
	r := &renderer{f: f, node: snap.Node, cfg: cfg, local: local, masqClusterIPs: len(masq) > 0}
	newTable := func(name string, part int) *Table {
		t := &Table{Family: f, Name: name, key: key, in: r, shards: shards, part: part}
		for _, c := range chains {
			if shards == 1 || shardStatic[c.Name] != (part == 0) {
				t.Chains = append(t.Chains, c)
			}
		}
		for _, st := range sets {
			if shards == 1 || shardStatic[st.Name] != (part == 0) {
				t.Sets = append(t.Sets, st)
			}
		}
		return t
	}
	tables := []*Table{newTable(TableName, 0)}
	for i := 0; shards > 1 && i < shards; i++ {
		tables = append(tables, newTable(ShardTableName(i), i+1))
	}
	// Reuse needs the previous render of every table of the family from
	// the same inputs; otherwise everything is rendered.
	prevs := func() []*Table {
		if prev == nil {
			return nil
		}
		out := make([]*Table, len(tables))
		for i, t := range tables {
			if out[i] = prev.Lookup(f, t.Name); out[i] == nil || out[i].key != key {
				return nil
			}
		}
		return out
	}()
	tableOf := func(name model.ServicePortName) int {
		if shards > 1 {
			return 1 + ShardOf(name, shards)
		}
		return 0
	}
	// place renders sp (nil: removed) into its tables, in place of old (nil:
	// nothing before).
	place := func(name model.ServicePortName, old, sp *model.ServicePort) {
		tables[0].moveHairpin(f, old, sp)
		si := tableOf(name)
		delete(tables[0].Services, name)
		delete(tables[si].Services, name)
		if sp == nil {
			return
		}
		so := r.service(sp)
		if so == nil {
			return
		}
		if si == 0 {
			tables[0].Services[name] = so
			tables[0].fresh = append(tables[0].fresh, name)
			return
		}
		m, sh := splitService(so)
		if m != nil {
			tables[0].Services[name] = m
			tables[0].fresh = append(tables[0].fresh, name)
		}
		if sh != nil {
			tables[si].Services[name] = sh
			tables[si].fresh = append(tables[si].fresh, name)
		}
	}
	if prevs == nil {
		tables[0].inheritHairpin(nil)
		for _, t := range tables {
			t.Services = make(map[model.ServicePortName]*ServiceObjects, len(snap.Services)/len(tables)+1)
		}
		for name, sp := range snap.Services {
			place(name, nil, sp)
		}
		return tables
	}
	tables[0].inheritHairpin(prevs[0])
	// Incremental: start from the previous maps (unchanged service ports
	// keep their objects, same pointers) and render only what changed:
	// an unchanged service port costs two map lookups and a hash.
	for i, t := range tables {
		t.Services = maps.Clone(prevs[i].Services)
	}
	for name, sp := range snap.Services {
		m, sh := prevs[0].Services[name], prevs[tableOf(name)].Services[name]
		var old *model.ServicePort
		switch {
		case m != nil:
			old = m.Source
		case sh != nil:
			old = sh.Source
		}
		// Nothing rendered before (say, no cluster IP of this family) is
		// rendered again: cheap, since it renders nothing again.
		if old != sp {
			place(name, old, sp)
		}
	}
	// A removed service port may have objects in the main table and in
	// its shard: it is placed (away) once.
	removed := map[model.ServicePortName]*model.ServicePort{}
	for _, p := range prevs {
		for name, so := range p.Services {
			if _, ok := snap.Services[name]; !ok {
				removed[name] = so.Source
			}
		}
	}
	for name, old := range removed {
		place(name, old, nil)
	}
	return tables
}

// splitService divides one service port's objects between the main table
// (the firewall chain and the elements of main-only maps) and its shard
// (everything the shard's dispatch reaches). Either part may be nil.
func splitService(so *ServiceObjects) (main, shard *ServiceObjects) {
	m := &ServiceObjects{Source: so.Source}
	s := &ServiceObjects{Source: so.Source, Sets: so.Sets}
	for _, c := range so.Chains {
		if strings.HasPrefix(c.Name, "firewall-") {
			m.Chains = append(m.Chains, c)
		} else {
			s.Chains = append(s.Chains, c)
		}
	}
	for _, e := range so.Elements {
		if mainOnly[e.Map] {
			m.Elements = append(m.Elements, e)
		} else {
			s.Elements = append(s.Elements, e)
		}
	}
	if len(m.Chains)+len(m.Elements) > 0 {
		main = m
	}
	if len(s.Chains)+len(s.Sets)+len(s.Elements) > 0 {
		shard = s
	}
	return main, shard
}

func rule(e ...Expr) Rule { return Rule(e) }

func jump(c string) Verdict                { return Verdict{Kind: Jump, Chain: c} }
func gotoV(c string) Verdict               { return Verdict{Kind: Goto, Chain: c} }
func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// staticObjects declares, in one place, the base chains, helper chains and
// maps that exist whatever the Services are. masq is the ClusterIP
// masquerade rule, if any (clusterIPMasq).
func staticObjects(f model.Family, node model.Node, cfg *proxy.Config, masq []Rule) ([]*Chain, []*Set) {
	mark := cfg.MarkMasq()
	base := func(name string, typ ChainType, hook Hook, prio int32, rules ...Rule) *Chain {
		return &Chain{Name: name, Base: &BaseChain{Type: typ, Hook: hook, Priority: prio}, Rules: rules}
	}
	ctNewJump := func(c string) Rule { return rule(MatchCtNew{}, jump(c)) }

	// NodePort destinations: every local address (minus loopback, which
	// nftables mode never serves, like kube-proxy's), or only the
	// configured ones.
	var nodePortMatch [][]Expr
	switch {
	case cfg.NodePortPrimary:
		for _, a := range node.Addresses {
			if model.FamilyOf(a) == f {
				nodePortMatch = append(nodePortMatch, []Expr{MatchAddr{Prefix: hostPrefix(a)}})
			}
		}
	case len(cfg.NodePortAddresses) > 0:
		for _, p := range cfg.NodePortAddresses {
			if model.FamilyOf(p.Addr()) == f {
				nodePortMatch = append(nodePortMatch, []Expr{MatchAddr{Prefix: p.Masked()}, MatchFibLocal{}})
			}
		}
	default:
		lo := netip.MustParsePrefix("127.0.0.0/8")
		if f == model.IPv6 {
			lo = netip.MustParsePrefix("::1/128")
		}
		nodePortMatch = [][]Expr{{MatchFibLocal{}, MatchAddr{Prefix: lo, Neg: true}}}
	}
	nodePortRules := func(m string) []Rule {
		var out []Rule
		for _, pre := range nodePortMatch {
			out = append(out, append(append(Rule{}, pre...), VMap{Key: KeyProtoPort, Map: m}))
		}
		return out
	}

	chains := []*Chain{
		base(ChainNatPrerouting, TypeNAT, HookPrerouting, prioDstNAT, rule(jump(ChainServices))),
		base(ChainNatOutput, TypeNAT, HookOutput, prioDstNAT, rule(jump(ChainServices))),
		base(ChainNatPostrouting, TypeNAT, HookPostrouting, prioSrcNAT,
			rule(MatchCtDNAT{}, MatchKeyInSet{Key: KeySaddrDaddr, Set: SetHairpin}, SetMark{Bits: mark}),
			rule(jump(ChainMasquerading))),
		base(ChainFilterPrerouting, TypeFilter, HookPrerouting, prioBeforeDstNAT, ctNewJump(ChainFirewallCheck)),
		base(ChainFilterInput, TypeFilter, HookInput, prioBeforeDstNAT, ctNewJump(ChainEndpointsCheck)),
		base(ChainFilterForward, TypeFilter, HookForward, prioBeforeDstNAT, ctNewJump(ChainEndpointsCheck)),
		// Output runs before nat-output (-100), so it sees the VIP of
		// locally originated connections.
		base(ChainFilterOutput, TypeFilter, HookOutput, prioBeforeDstNAT,
			ctNewJump(ChainEndpointsCheck), ctNewJump(ChainFirewallCheck)),
		{Name: ChainServices, Rules: append(append(append([]Rule(nil), masq...),
			rule(VMap{Key: KeyDaddrProtoPort, Map: MapServiceIPs})),
			nodePortRules(MapServiceNodePorts)...)},
		{Name: ChainEndpointsCheck, Rules: append([]Rule{rule(VMap{Key: KeyDaddrProtoPort, Map: MapNoEndpointIPs})},
			nodePortRules(MapNoEndpointNodePorts)...)},
		{Name: ChainFirewallCheck, Rules: []Rule{rule(VMap{Key: KeyDaddrProtoPort, Map: MapFirewallIPs})}},
		{Name: ChainMarkForMasq, Rules: []Rule{rule(SetMark{Bits: mark})}},
		{Name: ChainMasquerading, Rules: []Rule{
			rule(MatchMarkClear{Bits: mark}, Verdict{Kind: Return}),
			// Clear the bit so a packet re-entering (e.g. through a
			// tunnel) is not masqueraded twice.
			rule(SetMark{Bits: mark, Xor: true}),
			rule(Masquerade{}),
		}},
		{Name: ChainReject, Rules: []Rule{
			rule(MatchL4Proto{Proto: model.TCP}, Reject{TCPReset: true}),
			rule(Reject{}),
		}},
	}
	sets := []*Set{
		{Name: MapServiceIPs, Key: KeyDaddrProtoPort, Verdict: true},
		{Name: MapServiceNodePorts, Key: KeyProtoPort, Verdict: true},
		{Name: MapNoEndpointIPs, Key: KeyDaddrProtoPort, Verdict: true},
		{Name: MapNoEndpointNodePorts, Key: KeyProtoPort, Verdict: true},
		{Name: MapFirewallIPs, Key: KeyDaddrProtoPort, Verdict: true},
		{Name: SetHairpin, Key: KeySaddrDaddr},
		{Name: SetClusterIPs, Key: KeyDaddrProtoPort},
	}
	return chains, sets
}

// clusterIPMasq is the rule, if any, that marks ClusterIP traffic for
// masquerade (see SetClusterIPs): traffic from the node itself or other
// hosts must come back through this node, so its source is rewritten.
// Without --masquerade-all or a way to tell local pods apart there is none.
func clusterIPMasq(cfg *proxy.Config, local []netip.Prefix) []Rule {
	if !cfg.MasqueradeAll && len(local) == 0 {
		return nil
	}
	var m Rule
	if !cfg.MasqueradeAll {
		for _, p := range local {
			m = append(m, MatchAddr{Src: true, Prefix: p, Neg: true})
		}
	}
	return []Rule{append(m, MatchKeyInSet{Key: KeyDaddrProtoPort, Set: SetClusterIPs}, SetMark{Bits: cfg.MarkMasq()})}
}

type renderer struct {
	f     model.Family
	node  model.Node
	cfg   *proxy.Config
	local []netip.Prefix
	// masqClusterIPs: ChainServices has the rule that looks up
	// SetClusterIPs, so the set needs its elements.
	masqClusterIPs bool
}

// ofFamily returns the endpoints of family f. The common single-family case
// returns eps itself (callers never modify the result), which saves most of
// a 10k-Service render's allocations.
func ofFamily(f model.Family, eps []model.Endpoint) []model.Endpoint {
	same := true
	for _, ep := range eps {
		if model.FamilyOf(ep.IP) != f {
			same = false
			break
		}
	}
	if same {
		return eps
	}
	out := make([]model.Endpoint, 0, len(eps))
	for _, ep := range eps {
		if model.FamilyOf(ep.IP) == f {
			out = append(out, ep)
		}
	}
	return out
}

func addrsOfFamily(f model.Family, as []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		if model.FamilyOf(a) == f {
			out = append(out, a)
		}
	}
	return out
}

func sameEndpoints(a, b []model.Endpoint) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].AddrPort() != b[i].AddrPort() {
			return false
		}
	}
	return true
}

// service renders one service port's objects for the renderer's family, or
// nil when the port has no address of that family. Eligibility comes from the
// model; this only splits it by family and turns it into chains.
func (r *renderer) service(sp *model.ServicePort) *ServiceObjects {
	vip, ok := sp.ClusterIP(r.f)
	if !ok {
		return nil
	}
	el := sp.Eligible(r.node)
	internal, external := ofFamily(r.f, el.Internal), ofFamily(r.f, el.External)
	cluster, all := ofFamily(r.f, el.Cluster), ofFamily(r.f, el.All)

	so := &ServiceObjects{Source: sp}
	id := fmt.Sprintf("%s/%s/%s/%s", sp.Name.Namespace, sp.Name.Name, sp.Protocol.Lower(), portLabel(sp))
	h := model.ShortHash(fmt.Sprint(r.f), sp.Name.String())[:8]
	svcChain := "service-" + h + "-" + id
	extChain := "external-" + h + "-" + id
	cluChain := "cluster-" + h + "-" + id
	fwChain := "firewall-" + h + "-" + id
	port := uint16(sp.Port)

	// Affinity sets exist for every endpoint some cascade can pick: the
	// model's All, plus the cluster-wide ones that pods and the node reach
	// through an ETP=Local external address.
	targets := all
	if sp.ExternalPolicyLocal && sp.HasExternal() {
		targets = unionEndpoints(all, cluster)
	}
	affSet := map[netip.AddrPort]string{}
	if sp.AffinitySeconds > 0 {
		for _, ep := range targets {
			// The timeout is part of the set's identity (a set's
			// timeout cannot be changed in place), so a new timeout
			// means a new set name.
			ah := model.ShortHash(fmt.Sprint(r.f), sp.Name.String(), ep.String(), fmt.Sprint(sp.AffinitySeconds))[:8]
			affSet[ep.AddrPort()] = "affinity-" + ah + "-" + id + "__" + ep.IP.String() + "/" + fmt.Sprint(ep.Port)
			so.Sets = append(so.Sets, &Set{Name: affSet[ep.AddrPort()], Key: KeyAddr,
				Timeout: time.Duration(sp.AffinitySeconds) * time.Second})
		}
	}
	mark := r.cfg.MarkMasq()

	// pick returns the rule that sends the packet to ep when choice
	// matches. The DNAT is inline, with no per-endpoint chain, so the
	// kernel's table validation (run on every commit that adds a rule
	// with a NAT, mark or jump expression) walks one chain per Service
	// instead of one per endpoint. Hairpin is not decided here but once,
	// in nat-postrouting (SetHairpin), so an endpoint costs one rule.
	pick := func(choice []Expr, ep model.Endpoint) Rule {
		r := make(Rule, 0, 4+len(choice))
		r = append(r, MatchL4Proto{Proto: sp.Protocol})
		r = append(r, choice...)
		if s, ok := affSet[ep.AddrPort()]; ok {
			r = append(r, UpdateSaddr{Set: s})
		}
		return append(r, DNAT{To: ep.AddrPort()})
	}

	// cascade picks one of eps: affinity first (a client seen recently
	// goes back to the same endpoint), then numgen with probability
	// 1/n, 1/(n-1), … so every endpoint is equally likely. Rules per
	// endpoint instead of an inline anonymous vmap per Service keep the
	// kernel's load time linear and small (pkg/nftables/README.md).
	cascade := func(eps []model.Endpoint) []Rule {
		out := make([]Rule, 0, len(eps)*(1+int(min(sp.AffinitySeconds, 1))))
		if sp.AffinitySeconds > 0 {
			for _, ep := range eps {
				out = append(out, pick([]Expr{MatchSaddrInSet{Set: affSet[ep.AddrPort()]}}, ep))
			}
		}
		for i, ep := range eps {
			var choice []Expr
			if n := len(eps) - i; n > 1 {
				choice = []Expr{MatchNumgen{Mod: uint32(n)}}
			}
			out = append(out, pick(choice, ep))
		}
		return out
	}

	add := func(m string, e Element) { so.Elements = append(so.Elements, MapElement{Map: m, Element: e}) }
	reject := gotoV(ChainReject)

	// Internal (ClusterIP) traffic.
	key := Element{Addr: vip, Proto: sp.Protocol, Port: port}
	// "No endpoints at all" (reject) is judged on the cluster-wide set: a
	// Local policy without a local endpoint drops instead, as kube-proxy
	// does, because the service does exist elsewhere.
	switch {
	case len(cluster) == 0:
		key.Verdict = reject
		add(MapNoEndpointIPs, key)
	case len(internal) == 0:
		// internalTrafficPolicy Local without a local endpoint: drop,
		// not reject, as kube-proxy does.
		key.Verdict = Verdict{Kind: Drop}
		add(MapNoEndpointIPs, key)
	default:
		so.Chains = append(so.Chains, &Chain{Name: svcChain, Rules: cascade(internal)})
		if r.masqClusterIPs {
			add(SetClusterIPs, key)
		}
		key.Verdict = gotoV(svcChain)
		add(MapServiceIPs, key)
	}

	if !sp.HasExternal() {
		return so
	}

	// External traffic (NodePort, externalIPs, LB IPs).
	extVerdict := gotoV(extChain)
	extMapIPs, extMapNP := MapServiceIPs, MapServiceNodePorts
	if len(cluster) == 0 {
		extVerdict, extMapIPs, extMapNP = reject, MapNoEndpointIPs, MapNoEndpointNodePorts
	} else {
		c := &Chain{Name: extChain}
		if sp.ExternalPolicyLocal {
			// Pods and the node itself may reach an external IP of an
			// ETP=Local service; they get the cluster-wide endpoints,
			// as with kube-proxy. Only truly external clients are
			// limited to local endpoints, with their source kept.
			target := ""
			if len(cluster) > 0 {
				target = svcChain
				if !sameEndpoints(cluster, internal) {
					target = cluChain
					so.Chains = append(so.Chains, &Chain{Name: cluChain, Rules: cascade(cluster)})
				}
			}
			if target != "" {
				for _, p := range r.local {
					c.Rules = append(c.Rules, rule(MatchAddr{Src: true, Prefix: p}, gotoV(target)))
				}
				c.Rules = append(c.Rules, rule(MatchFibLocal{Src: true}, SetMark{Bits: mark}, gotoV(target)))
			}
		} else {
			c.Rules = append(c.Rules, rule(SetMark{Bits: mark}))
		}
		if len(external) > 0 {
			c.Rules = append(c.Rules, cascade(external)...)
		} else {
			c.Rules = append(c.Rules, rule(Verdict{Kind: Drop}))
		}
		so.Chains = append(so.Chains, c)
	}
	for _, ip := range addrsOfFamily(r.f, sp.ExternalIPs) {
		add(extMapIPs, Element{Addr: ip, Proto: sp.Protocol, Port: port, Verdict: extVerdict})
	}
	lbs := addrsOfFamily(r.f, sp.LoadBalancerIPs)
	for _, ip := range lbs {
		add(extMapIPs, Element{Addr: ip, Proto: sp.Protocol, Port: port, Verdict: extVerdict})
	}
	if sp.NodePort != 0 {
		add(extMapNP, Element{Proto: sp.Protocol, Port: uint16(sp.NodePort), Verdict: extVerdict})
	}
	var ranges []netip.Prefix
	for _, p := range sp.LoadBalancerSourceRanges {
		if model.FamilyOf(p.Addr()) == r.f {
			ranges = append(ranges, p.Masked())
		}
	}
	// Source ranges apply to LB IPs only (as in kube-proxy). A Service
	// whose ranges are all of the other family admits nobody of this one.
	// RestrictsSources, not the list's length: a Service whose ranges all
	// failed to parse must admit nobody, not everybody.
	if len(lbs) > 0 && sp.RestrictsSources() {
		c := &Chain{Name: fwChain}
		for _, p := range ranges {
			c.Rules = append(c.Rules, rule(MatchAddr{Src: true, Prefix: p}, Verdict{Kind: Return}))
		}
		c.Rules = append(c.Rules, rule(Verdict{Kind: Drop}))
		so.Chains = append(so.Chains, c)
		for _, ip := range lbs {
			add(MapFirewallIPs, Element{Addr: ip, Proto: sp.Protocol, Port: port, Verdict: gotoV(fwChain)})
		}
	}
	return so
}

func portLabel(sp *model.ServicePort) string {
	if sp.Name.Port != "" {
		return sp.Name.Port
	}
	return strings.ToLower(fmt.Sprint(sp.Port))
}

// unionEndpoints returns a followed by the endpoints of b not in a.
func unionEndpoints(a, b []model.Endpoint) []model.Endpoint {
	seen := make(map[netip.AddrPort]bool, len(a))
	out := append([]model.Endpoint(nil), a...)
	for _, ep := range a {
		seen[ep.AddrPort()] = true
	}
	for _, ep := range b {
		if !seen[ep.AddrPort()] {
			out = append(out, ep)
		}
	}
	return out
}
