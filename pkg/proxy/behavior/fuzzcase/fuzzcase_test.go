package fuzzcase

import (
	"math/rand/v2"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
)

// TestExpectAgreesWithTable: the expectation the fuzz targets check
// against gives the behaviour table's hand-written verdicts on the
// table's own snapshot, so the two cannot drift apart.
func TestExpectAgreesWithTable(t *testing.T) {
	snap := behavior.Snapshot()
	for _, tc := range behavior.Cases() {
		cfg := behavior.Config()
		if tc.Cfg != nil {
			tc.Cfg(&cfg)
		}
		if tc.Packet.Dst.IsLoopback() || len(cfg.NodePortAddresses) > 0 {
			continue // NodePort address selection: not modelled, the probes use the node address only
		}
		p := Expect(&cfg, snap, tc.Packet)
		if p.Want.String() != tc.Want.String() {
			t.Errorf("%s: %s\n  Expect %s (%s)\n  table  %s", tc.Name, tc.Packet, p.Want, p.Why, tc.Want)
		}
	}
}

// TestDecode: decoded snapshots are what pkg/watch would build (each
// frontend once, endpoints sorted and unique, of a ClusterIP's family),
// and over many inputs the probes reach every outcome and frontend kind,
// so the fuzz targets are not comparing trivial answers.
func TestDecode(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	outcomes := map[behavior.Outcome]int{}
	kinds := map[model.FrontendKind]int{}
	masq := map[bool]int{}
	for i := 0; i < 2000; i++ {
		data := make([]byte, rng.IntN(120))
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		c := Decode(data)
		var ports []*model.ServicePort
		for _, sp := range c.Snap.Services {
			ports = append(ports, sp)
			for j, ep := range sp.Endpoints {
				if j > 0 && sp.Endpoints[j-1].AddrPort().Compare(ep.AddrPort()) >= 0 {
					t.Fatalf("%s: endpoints not sorted and unique", sp.Name)
				}
			}
		}
		if _, conflicts := model.Resolve(ports...); len(conflicts) > 0 {
			t.Fatalf("decoded snapshot still has conflicts: %v", conflicts)
		}
		for _, p := range c.Probes {
			outcomes[p.Want.Outcome]++
			kinds[p.Kind]++
			if p.Want.Outcome == behavior.Forward {
				masq[p.Want.Masquerade]++
			}
		}
	}
	t.Logf("outcomes %v kinds %v masquerade %v", outcomes, kinds, masq)
	for _, o := range []behavior.Outcome{behavior.Forward, behavior.Reject, behavior.Drop, behavior.Untouched} {
		if outcomes[o] == 0 {
			t.Errorf("no probe expects %s", o)
		}
	}
	for _, k := range []model.FrontendKind{model.ClusterIPFrontend, model.LoadBalancerFrontend, model.ExternalIPFrontend, model.NodePortFrontend} {
		if kinds[k] == 0 {
			t.Errorf("no probe aimed at a %s", k)
		}
	}
	if masq[true] == 0 || masq[false] == 0 {
		t.Errorf("masquerade never varies: %v", masq)
	}
}
