package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// Pin is the conntrack-pinning experiment.
type Pin struct {
	Requests  int            `json:"requests"`
	Answers   map[string]int `json:"answers"`
	Pinned    string         `json:"pinned_endpoint"`
	Conntrack string         `json:"conntrack_entry"`
	Phases    []PinPhase     `json:"phases"`
}

// PinPhase is one change of the endpoint set while the connection stays open.
type PinPhase struct {
	Change       string         `json:"change"`
	Endpoints    []string       `json:"endpoints_after"`
	OpenConn     map[string]int `json:"open_connection_answers"`
	OpenConnErrs int            `json:"open_connection_errors"`
	NewConns     map[string]int `json:"new_connection_answers"`
}

func (l *lab) pin(ctx context.Context, mr *ModeResult) error {
	l.p.step(l.mode + ": conntrack pins one connection")
	if len(l.web.Pods()) < 4 {
		if err := l.web.Scale(ctx, 4); err != nil {
			return err
		}
	}
	pods := l.web.Pods()[:4]
	set := pods[:3]
	if _, err := l.cl.CreateService(ctx, framework.ClusterIPService(ns, "pin")); err != nil {
		return err
	}
	vip := l.vip(ctx, "pin", "tcp")
	if err := l.publish(ctx, "pin", set); err != nil {
		return err
	}
	if err := l.waitSet(ctx, l.client, vip, names(set)); err != nil {
		return err
	}
	conn, err := l.client.NS.DialContext(ctx, "tcp", vip)
	if err != nil {
		return fmt.Errorf("dial %s: %w", vip, err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	askN := func(n int) (map[string]int, int) {
		out, errs := map[string]int{}, 0
		for i := 0; i < n; i++ {
			_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.WriteString(conn, "hello\n"); err != nil {
				errs++
				continue
			}
			line, err := r.ReadString('\n')
			if err != nil {
				errs++
				continue
			}
			out[strings.TrimSpace(line)]++
		}
		return out, errs
	}
	res := &Pin{Requests: l.cfg.connections}
	mr.Pin = res
	res.Answers, _ = askN(l.cfg.connections)
	for n := range res.Answers {
		res.Pinned = n
	}
	local := netip.MustParseAddrPort(conn.LocalAddr().String())
	res.Conntrack, err = conntrackEntry(l.client.Node.NS, local)
	if err != nil {
		res.Conntrack = "unavailable: " + err.Error()
	}
	l.p.log("%d requests on one connection: %v; conntrack (node %s): %s", l.cfg.connections, res.Answers, l.client.Node.Name, res.Conntrack)

	var pinned *framework.Pod
	var others []*framework.Pod
	for _, p := range set {
		if p.Name == res.Pinned {
			pinned = p
		} else {
			others = append(others, p)
		}
	}
	if pinned == nil {
		return fmt.Errorf("one connection answered by %v, not by exactly one endpoint", res.Answers)
	}
	phase := func(change string, eps []*framework.Pod) error {
		if err := l.publish(ctx, "pin", eps); err != nil {
			return err
		}
		if err := l.waitSet(ctx, l.client, vip, names(eps)); err != nil {
			return err
		}
		ph := PinPhase{Change: change, Endpoints: names(eps)}
		ph.OpenConn, ph.OpenConnErrs = askN(100)
		c, err := l.client.TCPCounts(ctx, vip, 300)
		if err != nil {
			return err
		}
		ph.NewConns = c.ByName
		res.Phases = append(res.Phases, ph)
		l.p.log("%s: open connection %v (errors %d), 300 new connections %v", change, ph.OpenConn, ph.OpenConnErrs, ph.NewConns)
		return nil
	}
	cur := []*framework.Pod{pinned, others[1]}
	if err := phase("remove non-pinned endpoint "+others[0].Name, cur); err != nil {
		return err
	}
	cur = append(cur, pods[3])
	if err := phase("add endpoint "+pods[3].Name, cur); err != nil {
		return err
	}
	return phase("remove the pinned endpoint "+pinned.Name+" from the slice (pod keeps running)", cur[1:])
}

// conntrackEntry dumps the conntrack table of ns over ctnetlink and returns
// the TCP entry whose original source is local, formatted like conntrack -L.
func conntrackEntry(ns *framework.NetNS, local netip.AddrPort) (string, error) {
	f, err := os.Open(ns.Path())
	if err != nil {
		return "", fmt.Errorf("open netns: %w", err)
	}
	defer f.Close()
	c, err := ct.Dial(&netlink.Config{NetNS: int(f.Fd())})
	if err != nil {
		return "", fmt.Errorf("ctnetlink in %s: %w", ns.Name, err)
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		return "", fmt.Errorf("conntrack dump in %s: %w", ns.Name, err)
	}
	for _, fl := range flows {
		o := fl.TupleOrig
		if o.Proto.Protocol == syscall.IPPROTO_TCP && o.IP.SourceAddress == local.Addr() && o.Proto.SourcePort == local.Port() {
			return formatFlow(fl), nil
		}
	}
	return "", fmt.Errorf("no entry for %s among %d flows", local, len(flows))
}

func formatFlow(fl ct.Flow) string {
	o, r := fl.TupleOrig, fl.TupleReply
	proto := map[uint8]string{syscall.IPPROTO_TCP: "tcp", syscall.IPPROTO_UDP: "udp"}[o.Proto.Protocol]
	state := ""
	if fl.ProtoInfo.TCP != nil {
		state = tcpStates[fl.ProtoInfo.TCP.State] + " "
	}
	return fmt.Sprintf("%s %d %ssrc=%s dst=%s sport=%d dport=%d src=%s dst=%s sport=%d dport=%d [%s]",
		proto, fl.Timeout, state,
		o.IP.SourceAddress, o.IP.DestinationAddress, o.Proto.SourcePort, o.Proto.DestinationPort,
		r.IP.SourceAddress, r.IP.DestinationAddress, r.Proto.SourcePort, r.Proto.DestinationPort, fl.Status)
}

// tcpStates are the kernel's TCP_CONNTRACK_* numbers.
var tcpStates = map[uint8]string{0: "NONE", 1: "SYN_SENT", 2: "SYN_RECV", 3: "ESTABLISHED", 4: "FIN_WAIT", 5: "CLOSE_WAIT", 6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE", 9: "SYN_SENT2"}

func names(pods []*framework.Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, p.Name)
	}
	return out
}
