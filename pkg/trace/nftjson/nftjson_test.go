package nftjson_test

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/trace"
	"github.com/miniproxy/miniproxy/pkg/trace/nftjson"
	"github.com/miniproxy/miniproxy/pkg/trace/tracetest"
)

var update = flag.Bool("update", false, "rewrite golden trace outputs")

func load(t *testing.T, name string) *nftjson.Ruleset {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := nftjson.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// TestBehaviorTable runs the shared behaviour table through the tracer on
// miniproxy's nftables rules as the kernel listed them (`nft -j list
// ruleset`, captured by pkg/trace/live's kernel test with -update).
func TestBehaviorTable(t *testing.T) {
	behavior.Run(t, func(cfg proxy.Config, _ *model.Snapshot, pkt behavior.Packet) (behavior.Verdict, error) {
		rs := load(t, tracetest.ConfigKey(cfg)+".json")
		return tracetest.ToBehavior(nftjson.Trace(rs, tracetest.Packet(pkt)))
	})
}

// TestGolden pins the full output (paths, probabilities, steps) of a few traces.
func TestGolden(t *testing.T) {
	cases := []struct {
		file string
		pkt  behavior.Packet
	}{
		{"default.json", behavior.Packet{Src: behavior.ClientPod, Proto: model.TCP, Dst: a("172.30.0.3"), Port: 80}},
		{"default.json", behavior.Packet{Src: behavior.Outside, Proto: model.TCP, Dst: behavior.NodeIP, Port: 30050}},
		{"default.json", behavior.Packet{Src: behavior.ClientPod, Proto: model.TCP, Dst: a("172.30.0.9"), Port: 80}},
		// kube-proxy v1.37.2 nftables mode, captured by e2e TestTraceKubeProxy.
		{"kube-proxy.json", behavior.Packet{Src: a("10.244.1.13"), Proto: model.TCP, Dst: a("10.96.235.9"), Port: 80}},
	}
	for _, tc := range cases {
		name := strings.TrimSuffix(tc.file, ".json") + "-" + tc.pkt.Dst.String() + "-" + itoa(tc.pkt.Port)
		t.Run(name, func(t *testing.T) {
			if _, err := os.Stat(filepath.Join("testdata", tc.file)); err != nil {
				t.Skipf("no capture %s", tc.file)
			}
			res := nftjson.Trace(load(t, tc.file), tracetest.Packet(tc.pkt))
			res.Mode, res.Source = "nftables", tc.file
			var b strings.Builder
			if err := res.WriteText(&b); err != nil {
				t.Fatal(err)
			}
			golden(t, filepath.Join("testdata", name+".golden"), b.String())
		})
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// TestNumgenVmap: kube-proxy's shape, one numgen vmap over three endpoints,
// and a cascade of numgen matches, both give a third each.
func TestNumgenProbabilities(t *testing.T) {
	js := `{"nftables":[
{"table":{"family":"ip","name":"kube-proxy"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"nat-prerouting","type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"svc"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"cascade"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"ep-a"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"ep-b"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"ep-c"}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"nat-prerouting","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"10.96.0.1"}},{"goto":{"target":"svc"}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"nat-prerouting","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"10.96.0.2"}},{"goto":{"target":"cascade"}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"svc","expr":[{"vmap":{"key":{"numgen":{"mode":"random","mod":3,"offset":0}},"data":{"set":[[0,{"goto":{"target":"ep-a"}}],[1,{"goto":{"target":"ep-b"}}],[2,{"goto":{"target":"ep-c"}}]]}}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"cascade","expr":[{"match":{"op":"==","left":{"numgen":{"mode":"random","mod":3,"offset":0}},"right":0}},{"goto":{"target":"ep-a"}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"cascade","expr":[{"match":{"op":"==","left":{"numgen":{"mode":"random","mod":2,"offset":0}},"right":0}},{"goto":{"target":"ep-b"}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"cascade","expr":[{"goto":{"target":"ep-c"}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"ep-a","expr":[{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},{"dnat":{"addr":"10.244.0.1","port":80}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"ep-b","expr":[{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},{"dnat":{"addr":"10.244.0.2","port":80}}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"ep-c","expr":[{"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},{"dnat":{"addr":"10.244.0.3","port":80}}]}}
]}`
	rs, err := nftjson.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.96.0.1", "10.96.0.2"} {
		res := nftjson.Trace(rs, trace.Packet{Src: a("10.244.1.10"), Dst: a(dst), Proto: model.TCP, Port: 80})
		if res.Verdict != "DNAT" || len(res.Endpoints) != 3 {
			t.Fatalf("%s: %+v", dst, res)
		}
		for _, e := range res.Endpoints {
			if e.Prob < 0.3333 || e.Prob > 0.3334 {
				t.Errorf("%s: %s has p=%v, want 1/3", dst, e.Addr, e.Prob)
			}
		}
	}
}

// TestUnsupportedIsExplicit: an expression the tracer does not know, on a
// rule the packet reaches, ends the path as unsupported, naming it; on a
// rule a known match already rules out, it is irrelevant.
func TestUnsupportedIsExplicit(t *testing.T) {
	js := `{"nftables":[
{"table":{"family":"ip","name":"kube-proxy"}},
{"chain":{"family":"ip","table":"kube-proxy","name":"pre","type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"pre","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"10.96.0.9"}},{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth0"}},{"drop":null}]}},
{"rule":{"family":"ip","table":"kube-proxy","chain":"pre","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth0"}},{"drop":null}]}}
]}`
	rs, err := nftjson.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	res := nftjson.Trace(rs, trace.Packet{Src: a("10.244.1.10"), Dst: a("10.96.0.1"), Proto: model.TCP, Port: 80})
	if res.Verdict != "unsupported" || len(res.Unsupported) != 1 || !strings.Contains(res.Unsupported[0], "meta iifname") || !strings.Contains(res.Unsupported[0], "pre #2") {
		t.Fatalf("want unsupported meta iifname at rule 2, got %+v", res)
	}
}

func a(s string) netip.Addr { return netip.MustParseAddr(s) }

func itoa(n uint16) string { return strconv.Itoa(int(n)) }
