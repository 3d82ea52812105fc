package takeover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"

	gnft "github.com/google/nftables"
	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// Options say where a takeover acts and what miniproxy runs as.
type Options struct {
	Self Self
	// Run runs iptables, ipset and cat; nil runs them here. Tests prefix
	// "ip netns exec NS".
	Run iptables.Runner
	// NetNSFd is an open /run/netns/NAME for netlink (nftables); 0 means
	// the caller's namespace.
	NetNSFd int
	// NetNSPath selects the namespace for IPVS and the dummy interface;
	// empty means the caller's.
	NetNSPath string
	Log       *slog.Logger
}

func (o *Options) run() iptables.Runner {
	if o.Run == nil {
		return iptables.ExecRunner("")
	}
	return o.Run
}

func (o *Options) log() *slog.Logger {
	if o.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Log
}

// DetectVariant returns the variant the iptables binary on PATH is, or ""
// when there is none.
func DetectVariant(ctx context.Context, run iptables.Runner) string {
	if run == nil {
		run = iptables.ExecRunner("")
	}
	out, err := run(ctx, "", "iptables", "-V")
	if err != nil {
		return ""
	}
	if strings.Contains(string(out), "legacy") {
		return VariantLegacy
	}
	return VariantNFT
}

// tool names one variant and family's binaries.
func tool(variant string, f model.Family, what string) string {
	base := "iptables"
	if f == model.IPv6 {
		base = "ip6tables"
	}
	return base + "-" + variant + "-" + what // iptables-nft-save, ip6tables-legacy-restore, ...
}

// List reads what a takeover needs to see. A part whose tool or kernel
// support is missing is left empty: there is nothing of kube-proxy's there.
func List(ctx context.Context, o Options) (Listing, error) {
	run := o.run()
	var l Listing
	var errs []error
	for _, v := range []string{VariantNFT, VariantLegacy} {
		for _, f := range []model.Family{model.IPv4, model.IPv6} {
			save := tool(v, f, "save")
			if _, err := exec.LookPath(save); err != nil {
				continue
			}
			if v == VariantLegacy {
				// Listing the legacy variant registers its tables in the
				// namespace; look only where some already exist.
				names := "/proc/net/ip_tables_names"
				if f == model.IPv6 {
					names = "/proc/net/ip6_tables_names"
				}
				out, err := run(ctx, "", "cat", names)
				if err != nil || strings.TrimSpace(string(out)) == "" {
					continue
				}
			}
			out, err := run(ctx, "", save)
			if err != nil {
				errs = append(errs, fmt.Errorf("list %s: %w", save, err))
				continue
			}
			if strings.TrimSpace(string(out)) != "" {
				l.XTables = append(l.XTables, XTablesDump{Variant: v, Family: f, Save: string(out)})
			}
		}
	}
	tables, err := listNFTables(o.NetNSFd)
	if err != nil {
		errs = append(errs, err)
	}
	l.NFTables = tables
	if _, err := exec.LookPath("ipset"); err == nil {
		// No ip_set support in the kernel is not an error: nothing to clean.
		if out, err := run(ctx, "", "ipset", "list", "-n"); err == nil {
			l.IPSets = strings.Fields(string(out))
		}
	}
	if _, err := run(ctx, "", "cat", "/proc/net/ip_vs"); err == nil {
		v, err := listIPVS(ctx, o, l.IPSets)
		if err != nil {
			errs = append(errs, err)
		}
		l.IPVS = v
	}
	return l, errors.Join(errs...)
}

var familyNames = map[gnft.TableFamily]string{
	gnft.TableFamilyIPv4: "ip", gnft.TableFamilyIPv6: "ip6", gnft.TableFamilyINet: "inet",
	gnft.TableFamilyARP: "arp", gnft.TableFamilyBridge: "bridge", gnft.TableFamilyNetdev: "netdev",
}

func nftConn(fd int) (*gnft.Conn, error) {
	var opts []gnft.ConnOption
	if fd != 0 {
		opts = append(opts, gnft.WithNetNSFd(fd))
	}
	c, err := gnft.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables connection: %w", err)
	}
	return c, nil
}

func listNFTables(fd int) ([]NFTable, error) {
	c, err := nftConn(fd)
	if err != nil {
		return nil, err
	}
	ts, err := c.ListTables()
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	var out []NFTable
	for _, t := range ts {
		if name, ok := familyNames[t.Family]; ok {
			out = append(out, NFTable{Family: name, Name: t.Name})
		}
	}
	return out, nil
}

func listIPVS(ctx context.Context, o Options, ipsets []string) (*IPVSListing, error) {
	v := &IPVSListing{NodePorts: map[string][]uint16{}}
	h, err := mobyipvs.New(o.NetNSPath)
	if err != nil {
		return nil, fmt.Errorf("ipvs handle: %w", err)
	}
	defer h.Close()
	svcs, err := h.GetServices()
	if err != nil {
		return nil, fmt.Errorf("list ipvs services: %w", err)
	}
	for _, s := range svcs {
		a, ok := netip.AddrFromSlice(s.Address)
		if !ok || s.FWMark != 0 {
			continue
		}
		v.VirtualServers = append(v.VirtualServers, VirtualServer{Protocol: ipvsProto(s.Protocol), Addr: a.Unmap(), Port: s.Port})
	}
	nl, err := nlHandle(o.NetNSPath)
	if err != nil {
		return v, err
	}
	defer nl.Close()
	if link, err := nl.LinkByName(DummyInterface); err == nil {
		v.Dummy = true
		addrs, err := nl.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return v, fmt.Errorf("addresses of %s: %w", DummyInterface, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				v.DummyAddrs = append(v.DummyAddrs, ip.Unmap())
			}
		}
	}
	run := o.run()
	for _, s := range ipsets {
		proto, ok := nodePortSets[strings.Replace(s, "KUBE-6-", "KUBE-", 1)]
		if !ok {
			continue
		}
		out, err := run(ctx, "", "ipset", "save", s)
		if err != nil {
			return v, fmt.Errorf("read ipset %s: %w", s, err)
		}
		v.NodePorts[proto] = append(v.NodePorts[proto], ipsetPorts(string(out))...)
	}
	return v, nil
}

// ipsetPorts reads the ports of "add SET [addr,][proto:]port" lines.
func ipsetPorts(save string) []uint16 {
	var out []uint16
	for _, l := range strings.Split(save, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 || f[0] != "add" {
			continue
		}
		e := f[2]
		if i := strings.LastIndexAny(e, ",:"); i >= 0 {
			e = e[i+1:]
		}
		if p, err := strconv.ParseUint(e, 10, 16); err == nil {
			out = append(out, uint16(p))
		}
	}
	return out
}

func ipvsProto(p uint16) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_SCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

func nlHandle(path string) (*netlink.Handle, error) {
	ns := netns.None()
	if path != "" {
		h, err := netns.GetFromPath(path)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", path, err)
		}
		defer h.Close()
		ns = h
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	return nl, nil
}

// Apply removes what p lists, logging each object. It goes on past a
// failed part and returns every error.
func Apply(ctx context.Context, o Options, p Plan) error {
	log, run := o.log(), o.run()
	var errs []error
	if len(p.NFTables) > 0 {
		c, err := nftConn(o.NetNSFd)
		if err == nil {
			for _, t := range p.NFTables {
				c.DelTable(&gnft.Table{Name: t.Name, Family: map[string]gnft.TableFamily{"ip": gnft.TableFamilyIPv4, "ip6": gnft.TableFamilyIPv6}[t.Family]})
			}
			err = c.Flush()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete kube-proxy's nftables tables: %w", err))
		} else {
			for _, t := range p.NFTables {
				log.Info("removed leftover", "owner", ownerKubeProxy, "kind", "nftables table", "table", t.String())
			}
		}
	}
	for _, x := range p.XTables {
		restore := tool(x.Variant, x.Family, "restore")
		for _, t := range x.Tables {
			if _, err := run(ctx, t.Restore, restore, "--noflush", "-w", "5"); err != nil {
				errs = append(errs, fmt.Errorf("%s table %s: %w", restore, t.Table, err))
				continue
			}
			logXTables(log, x, t)
		}
	}
	if len(p.VirtualServers) > 0 || p.DeleteDummy {
		errs = append(errs, applyIPVS(o, p, log))
	}
	for _, s := range p.IPSets {
		if _, err := run(ctx, "", "ipset", "destroy", s); err != nil {
			errs = append(errs, fmt.Errorf("destroy ipset %s: %w", s, err))
			continue
		}
		log.Info("removed leftover", "owner", ownerKubeProxy, "kind", "ipset", "name", s)
	}
	return errors.Join(errs...)
}

func logXTables(log *slog.Logger, x XTablesRemoval, t TableRemoval) {
	attrs := []any{"variant", x.Variant, "family", fmt.Sprintf("IPv%d", x.Family), "table", t.Table}
	for _, r := range t.Jumps {
		log.Info("removed leftover", append(attrs, "owner", owner(t.Table, ruleTarget(r)), "kind", "rule", "rule", r)...)
	}
	// A node with 10k Services has 60k per-Service chains: those are
	// counted, every other chain is named.
	perService, sample := 0, ""
	for _, c := range t.Chains {
		if perServiceChain(c) {
			if perService == 0 {
				sample = c
			}
			perService++
			continue
		}
		log.Info("removed leftover", append(attrs, "owner", owner(t.Table, c), "kind", "chain", "chain", c)...)
	}
	if perService > 0 {
		log.Info("removed leftover", append(attrs, "owner", ownerShared, "kind", "per-Service chains", "count", perService, "first", sample)...)
	}
	for _, c := range t.Emptied {
		log.Warn("kube-proxy chain emptied but kept: another chain still jumps to it", append(attrs, "chain", c)...)
	}
}

func applyIPVS(o Options, p Plan, log *slog.Logger) error {
	var errs []error
	if len(p.VirtualServers) > 0 {
		h, err := mobyipvs.New(o.NetNSPath)
		if err != nil {
			return fmt.Errorf("ipvs handle: %w", err)
		}
		defer h.Close()
		for _, vs := range p.VirtualServers {
			s := &mobyipvs.Service{Address: vs.Addr.AsSlice(), Port: vs.Port, Protocol: protoNum(vs.Protocol)}
			s.AddressFamily = unix.AF_INET
			if vs.Addr.Is6() {
				s.AddressFamily = unix.AF_INET6
			}
			if err := h.DelService(s); err != nil {
				errs = append(errs, fmt.Errorf("delete virtual server %s: %w", vs, err))
				continue
			}
			log.Info("removed leftover", "owner", ownerKubeProxy, "kind", "ipvs virtual server", "vs", vs.String())
		}
	}
	if p.DeleteDummy {
		nl, err := nlHandle(o.NetNSPath)
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		defer nl.Close()
		link, err := nl.LinkByName(DummyInterface)
		if err == nil {
			err = nl.LinkDel(link)
		}
		var nf netlink.LinkNotFoundError
		switch {
		case errors.As(err, &nf):
		case err != nil:
			errs = append(errs, fmt.Errorf("delete %s: %w", DummyInterface, err))
		default:
			log.Info("removed leftover", "owner", ownerKubeProxy, "kind", "interface", "name", DummyInterface)
		}
	}
	return errors.Join(errs...)
}

func protoNum(p string) uint16 {
	switch p {
	case "udp":
		return unix.IPPROTO_UDP
	case "sctp":
		return unix.IPPROTO_SCTP
	}
	return unix.IPPROTO_TCP
}

// Run lists, decides and applies once, returning what it removed.
func Run(ctx context.Context, o Options) (Plan, error) {
	start := time.Now()
	l, lerr := List(ctx, o)
	p := Decide(o.Self, l)
	err := errors.Join(lerr, Apply(ctx, o, p))
	if !p.Empty() {
		chains := 0
		for _, x := range p.XTables {
			for _, t := range x.Tables {
				chains += len(t.Chains)
			}
		}
		o.log().Info("leftovers removed", "chains", chains, "nftablesTables", len(p.NFTables),
			"virtualServers", len(p.VirtualServers), "ipsets", len(p.IPSets), "took", time.Since(start).Round(time.Millisecond))
	}
	return p, err
}
