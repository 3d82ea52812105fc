package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Results is results.json.
type Results struct {
	Modes       []string      `json:"modes"`
	Experiments []string      `json:"experiments"`
	Connections int           `json:"connections"`
	Results     []*ModeResult `json:"results"`
	IPVS        string        `json:"ipvs"`
	ElapsedSec  float64       `json:"elapsed_seconds"`
	PlotError   string        `json:"plot_error,omitempty"`
	Kernel      string        `json:"kernel"`
	GoVersion   string        `json:"go_version"`
	K8sVersion  string        `json:"kube_apiserver_version"`
	Timestamp   string        `json:"timestamp"`
}

// ModeResult is one proxy mode's measurements.
type ModeResult struct {
	Mode    string   `json:"mode"`
	Skipped string   `json:"skipped,omitempty"`
	Errors  []string `json:"errors,omitempty"`
	// TeardownNote records a teardown step that needed force (not an error).
	TeardownNote string    `json:"teardown_note,omitempty"`
	ElapsedSec   float64   `json:"elapsed_seconds"`
	Spread       []Spread  `json:"spread,omitempty"`
	Pin          *Pin      `json:"pin,omitempty"`
	Stale        []*Stale  `json:"stale_udp,omitempty"`
	Affinity     *Affinity `json:"affinity,omitempty"`
	GRPC         *GRPC     `json:"grpc,omitempty"`
}

// ipvsGuestResults says where the IPVS column comes from: this kernel has no
// ip_vs, so IPVS is measured only by the qemu guest suite.
func ipvsGuestResults() string {
	m, _ := filepath.Glob("e2e-results/ipvs-guest*.json")
	if len(m) > 0 {
		return "IPVS is not run here (no ip_vs in this kernel); see the qemu guest suite's results: " + strings.Join(m, ", ")
	}
	return "IPVS skipped: this kernel has no ip_vs module and no guest results (e2e-results/ipvs-guest*.json) are present; `make guest` runs the IPVS suite in a qemu guest"
}

func writeReport(dir string, r *Results) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("report dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "report.md"), []byte(markdown(r)), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}

func sortedKeys(m map[string]int) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	slices.Sort(k)
	return k
}

func fmtCounts(m map[string]int) string {
	var parts []string
	for _, k := range sortedKeys(m) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	if len(parts) == 0 {
		return "—"
	}
	return strings.Join(parts, " ")
}

func secs(v float64) string {
	if v < 0 {
		return "not within window"
	}
	return fmt.Sprintf("%.3f s", v)
}

func summary(r *Results) string {
	var b strings.Builder
	for _, m := range r.Results {
		if m.Skipped != "" {
			fmt.Fprintf(&b, "%s: skipped (%s)\n", m.Mode, m.Skipped)
			continue
		}
		for _, s := range m.Spread {
			fmt.Fprintf(&b, "%s %s n=%d: χ²=%.2f p=%.3f\n", m.Mode, s.Proto, s.Endpoints, s.ChiSquare, s.PValue)
		}
		if m.GRPC != nil {
			for _, h := range m.GRPC.Histograms {
				fmt.Fprintf(&b, "%s gRPC %s: %s\n", m.Mode, h.Variant, fmtCounts(h.Counts))
			}
			for _, s := range m.GRPC.ScaleUps {
				fmt.Fprintf(&b, "%s gRPC scale-up %s: first new pod %s\n", m.Mode, s.Variant, secs(s.FirstNewSec))
			}
		}
		for _, e := range m.Errors {
			fmt.Fprintf(&b, "%s ERROR: %s\n", m.Mode, e)
		}
	}
	return b.String()
}

func markdown(r *Results) string {
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	w("# miniproxy lab: how the kernel picks an endpoint\n\n")
	w("Modes: %s. Experiments: %s. Run time %.0f s. kube-apiserver %s, kernel %s, %s, %s.\n\n",
		strings.Join(r.Modes, ", "), strings.Join(r.Experiments, ", "), r.ElapsedSec, r.K8sVersion, r.Kernel, r.GoVersion, r.Timestamp)
	w("Each mode runs in its own cluster: real etcd + kube-apiserver, two node namespaces with miniproxy in that mode, server pods spread over both nodes, one client pod on node-0. %s.\n\n", r.IPVS)

	w("## 1. Per-connection spread\n\n")
	w("Every new TCP connection / UDP flow to the ClusterIP is one random draw in the node's NAT rules. iptables: the Service chain has one rule per endpoint, rule k matching with probability 1/(n−k) (1/n, 1/(n−1), …, 1), so each endpoint gets 1/n overall. nftables (miniproxy's shape): a cascade of `numgen random mod (n−k) 0` rules with a fresh draw each, the same 1/(n−k) sequence (upstream kube-proxy's nftables mode instead makes one `numgen random mod n` draw into an anonymous verdict map, 1/n each). Both predict a uniform spread; the chi-square goodness-of-fit test (df = n−1) checks the counts against it. A p-value below 0.001 (χ² above the 0.1%% critical value) would mean the rules are not uniform.\n\n")
	w("| mode | proto | endpoints | counts | χ² | df | p | 0.1%% critical | within | rule probabilities |\n|---|---|---:|---|---:|---:|---:|---:|---|---|\n")
	for _, m := range r.Results {
		for _, s := range m.Spread {
			var counts, th []string
			for _, c := range s.Counts {
				counts = append(counts, fmt.Sprint(c.Count))
			}
			for _, p := range s.Theory {
				th = append(th, fmt.Sprintf("%.3g", p))
			}
			w("| %s | %s | %d | %s | %.2f | %d | %.3f | %.2f | %v | %s |\n", m.Mode, s.Proto, s.Endpoints, strings.Join(counts, " / "), s.ChiSquare, s.DF, s.PValue, s.Critical001, s.Within001, strings.Join(th, ", "))
		}
	}
	w("\n![spread](spread.png)\n\n")

	w("## 2. Conntrack pins the choice\n\n")
	w("One TCP connection makes %d requests. The endpoint was chosen once, at the SYN; the conntrack entry (read over ctnetlink in the client's node namespace) holds the rewritten reply tuple, so every later packet goes to the same pod. Changing the Service's endpoint set rewrites the rules for *new* connections only.\n\n", r.Connections)
	for _, m := range r.Results {
		if m.Pin == nil {
			continue
		}
		w("**%s**: answers %s; conntrack: `%s`\n\n", m.Mode, fmtCounts(m.Pin.Answers), m.Pin.Conntrack)
		w("| change | endpoints after | open connection (100 requests) | 300 new connections |\n|---|---|---|---|\n")
		for _, ph := range m.Pin.Phases {
			w("| %s | %s | %s (errors %d) | %s |\n", ph.Change, strings.Join(ph.Endpoints, ", "), fmtCounts(ph.OpenConn), ph.OpenConnErrs, fmtCounts(ph.NewConns))
		}
		w("\n")
	}

	w("## 3. gRPC\n\n")
	w("gRPC multiplexes every RPC of a channel over one HTTP/2 connection, so behind a ClusterIP the kernel picks once per channel: (a) one channel → one pod. (b) a pool spreads by channel count, lumpily. (c) a headless Service with `dns:///` and `round_robin` balances per RPC over the A records — but gRPC re-resolves only when a connection breaks, so new pods wait. (d) the server's MaxConnectionAge sends GOAWAY, the client reconnects and the kernel picks again. (f) miniproxy's resolver (pkg/grpcresolver) watches EndpointSlices and hands gRPC the endpoints the dataplane would use.\n\n")
	for _, m := range r.Results {
		if m.GRPC == nil {
			continue
		}
		g := m.GRPC
		if g.DNS != nil {
			w("CoreDNS (%s) answers `%s` with %s, TTL %d s.\n\n", g.DNS.Server, g.DNS.Name, strings.Join(g.DNS.Records, ", "), g.DNS.TTL)
		}
		for _, s := range g.Skipped {
			w("Skipped (%s): %s\n\n", m.Mode, s)
		}
		w("| mode | variant | RPCs | errors | per pod |\n|---|---|---:|---:|---|\n")
		for _, h := range g.Histograms {
			w("| %s | %s | %d | %d | %s |\n", m.Mode, h.Variant, h.RPCs, h.Errors, fmtCounts(h.Counts))
		}
		w("\nScale 3 → 6 pods while the client runs (RPC every %v; time from the EndpointSlice update):\n\n", streamEvery)
		w("| mode | variant | first new pod | all new pods | resolver update |\n|---|---|---|---|---|\n")
		for _, s := range g.ScaleUps {
			ru := ""
			if s.ResolverUpdateSec > 0 {
				ru = fmt.Sprintf("%.3f s", s.ResolverUpdateSec)
			}
			first := secs(s.FirstNewSec)
			if s.BaselineRPCs == 0 {
				first = "invalid: no answers before the scale-up"
			}
			w("| %s | %s | %s | %s | %s |\n", m.Mode, s.Variant, first, secs(s.AllNewSec), ru)
		}
		w("\n![grpc share over time](grpc-%s.png)\n\n", m.Mode)
	}

	w("## 4. Stale UDP\n\n")
	w("A UDP client keeps its source port (one conntrack flow) while its only endpoint A is replaced by B in the EndpointSlice (A keeps running). Without cleanup the flow's conntrack entry keeps sending it to A for as long as packets keep the entry alive; miniproxy's --conntrack-cleanup deletes entries that point at removed UDP endpoints, so the next datagram is NATed afresh to B.\n\n")
	w("| mode | --conntrack-cleanup | before | answers after the change (in order) | moved to B | after |\n|---|---|---|---|---|---|\n")
	for _, m := range r.Results {
		for _, s := range m.Stale {
			after := "—"
			if s.Switched {
				after = fmt.Sprintf("%.2f s", s.SwitchAfter)
			}
			w("| %s | %v | %s | %s | %v | %s |\n", m.Mode, s.Cleanup, s.Before, strings.Join(s.After, " → "), s.Switched, after)
		}
	}

	w("\n## 5. Session affinity (ClientIP)\n\n")
	w("With `sessionAffinity: ClientIP` the rules remember the client's last endpoint (iptables `-m recent`, nftables a timed set) and send its new connections there while the entry is younger than timeoutSeconds. After an idle period longer than the timeout the next connection is a fresh random pick (it changes with probability (n−1)/n).\n\n")
	w("| mode | timeout | burst | share on one endpoint | first connection after each idle > timeout | changed |\n|---|---:|---|---:|---|---|\n")
	for _, m := range r.Results {
		if a := m.Affinity; a != nil {
			w("| %s | %d s | %s | %.1f%% | %s | %d of %d |\n", m.Mode, a.TimeoutSeconds, fmtCounts(a.BurstAnswers), 100*a.StickShare, strings.Join(a.Rounds, ", "), a.ChangedRounds, len(a.Rounds))
		}
	}
	w("\n## Errors\n\n")
	n := 0
	for _, m := range r.Results {
		for _, e := range m.Errors {
			w("- %s: %s\n", m.Mode, e)
			n++
		}
		if m.Skipped != "" {
			w("- %s skipped: %s\n", m.Mode, m.Skipped)
			n++
		}
	}
	if r.PlotError != "" {
		w("- plots: %s\n", r.PlotError)
		n++
	}
	if n == 0 {
		w("None.\n")
	}
	return b.String()
}
