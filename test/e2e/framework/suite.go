package framework

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// KnownModes are the proxy modes every per-mode feature runs in, in matrix
// column order.
var KnownModes = []string{"iptables", "nftables", "ipvs"}

// ModeIndependent is the matrix column for features that do not depend on
// the proxy mode (manifests, RBAC, the test bed itself).
const ModeIndependent = "mode-independent"

// Suite is the state one `go test ./test/e2e` process shares between tests:
// one control plane, per-mode nodes with miniproxy running, the matrix. It
// is created in TestMain; its Close tears everything down (also on
// SIGINT/SIGTERM) and writes the matrix.
type Suite struct {
	Matrix     *Matrix
	ResultsDir string
	// Enabled modes (MINIPROXY_E2E_MODES, default "iptables"); the other
	// known modes appear in the matrix as skipped with DisabledReason.
	Enabled        []string
	DisabledReason map[string]string
	// NodesPerMode is how many node namespaces each mode gets (default 2).
	NodesPerMode int

	start       time.Time
	setupOnce   sync.Once
	env         *Env
	cluster     *Cluster
	setupErr    error
	stopSignals func()

	mu    sync.Mutex
	modes map[string]*ModeEnv
}

// ModeEnv is a set of nodes running miniproxy in one mode.
type ModeEnv struct {
	Mode    string
	Cluster *Cluster
	Nodes   []*Node
	Proxies []*Proxy
	err     error
}

// NewSuite reads MINIPROXY_E2E_MODES and MINIPROXY_E2E_RESULTS (default
// <repo>/e2e-results).
func NewSuite() *Suite {
	s := &Suite{
		Matrix:         NewMatrix(append([]string{ModeIndependent}, KnownModes...)...),
		DisabledReason: map[string]string{},
		NodesPerMode:   2,
		start:          time.Now(),
		modes:          map[string]*ModeEnv{},
	}
	modes := os.Getenv("MINIPROXY_E2E_MODES")
	if modes == "" {
		modes = "iptables"
	}
	for _, m := range strings.Split(modes, ",") {
		if m = strings.TrimSpace(m); m != "" {
			s.Enabled = append(s.Enabled, m)
		}
	}
	for _, m := range KnownModes {
		if !slices.Contains(s.Enabled, m) {
			s.DisabledReason[m] = "mode not enabled in this run (MINIPROXY_E2E_MODES=" + modes + ")"
		}
	}
	if slices.Contains(s.Enabled, "ipvs") {
		if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
			s.DisabledReason["ipvs"] = "this kernel has no ip_vs (IPVS tests run in a qemu guest, not here)"
		}
	}
	s.ResultsDir = os.Getenv("MINIPROXY_E2E_RESULTS")
	if s.ResultsDir == "" {
		if root, err := repoRoot(); err == nil {
			s.ResultsDir = filepath.Join(root, "e2e-results")
		} else {
			s.ResultsDir = "e2e-results"
		}
	}
	return s
}

// Logf prints a progress line with the time since the suite started.
func (s *Suite) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[e2e %6.1fs] %s\n", time.Since(s.start).Seconds(), fmt.Sprintf(format, args...))
}

// Cluster returns the shared cluster, starting it on first use. Without root
// it skips (recording why in row); when provisioning is missing or setup
// fails it fails the test with the reason.
func (s *Suite) Cluster(t testing.TB, row *Row) *Cluster {
	t.Helper()
	if err := RequireRoot(); err != nil {
		row.Skip(err.Error())
	}
	s.setupOnce.Do(func() {
		s.env, s.setupErr = NewEnv(Options{Log: s.Logf})
		if s.setupErr != nil {
			return
		}
		s.stopSignals = s.env.HandleSignals(func() { _ = s.writeMatrix() })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		s.cluster, s.setupErr = StartCluster(ctx, s.env)
	})
	if s.setupErr != nil {
		row.Note("setup: " + firstLine(s.setupErr.Error()))
		t.Fatalf("e2e setup failed: %v", s.setupErr)
	}
	return s.cluster
}

// Mode returns the nodes of mode with miniproxy running on each, creating
// them on first use. A disabled mode skips with its reason.
func (s *Suite) Mode(t testing.TB, row *Row, mode string) *ModeEnv {
	t.Helper()
	if why, off := s.DisabledReason[mode]; off {
		row.Skip(why)
	}
	c := s.Cluster(t, row)
	s.mu.Lock()
	me, ok := s.modes[mode]
	if !ok {
		me = &ModeEnv{Mode: mode, Cluster: c}
		s.modes[mode] = me
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		me.err = me.setup(ctx, s.NodesPerMode)
		cancel()
	}
	s.mu.Unlock()
	if me.err != nil {
		row.Note(mode + " setup: " + firstLine(me.err.Error()))
		t.Fatalf("%s: %v", mode, me.err)
	}
	return me
}

func (me *ModeEnv) setup(ctx context.Context, n int) error {
	prefix := map[string]string{"iptables": "ipt", "nftables": "nft", "ipvs": "ipvs"}[me.Mode]
	if prefix == "" {
		prefix = me.Mode
	}
	nodes, err := me.Cluster.AddNodes(ctx, prefix+"-node", n)
	if err != nil {
		return err
	}
	me.Nodes = nodes
	for _, node := range nodes {
		p, err := me.Cluster.StartProxy(ctx, node, ProxyOptions{Mode: me.Mode})
		if p != nil {
			me.Proxies = append(me.Proxies, p)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// DumpOnFailure registers a cleanup that prints every proxy's log and the
// node rules when t failed.
func (me *ModeEnv) DumpOnFailure(t testing.TB) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, p := range me.Proxies {
			t.Logf("--- miniproxy %s on %s (%s) ---\n%s", p.Mode, p.Node.Name, p.LogPath(), p.Logs())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, n := range me.Nodes {
			rules, err := n.Rules(ctx, me.Mode)
			t.Logf("--- rules on %s (err=%v) ---\n%s", n.Name, err, truncate(rules, 12000))
		}
	})
}

// ForEachMode runs fn as a subtest per known mode, tracking feature in the
// matrix; disabled modes are recorded as skipped.
func (s *Suite) ForEachMode(t *testing.T, feature string, fn func(t *testing.T, me *ModeEnv, row *Row)) {
	for _, mode := range KnownModes {
		t.Run(mode, func(t *testing.T) {
			row := s.Matrix.Track(t, feature, mode)
			me := s.Mode(t, row, mode)
			me.DumpOnFailure(t)
			fn(t, me, row)
		})
	}
}

// Close tears down the cluster and writes the matrix; TestMain calls it.
func (s *Suite) Close() error {
	var errs []error
	if s.env != nil {
		s.Logf("tearing down %s", s.env.ID)
		errs = append(errs, s.env.Close())
		s.stopSignals()
	}
	errs = append(errs, s.writeMatrix())
	return errors.Join(errs...)
}

func (s *Suite) writeMatrix() error {
	header := fmt.Sprintf("Modes enabled: %s. kube-apiserver %s, etcd %s.", strings.Join(s.Enabled, ", "), K8sVersion, EtcdVersion)
	if err := s.Matrix.Write(s.ResultsDir, header); err != nil {
		return err
	}
	s.Logf("matrix written to %s/e2e-matrix.md %v", s.ResultsDir, s.Matrix.Summary())
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "\n…(truncated)"
}

// PlainNodes returns two nodes without miniproxy (created on first use), for
// tests of the test bed itself.
func (s *Suite) PlainNodes(t testing.TB, row *Row) []*Node {
	t.Helper()
	c := s.Cluster(t, row)
	s.mu.Lock()
	defer s.mu.Unlock()
	me, ok := s.modes[""]
	if !ok {
		me = &ModeEnv{Cluster: c}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		me.Nodes, me.err = c.AddNodes(ctx, "net-node", 2)
		cancel()
		s.modes[""] = me
	}
	if me.err != nil {
		row.Note("node setup: " + firstLine(me.err.Error()))
		t.Fatalf("node setup: %v", me.err)
	}
	return me.Nodes
}
