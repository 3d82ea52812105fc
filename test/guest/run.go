package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Markers the init script prints. They are matched anywhere in a line: the
// firmware's escape codes glue onto the first console line.
const (
	markerUp   = "MINIPROXY-GUEST-UP"
	markerMods = "MINIPROXY-GUEST-MODULES"
	markerExit = "MINIPROXY-GUEST-EXIT="
)

// ErrUnavailable wraps every reason the guest cannot be run at all on this
// host (no qemu, no kernel package); callers skip rather than fail on it.
var ErrUnavailable = errors.New("guest unavailable")

// RequiredEnv names the variable that turns "the guest cannot run" from a
// skip into a failure. `make guest` (and so `make test` and CI) sets it: a run
// that was expected to cover the IPVS column must not pass with it skipped.
const RequiredEnv = "MINIPROXY_GUEST_REQUIRED"

// Required reports whether RequiredEnv is set to 1.
func Required() bool { return os.Getenv(RequiredEnv) == "1" }

// Options describe one guest run.
type Options struct {
	// Binary is a static executable run as the guest's test (e.g. from
	// `CGO_ENABLED=0 go test -c`).
	Binary string
	// Args are passed to Binary.
	Args []string
	// Env is set for Binary, as KEY=VALUE.
	Env []string
	// Modules are loaded (with their dependencies) before Binary starts.
	Modules []string
	// Timeout bounds the whole boot; qemu is killed after it. Default 3m.
	Timeout time.Duration
	// MemoryMB is the guest RAM. Default 512.
	MemoryMB int
	// CacheDir holds the kernel package. Default CacheDir().
	CacheDir string
	// Console, when set, receives the raw console output as it arrives.
	Console io.Writer
	// Network gives the guest a virtio NIC on qemu user networking, set up
	// as eth0 10.0.2.15/24 with default route 10.0.2.2, which qemu maps to
	// the loopback of the namespace qemu runs in (see Prefix).
	Network bool
	// Prefix is prepended to the qemu command line, e.g. {"ip", "netns",
	// "exec", NAME} so 10.0.2.2 reaches services in that namespace.
	Prefix []string
	// Files are extra files for the guest: guest path -> host path.
	Files map[string]string
}

// GuestHostIP is the address at which a networked guest reaches the loopback
// of the namespace qemu runs in.
const GuestHostIP = "10.0.2.2"

// Result is what came back from the guest.
type Result struct {
	// ExitCode is Binary's exit status, carried in the console output
	// (qemu itself exits 0 on poweroff whatever the guest did).
	ExitCode int
	// Output is the full console output.
	Output string
	// Boot is the time from starting qemu until the init script ran;
	// Modules until the modules were loaded; Total until qemu exited.
	Boot, Modules, Total time.Duration
	// FailedModules lists modules whose insmod failed.
	FailedModules []string
	// KernelRelease is the guest kernel's release.
	KernelRelease string
	// InitramfsBytes is the size of the compressed initramfs.
	InitramfsBytes int64
}

// QemuBinary is the emulator the runner uses.
const QemuBinary = "qemu-system-x86_64"

// Run boots the guest and runs opts.Binary in it. It returns an error wrapping
// ErrUnavailable when qemu or the kernel package cannot be had.
func Run(ctx context.Context, opts Options) (*Result, error) {
	if opts.Timeout == 0 {
		opts.Timeout = 3 * time.Minute
	}
	if opts.MemoryMB == 0 {
		opts.MemoryMB = 512
	}
	if opts.CacheDir == "" {
		opts.CacheDir = CacheDir()
	}
	qemu, err := exec.LookPath(QemuBinary)
	if err != nil {
		return nil, fmt.Errorf("%w: %s not installed (apt-get install qemu-system-x86): %v", ErrUnavailable, QemuBinary, err)
	}
	busybox, err := findBusybox()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if err := os.MkdirAll(opts.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("%w: cache dir: %v", ErrUnavailable, err)
	}
	k, err := EnsureKernel(ctx, opts.CacheDir, DefaultPackage)
	if err != nil {
		return nil, fmt.Errorf("%w: kernel package: %v", ErrUnavailable, err)
	}
	modNames := opts.Modules
	if opts.Network {
		modNames = append(append([]string(nil), modNames...), "virtio_pci", "virtio_net")
	}
	mods, err := k.ModuleOrder(modNames...)
	if err != nil {
		return nil, fmt.Errorf("module order: %w", err)
	}

	work, err := os.MkdirTemp("", "miniproxy-guest-")
	if err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(work)
	rd := NewInitramfs()
	rd.AddFile("bin/busybox", busybox, 0o755)
	for _, d := range []string{"proc", "sys", "dev", "tmp", "run", "etc"} {
		rd.AddDir(d)
	}
	for _, m := range mods {
		rd.AddFile("lib/modules/"+m, filepath.Join(k.ModDir, m), 0o644)
	}
	rd.AddData("modules.order", []byte(strings.Join(mods, "\n")+"\n"), 0o644)
	rd.AddFile("guest.test", opts.Binary, 0o755)
	for g, h := range opts.Files {
		mode := uint32(0o644)
		if st, err := os.Stat(h); err == nil && st.Mode()&0o111 != 0 {
			mode = 0o755
		}
		rd.AddFile(g, h, mode)
	}
	rd.AddData("init", []byte(initScript(opts)), 0o755)
	initrd := filepath.Join(work, "initrd.gz")
	if err := rd.WriteFile(initrd); err != nil {
		return nil, err
	}
	st, _ := os.Stat(initrd)

	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	// TCG explicitly: /dev/kvm may exist but hang on nested setups. One CPU:
	// multi-threaded TCG on two host cores is slower, not faster.
	args := []string{qemu,
		"-accel", "tcg", "-smp", "1", "-m", strconv.Itoa(opts.MemoryMB),
		"-nodefaults", "-display", "none", "-no-reboot",
		"-serial", "stdio", "-monitor", "none",
		"-kernel", k.Image(), "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 rdinit=/init"}
	if opts.Network {
		// romfile= : no PXE option ROM needed (or installed) for -kernel boots.
		args = append(args, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=")
	}
	args = append(append([]string(nil), opts.Prefix...), args...)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = nil
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("qemu stdout: %w", err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	res := &Result{ExitCode: -1, KernelRelease: k.Release, InitramfsBytes: st.Size()}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	var out bytes.Buffer
	var mu sync.Mutex
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if opts.Console != nil {
			fmt.Fprintln(opts.Console, line)
		}
		mu.Lock()
		out.WriteString(line)
		out.WriteByte('\n')
		mu.Unlock()
		switch {
		case strings.Contains(line, markerUp) && res.Boot == 0:
			res.Boot = time.Since(start)
		case strings.Contains(line, markerMods+"-FAIL "):
			res.FailedModules = append(res.FailedModules, strings.TrimSpace(line[strings.Index(line, markerMods+"-FAIL ")+len(markerMods)+6:]))
		case strings.Contains(line, markerMods+"-LOADED") && res.Modules == 0:
			res.Modules = time.Since(start)
		case strings.Contains(line, markerExit):
			v := line[strings.Index(line, markerExit)+len(markerExit):]
			if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
				res.ExitCode = n
			}
		}
	}
	werr := cmd.Wait()
	res.Total = time.Since(start)
	res.Output = out.String()
	if ctx.Err() != nil {
		return res, fmt.Errorf("guest did not finish within %v: %w\n%s", opts.Timeout, ctx.Err(), tail(res.Output, 40))
	}
	if werr != nil {
		return res, fmt.Errorf("qemu: %w: %s", werr, stderr.String())
	}
	if res.ExitCode < 0 {
		return res, fmt.Errorf("guest powered off without reporting an exit status\n%s", tail(res.Output, 40))
	}
	return res, nil
}

func findBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if b, err := os.ReadFile(p); err == nil {
			// A dynamically linked busybox would need its libraries in the
			// guest; busybox-static has no PT_INTERP.
			if bytes.Contains(b[:min(len(b), 4096)], []byte("/lib64/ld-linux")) {
				return "", fmt.Errorf("%s is dynamically linked; install busybox-static", p)
			}
			return p, nil
		}
	}
	return "", errors.New("busybox not found; install busybox-static")
}

func initScript(opts Options) string {
	var b strings.Builder
	b.WriteString("#!/bin/busybox sh\n")
	b.WriteString("/bin/busybox --install -s /bin\nexport PATH=/bin\n")
	b.WriteString("mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n")
	b.WriteString("mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\n")
	fmt.Fprintf(&b, "echo \"%s $(cut -d' ' -f1 /proc/uptime)\"\n", markerUp)
	fmt.Fprintf(&b, "for m in $(cat /modules.order); do insmod /lib/modules/$m || echo \"%s-FAIL $m\"; done\n", markerMods)
	fmt.Fprintf(&b, "echo \"%s-LOADED $(cut -d' ' -f1 /proc/uptime)\"\n", markerMods)
	if opts.Network {
		b.WriteString("ip link set lo up\nip link set eth0 up\nip addr add 10.0.2.15/24 dev eth0\nip route add default via " + GuestHostIP + "\n")
	}
	b.WriteString("cd /tmp\n")
	for _, e := range opts.Env {
		fmt.Fprintf(&b, "export %s\n", shellQuote(e))
	}
	b.WriteString("/guest.test")
	for _, a := range opts.Args {
		b.WriteString(" " + shellQuote(a))
	}
	b.WriteString(" 2>&1\nrc=$?\n")
	fmt.Fprintf(&b, "echo \"%s$rc\"\n", markerExit)
	b.WriteString("poweroff -f\n")
	return b.String()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestResult is one test's outcome as `go test -v` printed it in the guest.
type TestResult struct {
	Name    string
	Outcome string // PASS, FAIL or SKIP
	Elapsed time.Duration
	// Output holds the test's log lines (failure messages, skip reason).
	Output []string
}

var (
	resultRE = regexp.MustCompile(`--- (PASS|FAIL|SKIP): (\S+) \(([0-9.]+)s\)`)
	runRE    = regexp.MustCompile(`=== (RUN|CONT|NAME|PAUSE)\s+(\S+)`)
)

// ParseGoTest extracts test results from `go test -v` output. Markers are
// found anywhere in a line (console noise can precede them). With -v, a
// test's log lines stream between its "=== RUN"/"=== NAME" header and its
// result line, so indented lines are attributed to the test named last;
// this is exact for tests that do not run in parallel.
func ParseGoTest(out string) []TestResult {
	var res []TestResult
	logs := map[string][]string{}
	cur := ""
	for _, line := range strings.Split(out, "\n") {
		if m := resultRE.FindStringSubmatch(line); m != nil {
			secs, _ := strconv.ParseFloat(m[3], 64)
			res = append(res, TestResult{Name: m[2], Outcome: m[1], Elapsed: time.Duration(secs * float64(time.Second))})
			cur = ""
			continue
		}
		if m := runRE.FindStringSubmatch(line); m != nil {
			cur = m[2]
			continue
		}
		if cur != "" && strings.HasPrefix(line, "    ") {
			logs[cur] = append(logs[cur], strings.TrimSpace(line))
		}
	}
	for i := range res {
		res[i].Output = logs[res[i].Name]
	}
	sort.SliceStable(res, func(i, j int) bool { return res[i].Name < res[j].Name })
	return res
}

// BuildTestBinary compiles the test binary of the package in pkgDir as a
// static executable (CGO_ENABLED=0) at out, for running in the guest.
func BuildTestBinary(ctx context.Context, pkgDir, out string) error {
	cmd := exec.CommandContext(ctx, "go", "test", "-c", "-o", out, ".")
	cmd.Dir = pkgDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go test -c in %s: %w: %s", pkgDir, err, b)
	}
	return nil
}

// InGuestEnv is set (to "1") in the environment of binaries run by the
// harness, so a test binary can tell it is the guest side.
const InGuestEnv = "MINIPROXY_IN_GUEST"
