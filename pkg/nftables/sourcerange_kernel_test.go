package nftables

import (
	"testing"
	"time"

	mt "github.com/miniproxy/miniproxy/pkg/model/modeltest"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// TestKernelSourceRangesNoneValid: a LoadBalancer Service whose source ranges
// were all unreadable (model.LoadBalancerSourceRangesInvalid) admits nobody
// on its LB IP, while a Service whose range admits the client is reached
// (the control) and the closed Service's cluster IP still answers. Before
// the fix the renderer looked at the (empty) list and left the LB IP open.
func TestKernelSourceRangesNoneValid(t *testing.T) {
	netnstest.RequireRoot(t, "nft", "sysctl")
	n := netnstest.NewNode(t, "10.180.0.5")
	cfg := trafficConfig()
	cfg.NetNS = proxy.NetNS(n.Path())
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	open := mt.SP("ns", "open", "", "172.30.0.40", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	open.LoadBalancerIPs, open.LoadBalancerSourceRanges = mt.Addrs("198.51.100.4"), mt.Prefixes("10.180.0.100/32")
	closed := mt.SP("ns", "closed", "", "172.30.0.41", 80, mt.Ep("10.180.0.5", 8080, "node-a"))
	closed.LoadBalancerIPs, closed.LoadBalancerSourceRangesInvalid = mt.Addrs("198.51.100.6"), true
	mustSync(t, b, mt.Snap(open, closed), true)

	if _, _, err := n.Client.Ask("tcp", "198.51.100.4:80", 2*time.Second); err != nil {
		t.Fatalf("control: the client inside the open Service's source range got no answer: %v", err)
	}
	if _, _, err := n.Client.Ask("tcp", "172.30.0.41:80", 2*time.Second); err != nil {
		t.Fatalf("the closed Service's cluster IP must still answer: %v", err)
	}
	if name, _, err := n.Client.Ask("tcp", "198.51.100.6:80", 1500*time.Millisecond); err == nil {
		t.Fatalf("LB IP with no readable source range answered (%s): fail open", name)
	}
}
