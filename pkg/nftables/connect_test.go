package nftables

import (
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/miniproxy/miniproxy/internal/machine"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nftables/internal/fixture"
	"github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// TestConnectFlatness measures the dataplane side of scale: the connect time
// (SYN → established, through nat output and the DNAT) to one Service's VIP
// when 1k, 10k and 30k other Services are programmed, against connecting to
// an endpoint directly. With one dispatch map per table the rules' cost should
// not grow with N; with shards, the target Service sits in the last shard
// (registered last at the nat hooks, so its connection passes every other
// shard's lookup first: the costliest place). MINIPROXY_BENCH=1 only (30k
// Services take a while); MINIPROXY_CONNECT_OUT=file appends a Markdown table.
// It asserts that every connection to the VIP is answered by one of the
// Service's endpoints.
func TestConnectFlatness(t *testing.T) {
	if os.Getenv("MINIPROXY_BENCH") == "" {
		t.Skip("skipping: set MINIPROXY_BENCH=1 to measure first-connect latency at 1k/10k/30k Services")
	}
	const connects = 300
	var rows []string
	for _, tc := range []struct{ shards, n int }{{1, 1000}, {1, 10000}, {1, 30000}, {16, 1000}, {16, 10000}, {16, 30000}} {
		shards, n := tc.shards, tc.n
		t.Run(fmt.Sprintf("shards=%d/n=%d", shards, n), func(t *testing.T) {
			_, b, fd := setupTraffic(t, WithShards(shards))
			snap := scaleSnap(n, 3)
			name := "target"
			for i := 0; ruleset.ShardOf(model.ServicePortName{Namespace: "ns1", Name: name, Protocol: model.TCP}, shards) != shards-1; i++ {
				name = fmt.Sprintf("target-%d", i)
			}
			target := fixture.SP("ns1", name, 80, "172.30.0.12")
			target.Endpoints = []model.Endpoint{fixture.EP("10.180.0.1", 8080, "node-a"), fixture.EP("10.180.0.2", 8080, "node-a"),
				fixture.EP("10.180.0.3", 8080, "node-a")}
			snap.Services[target.Name] = target
			mustSync(t, b, snap, false)
			dial := func(addr string) []time.Duration {
				var ds []time.Duration
				for i := 0; i < connects; i++ {
					var c net.Conn
					var err error
					inNS(t, fd, func() {
						s := time.Now()
						c, err = net.DialTimeout("tcp", addr, 2*time.Second)
						if err == nil {
							ds = append(ds, time.Since(s))
						}
					})
					if err != nil {
						t.Fatalf("connect %s (%d Services): %v", addr, n, err)
					}
					c.Close()
				}
				sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
				return ds
			}
			got := hits(t, fd, "172.30.0.12:80", 30)
			for who := range got {
				if !strings.HasPrefix(who, "10.180.0.") {
					t.Fatalf("VIP answered by %q at %d Services, want one of the target's endpoints", who, n)
				}
			}
			// Interleave so both series see the same machine state.
			var vip, direct []time.Duration
			for round := 0; round < 3; round++ {
				vip = append(vip, dial("172.30.0.12:80")...)
				direct = append(direct, dial("10.180.0.1:8080")...)
			}
			sort.Slice(vip, func(i, j int) bool { return vip[i] < vip[j] })
			sort.Slice(direct, func(i, j int) bool { return direct[i] < direct[j] })
			p := func(ds []time.Duration, q float64) time.Duration { return ds[int(q*float64(len(ds)-1))] }
			row := fmt.Sprintf("| %d | %d | %v | %v | %v | %v |", shards, n+1, p(vip, 0.5).Round(time.Microsecond), p(vip, 0.99).Round(time.Microsecond),
				p(direct, 0.5).Round(time.Microsecond), (p(vip, 0.5) - p(direct, 0.5)).Round(time.Microsecond))
			t.Log(row)
			rows = append(rows, row)
		})
	}
	if out := os.Getenv("MINIPROXY_CONNECT_OUT"); out != "" && len(rows) > 0 {
		f, err := os.OpenFile(out, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fmt.Fprintf(f, "\nnftables, connect from the node namespace (nat output), %d connects × 3 rounds, %s, load %s:\n\n", connects, time.Now().UTC().Format(time.RFC3339), machine.LoadAvg())
		fmt.Fprintln(f, "| shards | Services | VIP p50 | VIP p99 | direct p50 | VIP − direct (rules' cost) |\n|---|---|---|---|---|---|")
		fmt.Fprintln(f, strings.Join(rows, "\n"))
	}
}
