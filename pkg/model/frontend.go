package model

import (
	"fmt"
	"net/netip"
	"slices"
)

// FrontendKind says how a service port claims a frontend.
type FrontendKind uint8

// The kinds of claim. Within one service port a frontend listed twice keeps
// the first kind in this order (an address that is both an externalIP and a
// load-balancer IP of the same port is a load-balancer IP, so its source
// ranges apply: fail closed).
const (
	ClusterIPFrontend FrontendKind = iota + 1
	LoadBalancerFrontend
	ExternalIPFrontend
	NodePortFrontend
)

func (k FrontendKind) String() string {
	switch k {
	case ClusterIPFrontend:
		return "ClusterIP"
	case LoadBalancerFrontend:
		return "load-balancer IP"
	case ExternalIPFrontend:
		return "externalIP"
	case NodePortFrontend:
		return "NodePort"
	}
	return fmt.Sprintf("FrontendKind(%d)", uint8(k))
}

// Frontend is what a backend dispatches on: destination address, protocol
// and port (an nft map key, an IPVS virtual server, an iptables match). Addr
// is the zero Addr for a NodePort, which is matched on every node address
// and so has a key space of its own.
type Frontend struct {
	Addr     netip.Addr
	Protocol Protocol
	Port     int32
}

func (f Frontend) String() string {
	if !f.Addr.IsValid() {
		return fmt.Sprintf("NodePort %d/%s", f.Port, f.Protocol)
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, uint16(f.Port)), f.Protocol)
}

// Conflict is one frontend claimed by more than one service port. Only the
// Winner's claim is programmed; the Loser keeps everything else.
type Conflict struct {
	Frontend   Frontend
	Loser      ServicePortName
	LoserKind  FrontendKind
	Winner     ServicePortName
	WinnerKind FrontendKind
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s %s of %s is the %s of %s", c.LoserKind, c.Frontend, c.Loser, c.WinnerKind, c.Winner)
}

// Frontends applies miniproxy's one frontend rule, incrementally. Two service
// ports that claim the same frontend would give every backend two entries
// with one key: the nftables kernel refuses the whole batch ("file exists"),
// iptables and IPVS keep whichever came first. So before any backend renders,
// each frontend gets exactly one owner:
//
//   - A ClusterIP claim beats any other claim (an externalIP or load-balancer
//     IP equal to some Service's ClusterIP, port and protocol is dropped).
//   - Otherwise the older Service wins (ServicePort.Created, the Service's
//     creationTimestamp); ties go to the smaller namespace, then name, then
//     port name.
//   - The loser loses only that frontend: the address is dropped from its
//     port and everything else (ClusterIP, NodePort, other addresses) stays.
//     A port that loses its ClusterIP of a family (two Services with one
//     ClusterIP, which the apiserver's allocator prevents) loses every
//     frontend of that family, since no backend programs a family without one.
//   - Within one port, duplicates are harmless: an address listed twice is
//     kept once, and externalIPs or load-balancer IPs of a family the port has
//     no ClusterIP of are dropped, as kube-proxy does.
//
// Update costs time proportional to the ports it is given plus the ports
// that share a frontend with them, not to the number of Services. The zero
// value is not usable; call NewFrontends.
type Frontends struct {
	claims map[Frontend][]claim
	// adjusted holds the ports whose effective port differs from the
	// declared one, so an unchanged loser keeps its pointer.
	adjusted map[ServicePortName]*adjustment
	current  int
}

type claim struct {
	sp   *ServicePort
	kind FrontendKind
}

type portClaim struct {
	f    Frontend
	kind FrontendKind
}

type adjustment struct {
	declared, effective *ServicePort
	dropped             []portClaim
	conflicts           []Conflict
}

// NewFrontends returns an empty index.
func NewFrontends() *Frontends {
	return &Frontends{claims: map[Frontend][]claim{}, adjusted: map[ServicePortName]*adjustment{}}
}

// FrontendChanges is what one Update decided.
type FrontendChanges struct {
	// Effective holds the port to program for every name whose effective
	// port may have changed and that still exists: the declared pointer
	// when nothing was dropped, else a copy without the lost frontends (the
	// same copy as before while its losses are unchanged).
	Effective []*ServicePort
	// Appeared and Resolved are the conflicts that began and ended; a
	// conflict is identified by its loser and frontend, so a loser that keeps
	// losing (to the same or another winner) is reported once.
	Appeared, Resolved []Conflict
	// Current is the number of conflicts in force after the update.
	Current int
}

// Update withdraws the claims of old (ports given as new to an earlier
// Update, by pointer) and adds those of new, then re-decides every frontend
// either touched. The ports are never modified.
func (x *Frontends) Update(old, new []*ServicePort) FrontendChanges {
	keys := make(map[Frontend]bool, len(old)+len(new))
	touched := make(map[ServicePortName]*ServicePort, len(old)+len(new))
	for _, sp := range old {
		for _, pc := range claimsOf(sp) {
			x.remove(pc.f, sp)
			keys[pc.f] = true
		}
		if _, ok := touched[sp.Name]; !ok {
			touched[sp.Name] = nil
		}
	}
	for _, sp := range new {
		for _, pc := range claimsOf(sp) {
			x.claims[pc.f] = append(x.claims[pc.f], claim{sp: sp, kind: pc.kind})
			keys[pc.f] = true
		}
		touched[sp.Name] = sp
	}
	// Who wins a ClusterIP decides whether its claimants' other frontends
	// of that family count at all, so those are re-decided too (a new
	// port's own frontends are touched already).
	var more []Frontend
	for f := range keys {
		for _, c := range x.claims[f] {
			if c.kind == ClusterIPFrontend && touched[c.sp.Name] != c.sp {
				for _, pc := range claimsOf(c.sp) {
					more = append(more, pc.f)
				}
			}
		}
	}
	for _, f := range more {
		keys[f] = true
	}
	for f := range keys {
		for _, c := range x.claims[f] {
			touched[c.sp.Name] = c.sp
		}
	}

	ch := FrontendChanges{Effective: make([]*ServicePort, 0, len(touched))}
	for name, sp := range touched {
		prev := x.adjusted[name]
		var prevConflicts []Conflict
		if prev != nil {
			prevConflicts = prev.conflicts
		}
		if sp == nil {
			ch.Resolved = append(ch.Resolved, prevConflicts...)
			x.current -= len(prevConflicts)
			delete(x.adjusted, name)
			continue
		}
		pcs := claimsOf(sp)
		dropped, conflicts := x.resolve(sp, pcs)
		ch.Appeared = append(ch.Appeared, newConflicts(conflicts, prevConflicts)...)
		ch.Resolved = append(ch.Resolved, newConflicts(prevConflicts, conflicts)...)
		x.current += len(conflicts) - len(prevConflicts)
		switch {
		case len(dropped) == 0 && len(pcs) == declaredClaims(sp):
			delete(x.adjusted, name)
			ch.Effective = append(ch.Effective, sp)
		case prev != nil && prev.declared == sp && slices.Equal(prev.dropped, dropped):
			prev.conflicts = conflicts // the winner may have changed
			ch.Effective = append(ch.Effective, prev.effective)
		default:
			eff := effective(sp, pcs, dropped)
			x.adjusted[name] = &adjustment{declared: sp, effective: eff, dropped: dropped, conflicts: conflicts}
			ch.Effective = append(ch.Effective, eff)
		}
	}
	// Reports in a stable order.
	sortConflicts(ch.Appeared)
	sortConflicts(ch.Resolved)
	ch.Current = x.current
	return ch
}

// Conflicts returns every conflict in force, sorted by loser.
func (x *Frontends) Conflicts() []Conflict {
	var out []Conflict
	for _, a := range x.adjusted {
		out = append(out, a.conflicts...)
	}
	sortConflicts(out)
	return out
}

func sortConflicts(cs []Conflict) {
	slices.SortFunc(cs, func(a, b Conflict) int {
		if a.Loser != b.Loser {
			if a.Loser.Less(b.Loser) {
				return -1
			}
			return 1
		}
		return compareFrontend(a.Frontend, b.Frontend)
	})
}

// Resolve applies the frontend rule to a complete set of declared ports:
// the effective ports (same order; a port with nothing dropped is returned
// as is) and the conflicts.
func Resolve(ports ...*ServicePort) ([]*ServicePort, []Conflict) {
	x := NewFrontends()
	ch := x.Update(nil, ports)
	byName := make(map[ServicePortName]*ServicePort, len(ch.Effective))
	for _, sp := range ch.Effective {
		byName[sp.Name] = sp
	}
	out := make([]*ServicePort, len(ports))
	for i, sp := range ports {
		out[i] = byName[sp.Name]
	}
	return out, x.Conflicts()
}

func compareFrontend(a, b Frontend) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if a.Protocol != b.Protocol {
		if a.Protocol < b.Protocol {
			return -1
		}
		return 1
	}
	return int(a.Port - b.Port)
}

// newConflicts returns the conflicts of a whose loser and frontend are not in b.
func newConflicts(a, b []Conflict) []Conflict {
	var out []Conflict
	for _, c := range a {
		if !slices.ContainsFunc(b, func(o Conflict) bool { return o.Loser == c.Loser && o.Frontend == c.Frontend }) {
			out = append(out, c)
		}
	}
	return out
}

func (x *Frontends) remove(f Frontend, sp *ServicePort) {
	cs := x.claims[f]
	i := slices.IndexFunc(cs, func(c claim) bool { return c.sp == sp })
	if i < 0 {
		return
	}
	cs = slices.Delete(cs, i, i+1)
	if len(cs) == 0 {
		delete(x.claims, f)
	} else {
		x.claims[f] = cs
	}
}

// claimsOf lists the frontends sp claims, each once: ClusterIPs, then
// load-balancer IPs, externalIPs (only of a family sp has a ClusterIP of)
// and the NodePort.
func claimsOf(sp *ServicePort) []portClaim {
	if len(sp.ClusterIPs) == 0 {
		return nil
	}
	out := make([]portClaim, 0, declaredClaims(sp))
	add := func(ip netip.Addr, kind FrontendKind) {
		if kind != ClusterIPFrontend {
			if _, ok := sp.ClusterIP(FamilyOf(ip)); !ok {
				return
			}
		}
		f := Frontend{Addr: ip, Protocol: sp.Protocol, Port: sp.Port}
		if !slices.ContainsFunc(out, func(pc portClaim) bool { return pc.f == f }) {
			out = append(out, portClaim{f: f, kind: kind})
		}
	}
	for _, ip := range sp.ClusterIPs {
		add(ip, ClusterIPFrontend)
	}
	for _, ip := range sp.LoadBalancerIPs {
		add(ip, LoadBalancerFrontend)
	}
	for _, ip := range sp.ExternalIPs {
		add(ip, ExternalIPFrontend)
	}
	if sp.NodePort != 0 {
		out = append(out, portClaim{f: Frontend{Protocol: sp.Protocol, Port: sp.NodePort}, kind: NodePortFrontend})
	}
	return out
}

// declaredClaims is the number of frontends sp lists; more than
// len(claimsOf(sp)) means some were duplicates or of a family without a ClusterIP.
func declaredClaims(sp *ServicePort) int {
	n := len(sp.ClusterIPs) + len(sp.LoadBalancerIPs) + len(sp.ExternalIPs)
	if sp.NodePort != 0 {
		n++
	}
	return n
}

// before reports whether a's claim outranks b's (different ports).
func before(a, b claim) bool {
	if ac, bc := a.kind == ClusterIPFrontend, b.kind == ClusterIPFrontend; ac != bc {
		return ac
	}
	if !a.sp.Created.Equal(b.sp.Created) {
		return a.sp.Created.Before(b.sp.Created)
	}
	return a.sp.Name.Less(b.sp.Name)
}

// winner returns the claim that owns f, if any counts.
func (x *Frontends) winner(f Frontend) (claim, bool) {
	var best claim
	found := false
	for _, c := range x.claims[f] {
		if !x.active(c, f) {
			continue
		}
		if !found || before(c, best) {
			best, found = c, true
		}
	}
	return best, found
}

// active reports whether c, a claim on f, counts: a ClusterIP always does;
// another frontend only while its port owns a ClusterIP of f's family (a
// NodePort: of any family).
func (x *Frontends) active(c claim, f Frontend) bool {
	if c.kind == ClusterIPFrontend {
		return true
	}
	for _, ip := range c.sp.ClusterIPs {
		if c.kind != NodePortFrontend && FamilyOf(ip) != FamilyOf(f.Addr) {
			continue
		}
		if x.ownsClusterIP(c.sp, ip) {
			return true
		}
	}
	return false
}

func (x *Frontends) ownsClusterIP(sp *ServicePort, ip netip.Addr) bool {
	var best claim
	found := false
	for _, c := range x.claims[Frontend{Addr: ip, Protocol: sp.Protocol, Port: sp.Port}] {
		if c.kind == ClusterIPFrontend && (!found || before(c, best)) {
			best, found = c, true
		}
	}
	return found && best.sp == sp
}

// resolve decides each of sp's claims: the ones dropped, and among them
// the conflicts to report (a claim dropped only because sp lost its
// ClusterIP of that family is a consequence, not a conflict of its own).
func (x *Frontends) resolve(sp *ServicePort, pcs []portClaim) (dropped []portClaim, conflicts []Conflict) {
	for _, pc := range pcs {
		w, ok := x.winner(pc.f)
		if ok && w.sp == sp {
			continue
		}
		dropped = append(dropped, pc)
		if ok && x.active(claim{sp: sp, kind: pc.kind}, pc.f) {
			conflicts = append(conflicts, Conflict{Frontend: pc.f, Loser: sp.Name, LoserKind: pc.kind, Winner: w.sp.Name, WinnerKind: w.kind})
		}
	}
	return dropped, conflicts
}

// effective returns a copy of sp holding only the frontends it owns.
func effective(sp *ServicePort, pcs, dropped []portClaim) *ServicePort {
	keep := make(map[portClaim]bool, len(pcs))
	for _, pc := range pcs {
		keep[pc] = !slices.Contains(dropped, pc)
	}
	filter := func(ips []netip.Addr, kind FrontendKind) []netip.Addr {
		var out []netip.Addr
		for _, ip := range ips {
			pc := portClaim{f: Frontend{Addr: ip, Protocol: sp.Protocol, Port: sp.Port}, kind: kind}
			if keep[pc] {
				out = append(out, ip)
				keep[pc] = false // once
			}
		}
		return out
	}
	cp := *sp
	cp.ClusterIPs = filter(sp.ClusterIPs, ClusterIPFrontend)
	cp.LoadBalancerIPs = filter(sp.LoadBalancerIPs, LoadBalancerFrontend)
	cp.ExternalIPs = filter(sp.ExternalIPs, ExternalIPFrontend)
	if sp.NodePort != 0 && !keep[portClaim{f: Frontend{Protocol: sp.Protocol, Port: sp.NodePort}, kind: NodePortFrontend}] {
		cp.NodePort = 0
	}
	return &cp
}
