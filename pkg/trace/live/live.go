// Package live reads the Service rules installed in a network namespace —
// nftables through `nft -j list ruleset`, iptables through iptables-save of
// whichever variant (nft or legacy) holds them — and traces a packet through
// every mode it finds, with pkg/trace/nftjson and pkg/iptables/iptrace.
//
// IPVS is not traced: a node in IPVS mode gets a note saying so.
//
// Reading is side-effect free on purpose, because the command runs on live
// nodes, often in the root namespace: iptables-legacy-save is run only when
// /proc/net/ip_tables_names (ip6_tables_names) already lists the table, since
// asking the legacy tools about a table that does not exist registers it;
// iptables-nft-save is run only when the nft ruleset shows iptables-nft's
// table with a KUBE- chain (or when nft itself is missing).
package live

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/trace"
	"github.com/miniproxy/miniproxy/pkg/trace/nftjson"
)

// Runner runs a command and returns its standard output. Tests prefix
// "ip netns exec NS".
type Runner func(ctx context.Context, name string, args ...string) ([]byte, error)

// ExecRunner runs commands in the caller's network namespace, or with a
// prefix such as "ip netns exec NS".
func ExecRunner(prefix ...string) Runner {
	return func(ctx context.Context, name string, args ...string) ([]byte, error) {
		argv := append(append(append([]string{}, prefix...), name), args...)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return out, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
		}
		return out, nil
	}
}

// Options choose what to read.
type Options struct {
	Run Runner
	// Mode is "auto" (every mode with Service rules), "iptables" or "nftables".
	Mode string
}

// Ruleset is what was read from the kernel.
type Ruleset struct {
	// NFT is the parsed nft ruleset (nil when nft is not installed).
	NFT *nftjson.Ruleset
	// IPTables holds iptables-save text per variant and family, e.g.
	// "iptables-nft-save", "ip6tables-legacy-save".
	IPTables map[string]*iptrace.Ruleset
	// Notes explain what was not read and why.
	Notes []string
}

// Read reads the rulesets of the namespace the runner acts in, for family f.
func Read(ctx context.Context, opt Options, f model.Family) (*Ruleset, error) {
	run := opt.Run
	if run == nil {
		run = ExecRunner()
	}
	rs := &Ruleset{IPTables: map[string]*iptrace.Ruleset{}}
	nftOut, nftErr := run(ctx, "nft", "-j", "list", "ruleset")
	if nftErr == nil {
		p, err := nftjson.Parse(nftOut)
		if err != nil {
			return nil, err
		}
		rs.NFT = p
	} else {
		rs.Notes = append(rs.Notes, "nft not readable: "+nftErr.Error())
	}
	if opt.Mode == "nftables" {
		return rs, nil
	}
	prefix, fam, procNames := "iptables", "ip", "/proc/net/ip_tables_names"
	if f == model.IPv6 {
		prefix, fam, procNames = "ip6tables", "ip6", "/proc/net/ip6_tables_names"
	}
	// iptables-nft: its tables are visible in the nft ruleset.
	if rs.NFT == nil || rs.NFT.HasIPTablesChain(fam, "nat", "KUBE-SERVICES") || rs.NFT.HasIPTablesChain(fam, "filter", "KUBE-SERVICES") {
		if text, err := saveTables(ctx, run, prefix+"-nft-save", []string{"nat", "filter"}); err == nil {
			if p, err := iptrace.Parse(text); err == nil {
				rs.IPTables[prefix+"-nft-save"] = p
			} else {
				return nil, fmt.Errorf("%s-nft-save: %w", prefix, err)
			}
		} else {
			rs.Notes = append(rs.Notes, err.Error())
		}
	}
	// iptables-legacy: only tables the kernel already has.
	names, _ := run(ctx, "cat", procNames)
	var legacy []string
	for _, n := range strings.Fields(string(names)) {
		if n == "nat" || n == "filter" {
			legacy = append(legacy, n)
		}
	}
	if len(legacy) > 0 {
		text, err := saveTables(ctx, run, prefix+"-legacy-save", legacy)
		if err != nil {
			rs.Notes = append(rs.Notes, err.Error())
		} else if strings.Contains(text, "KUBE-") {
			p, err := iptrace.Parse(text)
			if err != nil {
				return nil, fmt.Errorf("%s-legacy-save: %w", prefix, err)
			}
			rs.IPTables[prefix+"-legacy-save"] = p
		}
	}
	return rs, nil
}

func saveTables(ctx context.Context, run Runner, tool string, tables []string) (string, error) {
	var b strings.Builder
	for _, t := range tables {
		out, err := run(ctx, tool, "-t", t)
		if err != nil {
			return "", err
		}
		b.Write(out)
	}
	return b.String(), nil
}

// Trace traces pkt through every mode found in rs (or the one asked for).
// No Service rules at all is an error that says what was looked for.
func Trace(rs *Ruleset, pkt trace.Packet, opt Options) ([]*trace.Result, error) {
	var out []*trace.Result
	if opt.Mode != "iptables" && rs.NFT != nil && rs.NFT.HasServiceTables() {
		r := nftjson.Trace(rs.NFT, pkt)
		r.Mode, r.Source = "nftables", "nft -j list ruleset"
		out = append(out, r)
	}
	if opt.Mode != "nftables" {
		for _, tool := range []string{"iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"} {
			p := rs.IPTables[tool]
			if p == nil || !hasKube(p) {
				continue
			}
			r := iptrace.Trace(p, pkt, iptrace.Options{})
			r.Mode, r.Source = "iptables ("+strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(tool, "ip6tables-"), "iptables-"), "-save")+")", tool
			out = append(out, r)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no Service rules found: no kube-proxy or miniproxy nft table, and no KUBE-SERVICES chain in iptables (nft or legacy); IPVS mode is not traced")
	}
	if len(out) > 1 {
		var modes []string
		for _, r := range out {
			modes = append(modes, r.Mode)
		}
		note := fmt.Sprintf("Service rules of several modes are installed (%s): each is traced on its own; the kernel runs them all in hook priority order and the first DNAT wins", strings.Join(modes, ", "))
		for _, r := range out {
			r.Notes = append(r.Notes, note)
		}
	}
	for _, r := range out {
		r.Notes = append(r.Notes, rs.Notes...)
	}
	return out, nil
}

func hasKube(p *iptrace.Ruleset) bool {
	for _, t := range p.Tables {
		if t.Chains["KUBE-SERVICES"] != nil {
			return true
		}
	}
	return false
}

// LocalAddrs lists the addresses of the namespace the runner acts in
// (`ip -j addr show`).
func LocalAddrs(ctx context.Context, run Runner) ([]netip.Addr, error) {
	if run == nil {
		run = ExecRunner()
	}
	out, err := run(ctx, "ip", "-j", "addr", "show")
	if err != nil {
		return nil, err
	}
	var links []struct {
		AddrInfo []struct {
			Local string `json:"local"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return nil, fmt.Errorf("ip -j addr show: %w", err)
	}
	var addrs []netip.Addr
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if p, err := netip.ParseAddr(a.Local); err == nil {
				addrs = append(addrs, p)
			}
		}
	}
	return addrs, nil
}
