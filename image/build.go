package image

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Options say where a build takes its inputs from.
type Options struct {
	Log *slog.Logger
	// SourceDir is the repository root (the Go module).
	SourceDir string
	// Version is stamped into miniproxy (--version) and the image labels.
	Version string
	// Go is the go command.
	Go string
	// CacheDir keeps downloaded .debs between builds; "" caches nothing.
	CacheDir string
	// WorkDir holds extracted packages and built binaries.
	WorkDir string
	// Created is every timestamp in the image.
	Created time.Time
}

// Build returns the image's layers: the Debian userspace (changes only when
// a package does) and then miniproxy with iptables-wrapper.
func Build(ctx context.Context, o Options) ([]Layer, []Deb, error) {
	debs, err := FetchDebs(ctx, o.Log, Packages, o.CacheDir, o.WorkDir)
	if err != nil {
		return nil, nil, err
	}
	base, err := DebianEntries(ctx, debs, filepath.Join(o.WorkDir, "extract"))
	if err != nil {
		return nil, nil, err
	}
	app, err := AppEntries(ctx, o)
	if err != nil {
		return nil, nil, err
	}
	var pkgs []string
	for _, d := range debs {
		pkgs = append(pkgs, d.Package+"="+d.Version)
	}
	return []Layer{
		{CreatedBy: "debian bookworm: " + strings.Join(pkgs, " "), Entries: base},
		{CreatedBy: "miniproxy " + o.Version + ", iptables-wrapper", Entries: app},
	}, debs, nil
}

// DebianEntries extracts debs under dir and returns the files the image
// takes from them, the merged-/usr links, the dpkg status records and the
// empty directories.
func DebianEntries(ctx context.Context, debs []Deb, dir string) ([]Entry, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	tree := NewTree()
	var status []Entry
	for _, d := range debs {
		root := filepath.Join(dir, d.Package)
		ctl, err := Extract(ctx, d, root)
		if err != nil {
			return nil, err
		}
		if err := tree.AddPackage(d.Package, root); err != nil {
			return nil, err
		}
		// distroless's convention: scanners read one control file per
		// package from status.d.
		status = append(status, Entry{Path: "/var/lib/dpkg/status.d/" + d.Package, Type: tar.TypeReg, Mode: 0o644, Data: ctl})
	}
	entries, err := tree.Select(Files, Trees, Packages)
	if err != nil {
		return nil, err
	}
	entries = append(entries, status...)
	for p, target := range MergedUsr {
		entries = append(entries, Entry{Path: p, Type: tar.TypeSymlink, Link: target})
	}
	for p, mode := range EmptyDirs {
		entries = append(entries, Entry{Path: p, Type: tar.TypeDir, Mode: mode})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Path < entries[j].Path })
	return entries, nil
}

// AppEntries builds miniproxy and iptables-wrapper (static, -trimpath) and
// returns them with the wrapper's links.
func AppEntries(ctx context.Context, o Options) ([]Entry, error) {
	bin := filepath.Join(o.WorkDir, "bin")
	var entries []Entry
	for _, b := range []struct{ pkg, dst string }{
		{"./cmd/miniproxy", Miniproxy},
		{"./image/iptables-wrapper", Wrapper},
	} {
		out := filepath.Join(bin, filepath.Base(b.dst))
		if err := GoBuild(ctx, o, b.pkg, out); err != nil {
			return nil, err
		}
		entries = append(entries, Entry{Path: b.dst, Type: tar.TypeReg, Mode: 0o755, Src: out})
	}
	for _, l := range WrapperLinks {
		entries = append(entries, Entry{Path: filepath.Dir(Wrapper) + "/" + l, Type: tar.TypeSymlink, Link: filepath.Base(Wrapper)})
	}
	return entries, nil
}

// GoBuild builds a static binary whose bytes depend only on the source, the
// toolchain and the version: no cgo, no paths, no VCS stamp (the version is
// passed explicitly), no symbol table.
func GoBuild(ctx context.Context, o Options, pkg, out string) error {
	cmd := exec.CommandContext(ctx, o.Go, "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -X main.version="+o.Version, "-o", out, pkg)
	cmd.Dir = o.SourceDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w: %s", pkg, err, bytes.TrimSpace(b))
	}
	f, err := elf.Open(out)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the image needs it static", out)
		}
	}
	return nil
}

// GitVersion describes the source tree: the nearest tag and commit, -dirty
// with uncommitted changes; "dev" outside a git checkout.
func GitVersion(ctx context.Context, dir string) string {
	cmd := exec.CommandContext(ctx, "git", "describe", "--tags", "--always", "--dirty")
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil || len(bytes.TrimSpace(out)) == 0 {
		return "dev"
	}
	return string(bytes.TrimSpace(out))
}
