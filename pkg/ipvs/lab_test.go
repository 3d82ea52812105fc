package ipvs

import (
	"context"
	"net/netip"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/guest/glab"
)

// lab is a glab node programmed by an IPVS backend (see test/guest/glab for
// the topology).
type lab struct {
	*glab.Lab
	t   *testing.T
	be  *Backend
	cfg proxy.Config
}

func newLab(t *testing.T, nPods int, opts Options) *lab {
	t.Helper()
	l := &lab{Lab: glab.New(t, nPods), t: t}
	l.cfg = proxy.Config{NetNS: proxy.NetNS(glab.NSPath(l.Node)), ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix(glab.ClusterNet)}}
	var err error
	l.be, err = New(l.cfg, opts)
	glab.Must(t, err, "new backend")
	t.Cleanup(func() {
		if err := l.be.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		l.be.Close()
	})
	return l
}

func (l *lab) sync(snap *model.Snapshot, full bool) {
	l.t.Helper()
	if _, err := l.be.Sync(context.Background(), snap, full); err != nil {
		l.t.Fatalf("sync (full=%v): %v", full, err)
	}
}

// service builds a one-port service over the first nEps pods.
func service(name, vip string, proto model.Protocol, nEps int, mods ...func(*model.ServicePort)) *model.ServicePort {
	sp := &model.ServicePort{
		Name:       model.ServicePortName{Namespace: "default", Name: name, Protocol: proto},
		ClusterIPs: []netip.Addr{netip.MustParseAddr(vip)}, Port: 80, Protocol: proto,
	}
	for i := 0; i < nEps; i++ {
		sp.Endpoints = append(sp.Endpoints, model.Endpoint{IP: netip.MustParseAddr(glab.PodIP(i)), Port: glab.PodPort, Ready: true, Serving: true, NodeName: "node1"})
	}
	for _, m := range mods {
		m(sp)
	}
	return sp
}

func snap(sps ...*model.ServicePort) *model.Snapshot {
	s := &model.Snapshot{Node: model.Node{Name: "node1", Addresses: []netip.Addr{netip.MustParseAddr(glab.NodeIP)}},
		Services: map[model.ServicePortName]*model.ServicePort{}}
	for _, sp := range sps {
		s.Services[sp.Name] = sp
	}
	return s
}
