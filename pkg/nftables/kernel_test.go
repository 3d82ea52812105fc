package nftables

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/netnsrun"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// richConfig is a dual-stack config with a ClusterCIDR local detector.
func richConfig() proxy.Config {
	return proxy.Config{
		Families:     []model.Family{model.IPv4, model.IPv6},
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16"), netip.MustParsePrefix("fd00:180::/64")},
		LocalMode:    proxy.LocalModeClusterCIDR,
	}
}

// newNSBackend creates a namespace and a backend bound to it.
func newNSBackend(t testing.TB, cfg proxy.Config, opts ...Option) (*netnstest.NS, *Backend) {
	t.Helper()
	netnstest.RequireRoot(t, "nft")
	ns := netnstest.New(t, "nft")
	cfg.NetNS = proxy.NetNS(ns.Path())
	b, err := New(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return ns, b
}

func mustSync(t testing.TB, b *Backend, snap *model.Snapshot, full bool) proxy.Result {
	t.Helper()
	res, err := b.Sync(context.Background(), snap, full)
	if err != nil {
		t.Fatalf("Sync(full=%v): %v", full, err)
	}
	return res
}

// TestKernelReadback applies the rich fixture and checks that Debian's nft
// reads back every object without errors or unknown expressions.
func TestKernelReadback(t *testing.T) {
	ns, b := newNSBackend(t, richConfig())
	// Someone else's table must survive everything we do.
	ns.MustRun(t, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
	snap := fixture.Rich()
	mustSync(t, b, snap, false)
	out := ns.MustRun(t, "nft", "list", "ruleset")
	t.Log(out)
	if strings.Contains(out, "unknown") || strings.Contains(out, "[invalid") {
		t.Errorf("nft output has unreadable expressions")
	}
	for _, want := range []string{
		"ip daddr . meta l4proto . th dport vmap @service-ips",
		// ClusterIP masquerade: one rule before dispatch, keys in a set.
		"ip saddr != 10.180.0.0/16 ip daddr . meta l4proto . th dport @cluster-ips meta mark set",
		"172.30.0.12 . tcp . 80,",
		"172.30.0.12 . tcp . 80 : goto service-",
		"numgen random mod 3",
		"dnat to 10.180.0.1:80",
		"masquerade fully-random",
		"update @affinity-",
		"reject with tcp reset",
		"fd00:30::60 . tcp . 80 : goto service-",
		"table ip other",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft list ruleset lacks %q", want)
		}
	}
	// The kernel's copy must compare equal to the rendered one in a full
	// sync (every expression kind, value for value; elements of every map).
	ns.MustRun(t, "nft", "add", "table", "ip", "other2")
	if res := mustSync(t, b, snap, true); res.Rules != 0 {
		t.Errorf("full sync of an unchanged rich ruleset sent %d messages, want 0", res.Rules)
	}
	if err := b.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	out = ns.MustRun(t, "nft", "list", "tables")
	if strings.Contains(out, "miniproxy") || !strings.Contains(out, "table ip other") {
		t.Errorf("after Cleanup: %s", out)
	}
}

// inNS runs fn on a thread switched into the namespace fd; sockets created by
// fn stay in that namespace.
func inNS(t *testing.T, fd int, fn func()) {
	t.Helper()
	if err := netnsrun.FD(fd, func() error { fn(); return nil }); err != nil {
		t.Fatal(err)
	}
}

// serve starts a TCP server on addr (inside the namespace) that writes its
// own address and closes.
func serve(t *testing.T, fd int, addrs ...string) {
	t.Helper()
	for _, a := range addrs {
		var ln net.Listener
		inNS(t, fd, func() {
			var err error
			if ln, err = net.Listen("tcp", a); err != nil {
				t.Fatalf("listen %s: %v", a, err)
			}
		})
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte(a))
				c.Close()
			}
		}()
	}
}

// hits connects n times to vip from inside the namespace and counts which
// server answered.
func hits(t *testing.T, fd int, vip string, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := 0; i < n; i++ {
		var c net.Conn
		var err error
		inNS(t, fd, func() { c, err = net.DialTimeout("tcp", vip, 5*time.Second) })
		if err != nil {
			out["error: "+err.Error()]++
			continue
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		c.Close()
		out[string(b)]++
	}
	return out
}

// trafficSnap: a 2-endpoint service, a service without endpoints, all on
// addresses local to the namespace.
func trafficSnap() *model.Snapshot {
	two := fixture.SP("ns1", "two", 80, "172.30.0.12")
	two.Endpoints = []model.Endpoint{fixture.EP("10.180.0.1", 8080, "node-a"), fixture.EP("10.180.0.2", 8080, "node-a")}
	none := fixture.SP("ns1", "none", 80, "172.30.0.10")
	other := fixture.SP("ns1", "other", 80, "172.30.0.13")
	other.Endpoints = []model.Endpoint{fixture.EP("10.180.0.3", 8080, "node-a")}
	return fixture.Snap(two, none, other)
}

func setupTraffic(t *testing.T, opts ...Option) (*netnstest.NS, *Backend, int) {
	ns, b := newNSBackend(t, trafficConfig(), opts...)
	for _, a := range []string{"10.180.0.1", "10.180.0.2", "10.180.0.3", "10.180.0.4"} {
		ns.MustRun(t, "ip", "addr", "add", a+"/32", "dev", "lo")
	}
	// A route so connections to VIPs leave through the output path.
	ns.MustRun(t, "ip", "route", "add", "172.30.0.0/16", "dev", "lo")
	fd := ns.FD(t)
	serve(t, fd, "10.180.0.1:8080", "10.180.0.2:8080", "10.180.0.3:8080", "10.180.0.4:8080")
	return ns, b, fd
}

func trafficConfig() proxy.Config {
	return proxy.Config{ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.180.0.0/16")}}
}

// ourTables lists the nft tables of family ip whose names are miniproxy's.
func ourTables(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(ns.MustRun(t, "nft", "list", "tables", "ip"), "\n") {
		if f := strings.Fields(l); len(f) == 3 && ruleset.IsOurTable(f[2]) {
			out = append(out, f[2])
		}
	}
	sort.Strings(out)
	return out
}

// TestKernelSharded: with the Services spread over shard tables, real
// connections reach every endpoint and a Service without endpoints refuses
// (its reject lives in the main table, its dispatch nowhere); a later run
// with fewer shards removes the extra tables in its first batch; a deleted
// shard comes back on the next full sync; cleanup removes every table.
func TestKernelSharded(t *testing.T) {
	ns, b, fd := setupTraffic(t, WithShards(4))
	mustSync(t, b, trafficSnap(), false)
	if got, want := ourTables(t, ns), []string{"miniproxy", "miniproxy-shard-00", "miniproxy-shard-01", "miniproxy-shard-02", "miniproxy-shard-03"}; !slices.Equal(got, want) {
		t.Fatalf("tables %v, want %v", got, want)
	}
	check := func(when string) {
		t.Helper()
		got := hits(t, fd, "172.30.0.12:80", 40)
		if got["10.180.0.1:8080"] == 0 || got["10.180.0.2:8080"] == 0 || len(got) != 2 {
			t.Errorf("%s: 172.30.0.12:80 answered by %v, want both endpoints only", when, got)
		}
		if got := hits(t, fd, "172.30.0.13:80", 5); got["10.180.0.3:8080"] != 5 {
			t.Errorf("%s: 172.30.0.13:80 answered by %v", when, got)
		}
		var err error
		inNS(t, fd, func() { _, err = net.DialTimeout("tcp", "172.30.0.10:80", 5*time.Second) })
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: dial service without endpoints: %v, want connection refused", when, err)
		}
	}
	check("4 shards")
	// The cold start went out as one batch per table; the generation check
	// must still know that only we committed, so a periodic full sync reads
	// nothing and sends nothing.
	if !b.clean {
		t.Error("after a cold start of one batch per table the backend does not consider the kernel clean")
	}
	if res := mustSync(t, b, trafficSnap(), true); res.Rules != 0 {
		t.Errorf("full sync right after the cold start sent %d messages, want 0", res.Rules)
	}

	// Drift: someone deletes the shard that holds ns1/two.
	var victim string
	for _, tb := range b.committed.Tables[1:] {
		if tb.Services[model.ServicePortName{Namespace: "ns1", Name: "two", Protocol: model.TCP}] != nil {
			victim = tb.Name
		}
	}
	if victim == "" {
		t.Fatal("ns1/two is in no shard")
	}
	ns.MustRun(t, "nft", "delete", "table", "ip", victim)
	var derr error
	inNS(t, fd, func() {
		var c net.Conn
		if c, derr = net.DialTimeout("tcp", "172.30.0.12:80", 500*time.Millisecond); derr == nil {
			c.Close()
		}
	})
	if derr == nil {
		t.Fatalf("172.30.0.12:80 still answers with its shard %s deleted; the test proves nothing", victim)
	}
	mustSync(t, b, trafficSnap(), true)
	check("after repairing " + victim)

	// The next run has 2 shards.
	cfg2 := trafficConfig()
	cfg2.NetNS = proxy.NetNS(ns.Path())
	b2, err := New(cfg2, WithShards(2))
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	mustSync(t, b2, trafficSnap(), false)
	if got, want := ourTables(t, ns), []string{"miniproxy", "miniproxy-shard-00", "miniproxy-shard-01"}; !slices.Equal(got, want) {
		t.Fatalf("after a 2-shard run: tables %v, want %v", got, want)
	}
	check("2 shards")

	ns.MustRun(t, "nft", "add", "table", "ip", "someone-else")
	if err := b2.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := ourTables(t, ns); len(got) != 0 {
		t.Fatalf("cleanup left %v", got)
	}
	if !strings.Contains(ns.MustRun(t, "nft", "list", "tables"), "someone-else") {
		t.Fatal("cleanup removed another component's table")
	}
}

// TestKernelTraffic makes real connections to a VIP and checks both
// endpoints answer, and that a service without endpoints refuses at once.
func TestKernelTraffic(t *testing.T) {
	_, b, fd := setupTraffic(t)
	mustSync(t, b, trafficSnap(), false)
	got := hits(t, fd, "172.30.0.12:80", 40)
	if got["10.180.0.1:8080"] == 0 || got["10.180.0.2:8080"] == 0 || len(got) != 2 {
		t.Errorf("connections to 172.30.0.12:80 answered by %v, want both endpoints only", got)
	}
	var err error
	inNS(t, fd, func() { _, err = net.DialTimeout("tcp", "172.30.0.10:80", 5*time.Second) })
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial service without endpoints: %v, want connection refused (TCP reset)", err)
	}
}

// TestKernelIncremental changes one service and checks that only its objects
// are sent and traffic follows.
func TestKernelIncremental(t *testing.T) {
	ns, b, fd := setupTraffic(t)
	snap := trafficSnap()
	first := mustSync(t, b, snap, false)
	before := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")

	next := fixture.Snap()
	for n, sp := range snap.Services {
		next.Services[n] = sp
	}
	two := *snap.Services[model.ServicePortName{Namespace: "ns1", Name: "two", Protocol: model.TCP}]
	two.Endpoints = []model.Endpoint{fixture.EP("10.180.0.2", 8080, "node-a"), fixture.EP("10.180.0.4", 8080, "node-a")}
	next.Services[two.Name] = &two
	res := mustSync(t, b, next, false)
	t.Logf("first sync %d messages, incremental %d messages", first.Rules, res.Rules)
	if res.Changed != 1 || res.Rules > 10 {
		t.Errorf("incremental sync: %+v, want 1 service and at most 10 messages", res)
	}
	after := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")
	bb, ab := blocks(before), blocks(after)
	for name := range ab {
		if _, ok := bb[name]; !ok {
			bb[name] = ""
		}
	}
	// The hairpin set follows the endpoints of every Service: .1 left
	// with ns1/two's old endpoints, .4 came with its new ones.
	hp := "set " + ruleset.SetHairpin + " {"
	if got, want := pairAddrs(bb[hp]), "10.180.0.1 10.180.0.2 10.180.0.3"; got != want {
		t.Errorf("hairpin set before the update holds %q, want %q", got, want)
	}
	if got, want := pairAddrs(ab[hp]), "10.180.0.2 10.180.0.3 10.180.0.4"; got != want {
		t.Errorf("hairpin set after the update holds %q, want %q", got, want)
	}
	for name, text := range bb {
		if text == ab[name] || strings.Contains(name, "ns1/two/") || name == hp {
			continue
		}
		// A shared map may change only in ns1/two's elements.
		for _, l := range diffLines(text, ab[name]) {
			if !strings.Contains(l, "ns1/two/") {
				t.Errorf("incremental sync changed %s beyond ns1/two: %q", name, l)
			}
		}
	}
	got := hits(t, fd, "172.30.0.12:80", 40)
	if got["10.180.0.4:8080"] == 0 || got["10.180.0.2:8080"] == 0 || len(got) != 2 {
		t.Errorf("after update, 172.30.0.12:80 answered by %v, want .2 and .4 only", got)
	}
	// Nothing changed: nothing sent.
	if res := mustSync(t, b, next, false); res.Rules != 0 {
		t.Errorf("no-op sync sent %d messages", res.Rules)
	}
	// Removing a service deletes its objects.
	delete(next.Services, two.Name)
	mustSync(t, b, next, false)
	out := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")
	if strings.Contains(out, "ns1/two/") {
		t.Errorf("removed service still present:\n%s", out)
	}
	// Its ClusterIP leaves the masquerade set too (another Service's stays).
	key := func(sp *model.ServicePort) string {
		vip, _ := sp.ClusterIP(model.IPv4)
		return fmt.Sprintf("%s . tcp . %d", vip, sp.Port)
	}
	masq := blocks(out)["set cluster-ips {"]
	if strings.Contains(masq, key(&two)) || len(next.Services) == 0 {
		t.Errorf("set cluster-ips after removing %s still holds %s:\n%s", two.Name, key(&two), masq)
	}
	for _, sp := range next.Services {
		if len(sp.Endpoints) > 0 && !strings.Contains(masq, key(sp)) {
			t.Errorf("set cluster-ips lacks %s of %s:\n%s", key(sp), sp.Name, masq)
		}
	}
	// And a full sync finds nothing to repair.
	if res := mustSync(t, b, next, true); res.Rules != 0 {
		t.Errorf("full sync after the removal sent %d messages, want 0", res.Rules)
	}
}

// blocks splits `nft list table` output into chain/map/set blocks by header.
func blocks(out string) map[string]string {
	m := map[string]string{}
	cur := ""
	for _, l := range strings.Split(out, "\n") {
		if s := strings.TrimSpace(l); strings.HasPrefix(l, "\t") && !strings.HasPrefix(l, "\t\t") && s != "}" && s != "" {
			cur = s
		}
		if strings.HasPrefix(l, "\t") {
			m[cur] += l + "\n"
		}
	}
	return m
}

// pairAddrs returns the addresses of the "a . a" elements in an nft
// listing of the hairpin set, sorted and joined by spaces.
func pairAddrs(block string) string {
	var out []string
	for _, m := range regexp.MustCompile(`([0-9a-f.:]+) \. ([0-9a-f.:]+)`).FindAllStringSubmatch(block, -1) {
		if m[1] == m[2] {
			out = append(out, m[1])
		}
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// diffLines returns lines present in only one of a and b.
func diffLines(a, b string) []string {
	count := map[string]int{}
	for _, l := range strings.Split(a, "\n") {
		count[strings.TrimSpace(l)]++
	}
	for _, l := range strings.Split(b, "\n") {
		count[strings.TrimSpace(l)]--
	}
	var out []string
	for l, n := range count {
		if n != 0 {
			out = append(out, l)
		}
	}
	return out
}

// TestKernelDriftRepair damages the table by hand and checks a full sync
// repairs it without touching other tables.
func TestKernelDriftRepair(t *testing.T) {
	ns, b, fd := setupTraffic(t)
	snap := trafficSnap()
	mustSync(t, b, snap, false)
	ns.MustRun(t, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
	want := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")
	svcChain := ""
	for _, l := range strings.Split(want, "\n") {
		if s := strings.TrimSpace(l); strings.HasPrefix(s, "chain service-") && strings.Contains(s, "ns1/two/") {
			svcChain = strings.TrimSuffix(strings.TrimPrefix(s, "chain "), " {")
		}
	}
	if svcChain == "" {
		t.Fatalf("no service chain for ns1/two in:\n%s", want)
	}

	damage := []struct{ name, script string }{
		{"element and rules", fmt.Sprintf("delete element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 }\nflush chain ip miniproxy %s\nadd chain ip miniproxy bogus\n", svcChain)},
		{"rule added", "add rule ip miniproxy services counter\n"},
		{"table deleted", "delete table ip miniproxy\n"},
	}
	for _, d := range damage {
		if out, err := ns.Run(context.Background(), d.script, "nft", "-f", "-"); err != nil {
			t.Fatalf("%s: %v: %s", d.name, err, out)
		}
		if got, _ := ns.Run(context.Background(), "", "nft", "list", "table", "ip", "miniproxy"); len(diffLines(got, want)) == 0 {
			t.Fatalf("%s: damage had no effect", d.name)
		}
		res := mustSync(t, b, snap, true)
		got, _ := ns.Run(context.Background(), "", "nft", "list", "table", "ip", "miniproxy")
		if len(diffLines(want, got)) != 0 {
			t.Errorf("%s: not repaired by full sync (%+v); diff: %q", d.name, res, diffLines(want, got))
		}
		if h := hits(t, fd, "172.30.0.12:80", 20); h["10.180.0.1:8080"]+h["10.180.0.2:8080"] != 20 {
			t.Errorf("%s: traffic after repair: %v", d.name, h)
		}
	}
	if out := ns.MustRun(t, "nft", "list", "table", "ip", "other"); !strings.Contains(out, "counter") {
		t.Errorf("other table changed: %s", out)
	}
	// A full sync with nothing to repair sends nothing: both when no one
	// committed since (no listing at all) and after someone else's commit
	// (listing and comparing everything must find no difference).
	if res := mustSync(t, b, snap, true); res.Rules != 0 {
		t.Errorf("clean full sync sent %d messages", res.Rules)
	}
	ns.MustRun(t, "nft", "add", "table", "ip", "other2")
	if res := mustSync(t, b, snap, true); res.Rules != 0 {
		t.Errorf("full sync after a foreign commit sent %d messages, want 0 (nothing drifted)", res.Rules)
	}
}

// TestKernelFailedBatchIsAtomic makes an incremental batch fail (a chain it
// rewrites was deleted by hand) and checks nothing of it was applied, then
// that a full sync recovers.
func TestKernelFailedBatchIsAtomic(t *testing.T) {
	ns, b, fd := setupTraffic(t)
	snap := trafficSnap()
	mustSync(t, b, snap, false)
	var twoChain string
	for _, c := range b.committed.Tables[0].AllChains() {
		if strings.HasPrefix(c.Name, "service-") && strings.Contains(c.Name, "ns1/two/") {
			twoChain = c.Name
		}
	}
	script := fmt.Sprintf("delete element ip miniproxy service-ips { 172.30.0.12 . tcp . 80 }\nflush chain ip miniproxy %s\ndelete chain ip miniproxy %s\n", twoChain, twoChain)
	if out, err := ns.Run(context.Background(), script, "nft", "-f", "-"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	before := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy")

	next := fixture.Snap()
	for n, sp := range snap.Services {
		cp := *sp
		if len(cp.Endpoints) > 0 {
			// Every service changes; "two" cannot be rewritten.
			cp.Endpoints = []model.Endpoint{fixture.EP("10.180.0.4", 8080, "node-a")}
		}
		next.Services[n] = &cp
	}
	if _, err := b.Sync(context.Background(), next, false); err == nil {
		t.Fatal("incremental sync over a deleted chain succeeded, want an error")
	} else {
		t.Logf("expected failure: %v", err)
	}
	if after := ns.MustRun(t, "nft", "list", "table", "ip", "miniproxy"); after != before {
		t.Errorf("failed batch changed the kernel: %q", diffLines(before, after))
	}
	mustSync(t, b, next, true)
	if h := hits(t, fd, "172.30.0.12:80", 10); h["10.180.0.4:8080"] != 10 {
		t.Errorf("after full sync: %v", h)
	}
}

// TestKernelShardedColdStartFailsPartway: a cold start sends one batch per
// table, so one table's batch can fail after others committed. Here another
// process owns a table with a shard's name (NFT_TABLE_F_OWNER: only its
// socket may change it, and the kernel deletes it when that socket closes),
// so that shard's batch is refused. The sync must report the error, commit
// nothing to memory, and the next sync must replace every table and serve
// every Service, including the ones of that shard.
func TestKernelShardedColdStartFailsPartway(t *testing.T) {
	const tableOwner = 0x2 // NFT_TABLE_F_OWNER (linux/netfilter/nf_tables.h)
	ns, b, fd := setupTraffic(t, WithShards(4))
	snap := trafficSnap()
	two := model.ServicePortName{Namespace: "ns1", Name: "two", Protocol: model.TCP}
	blocked := ruleset.ShardTableName(ruleset.ShardOf(two, 4))

	// google/nftables does not send table flags, so the owner writes its
	// one-message batch itself, and keeps the socket open.
	owner, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: fd})
	if err != nil {
		t.Fatal(err)
	}
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_TABLE_NAME, Data: []byte(blocked + "\x00")},
		{Type: unix.NFTA_TABLE_FLAGS, Data: binary.BigEndian.AppendUint32(nil, tableOwner)},
	})
	if err != nil {
		t.Fatal(err)
	}
	newTable := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWTABLE),
			Flags: netlink.Request | netlink.Acknowledge | netlink.Create},
		Data: append([]byte{unix.NFPROTO_IPV4, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	if _, err := owner.SendMessages([]netlink.Message{batchControl(unix.NFNL_MSG_BATCH_BEGIN), newTable,
		batchControl(unix.NFNL_MSG_BATCH_END)}); err != nil {
		t.Fatal(err)
	}
	if _, err := owner.Receive(); err != nil {
		t.Fatalf("creating the owned table: %v", err)
	}
	if got := ourTables(t, ns); !slices.Contains(got, blocked) {
		t.Fatalf("owned table %s not created: %v", blocked, got)
	}
	if _, err := b.Sync(context.Background(), snap, false); err == nil {
		t.Fatalf("cold start succeeded although %s is owned by another socket", blocked)
	} else {
		t.Logf("cold start with %s owned elsewhere: %v", blocked, err)
	}
	if b.committed != nil || b.clean {
		t.Errorf("after a failed cold start: committed %v, clean %v; want nothing committed", b.committed != nil, b.clean)
	}
	t.Logf("tables after the failure: %v", ourTables(t, ns))

	if err := owner.Close(); err != nil {
		t.Fatal(err)
	}
	res := mustSync(t, b, snap, false)
	if !res.Full {
		t.Errorf("the sync after a failed cold start is not a full one: %+v", res)
	}
	if got, want := ourTables(t, ns), []string{"miniproxy", "miniproxy-shard-00", "miniproxy-shard-01", "miniproxy-shard-02", "miniproxy-shard-03"}; !slices.Equal(got, want) {
		t.Fatalf("tables %v, want %v", got, want)
	}
	if got := hits(t, fd, "172.30.0.12:80", 40); got["10.180.0.1:8080"] == 0 || got["10.180.0.2:8080"] == 0 || len(got) != 2 {
		t.Errorf("ns1/two (in %s) answered by %v, want both endpoints only", blocked, got)
	}
	if got := hits(t, fd, "172.30.0.13:80", 5); got["10.180.0.3:8080"] != 5 {
		t.Errorf("ns1/other answered by %v", got)
	}
	if res := mustSync(t, b, snap, true); res.Rules != 0 || !b.clean {
		t.Errorf("full sync after the recovery sent %d messages (clean %v), want 0", res.Rules, b.clean)
	}
}
