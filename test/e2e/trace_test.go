package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gonum.org/v1/gonum/stat"
	"gonum.org/v1/gonum/stat/distuv"

	"github.com/miniproxy/miniproxy/pkg/trace"
	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// runTrace runs `miniproxy trace -o json` inside node's namespace, as an
// operator would on the node, and decodes its one result.
func runTrace(me *framework.ModeEnv, node *framework.Node, from netip.Addr, to string) (*trace.Result, string, error) {
	bin := filepath.Join(me.Cluster.Env.BinDir, "miniproxy")
	cmd := node.NS.Command(bin, "trace", "--from", from.String(), "--to", to+"/tcp", "--node", node.IP.String(), "-o", "json")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, "", fmt.Errorf("miniproxy trace: %w: %s", err, stderr.String())
	}
	var res []*trace.Result
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, string(out), fmt.Errorf("decode trace output: %w", err)
	}
	if len(res) != 1 {
		return nil, string(out), fmt.Errorf("want one traced mode, got %d", len(res))
	}
	return res[0], string(out), nil
}

// TestTrace: `miniproxy trace` on a node predicts what real connections do.
// For a Service with 3 endpoints it names exactly the endpoints' addresses
// with their probabilities, and 1,000 connections from the traced client
// agree (chi-square against the predicted shares, p > 0.001); for a Service
// with no endpoints it says reject, and a real connection is refused.
func TestTrace(t *testing.T) {
	suite.ForEachMode(t, "trace predicts endpoints, shares and reject", func(t *testing.T, me *framework.ModeEnv, row *framework.Row) {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		f := newFixture(t, ctx, me, "trace", 3)
		client := f.clients[0]
		addr := framework.VIP(f.svc, "tcp")
		row.Note("waiting for " + client.Name + " to reach all endpoints via " + addr)
		if got, err := waitExactly(ctx, "tcp", client, addr, f.dep.PodNames(), 90*time.Second); err != nil {
			t.Fatalf("endpoints not reachable: %v: %v", got, err)
		}

		res, out, err := runTrace(me, client.Node, client.IP, addr)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !strings.HasPrefix(res.Mode, me.Mode) || res.Verdict != "DNAT" || len(res.Unsupported) > 0 {
			t.Fatalf("trace: mode %q verdict %q unsupported %v, want a %s DNAT\n%s", res.Mode, res.Verdict, res.Unsupported, me.Mode, out)
		}
		byIP := map[netip.Addr]string{}
		for _, p := range f.dep.Pods() {
			byIP[p.IP] = p.Name
		}
		prob := map[string]float64{}
		sum := 0.0
		for _, e := range res.Endpoints {
			name, ok := byIP[e.Addr.Addr()]
			if !ok || e.Addr.Port() != framework.PodPort {
				t.Fatalf("trace predicts %s, not an endpoint of %v\n%s", e.Addr, byIP, out)
			}
			prob[name] = e.Prob
			sum += e.Prob
		}
		if len(prob) != len(byIP) || sum < 0.999 || sum > 1.001 {
			t.Fatalf("trace predicts %v (sum %.3f), want all of %v\n%s", prob, sum, byIP, out)
		}

		const n = 1000
		got, err := client.TCPCounts(ctx, addr, n)
		if err != nil || got.Errors != 0 {
			t.Fatalf("%d connections: %v %v", n, got, err)
		}
		var obs, exp []float64
		for name, p := range prob {
			obs = append(obs, float64(got.ByName[name]))
			exp = append(exp, p*float64(got.Total()))
		}
		chi := stat.ChiSquare(obs, exp)
		pval := distuv.ChiSquared{K: float64(len(obs) - 1)}.Survival(chi)
		t.Logf("%s: trace predicts %v; %d connections observed %v: χ²=%.2f p=%.3f", me.Mode, prob, n, got, chi, pval)
		if pval < 0.001 {
			t.Errorf("observed %v does not follow the predicted %v: χ²=%.2f p=%.4f", got, prob, chi, pval)
		}

		// A Service with no endpoints: trace says reject, a real connection is refused.
		empty := framework.ClusterIPService(f.ns, "trace-empty")
		esvc, err := me.Cluster.CreateService(ctx, empty)
		if err != nil {
			t.Fatal(err)
		}
		eaddr := framework.VIP(esvc, "tcp")
		row.Note("waiting for the no-endpoint Service " + eaddr + " to be programmed")
		var eres *trace.Result
		if err := framework.WaitFor(ctx, 60*time.Second, 200*time.Millisecond, func() (bool, error) {
			var err error
			eres, out, err = runTrace(me, client.Node, client.IP, eaddr)
			return err == nil && eres.Verdict == string(trace.Reject), nil
		}); err != nil {
			t.Fatalf("trace of %s never said reject: %+v\n%s", eaddr, eres, out)
		}
		_, err = client.DialTCP(ctx, eaddr)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("connection to %s: want refused as trace predicts, got %v", eaddr, err)
		}
		t.Logf("%s: trace of %s: reject; a real connection: %v", me.Mode, eaddr, err)
	})
}

// TestTraceKubeProxy: `miniproxy trace` reads the rules upstream kube-proxy
// v1.37.2 installed (iptables and nftables mode, on a node of its own with
// no miniproxy) and predicts its endpoints and shares; 600 real connections
// agree (chi-square).
func TestTraceKubeProxy(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		t.Run(mode, func(t *testing.T) {
			row := suite.Matrix.Track(t, "trace reads kube-proxy's rules", mode)
			c := suite.Cluster(t, row)
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			nodes, err := c.AddNodes(ctx, "kp"+mode[:3], 1)
			if err != nil {
				t.Fatal(err)
			}
			node := nodes[0]
			kp := filepath.Join(c.Env.K8sBin, "kube-proxy")
			cmd := node.NS.Command(kp, "--kubeconfig", c.CP.AdminKubeconfig, "--hostname-override", node.Name,
				"--proxy-mode", mode, "--cluster-cidr", framework.ClusterCIDR,
				"--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address", "0.0.0.0:10256",
				// conntrack tuning is host-wide: off.
				"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0")
			var logs strings.Builder
			cmd.Stdout, cmd.Stderr = &logs, &logs
			if err := cmd.Start(); err != nil {
				t.Fatalf("start kube-proxy: %v", err)
			}
			t.Cleanup(func() {
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				_ = cmd.Wait()
			})
			ns, err := c.NewNamespace(ctx, "tkp")
			if err != nil {
				t.Fatal(err)
			}
			svc, err := c.CreateService(ctx, framework.ClusterIPService(ns, "tkp"))
			if err != nil {
				t.Fatal(err)
			}
			dep, err := c.Deploy(ctx, framework.DeploymentSpec{Namespace: ns, Name: "tkp", Replicas: 3, Nodes: nodes})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = dep.Delete() })
			client, err := node.NewPod(ctx, "tkp-client")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = client.Delete() })
			addr := framework.VIP(svc, "tcp")
			row.Note("waiting for kube-proxy to program " + addr)
			if got, err := waitExactly(ctx, "tcp", client, addr, dep.PodNames(), 120*time.Second); err != nil {
				t.Fatalf("kube-proxy never served %s: %v: %v\n%s", addr, got, err, logs.String())
			}
			bin := filepath.Join(c.Env.BinDir, "miniproxy")
			// Exit status 2 (an unsupported construct) still prints the trace.
			out, err := node.NS.Command(bin, "trace", "--from", client.IP.String(), "--to", addr, "--node", node.IP.String(), "-o", "json").Output()
			if err != nil && len(out) == 0 {
				t.Fatalf("trace: %v", err)
			}
			var res []*trace.Result
			if err := json.Unmarshal(out, &res); err != nil || len(res) != 1 {
				t.Fatalf("trace output (%v): %s", err, out)
			}
			r := res[0]
			if !strings.HasPrefix(r.Mode, mode) || r.Verdict != "DNAT" || len(r.Unsupported) > 0 || len(r.Endpoints) != 3 {
				var b strings.Builder
				_ = r.WriteText(&b)
				t.Fatalf("trace of kube-proxy's %s rules:\n%s", mode, b.String())
			}
			byIP := map[netip.Addr]string{}
			for _, p := range dep.Pods() {
				byIP[p.IP] = p.Name
			}
			var obs, exp []float64
			const n = 600
			got, err := client.TCPCounts(ctx, addr, n)
			if err != nil || got.Errors != 0 {
				t.Fatalf("%d connections: %v %v", n, got, err)
			}
			for _, e := range r.Endpoints {
				name, ok := byIP[e.Addr.Addr()]
				if !ok {
					t.Fatalf("trace predicts %s, not an endpoint of %v", e.Addr, byIP)
				}
				obs = append(obs, float64(got.ByName[name]))
				exp = append(exp, e.Prob*float64(got.Total()))
			}
			chi := stat.ChiSquare(obs, exp)
			pval := distuv.ChiSquared{K: float64(len(obs) - 1)}.Survival(chi)
			t.Logf("kube-proxy %s: trace predicts %v; %d connections observed %v: χ²=%.2f p=%.3f", mode, r.Endpoints, n, got, chi, pval)
			if pval < 0.001 {
				t.Errorf("observed %v does not follow the predicted %v: p=%.4f", got, r.Endpoints, pval)
			}
			// Keep a capture of kube-proxy's rules for the root-free golden tests.
			if os.Getenv("MINIPROXY_TRACE_CAPTURE") != "" {
				capt := map[string][]string{"iptables": {"iptables-save"}, "nftables": {"nft", "-j", "list", "ruleset"}}[mode]
				text, err := node.NS.Run(ctx, capt...)
				if err == nil {
					err = os.WriteFile(filepath.Join(os.Getenv("MINIPROXY_TRACE_CAPTURE"), "kube-proxy-"+mode+".txt"), []byte(text), 0o644)
				}
				if err != nil {
					t.Log(err)
				}
				t.Logf("client %s, vip %s, node %s", client.IP, addr, node.IP)
			}
		})
	}
}
