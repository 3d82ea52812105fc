package iptrace_test

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/trace"
	"github.com/miniproxy/miniproxy/pkg/trace/tracetest"
)

var update = flag.Bool("update", false, "rewrite golden trace outputs")

func load(t *testing.T, name string) *iptrace.Ruleset {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := iptrace.Parse(string(data))
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// TestBehaviorTable runs the shared behaviour table on miniproxy's rules as
// iptables-save printed them from the kernel (captured by pkg/trace/live's
// kernel test with -update): the save form differs from what miniproxy
// writes (--set-xmark for --or-mark, -m tcp, /32 everywhere).
func TestBehaviorTable(t *testing.T) {
	behavior.Run(t, func(cfg proxy.Config, _ *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		return tracetest.ToBehavior(iptrace.Trace(load(t, tracetest.ConfigKey(cfg)+".txt"), tracetest.Packet(pkt), iptrace.Options{}))
	}, behavior.LocalhostCase())
}

func a(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestGolden pins the full output of a few traces.
func TestGolden(t *testing.T) {
	cases := []struct {
		file string
		pkt  trace.Packet
	}{
		{"default.txt", trace.Packet{Src: behavior.ClientPod, Proto: model.TCP, Dst: a("172.30.0.3"), Port: 80}},
		{"default.txt", trace.Packet{Src: behavior.Outside, Proto: model.TCP, Dst: behavior.NodeIP, Port: 30080}},
		{"default.txt", trace.Packet{Src: behavior.ClientPod, Proto: model.TCP, Dst: a("172.30.0.9"), Port: 80}},
		// kube-proxy v1.37.2 iptables mode, captured by e2e TestTraceKubeProxy.
		{"kube-proxy.txt", trace.Packet{Src: a("10.244.0.13"), Proto: model.TCP, Dst: a("10.96.186.107"), Port: 80}},
	}
	for _, tc := range cases {
		name := strings.TrimSuffix(tc.file, ".txt") + "-" + tc.pkt.Dst.String() + "-" + strconv.Itoa(int(tc.pkt.Port))
		t.Run(name, func(t *testing.T) {
			if _, err := os.Stat(filepath.Join("testdata", tc.file)); err != nil {
				t.Skipf("no capture %s", tc.file)
			}
			tc.pkt.LocalAddrs = behavior.LocalAddrs()
			res := iptrace.Trace(load(t, tc.file), tc.pkt, iptrace.Options{})
			res.Mode, res.Source = "iptables", tc.file
			var b strings.Builder
			if err := res.WriteText(&b); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if b.String() != string(want) {
				t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", path, b.String(), want)
			}
		})
	}
}

// TestStatisticCascade: kube-proxy's 1/3, 1/2, rest cascade gives each of
// three endpoints a third; ClientIP affinity pins a source the recent list
// already holds.
func TestStatisticCascade(t *testing.T) {
	text := `*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SVC-X - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-SEP-C - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X
-A KUBE-SVC-X -m comment --comment "ns/a -> 10.244.0.2:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-B --mask 255.255.255.255 --rsource -j KUBE-SEP-B
-A KUBE-SVC-X -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A
-A KUBE-SVC-X -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-B
-A KUBE-SVC-X -j KUBE-SEP-C
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.244.0.1:80
-A KUBE-SEP-B -p tcp -m recent --set --name KUBE-SEP-B --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.0.2:80
-A KUBE-SEP-C -p tcp -m tcp -j DNAT --to-destination 10.244.0.3:80
COMMIT
`
	rs, err := iptrace.Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	pkt := trace.Packet{Src: a("10.244.1.10"), Dst: a("10.96.0.1"), Proto: model.TCP, Port: 80}
	res := iptrace.Trace(rs, pkt, iptrace.Options{})
	if res.Verdict != "DNAT" || len(res.Endpoints) != 3 || len(res.Affinity) != 1 {
		t.Fatalf("%+v", res)
	}
	for _, e := range res.Endpoints {
		if e.Prob < 0.3333 || e.Prob > 0.3334 {
			t.Errorf("%s has p=%v, want 1/3", e.Addr, e.Prob)
		}
	}
	pinned := iptrace.Trace(rs, pkt, iptrace.Options{Recent: func(name string, src netip.Addr) bool { return name == "KUBE-SEP-B" && src == pkt.Src }})
	if len(pinned.Endpoints) != 1 || pinned.Endpoints[0].Addr.String() != "10.244.0.2:80" || pinned.Endpoints[0].Prob != 1 {
		t.Fatalf("pinned source: %+v", pinned.Endpoints)
	}
}

// TestUnsupportedIsExplicit: a match the tracer does not know ends the path
// as unsupported when the rule's known matches hold, and is irrelevant when
// they do not.
func TestUnsupportedIsExplicit(t *testing.T) {
	text := `*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -d 10.96.0.9/32 -i eth0 -j DROP
-A PREROUTING -m physdev --physdev-in veth1 -j DROP
COMMIT
`
	rs, err := iptrace.Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	res := iptrace.Trace(rs, trace.Packet{Src: a("10.244.1.10"), Dst: a("10.96.0.1"), Proto: model.TCP, Port: 80}, iptrace.Options{})
	if res.Verdict != "unsupported" || len(res.Unsupported) != 1 || !strings.Contains(res.Unsupported[0], "--physdev-in") {
		t.Fatalf("want unsupported --physdev-in, got %+v", res)
	}
}
