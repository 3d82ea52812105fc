package main

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// vip returns clusterIP:port of a Service's named port ("" if unknown; the
// next dial then fails with a clear error).
func (l *lab) vip(ctx context.Context, svc, port string) string {
	s, err := l.cl.Admin.CoreV1().Services(ns).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return fmt.Sprintf("<service %s: %v>", svc, err)
	}
	return framework.VIP(s, port)
}

// publish writes the EndpointSlice of svc with pods as its ready endpoints
// (ports tcp/udp/http of framework.ClusterIPService).
func (l *lab) publish(ctx context.Context, svc string, pods []*framework.Pod) error {
	var eps []framework.SliceEndpoint
	for _, p := range pods {
		eps = append(eps, framework.SliceEndpoint{IP: p.IP, Node: p.Node, Ready: true, Serving: true})
	}
	return l.cl.PublishSlice(ctx, ns, svc, "lab", eps, framework.DefaultSlicePorts())
}
