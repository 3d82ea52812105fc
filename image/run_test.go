package image

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/miniproxy/miniproxy/test/netnstest"
)

// missing skips with the reason, or fails where the caller requires the
// check (make e2e sets MINIPROXY_IMAGE_REQUIRED=1): a skipped image check
// must never read as a passed one there.
func missing(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("MINIPROXY_IMAGE_REQUIRED") == "1" {
		t.Fatalf("image check cannot run (MINIPROXY_IMAGE_REQUIRED=1): %s", msg)
	}
	t.Skipf("skipping: %s", msg)
}

func goCommand() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if g := os.Getenv("GOROOT"); g != "" { // go test sets it for the test binary
		return filepath.Join(g, "bin", "go")
	}
	return "go"
}

func buildImage(t *testing.T, ctx context.Context, cache string) (v1.Image, []Layer) {
	t.Helper()
	layers, _, err := Build(ctx, Options{
		Log: slog.New(slog.NewTextHandler(os.Stderr, nil)), SourceDir: "..", Version: "test-version",
		Go: goCommand(), CacheDir: cache, WorkDir: t.TempDir(), Created: time.Unix(0, 0).UTC(),
	})
	if err != nil {
		if strings.Contains(err.Error(), "apt-get") {
			missing(t, "the Debian packages cannot be had here: %v", err)
		}
		t.Fatal(err)
	}
	img, err := NewImage(layers, Config{Created: time.Unix(0, 0).UTC()})
	if err != nil {
		t.Fatal(err)
	}
	return img, layers
}

// snapshot describes every object under dir: type, permissions, link
// target or content hash.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		desc := info.Mode().String()
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + l
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		m[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestImage builds the image twice from separate work directories (same
// digest), holds deploy/daemonset.yaml to its config and files, then unpacks
// it and runs its binaries chrooted into it, each run in a private mount
// namespace (its own /proc) inside a private network namespace.
func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping in -short mode: builds the image (about 20 s with a warm cache); make e2e runs it")
	}
	if os.Geteuid() != 0 {
		missing(t, "needs root to chroot and create namespaces")
	}
	for _, b := range []string{"apt-get", "dpkg-deb", "unshare", "nsenter", "chroot", "mount", "tar", "ip"} {
		if _, err := exec.LookPath(b); err != nil {
			missing(t, "%s is not installed", b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cache := os.Getenv("MINIPROXY_CACHE")
	if cache == "" {
		cache = "/var/cache/miniproxy"
	}
	cache = filepath.Join(cache, "image")

	img, layers := buildImage(t, ctx, cache)
	again, _ := buildImage(t, ctx, cache)
	d1, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := again.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if d1 != d2 {
		t.Fatalf("two builds of the same inputs: %s and %s", d1, d2)
	}
	t.Logf("two builds, one digest: %s", d1)

	root := filepath.Join(t.TempDir(), "rootfs")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	flat := mutate.Extract(img)
	untar := exec.CommandContext(ctx, "tar", "-x", "-p", "-C", root)
	untar.Stdin = flat
	if out, err := untar.CombinedOutput(); err != nil {
		t.Fatalf("unpack the image: %v: %s", err, out)
	}
	flat.Close()

	// The Dockerfile's final stage is what mkimage -rootfs writes from the
	// same layers: it must equal the unpacked image, object for object.
	dockerRoot := filepath.Join(t.TempDir(), "rootfs")
	var all []Entry
	for _, l := range layers {
		all = append(all, l.Entries...)
	}
	if err := WriteDir(dockerRoot, all); err != nil {
		t.Fatal(err)
	}
	if a, b := snapshot(t, root), snapshot(t, dockerRoot); !maps.Equal(a, b) {
		for p := range a {
			if a[p] != b[p] {
				t.Errorf("%s: image %q, -rootfs %q", p, a[p], b[p])
			}
		}
		for p := range b {
			if _, ok := a[p]; !ok {
				t.Errorf("%s: only in -rootfs (%q)", p, b[p])
			}
		}
	}
	// Runtimes make /proc and /dev; the chroot needs mount points.
	if err := os.Mkdir(filepath.Join(root, "proc"), 0o555); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(root, "dev"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "dev/null"), nil, 0o666); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Each run's mount namespace died with it; prove /proc went too.
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(mi), root) {
			t.Errorf("a mount under %s outlived its namespace", root)
		}
	})

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	checkManifestAgainst(t, daemonSetContainer(t), cf.Config.Entrypoint, func(p string) bool {
		// The image's top-level links are relative, so Stat stays inside.
		fi, err := os.Stat(filepath.Join(root, p))
		if err != nil {
			return false
		}
		if p == cf.Config.Entrypoint[0] {
			return fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
		}
		return true
	})

	run := func(t *testing.T, ns *netnstest.NS, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, "nsenter", "--net="+ns.Path(), "--",
			"unshare", "--mount", "--propagation", "private", "--",
			// What a runtime gives every container: /proc and /dev/null.
			"/bin/sh", "-c", `mount -t proc proc "$0/proc" && mount --bind /dev/null "$0/dev/null" && exec chroot "$0" "$@"`, root)
		cmd.Args = append(cmd.Args, args...)
		cmd.Env = []string{"PATH=" + Path}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s in the image: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	expect := func(t *testing.T, out, want string) {
		t.Helper()
		if !strings.Contains(out, want) {
			t.Errorf("output %q lacks %q", strings.TrimSpace(out), want)
		}
	}
	links := func(t *testing.T, want string) {
		t.Helper()
		for _, l := range WrapperLinks {
			if got, err := os.Readlink(filepath.Join(root, "usr/sbin", l)); err != nil || got != want {
				t.Errorf("/usr/sbin/%s -> %q (%v), want %s", l, got, err, want)
			}
		}
	}
	resetLinks := func(t *testing.T) {
		t.Helper()
		for _, l := range WrapperLinks {
			p := filepath.Join(root, "usr/sbin", l)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(filepath.Base(Wrapper), p); err != nil {
				t.Fatal(err)
			}
		}
	}
	netnstest.RequireRoot(t)

	t.Run("tools", func(t *testing.T) {
		ns := netnstest.New(t, "img")
		expect(t, run(t, ns, Miniproxy, "--version"), "miniproxy test-version")
		for _, fam := range []string{"iptables", "ip6tables"} {
			expect(t, run(t, ns, fam+"-nft", "--version"), "(nf_tables)")
			expect(t, run(t, ns, fam+"-legacy", "--version"), "(legacy)")
		}
		expect(t, run(t, ns, "nft", "--version"), "nftables v")
		expect(t, run(t, ns, "ipset", "--version"), "ipset v")
		expect(t, run(t, ns, "modprobe", "--version"), "kmod version")
		expect(t, run(t, ns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet"), "0")
		run(t, ns, "cat", "/proc/net/ip_tables_names")
		// Talking to the kernel proves every library and extension loads.
		expect(t, run(t, ns, "iptables-nft", "-w", "-t", "nat", "-n", "-L"), "Chain PREROUTING")
		expect(t, run(t, ns, "ip6tables-nft", "-w", "-t", "filter", "-n", "-L"), "Chain INPUT")
		run(t, ns, "iptables-nft-restore", "-w", "--noflush", "--test", "/dev/null")
		run(t, ns, "nft", "list", "ruleset")
	})

	t.Run("wrapper picks nft on a fresh node", func(t *testing.T) {
		resetLinks(t)
		ns := netnstest.New(t, "img")
		expect(t, run(t, ns, "iptables-wrapper", "detect"), "nft\t")
		links(t, filepath.Base(Wrapper)) // detect changes nothing
		expect(t, run(t, ns, "iptables", "-w", "-t", "nat", "-n", "-L"), "Chain PREROUTING")
		links(t, "xtables-nft-multi")
		expect(t, run(t, ns, "iptables", "--version"), "(nf_tables)")
		expect(t, run(t, ns, "ip6tables", "--version"), "(nf_tables)")
	})

	t.Run("wrapper follows kubelet's legacy chains", func(t *testing.T) {
		resetLinks(t)
		ns := netnstest.New(t, "img")
		// What kubelet on a legacy node leaves, in this private namespace.
		run(t, ns, "iptables-legacy", "-w", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
		expect(t, run(t, ns, "iptables-wrapper", "detect"), "legacy\t")
		expect(t, run(t, ns, "iptables-save"), ":KUBE-IPTABLES-HINT")
		links(t, "xtables-legacy-multi")
		expect(t, run(t, ns, "iptables", "--version"), "(legacy)")
		expect(t, run(t, ns, "ip6tables", "-w", "-t", "filter", "-n", "-L"), "Chain INPUT")
	})
}
