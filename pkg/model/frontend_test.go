package model_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// svc is a TCP port 80 with a NodePort, created at t0+age seconds.
func svc(ns, name, vip string, age int, mutate func(*model.ServicePort)) *model.ServicePort {
	sp := mt.SP(ns, name, "", vip, 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	sp.Created = t0.Add(time.Duration(age) * time.Second)
	if mutate != nil {
		mutate(sp)
	}
	return sp
}

func ext(ips ...string) func(*model.ServicePort) {
	return func(sp *model.ServicePort) { sp.ExternalIPs = mt.Addrs(ips...) }
}

func lb(ips ...string) func(*model.ServicePort) {
	return func(sp *model.ServicePort) { sp.LoadBalancerIPs = mt.Addrs(ips...) }
}

// apply runs one Update and returns the effective port per name it reported.
func apply(t *testing.T, x *model.Frontends, old, cur []*model.ServicePort) (map[model.ServicePortName]*model.ServicePort, model.FrontendChanges) {
	t.Helper()
	ch := x.Update(old, cur)
	out := map[model.ServicePortName]*model.ServicePort{}
	for _, sp := range ch.Effective {
		if _, dup := out[sp.Name]; dup {
			t.Fatalf("Update reported %s twice", sp.Name)
		}
		out[sp.Name] = sp
	}
	return out, ch
}

func strs[T fmt.Stringer](in []T) []string {
	var out []string
	for _, x := range in {
		out = append(out, x.String())
	}
	return out
}

func TestFrontendOlderServiceWins(t *testing.T) {
	old := svc("b", "old", "172.30.0.1", 0, lb("198.51.100.1"))
	newer := svc("a", "new", "172.30.0.2", 10, func(sp *model.ServicePort) {
		sp.NodePort = 30080
		sp.LoadBalancerIPs = mt.Addrs("198.51.100.1", "198.51.100.2")
		sp.ExternalIPs = mt.Addrs("203.0.113.9")
	})
	eff, conflicts := model.Resolve(newer, old)
	if eff[1] != old {
		t.Errorf("the winner must be programmed as declared (same pointer)")
	}
	got := eff[0]
	if got == newer {
		t.Fatalf("the loser must be a copy without the lost address")
	}
	if want := mt.Addrs("198.51.100.2"); !slices.Equal(got.LoadBalancerIPs, want) {
		t.Errorf("loser LB IPs = %v, want %v", got.LoadBalancerIPs, want)
	}
	if !slices.Equal(got.ClusterIPs, newer.ClusterIPs) || got.NodePort != 30080 || !slices.Equal(got.ExternalIPs, newer.ExternalIPs) || !reflect.DeepEqual(got.Endpoints, newer.Endpoints) {
		t.Errorf("the loser must keep everything else: %+v", got)
	}
	if !slices.Equal(newer.LoadBalancerIPs, mt.Addrs("198.51.100.1", "198.51.100.2")) {
		t.Errorf("the declared port was modified")
	}
	want := []string{"load-balancer IP 198.51.100.1:80/TCP of a/new:/TCP is the load-balancer IP of b/old:/TCP"}
	if g := strs(conflicts); !slices.Equal(g, want) {
		t.Errorf("conflicts = %q, want %q", g, want)
	}
}

func TestFrontendTies(t *testing.T) {
	// Same creationTimestamp: namespace, then name, then port name.
	a := svc("ns1", "z", "172.30.0.1", 0, ext("203.0.113.1"))
	b := svc("ns2", "a", "172.30.0.2", 0, ext("203.0.113.1"))
	eff, _ := model.Resolve(b, a)
	if eff[1] != a || len(eff[0].ExternalIPs) != 0 {
		t.Errorf("tie on age: ns1/z must win over ns2/a")
	}
	c := svc("ns", "s", "172.30.0.3", 0, ext("203.0.113.1"))
	c.Name.Port = "b"
	d := svc("ns", "s", "172.30.0.3", 0, ext("203.0.113.1"))
	d.Name.Port, d.ClusterIPs = "a", mt.Addrs("172.30.0.4") // keep the ClusterIP claims apart
	eff, conflicts := model.Resolve(c, d)
	if eff[1] != d || len(eff[0].ExternalIPs) != 0 || len(conflicts) != 1 {
		t.Errorf("tie on service: port name a must win over b; conflicts %v", conflicts)
	}
	// Order of input never matters.
	e1, c1 := model.Resolve(a, b, c, d)
	e2, c2 := model.Resolve(d, c, b, a)
	slices.Reverse(e2)
	if !slices.Equal(strs(c1), strs(c2)) {
		t.Errorf("conflicts depend on input order: %v vs %v", c1, c2)
	}
	for i := range e1 {
		if !reflect.DeepEqual(e1[i], e2[i]) {
			t.Errorf("effective port %s depends on input order", e1[i].Name)
		}
	}
}

func TestFrontendClusterIPAlwaysWins(t *testing.T) {
	// An older Service lists a younger one's ClusterIP as externalIP.
	older := svc("ns", "older", "172.30.0.1", 0, ext("172.30.0.2", "203.0.113.1"))
	younger := svc("ns", "younger", "172.30.0.2", 10, nil)
	eff, conflicts := model.Resolve(older, younger)
	if eff[1] != younger {
		t.Errorf("the ClusterIP owner must be untouched")
	}
	if !slices.Equal(eff[0].ExternalIPs, mt.Addrs("203.0.113.1")) {
		t.Errorf("externalIP equal to a ClusterIP must be dropped, got %v", eff[0].ExternalIPs)
	}
	if len(conflicts) != 1 || conflicts[0].WinnerKind != model.ClusterIPFrontend || conflicts[0].Loser != older.Name {
		t.Errorf("conflicts = %v", conflicts)
	}
	// Another port of the same address is no conflict.
	other := svc("ns", "other", "172.30.0.3", 0, ext("172.30.0.2"))
	other.Port = 81
	if eff, conflicts := model.Resolve(other, younger); eff[0] != other || len(conflicts) != 0 {
		t.Errorf("a different port on a ClusterIP must not conflict: %v", conflicts)
	}
}

func TestFrontendDifferentProtocolOrPortShare(t *testing.T) {
	tcp := svc("ns", "dns-tcp", "172.30.0.1", 0, lb("198.51.100.1"))
	udp := svc("ns", "dns-udp", "172.30.0.2", 10, lb("198.51.100.1"))
	udp.Name.Protocol, udp.Protocol = model.UDP, model.UDP
	p81 := svc("ns", "web81", "172.30.0.3", 20, lb("198.51.100.1"))
	p81.Port = 81
	eff, conflicts := model.Resolve(tcp, udp, p81)
	if len(conflicts) != 0 || eff[0] != tcp || eff[1] != udp || eff[2] != p81 {
		t.Errorf("one IP shared by different protocols or ports must not conflict: %v", conflicts)
	}
}

func TestFrontendDuplicatesWithinAPort(t *testing.T) {
	sp := svc("ns", "dup", "172.30.0.1", 0, func(sp *model.ServicePort) {
		sp.ExternalIPs = mt.Addrs("203.0.113.1", "203.0.113.1", "198.51.100.1", "172.30.0.1", "fd00::1")
		sp.LoadBalancerIPs = mt.Addrs("198.51.100.1", "198.51.100.1")
	})
	eff, conflicts := model.Resolve(sp)
	if len(conflicts) != 0 {
		t.Errorf("duplicates within one port are not conflicts: %v", conflicts)
	}
	got := eff[0]
	if !slices.Equal(got.ExternalIPs, mt.Addrs("203.0.113.1")) || !slices.Equal(got.LoadBalancerIPs, mt.Addrs("198.51.100.1")) {
		t.Errorf("dedup: externalIPs %v LB IPs %v; want [203.0.113.1] [198.51.100.1] (an address that is both is an LB IP; own ClusterIP and a family without ClusterIP dropped)",
			got.ExternalIPs, got.LoadBalancerIPs)
	}
	// The same declared port resolved again keeps its copy.
	x := model.NewFrontends()
	e1, _ := apply(t, x, nil, []*model.ServicePort{sp})
	other := svc("ns", "other", "172.30.0.9", 0, nil)
	e2, _ := apply(t, x, nil, []*model.ServicePort{other})
	if _, ok := e2[sp.Name]; ok {
		t.Errorf("an unrelated add re-decided %s", sp.Name)
	}
	e3, _ := apply(t, x, []*model.ServicePort{other}, nil)
	if len(e3) != 0 || e1[sp.Name] == sp {
		t.Errorf("unexpected effective ports %v", e3)
	}
}

func TestFrontendClusterIPTwice(t *testing.T) {
	// The allocator prevents it; if it happens anyway, the younger port
	// loses that family, and its addresses of that family no longer count:
	// a third Service gets the externalIP it lists.
	a := svc("ns", "a", "172.30.0.1", 0, nil)
	b := svc("ns", "b", "172.30.0.1", 10, func(sp *model.ServicePort) { sp.NodePort = 30001; sp.ExternalIPs = mt.Addrs("203.0.113.1") })
	c := svc("ns", "c", "172.30.0.3", 20, ext("203.0.113.1"))
	eff, conflicts := model.Resolve(a, b, c)
	if eff[0] != a || eff[2] != c {
		t.Errorf("a and c must be untouched")
	}
	if len(eff[1].ClusterIPs) != 0 || len(eff[1].ExternalIPs) != 0 || eff[1].NodePort != 0 {
		t.Errorf("b must lose its family: %+v", eff[1])
	}
	if g := strs(conflicts); len(g) != 1 || conflicts[0].Loser != b.Name || conflicts[0].LoserKind != model.ClusterIPFrontend {
		t.Errorf("conflicts = %q; want only b's ClusterIP", g)
	}
}

func TestFrontendNodePortTwice(t *testing.T) {
	a := svc("ns", "a", "172.30.0.1", 10, func(sp *model.ServicePort) { sp.NodePort = 30001 })
	b := svc("ns", "b", "172.30.0.2", 0, func(sp *model.ServicePort) { sp.NodePort = 30001 })
	eff, conflicts := model.Resolve(a, b)
	if eff[0].NodePort != 0 || eff[1] != b || len(conflicts) != 1 || conflicts[0].Frontend.String() != "NodePort 30001/TCP" {
		t.Errorf("older NodePort must win: %+v %v", eff[0], conflicts)
	}
}

// TestFrontendLifecycle follows one conflict as Services come, change and go:
// reported once, pointers change exactly when the effective port does.
func TestFrontendLifecycle(t *testing.T) {
	x := model.NewFrontends()
	winner := svc("ns", "winner", "172.30.0.1", 0, lb("198.51.100.1"))
	bystander := svc("ns", "bystander", "172.30.0.3", 0, lb("198.51.100.3"))
	eff, ch := apply(t, x, nil, []*model.ServicePort{winner, bystander})
	if eff[winner.Name] != winner || eff[bystander.Name] != bystander || len(ch.Appeared) != 0 || ch.Current != 0 {
		t.Fatalf("no conflict yet: %+v", ch)
	}

	// A younger Service claims the same LB IP: it loses, once.
	loser := svc("ns", "loser", "172.30.0.2", 10, lb("198.51.100.1", "198.51.100.2"))
	eff, ch = apply(t, x, nil, []*model.ServicePort{loser})
	if len(ch.Appeared) != 1 || ch.Appeared[0].Loser != loser.Name || ch.Appeared[0].Winner != winner.Name || ch.Current != 1 {
		t.Fatalf("appeared = %v current %d", ch.Appeared, ch.Current)
	}
	if _, ok := eff[bystander.Name]; ok {
		t.Errorf("bystander re-decided")
	}
	if w, ok := eff[winner.Name]; ok && w != winner {
		t.Errorf("the winner's pointer changed")
	}
	lost := eff[loser.Name]
	if lost == nil || lost == loser || !slices.Equal(lost.LoadBalancerIPs, mt.Addrs("198.51.100.2")) {
		t.Fatalf("loser effective = %+v", lost)
	}

	// The winner's endpoints change: the loser is not re-reported, keeps its pointer.
	winner2 := svc("ns", "winner", "172.30.0.1", 0, lb("198.51.100.1"))
	winner2.Endpoints = append(winner2.Endpoints, mt.Ep("10.180.1.5", 8080, "node-b"))
	eff, ch = apply(t, x, []*model.ServicePort{winner}, []*model.ServicePort{winner2})
	if len(ch.Appeared)+len(ch.Resolved) != 0 || ch.Current != 1 {
		t.Errorf("a winner's endpoint change reported conflicts: %+v", ch)
	}
	if eff[winner2.Name] != winner2 {
		t.Errorf("winner effective must be the new declared port")
	}
	if l, ok := eff[loser.Name]; ok && l != lost {
		t.Errorf("the loser's pointer changed though its effective port did not")
	}

	// The loser's endpoints change: new pointer (backends must re-render it), not re-reported.
	loser2 := svc("ns", "loser", "172.30.0.2", 10, lb("198.51.100.1", "198.51.100.2"))
	loser2.Endpoints = nil
	eff, ch = apply(t, x, []*model.ServicePort{loser}, []*model.ServicePort{loser2})
	if len(ch.Appeared)+len(ch.Resolved) != 0 {
		t.Errorf("a loser's endpoint change reported conflicts: %+v", ch)
	}
	lost2 := eff[loser2.Name]
	if lost2 == nil || lost2 == lost || len(lost2.Endpoints) != 0 || !slices.Equal(lost2.LoadBalancerIPs, mt.Addrs("198.51.100.2")) {
		t.Errorf("loser after its change = %+v", lost2)
	}

	// An even older Service takes the IP: the old winner now loses (new
	// conflict), the loser keeps losing to someone else (not re-reported).
	oldest := svc("ns", "oldest", "172.30.0.9", -10, lb("198.51.100.1"))
	eff, ch = apply(t, x, nil, []*model.ServicePort{oldest})
	if g := strs(ch.Appeared); len(g) != 1 || ch.Appeared[0].Loser != winner2.Name || len(ch.Resolved) != 0 || ch.Current != 2 {
		t.Errorf("appeared %q resolved %v current %d", g, ch.Resolved, ch.Current)
	}
	if eff[winner2.Name] == winner2 || len(eff[winner2.Name].LoadBalancerIPs) != 0 {
		t.Errorf("the former winner must now be a copy without the IP")
	}
	if l, ok := eff[loser2.Name]; ok && l != lost2 {
		t.Errorf("loser pointer changed though it still loses the same IP")
	}
	if cs := x.Conflicts(); len(cs) != 2 || cs[0].Winner != oldest.Name || cs[1].Winner != oldest.Name {
		t.Errorf("current conflicts = %v", cs)
	}

	// The oldest goes away: ns/winner wins again, loser still loses.
	eff, ch = apply(t, x, []*model.ServicePort{oldest}, nil)
	if len(ch.Resolved) != 1 || ch.Resolved[0].Loser != winner2.Name || len(ch.Appeared) != 0 || ch.Current != 1 {
		t.Errorf("resolved %v appeared %v", ch.Resolved, ch.Appeared)
	}
	if eff[winner2.Name] != winner2 {
		t.Errorf("the winner must be its declared port again")
	}
	if _, ok := eff[oldest.Name]; ok {
		t.Errorf("a removed port must not be reported as effective")
	}

	// The winner goes away: the loser gets its declared port back.
	eff, ch = apply(t, x, []*model.ServicePort{winner2}, nil)
	if len(ch.Resolved) != 1 || ch.Resolved[0].Loser != loser2.Name || ch.Current != 0 {
		t.Errorf("resolved %v current %d", ch.Resolved, ch.Current)
	}
	if eff[loser2.Name] != loser2 {
		t.Errorf("the former loser must be programmed as declared")
	}
	if len(x.Conflicts()) != 0 {
		t.Errorf("conflicts left: %v", x.Conflicts())
	}
}

// TestFrontendIncrementalMatchesScratch applies random updates and checks
// after each that the incremental index agrees with deciding from scratch,
// that effective pointers change only when content does, and that the
// appeared/resolved reports add up to the current conflicts.
func TestFrontendIncrementalMatchesScratch(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(pool []string) []string {
		var out []string
		for range rng.IntN(3) {
			out = append(out, pool[rng.IntN(len(pool))])
		}
		return out
	}
	ips := []string{"203.0.113.1", "203.0.113.2", "172.30.0.1", "172.30.0.2", "fd00::1"}
	vips := []string{"172.30.0.1", "172.30.0.2", "172.30.0.3", "172.30.0.4", "172.30.0.5", "172.30.0.1"}
	random := func(i int) *model.ServicePort {
		sp := svc("ns", fmt.Sprintf("s%d", i), vips[i%len(vips)], rng.IntN(4), nil)
		sp.ExternalIPs = mt.Addrs(pick(ips)...)
		sp.LoadBalancerIPs = mt.Addrs(pick(ips)...)
		if rng.IntN(3) == 0 {
			sp.NodePort = int32(30000 + rng.IntN(2))
		}
		if rng.IntN(4) == 0 {
			sp.Port = 81
		}
		if i%5 == 0 {
			sp.ClusterIPs = append(sp.ClusterIPs, netip.MustParseAddr(fmt.Sprintf("fd00:30::%d", i%3)))
		}
		return sp
	}
	x := model.NewFrontends()
	declared := map[int]*model.ServicePort{}
	programmed := map[model.ServicePortName]*model.ServicePort{}
	reported := map[string]bool{}
	for step := range 2000 {
		i := rng.IntN(12)
		var old, cur []*model.ServicePort
		if sp := declared[i]; sp != nil {
			old = append(old, sp)
			delete(declared, i)
			delete(programmed, sp.Name)
		}
		if rng.IntN(4) != 0 {
			sp := random(i)
			declared[i] = sp
			cur = append(cur, sp)
		}
		before := map[model.ServicePortName]*model.ServicePort{}
		for n, sp := range programmed {
			before[n] = sp
		}
		ch := x.Update(old, cur)
		for _, sp := range ch.Effective {
			programmed[sp.Name] = sp
		}
		for _, c := range ch.Resolved {
			if !reported[c.Loser.String()+c.Frontend.String()] {
				t.Fatalf("step %d: resolved a conflict never reported: %v", step, c)
			}
			delete(reported, c.Loser.String()+c.Frontend.String())
		}
		for _, c := range ch.Appeared {
			k := c.Loser.String() + c.Frontend.String()
			if reported[k] {
				t.Fatalf("step %d: conflict reported twice: %v", step, c)
			}
			reported[k] = true
		}

		var all []*model.ServicePort
		for _, sp := range declared {
			all = append(all, sp)
		}
		want, wantConflicts := model.Resolve(all...)
		if len(want) != len(programmed) {
			t.Fatalf("step %d: %d programmed, want %d", step, len(programmed), len(want))
		}
		for _, w := range want {
			got := programmed[w.Name]
			if !reflect.DeepEqual(got, w) {
				t.Fatalf("step %d: %s incremental %+v\nfrom scratch %+v", step, w.Name, got, w)
			}
			if b := before[w.Name]; b != nil && b != got && reflect.DeepEqual(b, got) && !slices.Contains(cur, declaredOf(declared, w.Name)) {
				t.Errorf("step %d: %s got a new pointer with unchanged content", step, w.Name)
			}
		}
		gotConflicts := x.Conflicts()
		if !slices.Equal(strs(gotConflicts), strs(wantConflicts)) || ch.Current != len(wantConflicts) || len(reported) != len(wantConflicts) {
			t.Fatalf("step %d: conflicts\n got %q (current %d, reported %d)\nwant %q", step, strs(gotConflicts), ch.Current, len(reported), strs(wantConflicts))
		}
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func declaredOf(m map[int]*model.ServicePort, n model.ServicePortName) *model.ServicePort {
	for _, sp := range m {
		if sp.Name == n {
			return sp
		}
	}
	return nil
}

func TestFrontendDedupLeavesCleanPortsAlone(t *testing.T) {
	// The common case: nothing shared, nothing copied.
	var ports []*model.ServicePort
	for i := range 100 {
		ports = append(ports, svc("ns", fmt.Sprint(i), fmt.Sprintf("172.30.1.%d", i), i, ext(fmt.Sprintf("203.0.113.%d", i))))
	}
	eff, conflicts := model.Resolve(ports...)
	for i := range ports {
		if eff[i] != ports[i] {
			t.Fatalf("%s copied without a conflict", ports[i].Name)
		}
	}
	if len(conflicts) != 0 {
		t.Fatal(conflicts)
	}
}

// benchPorts are n Services with a ClusterIP, a NodePort for every 10th and
// an LB IP for every 5th, no two sharing a frontend.
func benchPorts(n int) []*model.ServicePort {
	out := make([]*model.ServicePort, n)
	for i := range n {
		sp := svc("ns", fmt.Sprint(i), netip.AddrFrom4([4]byte{172, 30, byte(i >> 8), byte(i)}).String(), i, nil)
		if i%10 == 0 {
			sp.NodePort = int32(30000 + i/10)
		}
		if i%5 == 0 {
			sp.LoadBalancerIPs = []netip.Addr{netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)})}
		}
		out[i] = sp
	}
	return out
}

// BenchmarkFrontends: the cold start (every port at once) and one changed
// port among n, which must cost about the same whatever n is.
func BenchmarkFrontends(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		ports := benchPorts(n)
		b.Run(fmt.Sprintf("cold/%d", n), func(b *testing.B) {
			b.ReportAllocs()
			start := cpuTime()
			for b.Loop() {
				model.NewFrontends().Update(nil, ports)
			}
			// This machine is shared; CPU time says more than wall time.
			b.ReportMetric(float64((cpuTime()-start).Microseconds())/float64(b.N)/1000, "cpu-ms/op")
		})
		b.Run(fmt.Sprintf("one-change/%d", n), func(b *testing.B) {
			x := model.NewFrontends()
			x.Update(nil, ports)
			cur := ports[n/2]
			b.ReportAllocs()
			for b.Loop() {
				next := *cur
				x.Update([]*model.ServicePort{cur}, []*model.ServicePort{&next})
				cur = &next
			}
		})
		b.Run(fmt.Sprintf("index-heap/%d", n), func(b *testing.B) {
			for b.Loop() {
				runtime.GC()
				var m0, m1 runtime.MemStats
				runtime.ReadMemStats(&m0)
				x := model.NewFrontends()
				x.Update(nil, ports)
				runtime.GC()
				runtime.ReadMemStats(&m1)
				b.ReportMetric(float64(m1.HeapAlloc-m0.HeapAlloc)/float64(n), "B/port")
				runtime.KeepAlive(x)
			}
		})
	}
}
