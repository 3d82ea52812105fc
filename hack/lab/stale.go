package main

import (
	"context"
	"fmt"
	"time"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Stale is the stale-UDP experiment for one setting of --conntrack-cleanup.
type Stale struct {
	Cleanup     bool     `json:"conntrack_cleanup"`
	SourcePort  int      `json:"source_port"`
	Before      string   `json:"answer_before"`
	After       []string `json:"answers_after_removal"`
	Switched    bool     `json:"flow_moved_to_new_endpoint"`
	SwitchAfter float64  `json:"switched_after_seconds,omitempty"`
}

// stale sends datagrams from one socket (fixed source port, one conntrack
// flow) to a UDP Service, then replaces the flow's endpoint A by B in the
// slice. A keeps running, so a stale conntrack entry is visible as answers
// that still come from A. It runs on the default node (cleanup on) and on a
// third node whose miniproxy runs with --conntrack-cleanup=false.
func (l *lab) stale(ctx context.Context, mr *ModeResult) error {
	l.p.step(l.mode + ": stale UDP flow, with and without --conntrack-cleanup")
	if len(l.web.Pods()) < 2 {
		if err := l.web.Scale(ctx, 2); err != nil {
			return err
		}
	}
	a, b := l.web.Pods()[0], l.web.Pods()[1]
	node, _, err := l.cl.AddProxyNode(ctx, "nocleanup", l.mode, "--conntrack-cleanup=false")
	if err != nil {
		return err
	}
	client2, err := node.NewPod(ctx, "client-nocleanup")
	if err != nil {
		return err
	}
	if _, err := l.cl.CreateService(ctx, framework.ClusterIPService(ns, "stale")); err != nil {
		return err
	}
	vipUDP, vipTCP := l.vip(ctx, "stale", "udp"), l.vip(ctx, "stale", "tcp")
	if err := l.publish(ctx, "stale", []*framework.Pod{a}); err != nil {
		return err
	}
	clients := map[bool]*framework.Pod{true: l.client, false: client2}
	flows := map[bool]*framework.UDPFlow{}
	for _, cleanup := range []bool{true, false} {
		c := clients[cleanup]
		if err := l.waitSet(ctx, c, vipTCP, []string{a.Name}); err != nil {
			return err
		}
		f, err := c.NewUDPFlow(vipUDP)
		if err != nil {
			return err
		}
		defer f.Close()
		flows[cleanup] = f
		st := Stale{Cleanup: cleanup, SourcePort: f.LocalPort()}
		if st.Before, err = f.Ask(time.Second); err != nil {
			return err
		}
		mr.Stale = append(mr.Stale, &st)
	}
	t0 := time.Now()
	if err := l.publish(ctx, "stale", []*framework.Pod{b}); err != nil {
		return err
	}
	for _, st := range mr.Stale {
		if err := l.waitSet(ctx, clients[st.Cleanup], vipTCP, []string{b.Name}); err != nil {
			return err
		}
	}
	// Keep the flows alive for a bounded while (one datagram every 200 ms,
	// shorter than any UDP conntrack timeout) and record every answer.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		for _, st := range mr.Stale {
			ans, err := flows[st.Cleanup].Ask(300 * time.Millisecond)
			if err != nil {
				ans = "timeout"
			}
			if len(st.After) == 0 || st.After[len(st.After)-1] != ans {
				st.After = append(st.After, ans)
			}
			if ans == b.Name && !st.Switched {
				st.Switched, st.SwitchAfter = true, time.Since(t0).Seconds()
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, st := range mr.Stale {
		l.p.log("cleanup=%v: flow from port %d answered by %s, after %s→%s: %v (moved: %v)", st.Cleanup, st.SourcePort, st.Before, a.Name, b.Name, st.After, st.Switched)
	}
	if !mr.Stale[0].Switched {
		return fmt.Errorf("with --conntrack-cleanup the flow never moved to %s: %v", b.Name, mr.Stale[0].After)
	}
	return nil
}
