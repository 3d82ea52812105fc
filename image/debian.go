package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Deb is one downloaded Debian package.
type Deb struct {
	Package, Version, File string
	SHA256                 string
	Path                   string // on disk
}

// FetchDebs downloads the candidate version of each package with apt-get, or
// takes it from cacheDir when a file there has the checksum apt expects.
// New downloads are copied into cacheDir when it is writable; nothing
// depends on the cache existing. workDir receives downloads that cannot be
// cached.
func FetchDebs(ctx context.Context, log *slog.Logger, packages []string, cacheDir, workDir string) ([]Deb, error) {
	debs, err := printURIs(ctx, packages)
	if err != nil && os.Geteuid() == 0 {
		// A machine that never ran apt-get update has no package lists.
		log.Info("apt-get cannot resolve the packages; running apt-get update once", "err", err)
		if out, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
			return nil, fmt.Errorf("apt-get update: %w: %s", uerr, bytes.TrimSpace(out))
		}
		debs, err = printURIs(ctx, packages)
	}
	if err != nil {
		return nil, err
	}
	if cacheDir != "" {
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			log.Info("deb cache unusable; downloading into the work directory", "dir", cacheDir, "err", err)
			cacheDir = ""
		}
	}
	var missing []int
	for i := range debs {
		if cacheDir != "" {
			p := filepath.Join(cacheDir, debs[i].File)
			if sum, err := fileSHA256(p); err == nil && sum == debs[i].SHA256 {
				debs[i].Path = p
				continue
			}
		}
		missing = append(missing, i)
	}
	if len(missing) > 0 {
		dl := filepath.Join(workDir, "download")
		if err := os.MkdirAll(dl, 0o755); err != nil {
			return nil, err
		}
		args := []string{"download", "-q", "-o", "APT::Sandbox::User=root"}
		for _, i := range missing {
			args = append(args, debs[i].Package+"="+debs[i].Version)
		}
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Dir = dl
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("apt-get %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
		for _, i := range missing {
			p := filepath.Join(dl, debs[i].File)
			sum, err := fileSHA256(p)
			if err != nil {
				return nil, fmt.Errorf("downloaded %s: %w", debs[i].File, err)
			}
			if sum != debs[i].SHA256 {
				return nil, fmt.Errorf("downloaded %s: sha256 %s, apt expects %s", debs[i].File, sum, debs[i].SHA256)
			}
			debs[i].Path = p
			if cacheDir != "" {
				if err := copyFile(p, filepath.Join(cacheDir, debs[i].File)); err == nil {
					debs[i].Path = filepath.Join(cacheDir, debs[i].File)
				} else {
					log.Info("cannot cache a deb", "file", debs[i].File, "err", err)
				}
			}
		}
		log.Info("downloaded Debian packages", "count", len(missing))
	}
	return debs, nil
}

// printURIs asks apt which file and checksum each package's candidate has.
// It runs in an empty directory: apt prints nothing for a package whose file
// is already in the current one.
func printURIs(ctx context.Context, packages []string) ([]Deb, error) {
	dir, err := os.MkdirTemp("", "mkimage-apt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"download", "--print-uris"}, packages...)...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("apt-get download --print-uris: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	byName := map[string]Deb{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		// 'URI' name_version_arch.deb size SHA256:hex
		f := strings.Fields(sc.Text())
		if len(f) != 4 || !strings.HasPrefix(f[3], "SHA256:") {
			continue
		}
		name, rest, ok := strings.Cut(f[1], "_")
		version, _, ok2 := strings.Cut(rest, "_")
		if !ok || !ok2 {
			return nil, fmt.Errorf("apt-get --print-uris: unexpected file name %q", f[1])
		}
		// File names escape the epoch colon as %3a.
		version = strings.ReplaceAll(version, "%3a", ":")
		byName[name] = Deb{Package: name, Version: version, File: f[1], SHA256: strings.TrimPrefix(f[3], "SHA256:")}
	}
	debs := make([]Deb, 0, len(packages))
	for _, p := range packages {
		d, ok := byName[p]
		if !ok {
			return nil, fmt.Errorf("apt-get has no candidate for %s", p)
		}
		debs = append(debs, d)
	}
	return debs, nil
}

// Extract unpacks a package with dpkg-deb into dir and returns its control
// file (what /var/lib/dpkg/status.d records, so scanners see the versions).
func Extract(ctx context.Context, d Deb, dir string) ([]byte, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", d.Path, dir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg-deb -x %s: %w: %s", d.File, err, bytes.TrimSpace(out))
	}
	ctl, err := exec.CommandContext(ctx, "dpkg-deb", "-f", d.Path).Output()
	if err != nil {
		return nil, fmt.Errorf("dpkg-deb -f %s: %w", d.File, err)
	}
	return ctl, nil
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// copyFile writes dst through a temporary name, so a concurrent build never
// reads a half-written cache entry.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".partial-")
	if err != nil {
		return err
	}
	_, cerr := io.Copy(tmp, in)
	if err := errors.Join(cerr, tmp.Close()); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), dst)
}
