// Package trace answers "which pod will my connection go to, and why?" for
// the Service rules installed in a network namespace: it follows the first
// packet of a new connection through a ruleset read from the kernel (not from
// miniproxy's model), exploring every branch of every random endpoint choice,
// and reports each path with its probability, the endpoints, masquerade,
// affinity and the final verdict.
//
// The interpreters live beside their formats: pkg/iptables/iptrace reads
// iptables-save text, pkg/trace/nftjson reads `nft -j list ruleset`. Both
// report into the types of this package, so the CLI, the behaviour table and
// the e2e tests read one shape. An interpreter never guesses: a construct it
// does not know, on a rule the packet would otherwise match, ends that path
// with the verdict "unsupported" and the construct's text, so a trace is
// either right or says where it stopped.
package trace

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/netip"
	"sort"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/model"
)

// Packet is the first packet of a connection as it reaches the node.
type Packet struct {
	Src   netip.Addr
	Dst   netip.Addr
	Proto model.Protocol
	Port  uint16
	// FromNode: a process on the node sends it (output hook); otherwise it
	// arrives from a pod or another host (prerouting).
	FromNode bool
	// LocalAddrs are the node's own addresses (addrtype LOCAL, fib type
	// local); loopback addresses always count.
	LocalAddrs []netip.Addr
}

// Local reports whether a is one of the node's addresses.
func (p Packet) Local(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	for _, l := range p.LocalAddrs {
		if l == a {
			return true
		}
	}
	return false
}

func (p Packet) String() string {
	from := "from"
	if p.FromNode {
		from = "from node process"
	}
	return fmt.Sprintf("%s %s → %s/%s", from, p.Src, netip.AddrPortFrom(p.Dst, p.Port), p.Proto.Lower())
}

// Kind is how a path ends.
type Kind string

// Path endings.
const (
	// DNAT: the connection is translated to Endpoint.
	DNAT Kind = "dnat"
	// Reject: answered with a TCP reset / ICMP unreachable.
	Reject Kind = "reject"
	Drop   Kind = "drop"
	// NoMatch: no Service rule translated it; it is routed as addressed.
	NoMatch Kind = "no match"
	// Unsupported: the tracer met a construct it cannot evaluate; Reason
	// says which. The path's real fate is unknown.
	Unsupported Kind = "unsupported"
)

// Step is one thing a path passed: a chain entered, a rule that matched, a
// map looked up, a random choice taken.
type Step struct {
	Where string `json:"where"`
	What  string `json:"what"`
}

// Path is one way the packet can go.
type Path struct {
	Prob       float64        `json:"probability"`
	Kind       Kind           `json:"verdict"`
	Endpoint   netip.AddrPort `json:"endpoint,omitzero"`
	Masquerade bool           `json:"masquerade"`
	Reason     string         `json:"reason,omitempty"`
	Steps      []Step         `json:"steps"`
}

// Endpoint is one endpoint that may answer, with its share of connections.
type Endpoint struct {
	Addr       netip.AddrPort `json:"endpoint"`
	Prob       float64        `json:"probability"`
	Masquerade bool           `json:"masquerade"`
}

// Result is a whole trace.
type Result struct {
	Mode   string `json:"mode"`   // "iptables (nft)", "nftables", …
	Source string `json:"source"` // where the ruleset was read from
	Packet string `json:"packet"`
	// Verdict summarises the paths: "DNAT", "reject", "drop", "no match",
	// "unsupported" or "mixed" when paths end differently.
	Verdict   string     `json:"verdict"`
	Endpoints []Endpoint `json:"endpoints,omitempty"`
	// Affinity describes ClientIP session affinity met on the way: paths
	// are those of a client not yet pinned, unless the live affinity state
	// already holds the source (then the pinned path is the only one).
	Affinity []string `json:"affinity,omitempty"`
	Paths    []Path   `json:"paths"`
	// Unsupported lists every construct a path stopped at.
	Unsupported []string `json:"unsupported,omitempty"`
	// Notes are facts the reader needs (other rule sets present, …).
	Notes []string `json:"notes,omitempty"`
}

// Finish merges paths that ended identically and fills the summary fields.
func (r *Result) Finish() {
	// Merge identical paths (same steps and ending) by summing probability.
	key := func(p Path) string {
		var b strings.Builder
		fmt.Fprintf(&b, "%s|%s|%v|%s", p.Kind, p.Endpoint, p.Masquerade, p.Reason)
		for _, s := range p.Steps {
			b.WriteString("|" + s.Where + ":" + s.What)
		}
		return b.String()
	}
	idx := map[string]int{}
	var merged []Path
	for _, p := range r.Paths {
		k := key(p)
		if i, ok := idx[k]; ok {
			merged[i].Prob += p.Prob
			continue
		}
		idx[k] = len(merged)
		merged = append(merged, p)
	}
	sort.SliceStable(merged, func(i, j int) bool {
		if merged[i].Kind != merged[j].Kind {
			return merged[i].Kind < merged[j].Kind
		}
		return merged[i].Endpoint.Compare(merged[j].Endpoint) < 0
	})
	r.Paths = merged

	kinds := map[Kind]bool{}
	eps := map[netip.AddrPort]*Endpoint{}
	unsup := map[string]bool{}
	for _, p := range r.Paths {
		kinds[p.Kind] = true
		switch p.Kind {
		case DNAT:
			e := eps[p.Endpoint]
			if e == nil {
				e = &Endpoint{Addr: p.Endpoint}
				eps[p.Endpoint] = e
			}
			e.Prob += p.Prob
			e.Masquerade = e.Masquerade || p.Masquerade
		case Unsupported:
			unsup[p.Reason] = true
		}
	}
	r.Endpoints = nil
	for _, e := range eps {
		e.Prob = round(e.Prob)
		r.Endpoints = append(r.Endpoints, *e)
	}
	sort.Slice(r.Endpoints, func(i, j int) bool { return r.Endpoints[i].Addr.Compare(r.Endpoints[j].Addr) < 0 })
	r.Unsupported = nil
	for u := range unsup {
		r.Unsupported = append(r.Unsupported, u)
	}
	sort.Strings(r.Unsupported)
	for i := range r.Paths {
		r.Paths[i].Prob = round(r.Paths[i].Prob)
	}
	switch {
	case len(kinds) == 1 && kinds[DNAT]:
		r.Verdict = "DNAT"
	case len(kinds) == 1:
		for k := range kinds {
			r.Verdict = string(k)
		}
	case len(kinds) == 0:
		r.Verdict = string(NoMatch)
	default:
		r.Verdict = "mixed"
	}
	sort.Strings(r.Affinity)
	r.Affinity = dedupe(r.Affinity)
}

func dedupe(s []string) []string {
	out := s[:0]
	for i, x := range s {
		if i == 0 || x != s[i-1] {
			out = append(out, x)
		}
	}
	return out
}

// round keeps probabilities readable and comparable: a cascade of 1/3, 1/2
// multiplies to 0.33333333333333337.
func round(p float64) float64 { return math.Round(p*1e9) / 1e9 }

// WriteText prints r for a person.
func (r *Result) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "trace %s\n", r.Packet)
	fmt.Fprintf(&b, "ruleset: %s (%s)\n", r.Mode, r.Source)
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	switch r.Verdict {
	case "DNAT":
		fmt.Fprintf(&b, "verdict: DNAT to one of %d endpoint(s)\n", len(r.Endpoints))
	default:
		fmt.Fprintf(&b, "verdict: %s\n", r.Verdict)
	}
	for _, e := range r.Endpoints {
		masq := "source kept"
		if e.Masquerade {
			masq = "masquerade (source becomes the node's address)"
		}
		fmt.Fprintf(&b, "  %-24s %6.2f%%  %s\n", e.Addr, 100*e.Prob, masq)
	}
	for _, a := range r.Affinity {
		fmt.Fprintf(&b, "affinity: %s\n", a)
	}
	for _, u := range r.Unsupported {
		fmt.Fprintf(&b, "unsupported: %s\n", u)
	}
	for i, p := range r.Paths {
		end := string(p.Kind)
		switch p.Kind {
		case DNAT:
			end = "DNAT to " + p.Endpoint.String()
			if p.Masquerade {
				end += ", masquerade"
			}
		case Unsupported:
			end = "unsupported: " + p.Reason
		}
		fmt.Fprintf(&b, "path %d (%.2f%%): %s\n", i+1, 100*p.Prob, end)
		for _, s := range p.Steps {
			fmt.Fprintf(&b, "    %-40s %s\n", s.Where, s.What)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON prints results (one per mode found) as a JSON array, for scripts.
func WriteJSON(w io.Writer, rs []*Result) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rs)
}
