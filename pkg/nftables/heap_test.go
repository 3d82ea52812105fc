package nftables

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
)

// TestRetainedHeap reports how much heap the backend keeps after a cold sync
// of 10k Services × 5 (what it holds for O(changed) diffs), apart from the
// snapshot itself. MINIPROXY_BENCH=1 only; MINIPROXY_HEAPPROFILE=path writes
// a heap profile. It asserts only that the sync succeeds.
func TestRetainedHeap(t *testing.T) {
	if os.Getenv("MINIPROXY_BENCH") == "" {
		t.Skip("skipping: set MINIPROXY_BENCH=1 to measure the backend's retained heap")
	}
	_, be := newNSBackend(t, scaleConfig())
	snap := scaleSnap(10000, 5)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	if _, err := be.Sync(context.Background(), snap, false); err != nil {
		t.Fatal(err)
	}
	after := heap()
	t.Logf("10k × 5: heap retained by the nftables backend after a cold sync: %.1f MB (snapshot held outside: %.1f MB before)",
		float64(after-before)/1e6, float64(before)/1e6)
	if p := os.Getenv("MINIPROXY_HEAPPROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := pprof.WriteHeapProfile(f); err != nil {
			t.Fatal(err)
		}
	}
	runtime.KeepAlive(be)
	runtime.KeepAlive(snap)
}
