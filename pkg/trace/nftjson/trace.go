package nftjson

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/trace"
)

// maxNumgen bounds the values of one numgen a trace enumerates.
const maxNumgen = 1 << 16

type fate int

const (
	cont fate = iota
	accept
	drop
	reject
	unsupported
)

type state struct {
	prob   float64
	steps  []trace.Step
	dst    netip.Addr
	port   uint16
	mark   uint32
	dnat   bool
	masq   bool
	fate   fate
	reason string
	depth  int
}

func (s state) step(where, what string) state {
	s.steps = append(slices.Clip(s.steps), trace.Step{Where: where, What: what})
	return s
}

func (s state) unsupported(where, what string) state {
	s = s.step(where, "unsupported: "+what)
	s.fate, s.reason = unsupported, what+" (in "+where+")"
	return s
}

type tracer struct {
	pkt trace.Packet
	res *trace.Result
}

type base struct {
	t *Table
	c *Chain
}

// IPTablesNFT reports whether t is one of iptables-nft's tables: its rules
// carry xt expressions, or its base chains have iptables' built-in names.
func IPTablesNFT(t *Table) bool {
	if t.XT {
		return true
	}
	for _, c := range t.Chains {
		if c.Hook != "" && c.Name == strings.ToUpper(c.Name) {
			return true
		}
	}
	return false
}

// Trace follows pkt through rs. The result's Mode and Source are left for
// the caller.
func Trace(rs *Ruleset, pkt trace.Packet) *trace.Result {
	tr := &tracer{pkt: pkt, res: &trace.Result{Packet: pkt.String()}}
	fam := "ip"
	if model.FamilyOf(pkt.Dst) == model.IPv6 {
		fam = "ip6"
	}
	var tables []*Table
	for _, t := range rs.Tables {
		if t.Family != fam && t.Family != "inet" {
			continue
		}
		if IPTablesNFT(t) {
			tr.res.Notes = append(tr.res.Notes, fmt.Sprintf("table %s %s is iptables-nft's: not traced here (see the iptables trace)", t.Family, t.Name))
			continue
		}
		tables = append(tables, t)
	}
	states := []state{{prob: 1, dst: pkt.Dst, port: pkt.Port}}
	hooks := []string{"prerouting", ""}
	if pkt.FromNode {
		hooks = []string{"output"}
	}
	hooks = append(hooks, "postrouting")
	for _, h := range hooks {
		var next []state
		for _, st := range states {
			if st.fate != cont {
				next = append(next, st)
				continue
			}
			hook := h
			if hook == "" { // the routing decision after prerouting
				hook = "forward"
				if pkt.Local(st.dst) {
					hook = "input"
				}
			}
			next = append(next, tr.hook(tables, hook, st)...)
		}
		states = next
	}
	for _, s := range states {
		p := trace.Path{Prob: s.prob, Steps: s.steps, Masquerade: s.masq}
		switch s.fate {
		case drop:
			p.Kind = trace.Drop
		case reject:
			p.Kind = trace.Reject
		case unsupported:
			p.Kind, p.Reason = trace.Unsupported, s.reason
		default:
			p.Kind = trace.NoMatch
			if s.dnat {
				p.Kind, p.Endpoint = trace.DNAT, netip.AddrPortFrom(s.dst, s.port)
			}
		}
		tr.res.Paths = append(tr.res.Paths, p)
	}
	tr.res.Finish()
	return tr.res
}

// hook runs the base chains of hook in priority order. A drop or reject
// ends the packet; accept ends only that base chain. Once a connection has
// its NAT binding the kernel runs no further nat chains of the hook
// (nf_nat_inet_fn stops at the first chain that sets one up).
func (tr *tracer) hook(tables []*Table, hook string, st state) []state {
	var bases []base
	for _, t := range tables {
		for _, c := range t.Chains {
			if c.Hook == hook {
				bases = append(bases, base{t, c})
			}
		}
	}
	// Equal priorities run in registration order, which the ruleset does
	// not show; table then chain name is a stable stand-in.
	sort.Slice(bases, func(i, j int) bool {
		bi, bj := bases[i], bases[j]
		if bi.c.Prio != bj.c.Prio {
			return bi.c.Prio < bj.c.Prio
		}
		if bi.t.Name != bj.t.Name {
			return bi.t.Name < bj.t.Name
		}
		return bi.c.Name < bj.c.Name
	})
	states := []state{st}
	for _, b := range bases {
		var next []state
		for _, s := range states {
			if s.fate != cont {
				next = append(next, s)
				continue
			}
			if b.c.Type == "nat" && ((hook == "postrouting" && s.masq) || (hook != "postrouting" && s.dnat)) {
				next = append(next, s)
				continue
			}
			where := fmt.Sprintf("%s %s/%s", b.t.Family, b.t.Name, b.c.Name)
			s = s.step(where, fmt.Sprintf("hook %s priority %d", hook, b.c.Prio))
			for _, r := range tr.chain(b.t, b.c, 0, s) {
				switch r.fate {
				case accept:
					r.fate = cont
				case cont:
					if b.c.Policy == "drop" {
						r = r.step(where, "policy drop")
						r.fate = drop
					}
				}
				next = append(next, r)
			}
		}
		states = next
	}
	return states
}

// chain evaluates c from rule ri on. A fate of cont means the packet fell
// off the chain or returned.
func (tr *tracer) chain(t *Table, c *Chain, ri int, st state) []state {
	if ri >= len(c.Rules) {
		st.fate = cont
		return []state{st}
	}
	return tr.expr(t, c, ri, 0, st)
}

func (tr *tracer) expr(t *Table, c *Chain, ri, ei int, st state) []state {
	r := c.Rules[ri]
	if ei == len(r.Exprs) {
		return tr.chain(t, c, ri+1, st)
	}
	where := fmt.Sprintf("%s %s/%s #%d", t.Family, t.Name, c.Name, ri+1)
	nextExpr := func(s state) []state { return tr.expr(t, c, ri, ei+1, s) }
	nextRule := func(s state) []state { return tr.chain(t, c, ri+1, s) }
	e, _ := r.Exprs[ei].(map[string]any)
	if len(e) != 1 {
		return []state{st.unsupported(where, compact(r.Exprs[ei]))}
	}
	var key string
	var arg any
	for k, v := range e {
		key, arg = k, v
	}
	switch key {
	case "match":
		m, _ := arg.(map[string]any)
		op, _ := m["op"].(string)
		left := m["left"]
		if ng, ok := numgenOf(left); ok {
			if ng.mod == 0 || ng.mod > maxNumgen {
				return []state{st.unsupported(where, "numgen mod "+strconv.Itoa(ng.mod))}
			}
			hits := 0
			for v := 0; v < ng.mod; v++ {
				ok, why := tr.compare(t, numVal(uint64(v+ng.offset)), op, m["right"])
				if why != "" {
					return []state{st.unsupported(where, why)}
				}
				if ok {
					hits++
				}
			}
			p := float64(hits) / float64(ng.mod)
			var out []state
			if hits > 0 {
				s := st
				s.prob *= p
				out = append(out, nextExpr(s.step(where, fmt.Sprintf("%s   [taken with p=%.4g]", exprString(arg, "match"), p)))...)
			}
			if hits < ng.mod {
				s := st
				s.prob *= 1 - p
				out = append(out, nextRule(s)...)
			}
			return out
		}
		v, why := tr.value(left, st)
		if why != "" {
			return []state{st.unsupported(where, why)}
		}
		if v.kind == vNone { // a protocol dependency that fails: tcp dport on udp
			return nextRule(st)
		}
		ok, why := tr.compare(t, v, op, m["right"])
		if why != "" {
			return []state{st.unsupported(where, why)}
		}
		tr.noteAffinity(t, left, m["right"])
		if !ok {
			return nextRule(st)
		}
		return nextExpr(st)
	case "counter", "log", "comment":
		return nextExpr(st)
	case "mangle":
		m, _ := arg.(map[string]any)
		if k, ok := m["key"].(map[string]any); !ok || metaKey(k) != "mark" {
			return []state{st.unsupported(where, exprString(arg, key))}
		}
		v, why := tr.value(m["value"], st)
		if why != "" || v.kind != vNum {
			return []state{st.unsupported(where, exprString(arg, key))}
		}
		st.mark = uint32(v.num)
		return nextExpr(st)
	case "set":
		// add/update of a dynamic set (affinity): nothing to decide.
		return nextExpr(st)
	case "vmap":
		m, _ := arg.(map[string]any)
		return tr.vmap(t, c, ri, where, m, st)
	case "jump", "goto":
		m, _ := arg.(map[string]any)
		target, _ := m["target"].(string)
		return tr.jump(t, c, ri, where, key, target, st.step(where, key+" "+target))
	case "return":
		st = st.step(where, "return")
		st.fate = cont
		return []state{st}
	case "continue":
		return nextRule(st)
	case "accept":
		st = st.step(where, "accept")
		st.fate = accept
		return []state{st}
	case "drop":
		st = st.step(where, "drop")
		st.fate = drop
		return []state{st}
	case "reject":
		if m, ok := arg.(map[string]any); ok && m["type"] == "tcp reset" && tr.pkt.Proto != model.TCP {
			// `reject with tcp reset` carries an implicit meta l4proto tcp.
			return nextRule(st)
		}
		st = st.step(where, exprString(arg, key))
		st.fate = reject
		return []state{st}
	case "dnat":
		m, _ := arg.(map[string]any)
		if mp, ok := m["addr"].(map[string]any); ok && mp["map"] != nil {
			// kube-proxy ≥ 1.31: dnat ip to numgen random mod N map { 0 : addr . port, … }
			return tr.dnatMap(where, mp["map"], st)
		}
		as, ok := m["addr"].(string)
		a, err := netip.ParseAddr(as)
		if !ok || err != nil {
			return []state{st.unsupported(where, exprString(arg, key))}
		}
		port := st.port
		if p, ok := m["port"]; ok {
			n, err := strconv.Atoi(fmt.Sprint(p))
			if err != nil {
				return []state{st.unsupported(where, exprString(arg, key))}
			}
			port = uint16(n)
		}
		st = st.step(where, exprString(arg, key))
		st.dst, st.port, st.dnat, st.fate = a, port, true, accept
		return []state{st}
	case "masquerade", "snat":
		st = st.step(where, exprString(arg, key))
		st.masq, st.fate = true, accept
		return []state{st}
	}
	return []state{st.unsupported(where, compact(e))}
}

// dnatMap is a DNAT whose address (and port) come from a map lookup; a
// numgen key forks into every element with its share.
func (tr *tracer) dnatMap(where string, x any, st state) []state {
	m, _ := x.(map[string]any)
	data, _ := m["data"].(map[string]any)
	set, ok := data["set"].([]any)
	if !ok {
		return []state{st.unsupported(where, "dnat map "+compact(x))}
	}
	to := func(v any, s state, note string) []state {
		addr, port := v, any(nil)
		if c, ok := v.(map[string]any); ok {
			parts, _ := c["concat"].([]any)
			if len(parts) != 2 {
				return []state{s.unsupported(where, "dnat map value "+compact(v))}
			}
			addr, port = parts[0], parts[1]
		}
		a, err := netip.ParseAddr(fmt.Sprint(addr))
		if err != nil {
			return []state{s.unsupported(where, "dnat map value "+compact(v))}
		}
		p := s.port
		if port != nil {
			p = uint16(atoi(port))
		}
		s = s.step(where, fmt.Sprintf("%sdnat to %s", note, netip.AddrPortFrom(a, p)))
		s.dst, s.port, s.dnat, s.fate = a, p, true, accept
		return []state{s}
	}
	if ng, ok := numgenOf(m["key"]); ok {
		if ng.mod == 0 || ng.mod > maxNumgen {
			return []state{st.unsupported(where, "numgen mod "+strconv.Itoa(ng.mod))}
		}
		count := map[string]int{}
		vals := map[string]any{}
		var order []string
		miss := 0
		for v := 0; v < ng.mod; v++ {
			var found any
			for _, e := range set {
				pair, _ := e.([]any)
				if len(pair) != 2 {
					continue
				}
				if ok, _ := tr.elemMatch(nil, numVal(uint64(v+ng.offset)), unwrapElem(pair[0])); ok {
					found = pair[1]
					break
				}
			}
			if found == nil {
				miss++
				continue
			}
			k := compact(found)
			if count[k] == 0 {
				order = append(order, k)
				vals[k] = found
			}
			count[k]++
		}
		var out []state
		for _, k := range order {
			s := st
			p := float64(count[k]) / float64(ng.mod)
			s.prob *= p
			out = append(out, to(vals[k], s, fmt.Sprintf("numgen random mod %d map [taken with p=%.4g]: ", ng.mod, p))...)
		}
		if miss > 0 {
			// No element: the kernel drops the packet (NAT to nothing).
			s := st
			s.prob *= float64(miss) / float64(ng.mod)
			s = s.step(where, "dnat map has no element for the random value: drop")
			s.fate = drop
			out = append(out, s)
		}
		return out
	}
	v, why := tr.value(m["key"], st)
	if why != "" || v.kind == vNone {
		return []state{st.unsupported(where, "dnat map key "+compact(m["key"]))}
	}
	for _, e := range set {
		pair, _ := e.([]any)
		if len(pair) != 2 {
			continue
		}
		ok, why := tr.elemMatch(nil, v, unwrapElem(pair[0]))
		if why != "" {
			return []state{st.unsupported(where, why)}
		}
		if ok {
			return to(pair[1], st, "")
		}
	}
	s := st.step(where, "dnat map has no element for "+v.String()+": drop")
	s.fate = drop
	return []state{s}
}

func (tr *tracer) jump(t *Table, c *Chain, ri int, where, kind, target string, st state) []state {
	if st.depth > 64 {
		return []state{st.unsupported(where, "chain depth over 64 (loop?)")}
	}
	tc := t.Chains[target]
	if tc == nil {
		return []state{st.unsupported(where, kind+" to missing chain "+target)}
	}
	st.depth++
	res := tr.chain(t, tc, 0, st)
	if kind == "goto" {
		return res
	}
	var out []state
	for _, r := range res {
		r.depth--
		if r.fate == cont {
			out = append(out, tr.chain(t, c, ri+1, r)...)
		} else {
			out = append(out, r)
		}
	}
	return out
}

// vmap looks the key up and applies the verdict; a numgen key forks into
// every verdict it can pick, each with its share.
func (tr *tracer) vmap(t *Table, c *Chain, ri int, where string, m map[string]any, st state) []state {
	elems, name, why := tr.mapElems(t, m["data"])
	if why != "" {
		return []state{st.unsupported(where, why)}
	}
	apply := func(v any, s state) []state {
		vm, _ := v.(map[string]any)
		for k, a := range vm {
			switch k {
			case "jump", "goto":
				am, _ := a.(map[string]any)
				target, _ := am["target"].(string)
				return tr.jump(t, c, ri, where, k, target, s)
			case "drop":
				s = s.step(where, "drop")
				s.fate = drop
				return []state{s}
			case "accept":
				s = s.step(where, "accept")
				s.fate = accept
				return []state{s}
			case "return":
				s.fate = cont
				return []state{s}
			case "continue":
				return tr.chain(t, c, ri+1, s)
			}
		}
		return []state{s.unsupported(where, "verdict "+compact(v))}
	}
	if ng, ok := numgenOf(m["key"]); ok {
		if ng.mod == 0 || ng.mod > maxNumgen {
			return []state{st.unsupported(where, "numgen mod "+strconv.Itoa(ng.mod))}
		}
		type pick struct {
			verdict any
			n       int
		}
		var picks []*pick
		miss := 0
		for v := 0; v < ng.mod; v++ {
			val := numVal(uint64(v + ng.offset))
			var found any
			for _, e := range elems {
				ok, why := tr.elemMatch(t, val, e[0])
				if why != "" {
					return []state{st.unsupported(where, why)}
				}
				if ok {
					found = e[1]
					break
				}
			}
			if found == nil {
				miss++
				continue
			}
			i := slices.IndexFunc(picks, func(p *pick) bool { return compact(p.verdict) == compact(found) })
			if i < 0 {
				picks = append(picks, &pick{verdict: found})
				i = len(picks) - 1
			}
			picks[i].n++
		}
		var out []state
		for _, p := range picks {
			s := st
			prob := float64(p.n) / float64(ng.mod)
			s.prob *= prob
			s = s.step(where, fmt.Sprintf("numgen random mod %d vmap %s: %s   [taken with p=%.4g]", ng.mod, name, verdictString(p.verdict), prob))
			out = append(out, apply(p.verdict, s)...)
		}
		if miss > 0 {
			s := st
			s.prob *= float64(miss) / float64(ng.mod)
			out = append(out, tr.chain(t, c, ri+1, s)...)
		}
		return out
	}
	v, why := tr.value(m["key"], st)
	if why != "" {
		return []state{st.unsupported(where, why)}
	}
	if v.kind == vNone {
		return tr.chain(t, c, ri+1, st)
	}
	for _, e := range elems {
		ok, why := tr.elemMatch(t, v, e[0])
		if why != "" {
			return []state{st.unsupported(where, why)}
		}
		if ok {
			return apply(e[1], st.step(where, fmt.Sprintf("%s vmap %s: %s → %s", exprString(m["key"], ""), name, v, verdictString(e[1]))))
		}
	}
	return tr.chain(t, c, ri+1, st)
}

func (tr *tracer) mapElems(t *Table, data any) (elems [][2]any, name, why string) {
	switch d := data.(type) {
	case string:
		if !strings.HasPrefix(d, "@") {
			return nil, "", "vmap data " + d
		}
		s := t.Sets[d[1:]]
		if s == nil {
			return nil, "", "lookup in missing map " + d
		}
		for _, e := range s.Elems {
			if p, ok := e.([]any); ok && len(p) == 2 {
				elems = append(elems, [2]any{p[0], p[1]})
			}
		}
		return elems, d, ""
	case map[string]any:
		set, ok := d["set"].([]any)
		if !ok {
			return nil, "", "vmap data " + compact(d)
		}
		for _, e := range set {
			if p, ok := e.([]any); ok && len(p) == 2 {
				elems = append(elems, [2]any{unwrapElem(p[0]), p[1]})
			}
		}
		return elems, "{…}", ""
	}
	return nil, "", "vmap data " + compact(data)
}

// noteAffinity records a ClientIP affinity lookup: a match of the source
// address against a set with timeouts.
func (tr *tracer) noteAffinity(t *Table, left, right any) {
	name, ok := right.(string)
	if !ok || !strings.HasPrefix(name, "@") {
		return
	}
	s := t.Sets[name[1:]]
	if s == nil || (s.Timeout == 0 && !slices.Contains(s.Flags, "timeout")) {
		return
	}
	if p, ok := left.(map[string]any)["payload"].(map[string]any); ok && p["field"] == "saddr" {
		tr.res.Affinity = append(tr.res.Affinity, fmt.Sprintf("ClientIP via set %s (timeout %d s, %d live element(s))", name, s.Timeout, len(s.Elems)))
	}
}

// ---- values ----

type vkind int

const (
	vNone vkind = iota // the expression's dependency does not hold
	vAddr
	vNum
	vStr
	vFlags
	vConcat
)

type value struct {
	kind  vkind
	addr  netip.Addr
	num   uint64
	str   string
	flags []string
	parts []value
}

func numVal(n uint64) value { return value{kind: vNum, num: n} }

func (v value) String() string {
	switch v.kind {
	case vAddr:
		return v.addr.String()
	case vNum:
		if v.str != "" { // a protocol number, printed by name
			return v.str
		}
		return strconv.FormatUint(v.num, 10)
	case vStr:
		return v.str
	case vFlags:
		return strings.Join(v.flags, ",")
	case vConcat:
		var s []string
		for _, p := range v.parts {
			s = append(s, p.String())
		}
		return strings.Join(s, " . ")
	}
	return "?"
}

type numgen struct{ mod, offset int }

func numgenOf(x any) (numgen, bool) {
	m, ok := x.(map[string]any)
	if !ok {
		return numgen{}, false
	}
	ng, ok := m["numgen"].(map[string]any)
	if !ok || ng["mode"] != "random" {
		return numgen{}, false
	}
	mod, _ := strconv.Atoi(fmt.Sprint(ng["mod"]))
	off, _ := strconv.Atoi(fmt.Sprint(ng["offset"]))
	return numgen{mod, off}, true
}

func metaKey(m map[string]any) string {
	if mm, ok := m["meta"].(map[string]any); ok {
		k, _ := mm["key"].(string)
		return k
	}
	return ""
}

var protoNums = map[string]uint64{"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}

// value evaluates a left-hand expression for the packet in state st.
func (tr *tracer) value(x any, st state) (value, string) {
	m, ok := x.(map[string]any)
	if !ok || len(m) != 1 {
		return value{}, "expression " + compact(x)
	}
	proto := protoNums[tr.pkt.Proto.Lower()]
	for k, a := range m {
		switch k {
		case "payload":
			p, _ := a.(map[string]any)
			pr, _ := p["protocol"].(string)
			field, _ := p["field"].(string)
			switch pr {
			case "ip", "ip6":
				if (pr == "ip") != tr.pkt.Dst.Is4() {
					return value{}, ""
				}
				switch field {
				case "saddr":
					return value{kind: vAddr, addr: tr.pkt.Src}, ""
				case "daddr":
					return value{kind: vAddr, addr: st.dst}, ""
				case "protocol", "nexthdr":
					return value{kind: vNum, num: proto, str: tr.pkt.Proto.Lower()}, ""
				}
			case "th", "tcp", "udp", "sctp":
				if pr != "th" && pr != tr.pkt.Proto.Lower() {
					return value{}, ""
				}
				if field == "dport" {
					return numVal(uint64(st.port)), ""
				}
			}
			return value{}, "payload " + pr + " " + field
		case "meta":
			switch metaKey(m) {
			case "l4proto":
				return value{kind: vNum, num: proto, str: tr.pkt.Proto.Lower()}, ""
			case "nfproto":
				if tr.pkt.Dst.Is4() {
					return value{kind: vStr, str: "ipv4"}, ""
				}
				return value{kind: vStr, str: "ipv6"}, ""
			case "protocol":
				if tr.pkt.Dst.Is4() {
					return value{kind: vStr, str: "ip"}, ""
				}
				return value{kind: vStr, str: "ip6"}, ""
			case "mark":
				return numVal(uint64(st.mark)), ""
			}
			return value{}, "meta " + metaKey(m)
		case "ct":
			c, _ := a.(map[string]any)
			switch c["key"] {
			case "state":
				return value{kind: vFlags, flags: []string{"new"}}, ""
			case "status":
				if st.dnat {
					return value{kind: vFlags, flags: []string{"dnat"}}, ""
				}
				return value{kind: vFlags}, ""
			case "direction":
				return value{kind: vStr, str: "original"}, ""
			}
			return value{}, "ct " + fmt.Sprint(c["key"])
		case "fib":
			f, _ := a.(map[string]any)
			flags, _ := f["flags"].([]any)
			if f["result"] != "type" || len(flags) != 1 {
				return value{}, "fib " + compact(f)
			}
			addr := st.dst
			switch flags[0] {
			case "saddr":
				addr = tr.pkt.Src
			case "daddr":
			default:
				return value{}, "fib " + compact(f)
			}
			if tr.pkt.Local(addr) {
				return value{kind: vStr, str: "local"}, ""
			}
			return value{kind: vStr, str: "unicast"}, ""
		case "concat":
			parts, _ := a.([]any)
			v := value{kind: vConcat}
			for _, p := range parts {
				pv, why := tr.value(p, st)
				if why != "" || pv.kind == vNone {
					return pv, why
				}
				v.parts = append(v.parts, pv)
			}
			return v, ""
		case "&", "|", "^":
			ops, _ := a.([]any)
			if len(ops) != 2 {
				return value{}, "expression " + compact(x)
			}
			l, why := tr.value(ops[0], st)
			if why != "" || l.kind != vNum {
				return value{}, "expression " + compact(x)
			}
			r, err := strconv.ParseUint(fmt.Sprint(ops[1]), 0, 64)
			if err != nil {
				return value{}, "expression " + compact(x)
			}
			switch k {
			case "&":
				return numVal(l.num & r), ""
			case "|":
				return numVal(l.num | r), ""
			}
			return numVal(l.num ^ r), ""
		}
		return value{}, "expression " + compact(x)
	}
	return value{}, ""
}

// compare applies op to v and a right-hand side.
func (tr *tracer) compare(t *Table, v value, op string, right any) (bool, string) {
	var hit bool
	var why string
	if name, ok := right.(string); ok && strings.HasPrefix(name, "@") {
		s := t.Sets[name[1:]]
		if s == nil {
			return false, "lookup in missing set " + name
		}
		for _, e := range s.Elems {
			if hit, why = tr.elemMatch(t, v, e); why != "" || hit {
				break
			}
		}
	} else if m, ok := right.(map[string]any); ok && m["set"] != nil {
		set, _ := m["set"].([]any)
		for _, e := range set {
			if hit, why = tr.elemMatch(t, v, unwrapElem(e)); why != "" || hit {
				break
			}
		}
	} else {
		hit, why = tr.elemMatch(t, v, right)
	}
	if why != "" {
		return false, why
	}
	switch op {
	case "==", "in", "":
		return hit, ""
	case "!=":
		return !hit, ""
	}
	return false, "operator " + op
}

// elemMatch reports whether v equals (or falls in) one element e.
func (tr *tracer) elemMatch(t *Table, v value, e any) (bool, string) {
	if m, ok := e.(map[string]any); ok {
		switch {
		case m["prefix"] != nil:
			p, _ := m["prefix"].(map[string]any)
			a, err := netip.ParseAddr(fmt.Sprint(p["addr"]))
			n, err2 := strconv.Atoi(fmt.Sprint(p["len"]))
			if err != nil || err2 != nil || v.kind != vAddr {
				return false, "prefix " + compact(p)
			}
			return netip.PrefixFrom(a, n).Masked().Contains(v.addr), ""
		case m["range"] != nil:
			r, _ := m["range"].([]any)
			if len(r) != 2 {
				return false, "range " + compact(r)
			}
			lo, ok1 := tr.scalar(v, r[0])
			hi, ok2 := tr.scalar(v, r[1])
			if !ok1 || !ok2 {
				return false, "range " + compact(r)
			}
			return cmpVal(lo, v) <= 0 && cmpVal(v, hi) <= 0, ""
		case m["concat"] != nil:
			parts, _ := m["concat"].([]any)
			if v.kind != vConcat || len(parts) != len(v.parts) {
				return false, ""
			}
			for i, p := range parts {
				ok, why := tr.elemMatch(t, v.parts[i], p)
				if why != "" || !ok {
					return false, why
				}
			}
			return true, ""
		}
		return false, "value " + compact(m)
	}
	if list, ok := e.([]any); ok { // flags: ct state { established, related }
		for _, x := range list {
			if ok, why := tr.elemMatch(t, v, x); why != "" || ok {
				return ok, why
			}
		}
		return false, ""
	}
	if v.kind == vFlags {
		return slices.Contains(v.flags, fmt.Sprint(e)), ""
	}
	w, ok := tr.scalar(v, e)
	if !ok {
		return false, fmt.Sprintf("value %s compared with %s", compact(e), v)
	}
	return cmpVal(v, w) == 0, ""
}

// scalar reads a JSON scalar as the same kind as v.
func (tr *tracer) scalar(v value, e any) (value, bool) {
	s := fmt.Sprint(e)
	switch v.kind {
	case vAddr:
		a, err := netip.ParseAddr(s)
		return value{kind: vAddr, addr: a}, err == nil
	case vNum:
		if n, ok := protoNums[s]; ok {
			return numVal(n), true
		}
		n, err := strconv.ParseUint(s, 0, 64)
		return numVal(n), err == nil
	case vStr:
		return value{kind: vStr, str: s}, true
	}
	return value{}, false
}

func cmpVal(a, b value) int {
	switch a.kind {
	case vAddr:
		return a.addr.Compare(b.addr)
	case vNum:
		switch {
		case a.num < b.num:
			return -1
		case a.num > b.num:
			return 1
		}
		return 0
	}
	return strings.Compare(a.str, b.str)
}

// ---- printing ----

func compact(x any) string {
	b, err := json.Marshal(x)
	if err != nil {
		return fmt.Sprint(x)
	}
	return string(b)
}

func verdictString(v any) string {
	m, ok := v.(map[string]any)
	if !ok {
		return compact(v)
	}
	for k, a := range m {
		if am, ok := a.(map[string]any); ok && am["target"] != nil {
			return fmt.Sprintf("%s %s", k, am["target"])
		}
		return k
	}
	return compact(v)
}

// exprString prints the common expressions in nft's syntax, the rest as JSON.
func exprString(x any, kind string) string {
	m, _ := x.(map[string]any)
	switch kind {
	case "match":
		op := fmt.Sprint(m["op"])
		if op == "==" || op == "in" {
			op = ""
		} else {
			op += " "
		}
		return strings.TrimSpace(exprString(m["left"], "") + " " + op + rhsString(m["right"]))
	case "dnat", "snat":
		s := kind + " to " + fmt.Sprint(m["addr"])
		if p, ok := m["port"]; ok {
			s = fmt.Sprintf("%s to %s", kind, netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprint(m["addr"])), uint16(atoi(p))))
		}
		return s
	case "masquerade":
		return "masquerade"
	case "reject":
		if m != nil && m["type"] != nil {
			return fmt.Sprintf("reject with %v", m["type"])
		}
		return "reject"
	case "":
		for k, a := range m {
			switch k {
			case "payload":
				p, _ := a.(map[string]any)
				return fmt.Sprintf("%v %v", p["protocol"], p["field"])
			case "meta":
				return "meta " + metaKey(m)
			case "ct":
				c, _ := a.(map[string]any)
				return fmt.Sprintf("ct %v", c["key"])
			case "fib":
				f, _ := a.(map[string]any)
				return fmt.Sprintf("fib %v type", f["flags"])
			case "numgen":
				n, _ := a.(map[string]any)
				return fmt.Sprintf("numgen random mod %v", n["mod"])
			case "concat":
				parts, _ := a.([]any)
				var s []string
				for _, p := range parts {
					s = append(s, exprString(p, ""))
				}
				return strings.Join(s, " . ")
			case "&", "|", "^":
				ops, _ := a.([]any)
				if len(ops) == 2 {
					return fmt.Sprintf("%s %s %v", exprString(ops[0], ""), k, ops[1])
				}
			}
		}
	}
	return compact(x)
}

func rhsString(x any) string {
	switch r := x.(type) {
	case string:
		return r
	case map[string]any:
		if p, ok := r["prefix"].(map[string]any); ok {
			return fmt.Sprintf("%v/%v", p["addr"], p["len"])
		}
	}
	return compact(x)
}

func atoi(x any) int {
	n, _ := strconv.Atoi(fmt.Sprint(x))
	return n
}
