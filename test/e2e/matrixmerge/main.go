// Command matrixmerge folds the IPVS results of the qemu guest suite
// (e2e-results/ipvs-guest*.json) into the e2e matrix written by the namespace
// e2e suite, so e2e-matrix.md shows every mode in one table. The host kernel
// has no IPVS, so the ipvs column of host-run rows says where its cases ran.
//
//	go run ./test/e2e/matrixmerge [results-dir]
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

type guestFile struct {
	Kernel       string             `json:"kernel"`
	BootSeconds  float64            `json:"boot_seconds"`
	TotalSeconds float64            `json:"total_seconds"`
	Matrix       []framework.Result `json:"matrix"`
}

func main() {
	dir := "e2e-results"
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	if err := run(dir); err != nil {
		fmt.Fprintf(os.Stderr, "matrixmerge: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	var host []framework.Result
	data, err := os.ReadFile(filepath.Join(dir, "e2e-matrix.json"))
	if err != nil {
		return fmt.Errorf("read the e2e matrix (run the e2e suite first): %w", err)
	}
	if err := json.Unmarshal(data, &host); err != nil {
		return fmt.Errorf("parse e2e-matrix.json: %w", err)
	}
	// Fault-suite rows written outside the e2e package (test/crashtest:
	// crash-<mode>.json, a list of rows).
	faults, _ := filepath.Glob(filepath.Join(dir, "crash-*.json"))
	for _, f := range faults {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		var rows []framework.Result
		if err := json.Unmarshal(data, &rows); err != nil {
			return fmt.Errorf("parse %s: %w", f, err)
		}
		host = append(host, rows...)
	}
	guests, _ := filepath.Glob(filepath.Join(dir, "ipvs-guest*.json"))
	m := framework.NewMatrix(framework.KnownModes...)
	var notes []string
	for _, r := range host {
		if r.Mode == "ipvs" && r.Status == "skip" && len(guests) > 0 {
			r.Reason = "host kernel has no IPVS; IPVS cases run in the qemu guest (rows marked guest)"
		}
		m.Set(r)
	}
	for _, g := range guests {
		data, err := os.ReadFile(g)
		if err != nil {
			return err
		}
		var gf guestFile
		if err := json.Unmarshal(data, &gf); err != nil {
			return fmt.Errorf("parse %s: %w", g, err)
		}
		notes = append(notes, fmt.Sprintf("%s: kernel %s, boot %.1f s, total %.1f s", filepath.Base(g), gf.Kernel, gf.BootSeconds, gf.TotalSeconds))
		for _, r := range gf.Matrix {
			r.Feature = "guest: " + r.Feature
			m.Set(r)
		}
	}
	header := "Merged from the namespace e2e suite (host kernel) and the IPVS qemu guest suite.\n\n"
	if len(notes) > 0 {
		header += "Guest runs: " + strings.Join(notes, "; ") + "."
	} else {
		header += "No guest results found: the IPVS column is empty (run `make guest`)."
	}
	return m.Write(dir, header)
}
