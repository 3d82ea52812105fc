package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/image"
)

// fakeSaver answers from canned iptables-save outputs keyed by
// "variant command args"; anything else is empty, as a failing run is.
func fakeSaver(outputs map[string]string) (Saver, *[]string) {
	var calls []string
	return func(_ context.Context, m Mode, command string, args ...string) []byte {
		k := strings.Join(append([]string{string(m), command}, args...), " ")
		calls = append(calls, k)
		return []byte(outputs[k])
	}, &calls
}

const hintMangle = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"

func rules(n int) string {
	s := "*filter\n:INPUT ACCEPT [0:0]\n"
	for range n {
		s += "-A INPUT -j ACCEPT\n"
	}
	return s + "COMMIT\n"
}

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name    string
		outputs map[string]string
		want    Mode
	}{
		{"fresh namespace: nft", nil, NFT},
		{"kubelet chains in nft", map[string]string{"nft iptables-save -t mangle": hintMangle, "legacy iptables-save": rules(50)}, NFT},
		{"kubelet chains in nft ip6tables only", map[string]string{"nft ip6tables-save -t mangle": hintMangle, "legacy iptables-save": rules(50)}, NFT},
		{"kubelet chains in legacy", map[string]string{"legacy iptables-save": hintMangle, "nft iptables-save": rules(50)}, Legacy},
		{"kubelet chains in legacy ip6tables only", map[string]string{"legacy ip6tables-save": hintMangle, "nft iptables-save": rules(50)}, Legacy},
		{"more legacy rules", map[string]string{"legacy iptables-save": rules(3), "legacy ip6tables-save": rules(2), "nft iptables-save": rules(4)}, Legacy},
		{"more nft rules", map[string]string{"legacy iptables-save": rules(3), "nft iptables-save": rules(2), "nft ip6tables-save": rules(2)}, NFT},
		{"tie goes to nft", map[string]string{"legacy iptables-save": rules(3), "nft iptables-save": rules(3)}, NFT},
		// A chain named like the marker inside a rule is not the marker chain.
		{"marker only in a rule", map[string]string{"nft iptables-save -t mangle": "*mangle\n-A X -m comment --comment \":KUBE-IPTABLES-HINT \"\nCOMMIT\n", "legacy iptables-save": rules(1)}, Legacy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			save, _ := fakeSaver(tc.outputs)
			got, why := Detect(context.Background(), save)
			if got != tc.want {
				t.Errorf("Detect = %s (%s), want %s", got, why, tc.want)
			}
		})
	}
}

// The legacy tables are only ever dumped whole: "-t mangle" on
// iptables-legacy-save would create that table in the kernel.
func TestDetectNeverNamesALegacyTable(t *testing.T) {
	save, calls := fakeSaver(nil)
	Detect(context.Background(), save)
	for _, c := range *calls {
		if strings.HasPrefix(c, "legacy ") && strings.Contains(c, " -t") {
			t.Errorf("legacy call with a table: %q", c)
		}
	}
}

func TestSelect(t *testing.T) {
	dir := t.TempDir()
	for _, l := range Links {
		if err := os.Symlink("iptables-wrapper", filepath.Join(dir, l)); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []Mode{Legacy, NFT} {
		if err := Select(dir, m); err != nil {
			t.Fatal(err)
		}
		for _, l := range Links {
			if got, err := os.Readlink(filepath.Join(dir, l)); err != nil || got != MultiBinary(m) {
				t.Errorf("%s -> %q, %v; want %s", l, got, err, MultiBinary(m))
			}
		}
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	want := slices.Clone(Links)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("directory holds %v, want only %v (no temporary links left)", names, want)
	}
}

// The image links exactly the commands the wrapper re-points.
func TestLinksMatchImageSpec(t *testing.T) {
	if !slices.Equal(Links, image.WrapperLinks) {
		t.Errorf("wrapper links %v, image links %v", Links, image.WrapperLinks)
	}
	if filepath.Base(image.Wrapper) != "iptables-wrapper" {
		t.Errorf("the image installs the wrapper as %s; main dispatches on the name iptables-wrapper", image.Wrapper)
	}
}
