package ipvs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/nftables"
	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// DefaultInterface is the dummy interface service addresses are bound to,
// named as in kube-proxy so node tooling recognises it.
const DefaultInterface = "kube-ipvs0"

// svcFlagPersistent is IP_VS_SVC_F_PERSISTENT. The kernel adds other flags
// (e.g. hashed) to what it reports, so only this bit is compared.
const svcFlagPersistent = 0x1

// Options are the IPVS-mode settings beyond proxy.Config.
type Options struct {
	// Scheduler is --ipvs-scheduler (default rr).
	Scheduler string
	// StrictARP sets arp_ignore=1 and arp_announce=2 (conf/all) so the node
	// does not answer ARP for the addresses on kube-ipvs0 (needed by
	// MetalLB-style load balancers), as kube-proxy's strictARP does.
	StrictARP bool
	// Interface overrides the dummy interface name.
	Interface string
}

// Backend implements proxy.Backend with IPVS.
type Backend struct {
	cfg  proxy.Config
	opts Options

	mu   sync.Mutex
	nl   *netlink.Handle
	ipvs *mobyipvs.Handle
	nft  *nftables.Conn

	// last is the plan of the last successful sync; lastVS indexes it.
	last   *Plan
	lastVS map[Key]*VirtualServer
	// owned mirrors the ownership record in our nftables table (the
	// owned-vs sets): every virtual server this process, or one before it,
	// may have created. Keys are recorded in the kernel before their
	// virtual server is created and dropped only after it is deleted.
	owned map[Key]bool
	// draining holds real servers kept at weight 0 until their
	// connections end.
	draining map[Key]map[netip.AddrPort]bool
	setup    bool
	// nsFile keeps the namespace open for nftables' per-batch sockets.
	nsFile *os.File

	// afterVirtualServers, when set (by tests only), runs once the virtual
	// servers of a sync are reconciled, before addresses are bound and the
	// nftables table is written: the crash tests SIGKILL the process there.
	afterVirtualServers func()
}

var _ proxy.Backend = (*Backend)(nil)

var errClosed = errors.New("ipvs backend used after Close")

// New opens netlink handles in the target namespace. Nothing is changed in
// the kernel until the first Sync.
func New(cfg proxy.Config, opts Options) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if opts.Scheduler == "" {
		opts.Scheduler = DefaultScheduler
	}
	if !Schedulers[opts.Scheduler] {
		return nil, fmt.Errorf("unsupported ipvs scheduler %q", opts.Scheduler)
	}
	if opts.Interface == "" {
		opts.Interface = DefaultInterface
	}
	b := &Backend{cfg: cfg, opts: opts, owned: map[Key]bool{}, draining: map[Key]map[netip.AddrPort]bool{}}
	// The namespace file stays open for the backend's lifetime: nftables
	// opens a socket per batch inside the namespace of its fd.
	f, err := cfg.NetNS.Open()
	if err != nil {
		return nil, fmt.Errorf("ipvs backend: %w", err)
	}
	b.nsFile = f
	ns := netns.None()
	nftOpts := []nftables.ConnOption{nftables.WithSockOptions(bigSendBuffer)}
	if f != nil {
		ns = netns.NsHandle(int(f.Fd()))
		nftOpts = append(nftOpts, nftables.WithNetNSFd(int(f.Fd())))
	}
	if b.nl, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err != nil {
		b.Close()
		return nil, fmt.Errorf("netlink handle in %q: %w", cfg.NetNS, err)
	}
	if !ipvsAvailable(cfg.NetNS) {
		b.Close()
		return nil, fmt.Errorf("the kernel has no IPVS (/proc/net/ip_vs missing; load ip_vs)")
	}
	if b.ipvs, err = mobyipvs.New(string(cfg.NetNS)); err != nil {
		b.Close()
		return nil, fmt.Errorf("ipvs handle in %q: %w", cfg.NetNS, err)
	}
	if b.nft, err = nftables.New(nftOpts...); err != nil {
		b.Close()
		return nil, fmt.Errorf("nftables conn: %w", err)
	}
	return b, nil
}

// ipvsAvailable checks without side effects whether IPVS is loaded (the
// moby handle would otherwise try modprobe and log, then fail later).
func ipvsAvailable(ns proxy.NetNS) bool {
	ok := false
	_ = ns.Do(func() error {
		_, err := os.Stat("/proc/net/ip_vs")
		ok = err == nil
		return nil
	})
	return ok
}

// Close releases the IPVS, netlink and nftables handles and the namespace
// file. It changes nothing in the kernel and may be called more than once.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	if b.ipvs != nil {
		b.ipvs.Close()
		b.ipvs = nil
	}
	if b.nl != nil {
		b.nl.Close()
		b.nl = nil
	}
	if b.nft != nil {
		if err := b.nft.CloseLasting(); err != nil {
			errs = append(errs, fmt.Errorf("close nftables connection: %w", err))
		}
		b.nft = nil
	}
	if b.nsFile != nil {
		if err := b.nsFile.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close netns file: %w", err))
		}
		b.nsFile = nil
	}
	return errors.Join(errs...)
}

// Sync implements proxy.Backend.
func (b *Backend) Sync(ctx context.Context, snap *model.Snapshot, full bool) (proxy.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	res := proxy.Result{Full: full || b.last == nil}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if b.ipvs == nil {
		return res, errClosed
	}
	if res.Full || !b.setup {
		if err := b.setupNode(); err != nil {
			return res, err
		}
	}
	link, err := b.ensureLink()
	if err != nil {
		return res, err
	}
	nodeIPs, bound, err := b.addresses(link)
	if err != nil {
		return res, err
	}
	plan := BuildPlan(snap, &b.cfg, PlanOptions{Scheduler: b.opts.Scheduler}, nodeIPs)
	want := make(map[Key]*VirtualServer, len(plan.VirtualServers))
	for i := range plan.VirtualServers {
		want[plan.VirtualServers[i].Key] = &plan.VirtualServers[i]
	}

	// Which virtual servers to look at in the kernel, and which recorded
	// ones are already gone from it.
	consider := map[Key]bool{}
	var gone []Key
	if res.Full {
		if b.last == nil {
			// After a restart (or a failed sync) the record in our own
			// nftables table says what we may have created.
			rec, err := readOwnedVIPs(b.nft)
			if err != nil {
				return res, err
			}
			for _, k := range rec {
				b.owned[k] = true
			}
		}
		boundSet := map[netip.Addr]bool{}
		for _, a := range bound {
			boundSet[a] = true
		}
		svcs, err := b.ipvs.GetServices()
		if err != nil {
			return res, fmt.Errorf("list ipvs services: %w", err)
		}
		inKernel := map[Key]bool{}
		for _, s := range svcs {
			k, ok := keyOf(s)
			if !ok {
				continue
			}
			inKernel[k] = true
			// Ours: recorded as ours, or on our dummy interface (where
			// kube-proxy, or a miniproxy older than the record, put
			// them). Others' virtual servers are left alone.
			if boundSet[k.IP] || b.owned[k] {
				consider[k] = true
			}
		}
		for k := range want {
			consider[k] = true
		}
		for k := range b.owned {
			if !inKernel[k] && want[k] == nil {
				gone = append(gone, k)
			}
		}
	} else {
		for k, vs := range want {
			if old, ok := b.lastVS[k]; !ok || !sameVS(old, vs) {
				consider[k] = true
			}
		}
		for k := range b.lastVS {
			if want[k] == nil {
				consider[k] = true
			}
		}
		for k := range b.draining {
			consider[k] = true
		}
	}

	// Record before creating: a virtual server exists only once the
	// kernel's record names it, so a SIGKILL at any later instant leaves
	// nothing a restart or --cleanup cannot find. (The converse, a record
	// without its virtual server, is harmless: it is dropped below.)
	var intents []Key
	for k := range want {
		if !b.owned[k] {
			intents = append(intents, k)
		}
	}
	if len(intents) > 0 {
		if err := recordOwned(b.nft, intents); err != nil {
			b.last = nil
			return res, err
		}
		for _, k := range intents {
			b.owned[k] = true
		}
	}

	calls := len(intents)
	var errs []error
	for _, k := range sortedKeys(consider) {
		if err := ctx.Err(); err != nil {
			b.last = nil
			return res, err
		}
		n, err := b.reconcileVS(k, want[k])
		calls += n
		if err != nil {
			errs = append(errs, err)
		} else if want[k] == nil {
			gone = append(gone, k)
		}
		if want[k] != nil {
			res.Changed++
		}
	}
	if b.afterVirtualServers != nil {
		b.afterVirtualServers()
	}

	// Bind wanted addresses, then drop the ones no virtual server uses.
	wantBind := map[netip.Addr]bool{}
	for _, a := range plan.BindAddrs {
		wantBind[a] = true
	}
	boundNow := map[netip.Addr]bool{}
	for _, a := range bound {
		boundNow[a] = true
		if !wantBind[a] {
			if err := b.nl.AddrDel(link, hostAddr(a)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("unbind %s from %s: %w", a, b.opts.Interface, err))
			}
			calls++
		}
	}
	for _, a := range plan.BindAddrs {
		if !boundNow[a] {
			if err := b.nl.AddrAdd(link, hostAddr(a)); err != nil && !errors.Is(err, unix.EEXIST) {
				errs = append(errs, fmt.Errorf("bind %s to %s: %w", a, b.opts.Interface, err))
			}
			calls++
		}
	}

	// The table is rewritten with the record minus what is gone (deleted
	// above, or found absent), in the same batch as the filter, so the
	// record shrinks only after the virtual servers are gone.
	if res.Full || b.last == nil || len(gone) > 0 || !sameFilter(&b.last.Filter, &plan.Filter) || !sameAddrs(b.last.BindAddrs, plan.BindAddrs) {
		keep := make(map[Key]bool, len(b.owned))
		for k := range b.owned {
			keep[k] = true
		}
		for _, k := range gone {
			delete(keep, k)
		}
		n, err := queueTable(b.nft, &plan.Filter, plan.BindAddrs, sortedKeys(keep))
		if err == nil {
			err = b.nft.Flush()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("nftables table %s: %w", TableName, err))
		} else {
			b.owned = keep
		}
		calls += n
	}
	res.Rules = calls
	if err := errors.Join(errs...); err != nil {
		// IPVS has no transactions: what succeeded stays, and the caller's
		// next (full) sync repairs the rest against the kernel.
		b.last = nil
		return res, fmt.Errorf("ipvs sync: %w", err)
	}
	b.last = plan
	b.lastVS = want
	return res, nil
}

// reconcileVS makes one virtual server match vs (nil: delete it). It returns
// the number of IPVS calls made.
func (b *Backend) reconcileVS(k Key, vs *VirtualServer) (int, error) {
	calls := 0
	probe := ipvsService(k, nil)
	cur, err := b.ipvs.GetService(probe)
	exists := err == nil && cur != nil
	if vs == nil {
		delete(b.draining, k)
		if !exists {
			return 0, nil
		}
		if err := b.ipvs.DelService(probe); err != nil {
			return 1, fmt.Errorf("delete virtual server %s: %w", k, err)
		}
		return 1, nil
	}
	svc := ipvsService(k, vs)
	switch {
	case !exists:
		if err := b.ipvs.NewService(svc); err != nil {
			return 1, fmt.Errorf("create virtual server %s (%s): %w", k, vs.Service, err)
		}
		calls++
	case cur.SchedName != svc.SchedName || cur.Flags&svcFlagPersistent != svc.Flags&svcFlagPersistent ||
		(svc.Flags&svcFlagPersistent != 0 && cur.Timeout != svc.Timeout):
		if err := b.ipvs.UpdateService(svc); err != nil {
			return 1, fmt.Errorf("update virtual server %s: %w", k, err)
		}
		calls++
	}
	var dests []*mobyipvs.Destination
	if exists {
		if dests, err = b.ipvs.GetDestinations(svc); err != nil {
			return calls + 1, fmt.Errorf("list real servers of %s: %w", k, err)
		}
		calls++
	}
	have := map[netip.AddrPort]*mobyipvs.Destination{}
	for _, d := range dests {
		if a, ok := netip.AddrFromSlice(d.Address); ok {
			have[netip.AddrPortFrom(a.Unmap(), d.Port)] = d
		}
	}
	var errs []error
	drain := b.draining[k]
	for _, rs := range vs.Reals {
		d := have[rs.Addr]
		delete(have, rs.Addr)
		delete(drain, rs.Addr)
		switch {
		case d == nil:
			err = b.ipvs.NewDestination(svc, ipvsDest(rs.Addr, rs.Weight))
		case d.Weight != rs.Weight:
			err = b.ipvs.UpdateDestination(svc, ipvsDest(rs.Addr, rs.Weight))
		default:
			continue
		}
		calls++
		if err != nil {
			errs = append(errs, fmt.Errorf("real server %s of %s: %w", rs.Addr, k, err))
		}
	}
	// Real servers no longer wanted: TCP ones drain at weight 0 until their
	// connections are gone (checked again on every sync), as kube-proxy's
	// graceful termination does; UDP has no connection end to wait for.
	for a, d := range have {
		if k.Proto == model.UDP || d.ActiveConnections+d.InactiveConnections == 0 {
			err = b.ipvs.DelDestination(svc, ipvsDest(a, 0))
			delete(drain, a)
		} else if d.Weight != 0 {
			err = b.ipvs.UpdateDestination(svc, ipvsDest(a, 0))
			if drain == nil {
				drain = map[netip.AddrPort]bool{}
			}
			drain[a] = true
		} else {
			if drain == nil {
				drain = map[netip.AddrPort]bool{}
			}
			drain[a] = true
			continue
		}
		calls++
		if err != nil {
			errs = append(errs, fmt.Errorf("retire real server %s of %s: %w", a, k, err))
		}
	}
	if len(drain) > 0 {
		b.draining[k] = drain
	} else {
		delete(b.draining, k)
	}
	return calls, errors.Join(errs...)
}

// Draining returns the real servers currently held at weight 0, for tests
// and metrics.
func (b *Backend) Draining() map[Key][]netip.AddrPort {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[Key][]netip.AddrPort{}
	for k, m := range b.draining {
		for a := range m {
			out[k] = append(out[k], a)
		}
	}
	return out
}

// Cleanup removes miniproxy's virtual servers (those in the ownership record
// and those on kube-ipvs0's addresses), then the dummy interface and the
// nftables table, and nothing else. The interface and the table are the
// evidence of ownership, so they are removed only once every owned virtual
// server is gone; after a failure a second --cleanup finds the rest.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ipvs == nil {
		return errClosed
	}
	rec, err := readOwnedVIPs(b.nft)
	if err != nil {
		return fmt.Errorf("ipvs cleanup: %w", err)
	}
	owned := map[Key]bool{}
	for _, k := range rec {
		owned[k] = true
	}
	for k := range b.owned {
		owned[k] = true
	}
	bound := map[netip.Addr]bool{}
	link, lerr := b.nl.LinkByName(b.opts.Interface)
	var nf netlink.LinkNotFoundError
	switch {
	case lerr == nil:
		addrs, err := b.addrList(link)
		if err != nil {
			return fmt.Errorf("ipvs cleanup: list addresses of %s: %w", b.opts.Interface, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				bound[ip.Unmap()] = true
			}
		}
	case !errors.As(lerr, &nf):
		return fmt.Errorf("ipvs cleanup: look up %s: %w", b.opts.Interface, lerr)
	}
	svcs, err := b.ipvs.GetServices()
	if err != nil {
		return fmt.Errorf("ipvs cleanup: list ipvs services: %w", err)
	}
	var errs []error
	for _, s := range svcs {
		if err := ctx.Err(); err != nil {
			return err
		}
		k, ok := keyOf(s)
		if ok && (bound[k.IP] || owned[k]) {
			if err := b.ipvs.DelService(s); err != nil {
				errs = append(errs, fmt.Errorf("delete virtual server %s: %w", k, err))
			}
		}
	}
	b.last, b.lastVS = nil, nil
	b.draining = map[Key]map[netip.AddrPort]bool{}
	if len(errs) > 0 {
		b.owned = owned
		return fmt.Errorf("ipvs cleanup (kept %s and table %s as the record of what is left): %w",
			b.opts.Interface, TableName, errors.Join(errs...))
	}
	if lerr == nil {
		if err := b.nl.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", b.opts.Interface, err))
		}
	}
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	b.nft.AddTable(t)
	b.nft.DelTable(t)
	if err := b.nft.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("delete nftables table %s: %w", TableName, err))
	}
	b.owned = map[Key]bool{}
	return errors.Join(errs...)
}

// setupNode sets the IPVS sysctls kube-proxy's IPVS mode relies on, inside
// the target namespace only.
func (b *Backend) setupNode() error {
	set := map[string]string{
		// Conntrack entries for IPVS connections, so nftables masquerade
		// applies to IPVS-forwarded packets.
		"net/ipv4/vs/conntrack": "1",
		// Drop connections to deleted real servers instead of black-holing.
		"net/ipv4/vs/expire_nodest_conn": "1",
		// Persistence templates of weight-0 real servers expire, so affinity
		// does not pin clients to a draining endpoint.
		"net/ipv4/vs/expire_quiescent_template": "1",
	}
	if b.opts.StrictARP {
		set["net/ipv4/conf/all/arp_ignore"] = "1"
		set["net/ipv4/conf/all/arp_announce"] = "2"
	}
	err := b.cfg.NetNS.Do(func() error {
		for k, v := range set {
			if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	b.setup = true
	return nil
}

func (b *Backend) ensureLink() (netlink.Link, error) {
	link, err := b.nl.LinkByName(b.opts.Interface)
	if err == nil {
		return link, nil
	}
	var nf netlink.LinkNotFoundError
	if !errors.As(err, &nf) {
		return nil, fmt.Errorf("look up %s: %w", b.opts.Interface, err)
	}
	// Left down on purpose, as kube-proxy does: local routes for its
	// addresses exist anyway, and a down device never answers ARP.
	d := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: b.opts.Interface}}
	if err := b.nl.LinkAdd(d); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("create dummy interface %s (is the dummy driver loaded?): %w", b.opts.Interface, err)
	}
	link, err = b.nl.LinkByName(b.opts.Interface)
	if err != nil {
		return nil, fmt.Errorf("look up %s after creating it: %w", b.opts.Interface, err)
	}
	return link, nil
}

// addresses returns the node's own addresses (candidates for NodePorts) and
// those bound to the dummy interface.
func (b *Backend) addresses(link netlink.Link) (node, bound []netip.Addr, err error) {
	addrs, err := b.addrList(nil)
	if err != nil {
		return nil, nil, fmt.Errorf("list node addresses: %w", err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if a.LinkIndex == link.Attrs().Index {
			bound = append(bound, ip)
		} else {
			node = append(node, ip)
		}
	}
	return node, bound, nil
}

// addrList lists addresses, retrying a dump the kernel interrupted because
// addresses changed meanwhile (IPv6 DAD finishing on a new interface is
// enough); a bounded number of tries, then the error.
func (b *Backend) addrList(link netlink.Link) ([]netlink.Addr, error) {
	var err error
	for range 5 {
		var addrs []netlink.Addr
		addrs, err = b.nl.AddrList(link, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return addrs, err
		}
	}
	return nil, err
}

func hostAddr(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
}

func ipvsService(k Key, vs *VirtualServer) *mobyipvs.Service {
	s := &mobyipvs.Service{
		Address:       k.IP.AsSlice(),
		Protocol:      uint16(protoNum(k.Proto)),
		Port:          k.Port,
		AddressFamily: unix.AF_INET,
		Netmask:       0xffffffff,
	}
	if k.IP.Is6() {
		s.AddressFamily, s.Netmask = unix.AF_INET6, 128
	}
	if vs != nil {
		s.SchedName = vs.Scheduler
		if vs.Persistence > 0 {
			s.Flags = svcFlagPersistent
			s.Timeout = vs.Persistence
		}
	}
	return s
}

func ipvsDest(a netip.AddrPort, weight int) *mobyipvs.Destination {
	d := &mobyipvs.Destination{
		Address:         a.Addr().AsSlice(),
		Port:            a.Port(),
		Weight:          weight,
		ConnectionFlags: mobyipvs.ConnectionFlagMasq,
		AddressFamily:   unix.AF_INET,
	}
	if a.Addr().Is6() {
		d.AddressFamily = unix.AF_INET6
	}
	return d
}

func keyOf(s *mobyipvs.Service) (Key, bool) {
	if s.FWMark != 0 {
		return Key{}, false
	}
	ip, ok := netip.AddrFromSlice(s.Address)
	if !ok {
		return Key{}, false
	}
	p, ok := protoOf(s.Protocol)
	if !ok {
		return Key{}, false
	}
	return Key{IP: ip.Unmap(), Proto: p, Port: s.Port}, true
}
