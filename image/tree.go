package image

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// Entry is one file system object of a layer.
type Entry struct {
	Path  string // absolute and clean, as in the image
	Type  byte   // tar.TypeReg, tar.TypeDir or tar.TypeSymlink
	Mode  int64  // permission bits, sticky bit included
	Link  string // symlink target, exactly as the package has it
	Src   string // a regular file's content comes from this file...
	Data  []byte // ...or is this
	Owner string // the package it came from, for messages
}

// Tree is the union of extracted packages, keyed by merged-/usr path.
type Tree struct {
	entries map[string]*Entry
}

// NewTree returns an empty Tree.
func NewTree() *Tree { return &Tree{entries: map[string]*Entry{}} }

// canon maps a path to its merged-/usr form: Debian 12 packages still ship
// some files under /lib, /bin and /sbin, which are links to /usr/... on an
// installed system (and in the image).
func canon(p string) string {
	p = path.Clean("/" + p)
	for top := range MergedUsr {
		if p == top || strings.HasPrefix(p, top+"/") {
			return "/usr" + p
		}
	}
	return p
}

// AddPackage records everything a package extracted into root. Two packages
// may hold the same directory, never different files at one path.
func (t *Tree) AddPackage(pkg, root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		cp := canon(filepath.ToSlash(rel))
		e := &Entry{Path: cp, Mode: int64(info.Mode().Perm()), Owner: pkg}
		if info.Mode()&fs.ModeSticky != 0 {
			e.Mode |= 0o1000
		}
		switch {
		case info.IsDir():
			e.Type = tar.TypeDir
		case info.Mode()&fs.ModeSymlink != 0:
			e.Type = tar.TypeSymlink
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case info.Mode().IsRegular():
			e.Type, e.Src = tar.TypeReg, p
		default:
			return fmt.Errorf("%s: %s: unsupported file type %s", pkg, cp, info.Mode().Type())
		}
		old, ok := t.entries[cp]
		if !ok {
			t.entries[cp] = e
			return nil
		}
		if old.Type == tar.TypeDir && e.Type == tar.TypeDir {
			return nil
		}
		if same, err := sameEntry(old, e); err != nil || !same {
			return errors.Join(fmt.Errorf("%s and %s both ship %s, differently", old.Owner, pkg, cp), err)
		}
		return nil
	})
}

func sameEntry(a, b *Entry) (bool, error) {
	if a.Type != b.Type || a.Mode != b.Mode || a.Link != b.Link {
		return false, nil
	}
	if a.Type != tar.TypeReg {
		return true, nil
	}
	x, err := os.ReadFile(a.Src)
	if err != nil {
		return false, err
	}
	y, err := os.ReadFile(b.Src)
	if err != nil {
		return false, err
	}
	return bytes.Equal(x, y), nil
}

// resolve follows symlinks (in any path component) to the final object and
// returns its path and the links passed on the way.
func (t *Tree) resolve(p string) (string, []string, error) {
	var links []string
	for hops := 0; hops < 40; hops++ {
		p = canon(p)
		parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
		cur, redirected := "", false
		for i, c := range parts {
			cur = canon(cur + "/" + c)
			e, ok := t.entries[cur]
			if !ok {
				return "", links, fmt.Errorf("%s: not in any of the packages", cur)
			}
			if e.Type == tar.TypeSymlink {
				links = append(links, cur)
				target := e.Link
				if !path.IsAbs(target) {
					target = path.Join(path.Dir(cur), target)
				}
				p = path.Join(append([]string{target}, parts[i+1:]...)...)
				redirected = true
				break
			}
		}
		if !redirected {
			return p, links, nil
		}
	}
	return "", links, fmt.Errorf("%s: too many levels of symlinks", p)
}

// Selection is what the image takes from a Tree.
type Selection struct {
	t   *Tree
	sel map[string]*Entry
	elf []string // regular files not yet scanned for ELF dependencies
}

// Select picks files, trees, their shared-library closure (ELF interpreter
// and NEEDED sonames, looked up in LibraryDirs) and the bin/sbin symlinks
// that lead to picked files. Every package of packages must contribute.
func (t *Tree) Select(files, trees, packages []string) ([]Entry, error) {
	s := &Selection{t: t, sel: map[string]*Entry{}}
	for _, f := range files {
		if err := s.add(f, false); err != nil {
			return nil, err
		}
	}
	for _, tr := range trees {
		n := 0
		for p := range t.entries {
			if strings.HasPrefix(p, canon(tr)+"/") {
				if err := s.add(p, true); err != nil {
					return nil, err
				}
				n++
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("%s: no such directory in the packages", tr)
		}
	}
	for len(s.elf) > 0 {
		p := s.elf[0]
		s.elf = s.elf[1:]
		if err := s.addDependencies(p); err != nil {
			return nil, err
		}
	}
	for p, e := range t.entries {
		if e.Type != tar.TypeSymlink || (path.Dir(p) != "/usr/bin" && path.Dir(p) != "/usr/sbin") {
			continue
		}
		if final, _, err := t.resolve(p); err == nil && s.sel[final] != nil && s.sel[final].Type == tar.TypeReg {
			s.sel[p] = e
		}
	}
	used := map[string]bool{}
	for _, e := range s.sel {
		used[e.Owner] = true
	}
	for _, p := range packages {
		if !used[p] {
			return nil, fmt.Errorf("package %s contributes no file to the image: drop it from the list", p)
		}
	}
	// Licences of what ships, where the package has its own.
	for _, p := range packages {
		if final, links, err := t.resolve("/usr/share/doc/" + p + "/copyright"); err == nil && len(links) == 0 {
			s.sel[final] = t.entries[final]
		}
	}
	out := make([]Entry, 0, len(s.sel))
	for _, e := range s.sel {
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

// add picks p and the links leading to it; a directory is refused unless
// inTree (its contents are picked one by one).
func (s *Selection) add(p string, inTree bool) error {
	final, links, err := s.t.resolve(p)
	if err != nil {
		return err
	}
	for _, l := range links {
		s.sel[l] = s.t.entries[l]
	}
	e := s.t.entries[final]
	switch e.Type {
	case tar.TypeDir:
		if !inTree {
			return fmt.Errorf("%s is a directory: list it in Trees", p)
		}
	case tar.TypeReg:
		if s.sel[final] == nil {
			s.sel[final] = e
			s.elf = append(s.elf, final)
		}
	}
	return nil
}

func (s *Selection) addDependencies(p string) error {
	f, err := elf.Open(s.t.entries[p].Src)
	if err != nil {
		return nil // not an ELF file
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, prog.Filesz)
		if _, err := prog.ReadAt(b, 0); err != nil {
			return fmt.Errorf("%s: read ELF interpreter: %w", p, err)
		}
		interp := string(bytes.TrimRight(b, "\x00"))
		if err := s.add(interp, false); err != nil {
			return fmt.Errorf("%s needs its interpreter %s: %w", p, interp, err)
		}
	}
	needed, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("%s: read NEEDED: %w", p, err)
	}
	for _, so := range needed {
		found := slices.ContainsFunc(LibraryDirs, func(dir string) bool {
			_, _, err := s.t.resolve(dir + "/" + so)
			return err == nil && s.add(dir+"/"+so, false) == nil
		})
		if !found {
			return fmt.Errorf("%s needs %s, which none of the packages has: add its package to Packages", p, so)
		}
	}
	return nil
}
