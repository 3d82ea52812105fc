// Package tracetest connects traces of live rulesets to the shared behaviour
// table (pkg/proxy/behavior): the conversion of a trace into the table's
// verdict, and names for the few configs the table's cases use, so captured
// rulesets can be stored per config and found again.
package tracetest

import (
	"fmt"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/pkg/proxy/behavior"
	"github.com/miniproxy/miniproxy/pkg/trace"
)

// ToBehavior turns a trace into the behaviour table's terms. A trace that
// stopped at something it cannot evaluate, or whose paths end differently,
// is an error: the table expects one outcome per packet.
func ToBehavior(res *trace.Result) (behavior.Verdict, error) {
	if len(res.Unsupported) > 0 {
		return behavior.Verdict{}, fmt.Errorf("unsupported: %s", strings.Join(res.Unsupported, "; "))
	}
	switch res.Verdict {
	case "DNAT":
		v := behavior.Verdict{Outcome: behavior.Forward}
		for _, e := range res.Endpoints {
			v.Endpoints = append(v.Endpoints, e.Addr)
			v.Masquerade = v.Masquerade || e.Masquerade
		}
		return v, nil
	case string(trace.Reject):
		return behavior.Verdict{Outcome: behavior.Reject}, nil
	case string(trace.Drop):
		return behavior.Verdict{Outcome: behavior.Drop}, nil
	case string(trace.NoMatch):
		return behavior.Verdict{Outcome: behavior.Untouched}, nil
	}
	var ends []string
	for _, p := range res.Paths {
		ends = append(ends, fmt.Sprintf("%s %s %.3f", p.Kind, p.Endpoint, p.Prob))
	}
	return behavior.Verdict{}, fmt.Errorf("mixed outcomes for one packet: %s", strings.Join(ends, "; "))
}

// Packet converts a behaviour-table packet.
func Packet(p behavior.Packet) trace.Packet {
	return trace.Packet{Src: p.Src, Dst: p.Dst, Proto: p.Proto, Port: p.Port, FromNode: p.FromNode, LocalAddrs: behavior.LocalAddrs()}
}

// ConfigKey names a config of the behaviour table: "default", or the
// changes a case makes to it joined by "+".
func ConfigKey(cfg proxy.Config) string {
	def := behavior.Config()
	var parts []string
	if cfg.MasqueradeAll != def.MasqueradeAll {
		parts = append(parts, "masquerade-all")
	}
	if cfg.LocalhostNodePorts != def.LocalhostNodePorts {
		parts = append(parts, "no-localhost-nodeports")
	}
	if fmt.Sprint(cfg.NodePortAddresses) != fmt.Sprint(def.NodePortAddresses) {
		parts = append(parts, "nodeport-addresses")
	}
	if len(parts) == 0 {
		return "default"
	}
	return strings.Join(parts, "+")
}

// Configs are the distinct configs the behaviour table's cases use, by key.
func Configs() map[string]proxy.Config {
	out := map[string]proxy.Config{"default": behavior.Config()}
	for _, c := range behavior.Cases() {
		cfg := behavior.Config()
		if c.Cfg != nil {
			c.Cfg(&cfg)
		}
		out[ConfigKey(cfg)] = cfg
	}
	return out
}
