package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseGoTestFindsMarkersInNoisyLines(t *testing.T) {
	out := "\x1b[2J\x1b[01;01H=== RUN   TestKernel\n" +
		"=== RUN   TestKernel/A\n" +
		"    k_test.go:10: boom\n" +
		"=== RUN   TestKernel/B\n" +
		"    k_test.go:20: no dummy driver\n" +
		"--- FAIL: TestKernel (1.50s)\n" +
		"    --- FAIL: TestKernel/A (1.00s)\n" +
		"    --- SKIP: TestKernel/B (0.25s)\n" +
		"\x1b[0mFAIL\n"
	got := ParseGoTest(out)
	want := map[string]string{"TestKernel": "FAIL", "TestKernel/A": "FAIL", "TestKernel/B": "SKIP"}
	if len(got) != len(want) {
		t.Fatalf("got %d results, want %d: %+v", len(got), len(want), got)
	}
	for _, r := range got {
		if want[r.Name] != r.Outcome {
			t.Errorf("%s: outcome %s, want %s", r.Name, r.Outcome, want[r.Name])
		}
	}
	if got[1].Name != "TestKernel/A" || len(got[1].Output) != 1 || !strings.Contains(got[1].Output[0], "boom") {
		t.Errorf("A's log not attributed: %+v", got[1])
	}
	if got[2].Elapsed != 250*time.Millisecond || !strings.Contains(strings.Join(got[2].Output, " "), "no dummy") {
		t.Errorf("B: %+v", got[2])
	}
}

func TestParseModinfo(t *testing.T) {
	data := []byte("license=GPL\x00softdep=pre: crc32c post: foo\x00depends=nf_conntrack,nf_defrag_ipv6\x00")
	deps, soft, err := parseModinfo(data)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(deps, ",") != "nf_conntrack,nf_defrag_ipv6" || strings.Join(soft, ",") != "crc32c" {
		t.Fatalf("deps %v soft %v", deps, soft)
	}
}

// TestInitramfsLayout decodes the archive with a minimal newc reader and
// checks names, modes, contents and the order of parents before children.
func TestInitramfsLayout(t *testing.T) {
	dir := t.TempDir()
	host := filepath.Join(dir, "f")
	if err := os.WriteFile(host, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	rd := NewInitramfs()
	rd.AddFile("lib/modules/a/b.ko", host, 0o644)
	rd.AddData("init", []byte("#!/bin/sh\n"), 0o755)
	rd.AddSymlink("bin/sh", "busybox")
	out := filepath.Join(dir, "rd.gz")
	if err := rd.WriteFile(out); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(out)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(zr)
	type rec struct {
		mode uint64
		data string
	}
	got := map[string]rec{}
	var order []string
	for off := 0; off < len(raw); {
		h := string(raw[off : off+110])
		if !strings.HasPrefix(h, "070701") {
			t.Fatalf("bad magic at %d: %q", off, h[:6])
		}
		field := func(i int) uint64 {
			var v uint64
			for _, c := range h[6+8*i : 14+8*i] {
				v = v*16 + uint64(strings.IndexRune("0123456789ABCDEF", c))
			}
			return v
		}
		mode, size, nsize := field(1), int(field(6)), int(field(11))
		name := string(raw[off+110 : off+110+nsize-1])
		off += (110 + nsize + 3) &^ 3
		data := string(raw[off : off+size])
		off += (size + 3) &^ 3
		if name == "TRAILER!!!" {
			break
		}
		got[name] = rec{mode, data}
		order = append(order, name)
	}
	if got["lib/modules/a/b.ko"].data != "hello" || got["init"].mode != 0o100755 || got["bin/sh"].mode != 0o120777 || got["bin/sh"].data != "busybox" {
		t.Fatalf("unexpected archive: %+v", got)
	}
	pos := map[string]int{}
	for i, n := range order {
		pos[n] = i
	}
	if !(pos["lib"] < pos["lib/modules"] && pos["lib/modules"] < pos["lib/modules/a"] && pos["lib/modules/a"] < pos["lib/modules/a/b.ko"]) {
		t.Fatalf("parents must precede children: %v", order)
	}
}

// TestModuleOrderRealKernel checks the dependency order on the cached Debian
// kernel: libcrc32c's crypto soft dependency and ip_vs's hard ones.
func TestModuleOrderRealKernel(t *testing.T) {
	k, err := findKernel(filepath.Join(CacheDir(), "root"))
	if err != nil {
		t.Skipf("skipping: kernel package not cached (%v); TestGuestSelf fetches it", err)
	}
	order, err := k.ModuleOrder("ip_vs", "dummy")
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range order {
		pos[strings.TrimSuffix(filepath.Base(m), ".ko")] = i + 1
	}
	for _, pair := range [][2]string{{"crc32c_generic", "libcrc32c"}, {"libcrc32c", "nf_conntrack"}, {"nf_conntrack", "ip_vs"}} {
		if pos[pair[0]] == 0 || pos[pair[1]] == 0 || pos[pair[0]] > pos[pair[1]] {
			t.Errorf("%s must load before %s: %v", pair[0], pair[1], order)
		}
	}
	if pos["dummy"] == 0 {
		t.Errorf("dummy missing: %v", order)
	}
}

// TestGuestSelf boots the guest with this package's own test binary and
// checks that the requested modules are usable inside it. It is the runner's
// end-to-end proof; -short skips it.
func TestGuestSelf(t *testing.T) {
	if os.Getenv(InGuestEnv) != "" {
		t.Skip("already inside the guest")
	}
	if testing.Short() {
		t.Skip("skipping guest boot in -short mode")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "guest.test")
	if err := BuildTestBinary(ctx, ".", bin); err != nil {
		t.Fatal(err)
	}
	// A loopback server the guest must reach through qemu user networking
	// (10.0.2.2 is this namespace's loopback as seen from the guest).
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "hello-from-host")
			c.Close()
		}
	}()
	var console bytes.Buffer
	res, err := Run(ctx, Options{
		Binary:  bin,
		Args:    []string{"-test.v", "-test.run", "^TestInGuest$"},
		Env:     []string{InGuestEnv + "=1", "MINIPROXY_GUEST_HOSTPORT=" + net.JoinHostPort(GuestHostIP, fmt.Sprint(ln.Addr().(*net.TCPAddr).Port))},
		Modules: []string{"ip_vs", "dummy"},
		Network: true,
		Timeout: 3 * time.Minute,
		Console: &console,
	})
	if errors.Is(err, ErrUnavailable) && Required() {
		t.Fatalf("the guest was required (%s=1) but cannot run: %v", RequiredEnv, err)
	}
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("skipping: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s, initramfs %d bytes, boot %v, modules %v, total %v", res.KernelRelease, res.InitramfsBytes, res.Boot, res.Modules, res.Total)
	if len(res.FailedModules) > 0 {
		t.Errorf("modules failed to load: %v", res.FailedModules)
	}
	results := ParseGoTest(res.Output)
	if res.ExitCode != 0 || len(results) != 1 || results[0].Outcome != "PASS" {
		t.Fatalf("guest exit %d, results %+v\n%s", res.ExitCode, results, tail(res.Output, 30))
	}
}

// TestInGuest runs only inside the guest (see TestGuestSelf).
func TestInGuest(t *testing.T) {
	if os.Getenv(InGuestEnv) == "" {
		t.Skip("runs only inside the guest")
	}
	if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
		t.Fatalf("ip_vs not loaded in guest: %v", err)
	}
	b, err := os.ReadFile("/proc/modules")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "dummy ") {
		t.Fatalf("dummy not loaded: %s", b)
	}
	if hp := os.Getenv("MINIPROXY_GUEST_HOSTPORT"); hp != "" {
		c, err := net.DialTimeout("tcp", hp, 10*time.Second)
		if err != nil {
			t.Fatalf("host loopback service unreachable at %s: %v", hp, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "hello-from-host" {
			t.Fatalf("from host: %q %v", line, err)
		}
	}
}

// TestRunWithoutQemuIsUnavailable: a host without qemu must make callers
// skip (ErrUnavailable), never pass silently or fail obscurely.
func TestRunWithoutQemuIsUnavailable(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Run(context.Background(), Options{Binary: "/nonexistent"})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), QemuBinary) {
		t.Fatalf("want ErrUnavailable naming %s, got %v", QemuBinary, err)
	}
}
