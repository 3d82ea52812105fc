package nftables

import (
	"context"
	"testing"
	"time"
)

func TestDebugPhases(t *testing.T) {
	_, be := newNSBackend(t, scaleConfig())
	snap := scaleSnap(10000, 3)
	cfg := scaleConfig()
	_ = cfg
	start := time.Now()
	desired := be.Render(snap)
	t.Logf("render %v", time.Since(start))
	var plans []*plan
	for _, tb := range desired.Tables {
		plans = append(plans, replacePlan(tb))
	}
	msgs, size := plans[0].size()
	bs := &batchSender{netns: be.netns, sndbuf: size + (1 << 20), rcvbuf: 1 << 20}
	c, err := bs.conn()
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	for _, p := range plans {
		if err := p.emit(c); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("emit %v (%d msgs est, %d bytes est)", time.Since(start), msgs, size)
	start = time.Now()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Logf("flush %v err %v", time.Since(start), bs.err)
	_ = context.Background()
}
