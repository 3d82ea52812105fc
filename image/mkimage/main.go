// Command mkimage builds miniproxy's image without a container engine (see
// package image) and writes it as an archive that docker load, ctr images
// import and kind load image-archive all read. It prints the image digest.
//
//	go run ./image/mkimage -o bin/miniproxy-image.tar [-tag miniproxy:dev]...
//
// With -rootfs DIR it writes the image's files into DIR instead (the
// Dockerfile's build stage does this, so both builds ship the same files).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/miniproxy/miniproxy/image"
)

type tagList []string

func (t *tagList) String() string     { return strings.Join(*t, ",") }
func (t *tagList) Set(s string) error { *t = append(*t, s); return nil }

func main() {
	os.Exit(run())
}

func run() int {
	var (
		out, rootfs, src, version, cache, goCmd string
		tags                                    tagList
	)
	cacheDefault := os.Getenv("MINIPROXY_CACHE")
	if cacheDefault == "" {
		cacheDefault = "/var/cache/miniproxy"
	}
	flag.StringVar(&out, "o", "", "write the image archive here")
	flag.StringVar(&rootfs, "rootfs", "", "write the image's files into this (new) directory instead")
	flag.Var(&tags, "tag", "image name and tag, repeatable (default "+image.DefaultTag+")")
	flag.StringVar(&src, "src", ".", "repository root")
	flag.StringVar(&version, "version", "", "version stamped into miniproxy (default: git describe)")
	flag.StringVar(&cache, "cache", filepath.Join(cacheDefault, "image"), "where downloaded .debs are kept between builds (\"\" keeps none)")
	flag.StringVar(&goCmd, "go", "go", "the go command")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if (out == "") == (rootfs == "") {
		fmt.Fprintln(os.Stderr, "mkimage: give exactly one of -o FILE and -rootfs DIR")
		return 2
	}
	if len(tags) == 0 {
		tags = tagList{image.DefaultTag}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if version == "" {
		version = image.GitVersion(ctx, src)
	}
	// SOURCE_DATE_EPOCH (reproducible-builds.org) or the epoch: no build
	// time leaks into the image.
	created := time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mkimage: SOURCE_DATE_EPOCH=%q: %v\n", s, err)
			return 2
		}
		created = time.Unix(sec, 0).UTC()
	}
	work, err := os.MkdirTemp("", "mkimage-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	defer os.RemoveAll(work)
	start := time.Now()
	layers, debs, err := image.Build(ctx, image.Options{
		Log: log, SourceDir: src, Version: version, Go: goCmd, CacheDir: cache, WorkDir: work, Created: created,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	if rootfs != "" {
		var all []image.Entry
		for _, l := range layers {
			all = append(all, l.Entries...)
		}
		if err := image.WriteDir(rootfs, all); err != nil {
			fmt.Fprintf(os.Stderr, "mkimage: write %s: %v\n", rootfs, err)
			return 1
		}
		log.Info("wrote the image's files", "dir", rootfs, "took", time.Since(start).Round(time.Millisecond))
		return 0
	}
	var pkgs []string
	for _, d := range debs {
		pkgs = append(pkgs, d.Package+"="+d.Version)
	}
	img, err := image.NewImage(layers, image.Config{Created: created, Labels: map[string]string{
		"org.opencontainers.image.title":   "miniproxy",
		"org.opencontainers.image.version": version,
		"io.miniproxy.debian-packages":     strings.Join(pkgs, " "),
	}})
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	var buf bytes.Buffer
	if err := image.WriteArchive(&buf, img, tags); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	tmp := out + ".partial"
	if err := os.WriteFile(tmp, buf.Bytes(), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	if err := os.Rename(tmp, out); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	d, _ := img.Digest()
	log.Info("wrote the image", "file", out, "tags", tags.String(), "version", version, "size", buf.Len(), "took", time.Since(start).Round(time.Millisecond))
	fmt.Println(d.String())
	return 0
}
