// Package framework builds a real test bed for miniproxy on one machine: etcd
// and kube-apiserver inside a control-plane network namespace, N "node"
// namespaces joined by an underlay bridge namespace, "pods" as namespaces on
// each node's pod bridge running bin/podserver, and one miniproxy per node.
// The e2e tests (test/e2e) and the lab (hack/lab) both use it, so it reports
// errors instead of taking a *testing.T; suite.go adapts it for tests.
//
// Why a control-plane namespace: kube-apiserver needs a non-loopback
// --advertise-address it owns, and nothing may be added to the root
// namespace. Inside its own namespace the control plane gets an underlay
// address (and the default ports 2379/6443 are always free there, so two runs
// never collide on ports), node namespaces reach it over the underlay like a
// real cluster, and the test process reaches it with a dialer that creates
// its sockets inside that namespace (NetNS.DialContext).
//
// Everything a run creates is named mpe-<pid>-<rand>-…; a later run deletes
// namespaces whose owning pid is gone (a run killed by SIGKILL or a test
// timeout), and child processes die with the test process (Pdeathsig).
package framework

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// K8sVersion is the upstream version hack/provision.sh builds.
const K8sVersion = "v1.37.2"

// EtcdVersion is the etcd hack/provision.sh builds (hack/etcd pins it).
const EtcdVersion = "v3.6.16"

// Env describes where things are and owns the cleanup stack of one run.
type Env struct {
	ID      string // unique per run: mpe-<pid>-<rand>
	Root    string // repository root
	BinDir  string // repo bin/ (miniproxy, podserver from `make build`)
	K8sBin  string // kube-apiserver, kubectl, kube-proxy
	Etcd    string
	WorkDir string // data dirs, certs, logs of this run
	Log     func(format string, args ...any)

	cleanups Cleanups
}

// Options tune NewEnv.
type Options struct {
	// Log receives progress lines; nil discards them.
	Log func(format string, args ...any)
	// KeepWorkDir leaves data dirs and logs on disk after Close.
	KeepWorkDir bool
}

// RequireRoot explains why the framework cannot run, or returns nil.
func RequireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, veth, iptables inside them); run as root, e.g. `sudo make test`")
	}
	for _, b := range []string{"ip", "iptables", "nft", "conntrack"} {
		if p := absPath(b); !filepath.IsAbs(p) {
			return fmt.Errorf("%s not installed: run hack/provision.sh (installs iptables nftables conntrack iproute2 ipset)", b)
		}
	}
	return nil
}

// NewEnv locates the repository, the provisioned binaries and a work
// directory. It fails with a message naming the command that fixes it.
func NewEnv(opts Options) (*Env, error) {
	if err := RequireRoot(); err != nil {
		return nil, err
	}
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	e := &Env{
		ID:     fmt.Sprintf("mpe-%d-%s", os.Getpid(), hex.EncodeToString(b[:])),
		Root:   root,
		BinDir: filepath.Join(root, "bin"),
		Log:    opts.Log,
	}
	if e.Log == nil {
		e.Log = func(string, ...any) {}
	}
	if e.K8sBin, err = k8sBinDir(); err != nil {
		return nil, err
	}
	if e.Etcd, err = etcdBin(e.K8sBin); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(e.BinDir, "podserver")); err != nil {
		return nil, fmt.Errorf("%s/podserver missing: run `make build`", e.BinDir)
	}
	reapStale(e.Log)
	if e.WorkDir, err = os.MkdirTemp("", e.ID+"-"); err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	if !opts.KeepWorkDir {
		e.Defer("remove work dir", func() error { return os.RemoveAll(e.WorkDir) })
	}
	return e, nil
}

// MiniproxyBin returns bin/miniproxy or an error saying how to build it.
func (e *Env) MiniproxyBin() (string, error) {
	p := filepath.Join(e.BinDir, "miniproxy")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s missing: run `make build` (cmd/miniproxy)", p)
	}
	return p, nil
}

// Defer registers a cleanup; cleanups run last-in first-out in Close.
func (e *Env) Defer(what string, fn func() error) { e.cleanups.Add(what, fn) }

// Close runs every cleanup once and joins their errors.
func (e *Env) Close() error { return e.cleanups.Run(e.Log) }

// HandleSignals tears the run down on SIGINT/SIGTERM and then exits, so an
// interrupted run leaves no namespaces or processes behind. before runs first
// (e.g. to write partial results). The returned func stops the handler.
func (e *Env) HandleSignals(before func()) (stop func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, os.Interrupt, syscall.SIGTERM)
	// When `go test` itself is interrupted it exits and closes our stderr
	// pipe; a progress line written during teardown would then raise
	// SIGPIPE and kill us halfway, leaving namespaces behind.
	signal.Ignore(syscall.SIGPIPE)
	done := make(chan struct{})
	go func() {
		select {
		case sig := <-ch:
			fmt.Fprintf(os.Stderr, "miniproxy e2e: got %v, tearing down %s\n", sig, e.ID)
			if before != nil {
				before()
			}
			_ = e.Close()
			os.Exit(130)
		case <-done:
		}
	}()
	return func() { signal.Stop(ch); close(done) }
}

// Cleanups is a LIFO stack of teardown steps that runs at most once.
type Cleanups struct {
	mu    sync.Mutex
	steps []cleanupStep
	// running serializes Run: a second caller (the signal handler racing
	// TestMain) waits until the first has finished instead of returning
	// while a process is still being stopped.
	running sync.Mutex
}

type cleanupStep struct {
	what string
	fn   func() error
}

// Add pushes a step.
func (c *Cleanups) Add(what string, fn func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.steps = append(c.steps, cleanupStep{what, fn})
}

// Run pops and runs all steps, newest first.
func (c *Cleanups) Run(log func(string, ...any)) error {
	c.running.Lock()
	defer c.running.Unlock()
	var errs []error
	for {
		c.mu.Lock()
		if len(c.steps) == 0 {
			c.mu.Unlock()
			return errors.Join(errs...)
		}
		s := c.steps[len(c.steps)-1]
		c.steps = c.steps[:len(c.steps)-1]
		c.mu.Unlock()
		if err := s.fn(); err != nil {
			log("cleanup %s: %v", s.what, err)
			errs = append(errs, fmt.Errorf("%s: %w", s.what, err))
		}
	}
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("getwd: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && regexp.MustCompile(`(?m)^module github.com/miniproxy/miniproxy$`).Match(b) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no miniproxy go.mod above %s", dir)
		}
	}
}

// k8sBinDir finds the binaries hack/provision.sh built:
// $MINIPROXY_K8S_BIN, else $MINIPROXY_CACHE/k8s/current.
func k8sBinDir() (string, error) {
	dir := os.Getenv("MINIPROXY_K8S_BIN")
	if dir == "" {
		cache := os.Getenv("MINIPROXY_CACHE")
		if cache == "" {
			cache = "/var/cache/miniproxy"
		}
		dir = filepath.Join(cache, "k8s", "current")
	}
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver")); err != nil {
		return "", fmt.Errorf("kube-apiserver %s not provisioned (looked in %s): run `bash hack/provision.sh` (or `make e2e`, which runs it first)", K8sVersion, dir)
	}
	return filepath.EvalSymlinks(dir)
}

// etcdBin finds the etcd that hack/provision.sh built next to kube-apiserver,
// or the one MINIPROXY_ETCD names. An etcd on PATH is not taken silently: a
// distribution's older etcd (Debian 12 ships 3.4.23) lacks watch progress
// requests, so kube-apiserver turns every informer's streaming initial list
// into a plain LIST and the run measures something else.
func etcdBin(k8sBin string) (string, error) {
	if p := os.Getenv("MINIPROXY_ETCD"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("MINIPROXY_ETCD: %w", err)
		}
		return p, nil
	}
	p := filepath.Join(k8sBin, "etcd")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("etcd not provisioned (looked for %s): run `bash hack/provision.sh`, which builds etcd %s, or set MINIPROXY_ETCD", p, EtcdVersion)
	}
	return p, nil
}

var staleName = regexp.MustCompile(`^mpe-(\d+)-[0-9a-f]+-`)

// reapStale deletes namespaces left by runs whose process is gone. A live
// pid's namespaces are never touched, so parallel runs are safe.
func reapStale(log func(string, ...any)) {
	ents, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, ent := range ents {
		m := staleName.FindStringSubmatch(ent.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid() || syscall.Kill(pid, 0) == nil || errors.Is(syscall.Kill(pid, 0), syscall.EPERM) {
			continue
		}
		ns := &NetNS{Name: ent.Name()}
		killNetNSProcs(ns)
		if err := ns.Delete(); err == nil {
			log("removed stale namespace %s (pid %d gone)", ent.Name(), pid)
		}
	}
}

// killNetNSProcs kills processes still running inside a stale namespace.
func killNetNSProcs(ns *NetNS) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := execOutput(ctx, ipBin(), "netns", "pids", ns.Name)
	if err != nil {
		return
	}
	for _, f := range regexp.MustCompile(`\d+`).FindAllString(out, -1) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func execOutput(ctx context.Context, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %v: %w: %s", bin, args, err, out)
	}
	return string(out), nil
}

// logFile opens a log file in the work dir.
func (e *Env) logFile(name string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(e.WorkDir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log file %s: %w", name, err)
	}
	return f, nil
}

// tail returns the last n bytes of a file, for failure reports.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}
