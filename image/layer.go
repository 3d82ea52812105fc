package image

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// withParents returns entries plus the directories they imply (0755, as
// Debian's), sorted by path so a parent precedes its children. Explicit
// entries win over implied ones.
func withParents(entries []Entry) []Entry {
	byPath := map[string]Entry{}
	for _, e := range entries {
		byPath[e.Path] = e
	}
	for _, e := range entries {
		for d := path.Dir(e.Path); d != "/"; d = path.Dir(d) {
			if _, ok := byPath[d]; !ok {
				byPath[d] = Entry{Path: d, Type: tar.TypeDir, Mode: 0o755}
			}
		}
	}
	out := make([]Entry, 0, len(byPath))
	for _, e := range byPath {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// WriteTar writes entries as a layer tarball that depends on nothing but
// their paths, types, modes and contents: sorted, owned by root:root with no
// user or group names, every time mtime.
func WriteTar(w io.Writer, entries []Entry, mtime time.Time) error {
	tw := tar.NewWriter(w)
	for _, e := range withParents(entries) {
		h := &tar.Header{
			Name:     strings.TrimPrefix(e.Path, "/"),
			Typeflag: e.Type,
			Mode:     e.Mode,
			ModTime:  mtime,
			Format:   tar.FormatPAX,
		}
		switch e.Type {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeSymlink:
			h.Linkname, h.Mode = e.Link, 0o777
		case tar.TypeReg:
			data, err := e.content()
			if err != nil {
				return err
			}
			h.Size = int64(len(data))
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("%s: %w", e.Path, err)
			}
			if _, err := tw.Write(data); err != nil {
				return fmt.Errorf("%s: %w", e.Path, err)
			}
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("%s: %w", e.Path, err)
		}
	}
	return tw.Close()
}

func (e Entry) content() ([]byte, error) {
	if e.Src == "" {
		return e.Data, nil
	}
	b, err := os.ReadFile(e.Src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", e.Path, err)
	}
	return b, nil
}

// WriteDir materializes entries under dir (which must be empty or absent):
// the root file system the Dockerfile copies into its final stage.
func WriteDir(dir string, entries []Entry) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, e := range withParents(entries) {
		p := filepath.Join(dir, filepath.FromSlash(e.Path))
		switch e.Type {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(e.Link, p); err != nil {
				return err
			}
			continue
		case tar.TypeReg:
			data, err := e.content()
			if err != nil {
				return err
			}
			if err := os.WriteFile(p, data, 0o600); err != nil {
				return err
			}
		}
		// Chmod after creation: the umask must not change modes, and
		// os.Chmod is the one call that sets the sticky bit.
		mode := os.FileMode(e.Mode & 0o777)
		if e.Mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
		if err := os.Chmod(p, mode); err != nil {
			return err
		}
	}
	return nil
}
