package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/miniproxy/miniproxy/pkg/iptables/iptrace"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/trace"
	"github.com/miniproxy/miniproxy/pkg/trace/live"
	"github.com/miniproxy/miniproxy/pkg/trace/nftjson"
)

const traceUsage = `usage: miniproxy trace --from SRC --to DST:PORT[/PROTO] [flags]

Tells which endpoint a new connection from SRC to DST:PORT would reach on
this node, and why: it reads the Service rules installed in the current
network namespace (nftables and iptables, nft or legacy; kube-proxy's or
miniproxy's), not miniproxy's model, and prints every path the first packet
can take with its probability, masquerade, affinity and verdict.

`

// runTrace is the `miniproxy trace` subcommand. Exit status: 0 when the trace
// is complete, 1 on a usage or read error, 2 when some path reached a
// construct the tracer does not support (the output names it).
func runTrace(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("trace", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, traceUsage)
		fs.PrintDefaults()
	}
	from := fs.String("from", "", "source address of the connection (a pod, a node address, an outside client)")
	to := fs.String("to", "", "destination ADDR:PORT[/tcp|udp|sctp]: a ClusterIP, a node address with a NodePort, an external or load-balancer IP")
	node := fs.StringSlice("node", nil, "this node's addresses (for NodePorts and 'local' matches); default: the addresses of this network namespace")
	fromNode := fs.Bool("from-node", false, "the connection starts in a process on this node (output path); default: when --from is one of the node's addresses")
	mode := fs.String("mode", "auto", "ruleset to trace: auto (every mode with Service rules installed), iptables or nftables")
	file := fs.String("ruleset", "", "`FILE`: trace a saved ruleset instead of the live one (output of nft -j list ruleset, or of iptables-save)")
	output := fs.StringP("output", "o", "text", "output format: text or json")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return 1
	}
	pkt, err := parsePacket(*from, *to)
	if err != nil {
		fmt.Fprintf(stderr, "miniproxy trace: %v\n", err)
		fs.Usage()
		return 1
	}
	if *mode != "auto" && *mode != "iptables" && *mode != "nftables" {
		fmt.Fprintf(stderr, "miniproxy trace: --mode must be auto, iptables or nftables\n")
		return 1
	}
	if *output != "text" && *output != "json" {
		fmt.Fprintf(stderr, "miniproxy trace: -o must be text or json\n")
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, n := range *node {
		a, err := netip.ParseAddr(n)
		if err != nil {
			fmt.Fprintf(stderr, "miniproxy trace: --node %q: %v\n", n, err)
			return 1
		}
		pkt.LocalAddrs = append(pkt.LocalAddrs, a)
	}
	if len(*node) == 0 && *file == "" {
		if pkt.LocalAddrs, err = live.LocalAddrs(ctx, nil); err != nil {
			fmt.Fprintf(stderr, "miniproxy trace: cannot list this namespace's addresses (give --node): %v\n", err)
			return 1
		}
	}
	pkt.FromNode = *fromNode || pkt.Local(pkt.Src)

	var results []*trace.Result
	if *file != "" {
		r, err := traceFile(*file, pkt)
		if err != nil {
			fmt.Fprintf(stderr, "miniproxy trace: %v\n", err)
			return 1
		}
		results = []*trace.Result{r}
	} else {
		opt := live.Options{Mode: *mode}
		rs, err := live.Read(ctx, opt, model.FamilyOf(pkt.Dst))
		if err != nil {
			fmt.Fprintf(stderr, "miniproxy trace: %v\n", err)
			return 1
		}
		if results, err = live.Trace(rs, pkt, opt); err != nil {
			fmt.Fprintf(stderr, "miniproxy trace: %v\n", err)
			return 1
		}
	}
	code := 0
	for i, r := range results {
		if *output == "json" {
			continue
		}
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		if err := r.WriteText(stdout); err != nil {
			return 1
		}
	}
	if *output == "json" {
		if err := trace.WriteJSON(stdout, results); err != nil {
			return 1
		}
	}
	for _, r := range results {
		if len(r.Unsupported) > 0 {
			code = 2
		}
	}
	return code
}

func traceFile(path string, pkt trace.Packet) (*trace.Result, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(strings.TrimSpace(string(data)), "{") {
		rs, err := nftjson.Parse(data)
		if err != nil {
			return nil, err
		}
		r := nftjson.Trace(rs, pkt)
		r.Mode, r.Source = "nftables", path
		return r, nil
	}
	rs, err := iptrace.Parse(string(data))
	if err != nil {
		return nil, err
	}
	r := iptrace.Trace(rs, pkt, iptrace.Options{})
	r.Mode, r.Source = "iptables", path
	return r, nil
}

// parsePacket reads --from ADDR and --to ADDR:PORT[/PROTO].
func parsePacket(from, to string) (trace.Packet, error) {
	var pkt trace.Packet
	if from == "" || to == "" {
		return pkt, errors.New("--from and --to are required")
	}
	src, err := netip.ParseAddr(from)
	if err != nil {
		return pkt, fmt.Errorf("--from: %w", err)
	}
	dst, proto, _ := strings.Cut(to, "/")
	pkt.Proto = model.TCP
	switch strings.ToLower(proto) {
	case "", "tcp":
	case "udp":
		pkt.Proto = model.UDP
	case "sctp":
		pkt.Proto = model.SCTP
	default:
		return pkt, fmt.Errorf("--to: unknown protocol %q", proto)
	}
	ap, err := netip.ParseAddrPort(dst)
	if err != nil {
		return pkt, fmt.Errorf("--to: want ADDR:PORT[/PROTO]: %w", err)
	}
	if src.Is4() != ap.Addr().Is4() {
		return pkt, errors.New("--from and --to must be of one IP family")
	}
	pkt.Src, pkt.Dst, pkt.Port = src, ap.Addr(), ap.Port()
	return pkt, nil
}
