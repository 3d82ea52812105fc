// Package guest boots a throwaway qemu guest with a Debian kernel and runs a
// static Go test binary inside it. It exists for tests that need kernel
// features the build machine lacks (IPVS, the dummy interface driver): the
// guest kernel is Debian's linux-image-amd64, fetched with `apt-get download`
// and unpacked with `dpkg-deb -x` into a cache directory (never installed),
// and the results come back on the serial console.
//
// Everything the guest needs is carried in a gzip initramfs built here: busybox
// (static), the requested kernel modules in dependency order, and the test
// binary. No userspace networking tools are needed in the guest; the tests
// program the kernel through netlink only.
package guest

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
)

// CacheDir returns the directory the kernel package is cached in:
// ${MINIPROXY_CACHE:-/var/cache/miniproxy}/guest.
func CacheDir() string {
	base := os.Getenv("MINIPROXY_CACHE")
	if base == "" {
		base = "/var/cache/miniproxy"
	}
	return filepath.Join(base, "guest")
}

// Kernel is an unpacked Debian kernel package.
type Kernel struct {
	// Release is the module directory name, e.g. 6.1.0-56-amd64.
	Release string
	// Vmlinuz is the kernel image.
	Vmlinuz string
	// ModDir is lib/modules/<Release> inside the unpacked package.
	ModDir string
	// Vmlinux is the uncompressed kernel with a PVH entry point, when it
	// could be extracted; qemu boots it directly, skipping the in-guest XZ
	// decompression that dominates boot time under TCG (about 9 s -> 5 s).
	Vmlinux string
}

// Image returns the kernel image to boot: Vmlinux when available.
func (k *Kernel) Image() string {
	if k.Vmlinux != "" {
		return k.Vmlinux
	}
	return k.Vmlinuz
}

// DefaultPackage is the Debian meta package whose dependency is the kernel.
const DefaultPackage = "linux-image-amd64"

// EnsureKernel returns the cached kernel, fetching and unpacking it first when
// the cache is cold. It only ever writes below cacheDir.
func EnsureKernel(ctx context.Context, cacheDir, pkg string) (*Kernel, error) {
	// `make guest` runs the guest tests of several packages as parallel
	// processes. On a cold cache each would unpack the kernel and replace
	// the others' root while they read modules from it (seen on a fresh
	// CI machine: "index modules …: no such file or directory"), so the
	// whole check-or-fetch runs under a lock on the cache directory.
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", cacheDir, err)
	}
	lock, err := os.OpenFile(filepath.Join(cacheDir, "kernel.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open kernel cache lock: %w", err)
	}
	defer lock.Close() // closing the file releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock kernel cache %s: %w", cacheDir, err)
	}
	if k, err := findKernel(filepath.Join(cacheDir, "root")); err == nil {
		return k, nil
	}
	for _, bin := range []string{"apt-get", "apt-cache", "dpkg-deb"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("kernel not cached in %s and %s is missing: %w", cacheDir, bin, err)
		}
	}
	// The meta package only depends on the versioned image package, which is
	// the one that holds the files.
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", pkg).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache depends %s: %w", pkg, err)
	}
	real := ""
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			real = f[1]
			break
		}
	}
	if real == "" {
		real = pkg
	}
	debDir := filepath.Join(cacheDir, "deb")
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", debDir, err)
	}
	debs, _ := filepath.Glob(filepath.Join(debDir, real+"_*.deb"))
	if len(debs) == 0 {
		cmd := exec.CommandContext(ctx, "apt-get", "download", real)
		cmd.Dir = debDir
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("apt-get download %s: %w: %s", real, err, out)
		}
		debs, _ = filepath.Glob(filepath.Join(debDir, real+"_*.deb"))
		if len(debs) == 0 {
			return nil, fmt.Errorf("apt-get download %s left no .deb in %s", real, debDir)
		}
	}
	// Unpack into a temporary directory and rename, so an interrupted unpack
	// never looks like a usable cache.
	tmp, err := os.MkdirTemp(cacheDir, "unpack-")
	if err != nil {
		return nil, fmt.Errorf("temp dir for unpack: %w", err)
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg-deb -x %s: %w: %s", debs[0], err, out)
	}
	root := filepath.Join(cacheDir, "root")
	_ = os.RemoveAll(root)
	if err := os.Rename(tmp, root); err != nil {
		return nil, fmt.Errorf("move unpacked kernel into place: %w", err)
	}
	return findKernel(root)
}

func findKernel(root string) (*Kernel, error) {
	imgs, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(imgs) == 0 {
		return nil, fmt.Errorf("no vmlinuz in %s", root)
	}
	rel := strings.TrimPrefix(filepath.Base(imgs[0]), "vmlinuz-")
	mod := filepath.Join(root, "lib", "modules", rel)
	if _, err := os.Stat(mod); err != nil {
		return nil, fmt.Errorf("modules of %s: %w", rel, err)
	}
	k := &Kernel{Release: rel, Vmlinuz: imgs[0], ModDir: mod}
	vml := filepath.Join(filepath.Dir(root), "vmlinux-"+rel)
	if _, err := os.Stat(vml); err != nil {
		// Best effort: without it the compressed image still boots.
		if err := extractVmlinux(k.Vmlinuz, vml); err != nil {
			return k, nil
		}
	}
	k.Vmlinux = vml
	return k, nil
}

// extractVmlinux unpacks the XZ payload of a bzImage (Debian's format) with
// the xz tool and keeps it only if it is an ELF with a PVH entry note.
func extractVmlinux(bz, out string) error {
	data, err := os.ReadFile(bz)
	if err != nil {
		return err
	}
	i := bytes.Index(data, []byte("\xfd7zXZ\x00"))
	if i < 0 {
		return errors.New("no XZ payload in kernel image")
	}
	xz, err := exec.LookPath("xz")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(out), filepath.Base(out)+".tmp-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	cmd := exec.Command(xz, "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(data[i:])
	cmd.Stdout = f
	err = cmd.Run()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = checkPVH(tmp)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// checkPVH looks for XEN_ELFNOTE_PHYS32_ENTRY (type 18 in the "Xen" notes),
// which qemu needs to boot an ELF kernel directly.
func checkPVH(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("extracted kernel is not ELF: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			return err
		}
		for len(b) >= 12 {
			nsz, dsz, typ := f.ByteOrder.Uint32(b), f.ByteOrder.Uint32(b[4:]), f.ByteOrder.Uint32(b[8:])
			name := b[12:min(len(b), 12+int(nsz))]
			if typ == 18 && bytes.HasPrefix(name, []byte("Xen")) {
				return nil
			}
			adv := 12 + int((nsz+3)&^3) + int((dsz+3)&^3)
			if adv > len(b) {
				break
			}
			b = b[adv:]
		}
	}
	return errors.New("kernel has no PVH entry note")
}

// softAliases resolves soft dependencies that name a crypto algorithm rather
// than a module (libcrc32c's "pre: crc32c" needs an implementation loaded
// first, or its init fails).
var softAliases = map[string]string{"crc32c": "crc32c_generic"}

// ModuleOrder returns the .ko paths (relative to k.ModDir) of the named
// modules and everything they depend on, each after its dependencies. The
// dependencies are read from each module's .modinfo section (depends= and
// softdep=pre:), so the host needs neither depmod nor an installed kernel.
// Modules built into the kernel (modules.builtin) are silently satisfied.
func (k *Kernel) ModuleOrder(names ...string) ([]string, error) {
	paths := map[string]string{}
	err := filepath.WalkDir(k.ModDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			paths[normMod(strings.TrimSuffix(d.Name(), ".ko"))] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules of %s: %w", k.Release, err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(k.ModDir, "modules.builtin")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if l != "" {
				builtin[normMod(strings.TrimSuffix(filepath.Base(l), ".ko"))] = true
			}
		}
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		name = normMod(name)
		switch state[name] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		}
		p, ok := paths[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("module %s not found in %s", name, k.ModDir)
		}
		state[name] = 1
		deps, soft, err := modinfoDeps(p)
		if err != nil {
			return err
		}
		for _, s := range soft {
			if a, ok := softAliases[s]; ok {
				s = a
			}
			if _, ok := paths[normMod(s)]; ok {
				if err := visit(s, append(chain, name)); err != nil {
					return err
				}
			}
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		rel, _ := filepath.Rel(k.ModDir, p)
		order = append(order, rel)
		return nil
	}
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	for _, n := range sorted {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

func normMod(s string) string { return strings.ReplaceAll(s, "-", "_") }

// modinfoDeps reads depends= and softdep=pre: from a module's .modinfo.
func modinfoDeps(path string) (deps, softPre []string, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil, fmt.Errorf("module %s has no .modinfo", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, nil, fmt.Errorf("read .modinfo of %s: %w", path, err)
	}
	return parseModinfo(data)
}

func parseModinfo(data []byte) (deps, softPre []string, err error) {
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					deps = append(deps, d)
				}
			}
		case "softdep":
			// Format: "pre: a b post: c".
			inPre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					inPre = true
				case "post:":
					inPre = false
				default:
					if inPre {
						softPre = append(softPre, w)
					}
				}
			}
		}
	}
	if deps == nil && softPre == nil && len(data) == 0 {
		return nil, nil, errors.New("empty .modinfo")
	}
	return deps, softPre, nil
}
