package nfgen

import (
	"testing"

	"github.com/miniproxy/miniproxy/test/netnstest"
)

// TestReadCountsCommits: the generation moves by exactly one per commit in
// its own namespace and not at all for commits in another one.
func TestReadCountsCommits(t *testing.T) {
	netnstest.RequireRoot(t, "nft")
	ns, other := netnstest.New(t, "gen"), netnstest.New(t, "gen")
	fd := ns.FD(t)
	g0, err := Read(fd)
	if err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "nft", "add table ip gentest")
	other.MustRun(t, "nft", "add table ip gentest")
	g1, err := Read(fd)
	if err != nil {
		t.Fatal(err)
	}
	if g1 != g0+1 {
		t.Fatalf("generation %d → %d after one commit here and one elsewhere, want +1", g0, g1)
	}
	ns.MustRun(t, "nft", "list ruleset")
	if g2, _ := Read(fd); g2 != g1 {
		t.Fatalf("listing moved the generation %d → %d", g1, g2)
	}
}
