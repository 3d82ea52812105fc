package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// The tracer walks the rendered iptables rules for one packet, exploring
// both branches of every probabilistic match, and reports every endpoint the
// packet may reach. Any rule syntax it does not understand is an error, so an
// unexpected rule fails the behaviour table instead of being ignored.

type tracer struct {
	chains map[Table]map[string][][]string
	hooks  []Hook
	local  []netip.Addr
	fam    model.Family
}

type pktState struct {
	pkt  behavior.Packet
	dst  netip.Addr // current destination (after DNAT)
	port uint16
	mark bool
	dnat bool
}

type outcome struct {
	kind string // "fall", "return", "DNAT", "REJECT", "DROP", "ACCEPT", "MASQUERADE"
	st   pktState
}

func newTracer(cfg proxy.Config, snap *model.Snapshot, fam model.Family) (*tracer, error) {
	r := &Renderer{Cfg: cfg, Family: fam}
	base := r.RenderBase(snap.Node)
	text := renderFull(r, snap, base, nil, 0).final
	tr := &tracer{chains: map[Table]map[string][][]string{NAT: {}, Filter: {}}, hooks: base.Hooks, local: behavior.LocalAddrs(), fam: fam}
	var table Table
	for _, line := range strings.Split(text.String(), "\n") {
		switch {
		case line == "" || line == "COMMIT":
		case strings.HasPrefix(line, "*"):
			table = Table(line[1:])
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			tr.chains[table][name] = nil
		case strings.HasPrefix(line, "-A "):
			args, err := splitArgs(line)
			if err != nil {
				return nil, err
			}
			tr.chains[table][args[1]] = append(tr.chains[table][args[1]], args[2:])
		default:
			return nil, fmt.Errorf("unexpected restore line %q", line)
		}
	}
	return tr, nil
}

func splitArgs(line string) ([]string, error) {
	var out []string
	for line = strings.TrimSpace(line); line != ""; line = strings.TrimSpace(line) {
		if line[0] == '"' {
			end := strings.IndexByte(line[1:], '"')
			if end < 0 {
				return nil, fmt.Errorf("unterminated quote in %q", line)
			}
			out = append(out, line[1:end+1])
			line = line[end+2:]
			continue
		}
		tok, rest, _ := strings.Cut(line, " ")
		out = append(out, tok)
		line = rest
	}
	return out, nil
}

func inPrefix(spec string, a netip.Addr) (bool, error) {
	p, err := netip.ParsePrefix(spec)
	if err != nil {
		return false, err
	}
	return p.Contains(a), nil
}

// match evaluates a rule's matches. branch is true for matches that may or
// may not hold for a given connection (statistic, recent).
func (tr *tracer) match(args []string, st pktState) (ok, branch bool, target []string, err error) {
	neg := false
	for i := 0; i < len(args); i++ {
		a := args[i]
		next := func() string {
			i++
			if i < len(args) {
				return args[i]
			}
			return ""
		}
		res := true
		switch a {
		case "!":
			neg = true
			continue
		case "-s":
			if res, err = inPrefix(next(), st.pkt.Src); err != nil {
				return
			}
		case "-d":
			if res, err = inPrefix(next(), st.dst); err != nil {
				return
			}
		case "-p":
			res = next() == st.pkt.Proto.Lower()
		case "--dport":
			res = next() == strconv.Itoa(int(st.port))
		case "-m":
			switch m := next(); m {
			case "comment", "tcp", "udp", "sctp", "addrtype", "mark", "conntrack", "statistic", "recent":
			default:
				err = fmt.Errorf("unknown match module %q", m)
				return
			}
		case "--comment":
			next()
		case "--dst-type", "--src-type":
			if next() != "LOCAL" {
				err = fmt.Errorf("unknown addrtype in %v", args)
				return
			}
			addr := st.dst
			if a == "--src-type" {
				addr = st.pkt.Src
			}
			res = slices.Contains(tr.local, addr)
		case "--mark":
			next()
			res = st.mark
		case "--ctstate":
			states := strings.Split(next(), ",")
			// The first packet of a connection: NEW, plus DNAT once translated.
			res = slices.Contains(states, "NEW") || (st.dnat && slices.Contains(states, "DNAT"))
		case "--mode":
			if next() != "random" {
				err = fmt.Errorf("unknown statistic mode in %v", args)
				return
			}
		case "--probability":
			if _, err = strconv.ParseFloat(next(), 64); err != nil {
				return
			}
			branch = true
		case "--name", "--seconds":
			next()
		case "--rcheck":
			branch = true
		case "--set", "--rsource", "--reap":
		case "-j":
			target = args[i+1:]
			if neg {
				err = fmt.Errorf("dangling ! in %v", args)
			}
			return true, branch, target, err
		default:
			err = fmt.Errorf("unknown rule token %q in %v", a, args)
			return
		}
		if neg {
			res = !res
			neg = false
		}
		if !res {
			return false, false, nil, nil
		}
		ok = true
	}
	return false, false, nil, fmt.Errorf("rule without target: %v", args)
}

func (tr *tracer) run(table Table, chain string, from int, st pktState, depth int) ([]outcome, error) {
	if depth > 20 {
		return nil, fmt.Errorf("jump depth exceeded at %s", chain)
	}
	rules, ok := tr.chains[table][chain]
	if !ok {
		return nil, fmt.Errorf("jump to undeclared chain %s/%s", table, chain)
	}
	for i := from; i < len(rules); i++ {
		ok, branch, target, err := tr.match(rules[i], st)
		if err != nil {
			return nil, fmt.Errorf("%s/%s rule %d: %w", table, chain, i, err)
		}
		if !ok {
			continue
		}
		outs, err := tr.apply(table, chain, i, target, st, depth)
		if err != nil {
			return nil, err
		}
		if branch {
			rest, err := tr.run(table, chain, i+1, st, depth)
			if err != nil {
				return nil, err
			}
			outs = append(outs, rest...)
		}
		return outs, nil
	}
	return []outcome{{"fall", st}}, nil
}

func (tr *tracer) apply(table Table, chain string, i int, target []string, st pktState, depth int) ([]outcome, error) {
	cont := func(st pktState) ([]outcome, error) { return tr.run(table, chain, i+1, st, depth) }
	switch t := target[0]; t {
	case "RETURN":
		return []outcome{{"return", st}}, nil
	case "ACCEPT", "DROP", "REJECT":
		return []outcome{{t, st}}, nil
	case "MASQUERADE":
		return []outcome{{t, st}}, nil
	case "MARK":
		switch target[1] {
		case "--or-mark":
			st.mark = true
		case "--xor-mark":
			st.mark = !st.mark
		default:
			return nil, fmt.Errorf("unknown MARK op %v", target)
		}
		return cont(st)
	case "DNAT":
		if len(target) < 3 || target[1] != "--to-destination" {
			return nil, fmt.Errorf("bad DNAT %v", target)
		}
		to, err := netip.ParseAddrPort(target[2])
		if err != nil {
			return nil, err
		}
		st.dst, st.port, st.dnat = to.Addr(), to.Port(), true
		return []outcome{{"DNAT", st}}, nil
	default:
		if !strings.HasPrefix(t, "KUBE-") {
			return nil, fmt.Errorf("unknown target %v", target)
		}
		subs, err := tr.run(table, t, 0, st, depth+1)
		if err != nil {
			return nil, err
		}
		var outs []outcome
		for _, s := range subs {
			if s.kind == "fall" || s.kind == "return" {
				more, err := cont(s.st)
				if err != nil {
					return nil, err
				}
				outs = append(outs, more...)
				continue
			}
			outs = append(outs, s)
		}
		return outs, nil
	}
}

// hook runs the hooks of a built-in chain in order, as ensureHooks installs them.
func (tr *tracer) hook(table Table, builtin string, st pktState) ([]outcome, error) {
	outs := []outcome{{"fall", st}}
	for _, h := range tr.hooks {
		if h.Table != table || h.Chain != builtin {
			continue
		}
		var next []outcome
		for _, o := range outs {
			if o.kind != "fall" && o.kind != "return" {
				next = append(next, o)
				continue
			}
			ok, branch, target, err := tr.match(h.Args, o.st)
			if err != nil {
				return nil, err
			}
			if branch {
				return nil, fmt.Errorf("probabilistic hook %v", h.Args)
			}
			if !ok {
				next = append(next, o)
				continue
			}
			subs, err := tr.run(table, target[0], 0, o.st, 1)
			if err != nil {
				return nil, err
			}
			for _, s := range subs {
				if s.kind == "return" {
					s.kind = "fall"
				}
				next = append(next, s)
			}
		}
		outs = next
	}
	return outs, nil
}

func (tr *tracer) trace(pkt behavior.Packet) (behavior.Verdict, error) {
	st := pktState{pkt: pkt, dst: pkt.Dst, port: pkt.Port}
	natChain := "PREROUTING"
	if pkt.FromNode {
		natChain = "OUTPUT"
	}
	nat, err := tr.hook(NAT, natChain, st)
	if err != nil {
		return behavior.Verdict{}, err
	}
	var v behavior.Verdict
	seen := map[string]bool{}
	for _, o := range nat {
		if o.kind != "DNAT" && o.kind != "fall" {
			return v, fmt.Errorf("unexpected nat verdict %s", o.kind)
		}
		filterChain := "FORWARD"
		switch {
		case pkt.FromNode:
			filterChain = "OUTPUT"
		case slices.Contains(tr.local, o.st.dst):
			filterChain = "INPUT"
		}
		fouts, err := tr.hook(Filter, filterChain, o.st)
		if err != nil {
			return v, err
		}
		for _, f := range fouts {
			switch f.kind {
			case "REJECT", "DROP":
				seen[f.kind] = true
				continue
			case "fall", "ACCEPT":
			default:
				return v, fmt.Errorf("unexpected filter verdict %s", f.kind)
			}
			if !f.st.dnat {
				seen["untouched"] = true
				continue
			}
			posts, err := tr.hook(NAT, "POSTROUTING", f.st)
			if err != nil {
				return v, err
			}
			for _, p := range posts {
				v.Endpoints = append(v.Endpoints, netip.AddrPortFrom(p.st.dst, p.st.port))
				if p.kind == "MASQUERADE" {
					v.Masquerade = true
				}
			}
			seen["forward"] = true
		}
	}
	if len(seen) != 1 {
		return v, fmt.Errorf("mixed outcomes for one packet: %v", seen)
	}
	for k := range seen {
		switch k {
		case "forward":
			v.Outcome = behavior.Forward
		case "REJECT":
			v.Outcome = behavior.Reject
		case "DROP":
			v.Outcome = behavior.Drop
		case "untouched":
			v.Outcome = behavior.Untouched
		}
	}
	return v, nil
}

func TestBehaviorTable(t *testing.T) {
	behavior.Run(t, func(cfg proxy.Config, snap *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		tr, err := newTracer(cfg, snap, model.FamilyOf(pkt.Dst))
		if err != nil {
			return behavior.Verdict{}, err
		}
		return tr.trace(pkt)
	}, behavior.LocalhostCase())
}
