package takeover

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/iptables"
	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
	"github.com/miniproxy/miniproxy/test/netnstest"
)

// kubeProxyKernelSave is kubeProxySave without the nfacct match (not every
// kernel has it), loadable by iptables-restore in a namespace.
func kubeProxyKernelSave() string {
	var keep []string
	for _, l := range strings.Split(kubeProxySave, "\n") {
		if !strings.Contains(l, "nfacct") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// foreignNFT is a CNI's nftables table, which must survive a takeover.
const foreignNFT = `table inet cni-test {
	chain cni-forward { type filter hook forward priority 0; policy accept; }
}
`

// kubeProxyNFT is the shape of kube-proxy's nftables-mode table.
const kubeProxyNFT = `table %s kube-proxy {
	map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
	chain services { }
	chain nat-prerouting { type nat hook prerouting priority -100; policy accept; jump services; }
}
`

// TestTakeoverKernel loads kube-proxy's leftovers of every mode that this
// kernel supports into both xtables variants and both families, next to
// kubelet's chains and a CNI's table, and checks that a takeover in each
// miniproxy mode removes exactly kube-proxy's objects.
func TestTakeoverKernel(t *testing.T) {
	netnstest.RequireRoot(t, "iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore", "nft", "ipset")
	for _, mode := range []string{"nftables", "iptables"} {
		t.Run(mode, func(t *testing.T) {
			ns := netnstest.New(t, "tko")
			ctx := context.Background()
			save := kubeProxyKernelSave()
			save6 := strings.NewReplacer("127.0.0.0/8", "::1/128", "10.244.1.2/32", "fd00::2/128", "10.244.1.2:8080", "[fd00::2]:8080", "10.96.0.10/32", "fd00:96::10/128").Replace(save)
			for _, bin := range []string{"iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore"} {
				in := save
				if strings.HasPrefix(bin, "ip6") {
					in = save6
				}
				if _, err := ns.Run(ctx, in, bin, "-w", "5"); err != nil {
					t.Fatal(err)
				}
			}
			nftIn := foreignNFT + strings.Replace(kubeProxyNFT, "%s", "ip", 1) +
				strings.Replace(strings.Replace(kubeProxyNFT, "%s", "ip6", 1), "ipv4_addr", "ipv6_addr", 1)
			if _, err := ns.Run(ctx, nftIn, "nft", "-f", "-"); err != nil {
				t.Fatal(err)
			}
			ns.MustRun(t, "ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port")
			ns.MustRun(t, "ipset", "create", "KUBE-6-CLUSTER-IP", "hash:ip,port", "family", "inet6")
			ns.MustRun(t, "ipset", "create", "cni-other", "hash:ip")

			var logs bytes.Buffer
			run := iptables.ExecRunner(proxy.NetNS(ns.Path()))
			o := Options{
				Self:    Self{Mode: mode, Variant: DetectVariant(ctx, run), Families: []model.Family{model.IPv4}},
				Run:     run,
				NetNSFd: ns.FD(t),
				Log:     slog.New(slog.NewTextHandler(&logs, nil)),
			}
			if o.Self.Variant != VariantNFT {
				t.Fatalf("iptables on this host is %q; the test assumes iptables-nft", o.Self.Variant)
			}
			if _, err := Run(ctx, o); err != nil {
				t.Fatalf("takeover: %v\n%s", err, logs.String())
			}
			t.Logf("log:\n%s", logs.String())

			for _, bin := range []string{"iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"} {
				out := ns.MustRun(t, bin)
				for _, keep := range []string{":KUBE-FIREWALL ", ":KUBE-KUBELET-CANARY ", ":DOCKER-USER ", ":CNI-HOSTPORT-DNAT ",
					"-A INPUT -j KUBE-FIREWALL", "-A FORWARD -j DOCKER-USER", "-j CNI-HOSTPORT-DNAT", "block incoming localnet connections"} {
					if !strings.Contains(out, keep) {
						t.Errorf("%s: %q was removed:\n%s", bin, keep, out)
					}
				}
				ours := mode == "iptables" && bin == "iptables-nft-save"
				for _, gone := range []string{":KUBE-FORWARD ", ":KUBE-PROXY-CANARY ", "kubernetes forwarding rules"} {
					if strings.Contains(out, gone) {
						t.Errorf("%s: kube-proxy's %q is left:\n%s", bin, gone, out)
					}
				}
				for _, name := range []string{":KUBE-SERVICES ", ":KUBE-SVC-BBBBBBBBBBBBBBBB ", ":KUBE-SEP-AAAAAAAAAAAAAAAA ", ":KUBE-POSTROUTING ", ":KUBE-PROXY-FIREWALL ", "-j KUBE-SERVICES"} {
					if has := strings.Contains(out, name); has != ours {
						t.Errorf("%s (miniproxy in %s mode): %q present=%v, want %v:\n%s", bin, mode, name, has, ours, out)
					}
				}
			}
			rs := ns.MustRun(t, "nft", "list", "tables")
			if strings.Contains(rs, "kube-proxy") || !strings.Contains(rs, "table inet cni-test") {
				t.Errorf("nftables tables after the takeover (want cni-test only, no kube-proxy):\n%s", rs)
			}
			sets := ns.MustRun(t, "ipset", "list", "-n")
			if strings.Contains(sets, "KUBE-") || !strings.Contains(sets, "cni-other") {
				t.Errorf("ipsets after the takeover (want cni-other only):\n%s", sets)
			}
			for _, want := range []string{"kind=\"nftables table\" table=\"ip kube-proxy\"", "kind=chain", "chain=KUBE-FORWARD", "kind=ipset name=KUBE-CLUSTER-IP"} {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("log lacks %q", want)
				}
			}

			// A second takeover finds nothing.
			p, err := Run(ctx, o)
			if err != nil || !p.Empty() {
				t.Errorf("second takeover: err %v, plan %+v", err, p)
			}
		})
	}
}
