// Package iptrace follows the first packet of a connection through iptables
// rules given as iptables-save (or iptables-restore) text: whoever wrote them,
// miniproxy or kube-proxy. It explores both branches of every
// `-m statistic --mode random --probability p` rule, multiplying the
// probabilities along each path, so a cascade 1/3, 1/2, 1 yields each
// endpoint's share.
//
// Tables traced, in the kernel's order: nat PREROUTING (or nat OUTPUT for a
// packet from a node process), then filter INPUT / FORWARD / OUTPUT by the
// routing decision after DNAT, then nat POSTROUTING. raw, mangle and
// security are not traced (a note says when they hold rules).
//
// Supported: -s, -d, -p, --dport, --tcp-flags/--syn (the first packet is a
// SYN), the comment, tcp, udp, sctp, addrtype (LOCAL), mark, conntrack
// (--ctstate: a first packet is NEW, and DNAT once translated), statistic
// (random) and recent (--rcheck/--update against a caller-supplied lookup,
// --set) matches; the targets ACCEPT, DROP, REJECT, RETURN, jumps and gotos
// to user chains, MARK, DNAT, SNAT, MASQUERADE, LOG/NFLOG (no effect), and
// built-in chain policies. Anything else on a rule whose other matches hold
// ends that path as "unsupported: <rule>".
package iptrace

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/trace"
)

// Ruleset is the parsed text: table → chain.
type Ruleset struct {
	Tables map[string]*Table
}

// Table is one iptables table.
type Table struct {
	Chains map[string]*Chain
}

// Chain is one chain; Policy is set for built-in chains ("-" otherwise).
type Chain struct {
	Name   string
	Policy string
	Rules  []Rule
}

// Rule is one rule: its text as written (without "-A CHAIN") and its words.
type Rule struct {
	Text string
	Args []string
}

// Parse reads iptables-save output (several tables may follow each other).
// Lines that are neither table headers, chain declarations, rules, COMMIT
// nor comments are an error: the input is not what the caller thinks.
func Parse(text string) (*Ruleset, error) {
	rs := &Ruleset{Tables: map[string]*Table{}}
	var t *Table
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line == "COMMIT" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			name := line[1:]
			if t = rs.Tables[name]; t == nil {
				t = &Table{Chains: map[string]*Chain{}}
				rs.Tables[name] = t
			}
		case t == nil:
			return nil, fmt.Errorf("line %d: %q before any table", n+1, line)
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			c := &Chain{Name: f[0], Policy: "-"}
			if len(f) > 1 {
				c.Policy = f[1]
			}
			if old := t.Chains[c.Name]; old != nil {
				c.Rules = old.Rules
			}
			t.Chains[c.Name] = c
		case strings.HasPrefix(line, "-A "):
			args, err := SplitArgs(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", n+1, err)
			}
			if len(args) < 2 {
				return nil, fmt.Errorf("line %d: rule without chain", n+1)
			}
			c := t.Chains[args[1]]
			if c == nil {
				// iptables-restore input may append to a built-in chain it
				// did not declare.
				c = &Chain{Name: args[1], Policy: "ACCEPT"}
				t.Chains[args[1]] = c
			}
			text := strings.TrimSpace(strings.TrimPrefix(line[3:], args[1]))
			c.Rules = append(c.Rules, Rule{Text: text, Args: args[2:]})
		default:
			return nil, fmt.Errorf("line %d: unexpected %q", n+1, line)
		}
	}
	return rs, nil
}

// SplitArgs splits a rule line into words, honouring double quotes (and
// backslash-escaped quotes inside them, as iptables-save writes comments).
func SplitArgs(line string) ([]string, error) {
	var out []string
	for line = strings.TrimSpace(line); line != ""; line = strings.TrimSpace(line) {
		if line[0] == '"' {
			var b strings.Builder
			i := 1
			for ; i < len(line) && line[i] != '"'; i++ {
				if line[i] == '\\' && i+1 < len(line) {
					i++
				}
				b.WriteByte(line[i])
			}
			if i >= len(line) {
				return nil, fmt.Errorf("unterminated quote in %q", line)
			}
			out = append(out, b.String())
			line = line[i+1:]
			continue
		}
		tok, rest, _ := strings.Cut(line, " ")
		out = append(out, tok)
		line = rest
	}
	return out, nil
}

// Options tune a trace.
type Options struct {
	// Recent reports whether src is in the xt_recent list name (ClientIP
	// affinity). nil: every list is empty (a first connection).
	Recent func(name string, src netip.Addr) bool
}

type kind int

const (
	fall kind = iota
	ret
	accept
	drop
	reject
	dnat
	snat // MASQUERADE or SNAT: ends the nat chain
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
	kind   kind
	reason string
}

func (s state) step(where, what string) state {
	s.steps = append(slices.Clip(s.steps), trace.Step{Where: where, What: what})
	return s
}

type tracer struct {
	rs  *Ruleset
	pkt trace.Packet
	opt Options
	res *trace.Result
}

// Trace follows pkt through rs. The result's Mode and Source are left for
// the caller.
func Trace(rs *Ruleset, pkt trace.Packet, opt Options) *trace.Result {
	tr := &tracer{rs: rs, pkt: pkt, opt: opt, res: &trace.Result{Packet: pkt.String()}}
	for _, name := range []string{"raw", "mangle", "security"} {
		if t := rs.Tables[name]; t != nil {
			for _, c := range t.Chains {
				if len(c.Rules) > 0 {
					tr.res.Notes = append(tr.res.Notes, fmt.Sprintf("table %s holds rules; it is not traced", name))
					break
				}
			}
		}
	}
	st := state{prob: 1, dst: pkt.Dst, port: pkt.Port}
	natChain := "PREROUTING"
	if pkt.FromNode {
		natChain = "OUTPUT"
	}
	var final []state
	for _, s := range tr.builtin("nat", natChain, st) {
		if s.kind != fall {
			final = append(final, s)
			continue
		}
		filterChain := "FORWARD"
		switch {
		case pkt.FromNode:
			filterChain = "OUTPUT"
		case pkt.Local(s.dst):
			filterChain = "INPUT"
		}
		for _, f := range tr.builtin("filter", filterChain, s) {
			if f.kind != fall {
				final = append(final, f)
				continue
			}
			final = append(final, tr.builtin("nat", "POSTROUTING", f)...)
		}
	}
	for _, s := range final {
		p := trace.Path{Prob: s.prob, Steps: s.steps, Masquerade: s.masq}
		switch s.kind {
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

// builtin runs a built-in chain; what falls off it meets the policy. States
// that come out with kind fall continue to the next hook.
func (tr *tracer) builtin(table, chain string, st state) []state {
	t := tr.rs.Tables[table]
	if t == nil || t.Chains[chain] == nil {
		return []state{st}
	}
	var out []state
	for _, s := range tr.run(table, chain, 0, st, 0) {
		switch s.kind {
		case fall, ret:
			pol := t.Chains[chain].Policy
			switch pol {
			case "DROP":
				s = s.step(table+"/"+chain, "policy DROP")
				s.kind = drop
			default:
				s.kind = fall
			}
		case accept, dnat, snat:
			s.kind = fall
		}
		out = append(out, s)
	}
	return out
}

func (tr *tracer) run(table, chain string, from int, st state, depth int) []state {
	if depth > 64 {
		st.kind, st.reason = unsupported, "jump depth over 64 at "+table+"/"+chain+" (loop?)"
		return []state{st}
	}
	c := tr.rs.Tables[table].Chains[chain]
	if c == nil {
		st.kind, st.reason = unsupported, "jump to missing chain "+table+"/"+chain
		return []state{st}
	}
	for i := from; i < len(c.Rules); i++ {
		r := c.Rules[i]
		where := fmt.Sprintf("%s/%s #%d", table, chain, i+1)
		m := tr.match(r, st)
		if !m.ok {
			continue
		}
		if m.unsupported != "" {
			st = st.step(where, r.Text)
			st.kind, st.reason = unsupported, fmt.Sprintf("%s in %s: %s", m.unsupported, where, r.Text)
			return []state{st}
		}
		if m.prob < 1 {
			taken := st
			taken.prob *= m.prob
			taken = taken.step(where, fmt.Sprintf("%s   [taken with p=%.4g]", r.Text, m.prob))
			not := st
			not.prob *= 1 - m.prob
			out := tr.target(table, chain, i, where, r, m.target, taken, depth)
			return append(out, tr.run(table, chain, i+1, not, depth)...)
		}
		what := r.Text
		if m.note != "" {
			what += "   [" + m.note + "]"
		}
		return tr.target(table, chain, i, where, r, m.target, st.step(where, what), depth)
	}
	st.kind = fall
	return []state{st}
}

type matchResult struct {
	ok          bool
	prob        float64
	target      []string
	unsupported string
	note        string
}

// match evaluates the rule's matches: ok=false as soon as a known match
// fails; constructs it does not know are reported only when every known
// match holds (then the rule's outcome depends on them).
func (tr *tracer) match(r Rule, st state) matchResult {
	res := matchResult{ok: true, prob: 1}
	var unknown []string
	args := r.Args
	neg := false
	module := ""
	fail := func() matchResult { return matchResult{} }
	for i := 0; i < len(args); i++ {
		a := args[i]
		next := func() string {
			i++
			if i < len(args) {
				return args[i]
			}
			return ""
		}
		holds := true
		known := true
		switch a {
		case "!":
			neg = true
			continue
		case "-s", "--source", "-d", "--destination":
			addr := tr.pkt.Src
			if a == "-d" || a == "--destination" {
				addr = st.dst
			}
			p, err := parsePrefix(next())
			if err != nil {
				unknown = append(unknown, a+" "+args[i])
				known = false
				break
			}
			holds = p.Contains(addr)
		case "-p", "--protocol":
			holds = protoIs(next(), tr.pkt.Proto.Lower())
		case "-m", "--match":
			module = next()
			continue
		case "--comment":
			next()
			continue
		case "--dport", "--destination-port":
			holds = portIn(next(), st.port)
		case "--syn":
			// The first packet of a TCP connection is a SYN.
		case "--tcp-flags":
			mask, comp := strings.Split(next(), ","), strings.Split(next(), ",")
			holds = (slices.Contains(mask, "SYN") || slices.Contains(mask, "ALL")) == slices.Contains(comp, "SYN") &&
				!slices.ContainsFunc(comp, func(f string) bool { return f != "SYN" && f != "NONE" })
		case "--dst-type", "--src-type":
			typ := next()
			addr := st.dst
			if a == "--src-type" {
				addr = tr.pkt.Src
			}
			switch typ {
			case "LOCAL":
				holds = tr.pkt.Local(addr)
			default:
				known = false
				unknown = append(unknown, a+" "+typ)
			}
		case "--mark":
			v, m, err := parseMark(next())
			if err != nil {
				known = false
				unknown = append(unknown, "--mark "+args[i])
				break
			}
			holds = st.mark&m == v
		case "--ctstate", "--state":
			states := strings.Split(next(), ",")
			holds = slices.Contains(states, "NEW") || (st.dnat && slices.Contains(states, "DNAT"))
		case "--mode":
			if m := next(); m != "random" {
				known = false
				unknown = append(unknown, "statistic --mode "+m)
			}
		case "--probability":
			p, err := strconv.ParseFloat(next(), 64)
			if err != nil || p < 0 || p > 1 {
				known = false
				unknown = append(unknown, "--probability "+args[i])
				break
			}
			if neg {
				p, neg = 1-p, false
			}
			res.prob *= p
			continue
		case "--rcheck", "--update":
			name, secs := recentArgs(args[i+1:])
			src := tr.pkt.Src
			pinned := tr.opt.Recent != nil && tr.opt.Recent(name, src)
			aff := fmt.Sprintf("ClientIP via iptables recent list %s (%s s)", name, secs)
			tr.res.Affinity = append(tr.res.Affinity, aff)
			holds = pinned
			if pinned {
				res.note = "source is in recent list " + name + ": pinned"
			}
		case "--set", "--rsource", "--reap", "--rdest":
		case "--name", "--seconds", "--mask":
			next()
		case "-j", "--jump", "-g", "--goto":
			res.target = args[i:]
			if len(unknown) > 0 {
				res.unsupported = strings.Join(unknown, ", ")
			}
			if neg {
				res.unsupported = "dangling !"
			}
			return res
		default:
			known = false
			unknown = append(unknown, fmt.Sprintf("%s (module %q)", a, module))
			// Skip this option's value words so they are not read as options.
			for i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") && args[i+1] != "!" {
				i++
			}
		}
		if known {
			if neg {
				holds = !holds
			}
			if !holds {
				return fail()
			}
		}
		neg = false
	}
	// A rule without a target only counts packets: it changes nothing.
	res.target = nil
	return res
}

func recentArgs(args []string) (name, secs string) {
	name, secs = "DEFAULT", "∞"
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "--name":
			name = args[i+1]
		case "--seconds":
			secs = args[i+1]
		case "-j", "-g":
			return
		}
	}
	return
}

func (tr *tracer) target(table, chain string, i int, where string, r Rule, target []string, st state, depth int) []state {
	cont := func(s state) []state { return tr.run(table, chain, i+1, s, depth) }
	if len(target) < 2 {
		// No target: a counting rule.
		return cont(st)
	}
	goto_ := target[0] == "-g" || target[0] == "--goto"
	t := target[1]
	opts := target[2:]
	opt := func(name string) string {
		for j := 0; j+1 < len(opts); j++ {
			if opts[j] == name {
				return opts[j+1]
			}
		}
		return ""
	}
	unsup := func(why string) []state {
		st.kind, st.reason = unsupported, fmt.Sprintf("%s in %s: %s", why, where, r.Text)
		return []state{st}
	}
	switch t {
	case "RETURN":
		st.kind = ret
		return []state{st}
	case "ACCEPT":
		st.kind = accept
		return []state{st}
	case "DROP":
		st.kind = drop
		return []state{st}
	case "REJECT":
		st.kind = reject
		return []state{st}
	case "LOG", "NFLOG", "TRACE":
		return cont(st)
	case "MASQUERADE", "SNAT":
		if table != "nat" {
			return unsup(t + " outside the nat table")
		}
		st.masq, st.kind = true, snat
		return []state{st}
	case "MARK":
		switch {
		case opt("--set-xmark") != "" || opt("--set-mark") != "":
			s := opt("--set-xmark")
			if s == "" {
				s = opt("--set-mark")
			}
			v, m, err := parseMark(s)
			if err != nil {
				return unsup("MARK " + s)
			}
			if opt("--set-mark") != "" {
				st.mark = st.mark&^m | v
			} else {
				st.mark = st.mark&^m ^ v
			}
		case opt("--or-mark") != "":
			v, err := strconv.ParseUint(opt("--or-mark"), 0, 32)
			if err != nil {
				return unsup("MARK --or-mark")
			}
			st.mark |= uint32(v)
		case opt("--xor-mark") != "":
			v, err := strconv.ParseUint(opt("--xor-mark"), 0, 32)
			if err != nil {
				return unsup("MARK --xor-mark")
			}
			st.mark ^= uint32(v)
		case opt("--and-mark") != "":
			v, err := strconv.ParseUint(opt("--and-mark"), 0, 32)
			if err != nil {
				return unsup("MARK --and-mark")
			}
			st.mark &= uint32(v)
		default:
			return unsup("MARK option")
		}
		return cont(st)
	case "DNAT":
		if table != "nat" {
			return unsup("DNAT outside the nat table")
		}
		to, err := parseDest(opt("--to-destination"), st.port)
		if err != nil {
			return unsup("DNAT target: " + err.Error())
		}
		st.dst, st.port, st.dnat, st.kind = to.Addr(), to.Port(), true, dnat
		return []state{st}
	}
	if strings.ToUpper(t) == t && tr.rs.Tables[table].Chains[t] == nil {
		// All-capitals names that are not chains are targets (TPROXY, CT, …).
		return unsup("target " + t)
	}
	var out []state
	for _, s := range tr.run(table, t, 0, st, depth+1) {
		switch s.kind {
		case fall, ret:
			if goto_ {
				s.kind = ret
				out = append(out, s)
				continue
			}
			out = append(out, cont(s)...)
		default:
			out = append(out, s)
		}
	}
	return out
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err == nil {
			return p.Masked(), nil
		}
		// Dotted netmask: 10.0.0.0/255.255.0.0.
		addr, mask, _ := strings.Cut(s, "/")
		a, err1 := netip.ParseAddr(addr)
		m, err2 := netip.ParseAddr(mask)
		if err1 != nil || err2 != nil {
			return netip.Prefix{}, err
		}
		bits := 0
		for _, b := range m.AsSlice() {
			for ; b&0x80 != 0; b <<= 1 {
				bits++
			}
		}
		return netip.PrefixFrom(a, bits).Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func protoIs(spec, proto string) bool {
	switch spec {
	case proto, "all", "0":
		return true
	case "6":
		return proto == "tcp"
	case "17":
		return proto == "udp"
	case "132":
		return proto == "sctp"
	}
	return false
}

func portIn(spec string, port uint16) bool {
	lo, hi, isRange := strings.Cut(spec, ":")
	l, err := strconv.Atoi(lo)
	if err != nil {
		return false
	}
	if !isRange {
		return l == int(port)
	}
	h, err := strconv.Atoi(hi)
	if err != nil {
		return false
	}
	return int(port) >= l && int(port) <= h
}

func parseMark(s string) (v, m uint32, err error) {
	vs, ms, hasMask := strings.Cut(s, "/")
	v64, err := strconv.ParseUint(vs, 0, 32)
	if err != nil {
		return 0, 0, err
	}
	m64 := uint64(0xffffffff)
	if hasMask {
		if m64, err = strconv.ParseUint(ms, 0, 32); err != nil {
			return 0, 0, err
		}
	}
	return uint32(v64), uint32(m64), nil
}

// parseDest reads a DNAT --to-destination: addr, addr:port, [v6]:port.
func parseDest(s string, port uint16) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	if a, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		return netip.AddrPortFrom(a, port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("cannot read %q", s)
}
