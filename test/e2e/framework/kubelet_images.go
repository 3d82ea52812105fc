package framework

import (
	"archive/tar"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/miniproxy/miniproxy/image"
)

// Tags of the images the kubelet test bed imports into every node's
// containerd (no registry is reachable: kubelet finds them already present).
const (
	MiniproxyImage     = "miniproxy:dev"      // what deploy/daemonset.yaml names
	MiniproxyImageNext = "miniproxy:e2e-next" // same image, the rolling update's new tag
	PodserverImage     = "miniproxy-e2e/podserver:dev"
)

// TestImages are image archives ready for `ctr images import`.
type TestImages struct {
	Pause, Podserver, Miniproxy string
}

// BuildTestImages builds, into dir: the pause image (a static podserver
// whose entrypoint is `podserver pause`), the podserver image, and
// miniproxy's own image exactly as `make image` builds it (image/mkimage,
// tagged MiniproxyImage and MiniproxyImageNext).
func BuildTestImages(ctx context.Context, e *Env, dir string) (*TestImages, error) {
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	o := image.Options{
		Log: slog.New(slog.DiscardHandler), SourceDir: e.Root, Version: "e2e", Go: goCmd,
		WorkDir: dir, Created: time.Unix(0, 0).UTC(),
	}
	bin := filepath.Join(dir, "podserver")
	if err := image.GoBuild(ctx, o, "./cmd/podserver", bin); err != nil {
		return nil, err
	}
	out := &TestImages{
		Pause:     filepath.Join(dir, "pause.tar"),
		Podserver: filepath.Join(dir, "podserver.tar"),
		Miniproxy: filepath.Join(dir, "miniproxy.tar"),
	}
	for _, im := range []struct {
		path, tag  string
		entrypoint []string
	}{
		{out.Pause, PauseImage, []string{"/podserver", "pause"}},
		{out.Podserver, PodserverImage, []string{"/podserver"}},
	} {
		if err := writeSingleBinaryImage(im.path, im.tag, bin, im.entrypoint); err != nil {
			return nil, err
		}
	}
	cmd := exec.CommandContext(ctx, goCmd, "run", "./image/mkimage", "-go", goCmd, "-o", out.Miniproxy,
		"-tag", MiniproxyImage, "-tag", MiniproxyImageNext)
	cmd.Dir = e.Root
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("image/mkimage: %w: %s", err, b)
	}
	return out, nil
}

func writeSingleBinaryImage(path, tag, bin string, entrypoint []string) error {
	img, err := image.NewImage([]image.Layer{{
		CreatedBy: "podserver",
		Entries:   []image.Entry{{Path: "/podserver", Type: tar.TypeReg, Mode: 0o755, Src: bin}},
	}}, image.Config{Created: time.Unix(0, 0).UTC()})
	if err != nil {
		return fmt.Errorf("image %s: %w", tag, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg := cf.Config
	cfg.Entrypoint = entrypoint
	if img, err = mutate.Config(img, v1.Config(cfg)); err != nil {
		return fmt.Errorf("image %s config: %w", tag, err)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("image archive: %w", err)
	}
	if err := image.WriteArchive(f, img, []string{tag}); err != nil {
		f.Close()
		return fmt.Errorf("image %s archive: %w", tag, err)
	}
	return f.Close()
}

// ImportImages imports every archive on every node.
func (kc *KubeletCluster) ImportImages(ctx context.Context, archives ...string) error {
	for _, kn := range kc.Nodes {
		for _, a := range archives {
			if err := kn.ImportImage(ctx, a); err != nil {
				return err
			}
		}
	}
	return nil
}
