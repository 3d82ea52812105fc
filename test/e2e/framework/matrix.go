package framework

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Result of one feature in one mode.
type Result struct {
	Feature string `json:"feature"`
	Mode    string `json:"mode"`
	Status  string `json:"status"` // pass | fail | skip
	Reason  string `json:"reason,omitempty"`
	Test    string `json:"test,omitempty"`
}

// Matrix collects feature × mode results and writes e2e-matrix.md. Tests add
// rows with Track; a feature that is declared but never run in a mode shows
// as "skip" with the declared reason, so gaps stay visible.
type Matrix struct {
	mu       sync.Mutex
	modes    []string
	features []string
	results  map[[2]string]Result
}

// NewMatrix creates an empty matrix with the given mode columns.
func NewMatrix(modes ...string) *Matrix {
	return &Matrix{modes: modes, results: map[[2]string]Result{}}
}

// Set records a result (the last one for a feature/mode wins, except that a
// failure is never overwritten by a pass).
func (m *Matrix) Set(r Result) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !slices.Contains(m.features, r.Feature) {
		m.features = append(m.features, r.Feature)
	}
	if !slices.Contains(m.modes, r.Mode) {
		m.modes = append(m.modes, r.Mode)
	}
	k := [2]string{r.Feature, r.Mode}
	if old, ok := m.results[k]; ok && old.Status == "fail" && r.Status != "fail" {
		return
	}
	m.results[k] = r
}

// Row tracks one feature in one mode for a running test.
type Row struct {
	m      *Matrix
	t      testing.TB
	res    Result
	reason string
}

// Track registers a t.Cleanup that records pass / fail / skip for feature
// in mode when t ends. Call it first in the test so it runs last and sees
// failures from other cleanups too.
func (m *Matrix) Track(t testing.TB, feature, mode string) *Row {
	t.Helper()
	r := &Row{m: m, t: t, res: Result{Feature: feature, Mode: mode, Test: t.Name()}}
	t.Cleanup(func() {
		switch {
		case t.Failed():
			r.res.Status = "fail"
			r.res.Reason = r.reason
			if r.res.Reason == "" {
				r.res.Reason = "see `" + t.Name() + "` in the test log"
			}
		case t.Skipped():
			r.res.Status = "skip"
			r.res.Reason = r.reason
		default:
			r.res.Status = "pass"
		}
		m.Set(r.res)
	})
	return r
}

// Skip records why and skips the test.
func (r *Row) Skip(reason string) {
	r.t.Helper()
	r.reason = reason
	r.t.Skip(reason)
}

// Note sets the reason shown if the test fails (e.g. the step it was in).
func (r *Row) Note(reason string) { r.reason = reason }

// Write writes e2e-matrix.md and e2e-matrix.json into dir.
func (m *Matrix) Write(dir string, header string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# miniproxy e2e matrix\n\n%s\n\nGenerated %s.\n\n", header, time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&b, "| feature | %s |\n|---|%s\n", strings.Join(m.modes, " | "), strings.Repeat("---|", len(m.modes)))
	var all []Result
	for _, f := range m.features {
		fmt.Fprintf(&b, "| %s |", f)
		for _, mode := range m.modes {
			r, ok := m.results[[2]string{f, mode}]
			if !ok {
				fmt.Fprintf(&b, " — |")
				continue
			}
			all = append(all, r)
			cell := r.Status
			if r.Reason != "" {
				cell += ": " + strings.ReplaceAll(r.Reason, "|", "/")
			}
			fmt.Fprintf(&b, " %s |", cell)
		}
		b.WriteString("\n")
	}
	if err := os.WriteFile(filepath.Join(dir, "e2e-matrix.md"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write matrix: %w", err)
	}
	js, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal matrix: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "e2e-matrix.json"), js, 0o644); err != nil {
		return fmt.Errorf("write matrix json: %w", err)
	}
	return nil
}

// Summary counts results by status.
func (m *Matrix) Summary() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]int{}
	for _, r := range m.results {
		out[r.Status]++
	}
	return out
}
