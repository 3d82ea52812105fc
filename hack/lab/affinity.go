package main

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Affinity is the sessionAffinity: ClientIP experiment.
type Affinity struct {
	TimeoutSeconds int            `json:"timeout_seconds"`
	Burst          int            `json:"burst_connections"`
	BurstAnswers   map[string]int `json:"burst_answers"`
	StickShare     float64        `json:"share_on_first_endpoint"`
	Rounds         []string       `json:"first_endpoint_after_each_timeout"`
	ChangedRounds  int            `json:"rounds_where_endpoint_changed"`
}

const affinityTimeout = 2 // seconds; the API allows 1..86400

func (l *lab) affinity(ctx context.Context, mr *ModeResult) error {
	l.p.step(fmt.Sprintf("%s: sessionAffinity ClientIP (timeout %ds)", l.mode, affinityTimeout))
	if len(l.web.Pods()) < 3 {
		if err := l.web.Scale(ctx, 3); err != nil {
			return err
		}
	}
	pods := l.web.Pods()[:3]
	svc := framework.ClusterIPService(ns, "sticky")
	svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	t := int32(affinityTimeout)
	svc.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &t}}
	if _, err := l.cl.CreateService(ctx, svc); err != nil {
		return err
	}
	if err := l.publish(ctx, "sticky", pods); err != nil {
		return err
	}
	vip := l.vip(ctx, "sticky", "tcp")
	// Rules are in once connections are answered at all; with affinity one
	// client cannot see every endpoint, so wait for answers, not the set.
	if err := framework.WaitFor(ctx, 30*time.Second, 100*time.Millisecond, func() (bool, error) {
		return l.client.Answers(ctx, vip, time.Second), nil
	}); err != nil {
		return fmt.Errorf("%s never answered: %w", vip, err)
	}
	time.Sleep((affinityTimeout + 1) * time.Second) // let the warm-up's affinity entry expire
	a := &Affinity{TimeoutSeconds: affinityTimeout, Burst: 300}
	mr.Affinity = a
	c, err := l.client.TCPCounts(ctx, vip, a.Burst)
	if err != nil {
		return err
	}
	a.BurstAnswers = c.ByName
	maxN := 0
	for _, n := range c.ByName {
		maxN = max(maxN, n)
	}
	a.StickShare = float64(maxN) / float64(max(1, c.Total()))
	prev := ""
	for n := range c.ByName {
		prev = n
	}
	// After each idle period longer than the timeout the next connection is
	// a fresh random pick: with 3 endpoints it changes 2 times in 3.
	for i := 0; i < 5; i++ {
		time.Sleep((affinityTimeout + 1) * time.Second)
		c, err := l.client.TCPCounts(ctx, vip, 1)
		if err != nil {
			return err
		}
		name := c.Names()
		if len(name) != 1 {
			return fmt.Errorf("after timeout: %s", c)
		}
		a.Rounds = append(a.Rounds, name[0])
		if name[0] != prev {
			a.ChangedRounds++
		}
		prev = name[0]
	}
	l.p.log("burst of %d: %v (%.1f%% on one endpoint); after each %ds idle: %v (%d of %d changed)",
		a.Burst, a.BurstAnswers, 100*a.StickShare, affinityTimeout, a.Rounds, a.ChangedRounds, len(a.Rounds))
	return nil
}
