package image

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// fakePackage lays out files like an extracted .deb: name -> content, or
// "-> target" for a symlink.
func fakePackage(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if target, ok := strings.CutPrefix(c, "-> "); ok {
			if err := os.Symlink(target, full); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if src, ok := strings.CutPrefix(c, "copy "); ok {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Skipf("skipping: this host has no %s to build a fake package from (%v)", src, err)
			}
			c = string(b)
		}
		if err := os.WriteFile(full, []byte(c), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func paths(entries []Entry) map[string]Entry {
	m := map[string]Entry{}
	for _, e := range entries {
		m[e.Path] = e
	}
	return m
}

// A real dynamically linked program from this Debian host pulls in its
// interpreter and libc through the merged-/usr mapping and the packages'
// symlinks; the bin/sbin links that lead to it come along.
func TestSelectResolvesLibrariesAndLinks(t *testing.T) {
	libc6 := fakePackage(t, map[string]string{
		"lib/x86_64-linux-gnu/libc.so.6":            "copy /lib/x86_64-linux-gnu/libc.so.6",
		"lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": "copy /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
		"lib64/ld-linux-x86-64.so.2":                "-> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
		"usr/share/doc/libc6/copyright":             "GPL",
		"usr/lib/x86_64-linux-gnu/gconv/unused.so":  "not shipped",
	})
	tools := fakePackage(t, map[string]string{
		"bin/true":                  "copy /usr/bin/true",
		"usr/sbin/also-true":        "-> ../bin/true",
		"sbin/dangling":             "-> nowhere",
		"usr/share/doc/x/copyright": "MIT",
	})
	tree := NewTree()
	for name, root := range map[string]string{"libc6": libc6, "tools": tools} {
		if err := tree.AddPackage(name, root); err != nil {
			t.Fatal(err)
		}
	}
	got, err := tree.Select([]string{"/usr/bin/true"}, nil, []string{"libc6", "tools"})
	if err != nil {
		t.Fatal(err)
	}
	m := paths(got)
	for _, want := range []string{
		"/usr/bin/true",
		"/usr/lib/x86_64-linux-gnu/libc.so.6",
		"/usr/lib64/ld-linux-x86-64.so.2",
		"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
		"/usr/sbin/also-true",
		"/usr/share/doc/libc6/copyright",
	} {
		if _, ok := m[want]; !ok {
			t.Errorf("selection lacks %s", want)
		}
	}
	for _, unwanted := range []string{"/usr/sbin/dangling", "/usr/lib/x86_64-linux-gnu/gconv/unused.so", "/bin/true"} {
		if _, ok := m[unwanted]; ok {
			t.Errorf("selection has %s", unwanted)
		}
	}
	if l := m["/usr/lib64/ld-linux-x86-64.so.2"]; l.Type != tar.TypeSymlink || l.Link != "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" {
		t.Errorf("interpreter link = %+v, want the package's symlink kept as is", l)
	}

	// Without libc's package the closure cannot be completed.
	alone := NewTree()
	if err := alone.AddPackage("tools", tools); err != nil {
		t.Fatal(err)
	}
	if _, err := alone.Select([]string{"/usr/bin/true"}, nil, []string{"tools"}); err == nil || !strings.Contains(err.Error(), "ld-linux") && !strings.Contains(err.Error(), "libc.so.6") {
		t.Errorf("Select without libc6 = %v, want an error naming the missing library", err)
	}
	// A listed package that contributes nothing is a stale list entry.
	if _, err := tree.Select([]string{"/usr/bin/true"}, nil, []string{"libc6", "tools", "unused"}); err == nil || !strings.Contains(err.Error(), "unused") {
		t.Errorf("Select with an unused package = %v, want an error naming it", err)
	}
}

func TestAddPackageRejectsConflicts(t *testing.T) {
	a := fakePackage(t, map[string]string{"lib/x/f": "one"})
	b := fakePackage(t, map[string]string{"usr/lib/x/f": "two"})
	same := fakePackage(t, map[string]string{"usr/lib/x/f": "one"})
	tree := NewTree()
	if err := tree.AddPackage("a", a); err != nil {
		t.Fatal(err)
	}
	if err := tree.AddPackage("same", same); err != nil {
		t.Errorf("identical file at the merged path: %v", err)
	}
	if err := tree.AddPackage("b", b); err == nil {
		t.Error("two packages with different /usr/lib/x/f: no error")
	}
}

// Layer tarballs depend on content only: sorted, root-owned, one mtime,
// parents implied.
func TestWriteTarIsCanonical(t *testing.T) {
	src := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(src, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	entries := []Entry{
		{Path: "/usr/sbin/z", Type: tar.TypeSymlink, Link: "a"},
		{Path: "/usr/sbin/a", Type: tar.TypeReg, Mode: 0o755, Src: src},
		{Path: "/tmp", Type: tar.TypeDir, Mode: 0o1777},
	}
	var one, two bytes.Buffer
	if err := WriteTar(&one, entries, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	// Reversed input, a touched source file: the same bytes.
	if err := os.Chtimes(src, time.Now(), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := WriteTar(&two, []Entry{entries[2], entries[1], entries[0]}, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(one.Bytes(), two.Bytes()) {
		t.Fatal("the same entries gave different tarballs")
	}
	tr := tar.NewReader(&one)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("%s: owner %d:%d (%q:%q) mtime %v", h.Name, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime)
		}
		if h.Name == "tmp/" && h.Mode != 0o1777 {
			t.Errorf("tmp/ mode %o, want 1777", h.Mode)
		}
	}
	want := "tmp/ usr/ usr/sbin/ usr/sbin/a usr/sbin/z"
	if strings.Join(names, " ") != want {
		t.Errorf("entries %q, want %q", strings.Join(names, " "), want)
	}
}

// The archive is both a docker-archive and an OCI layout, and both views
// give the image that was written, under its tag.
func TestWriteArchiveBothFormats(t *testing.T) {
	img, err := NewImage([]Layer{
		{CreatedBy: "one", Entries: []Entry{{Path: "/etc/a", Type: tar.TypeReg, Mode: 0o644, Data: []byte("a")}}},
		{CreatedBy: "two", Entries: []Entry{{Path: Miniproxy, Type: tar.TypeReg, Mode: 0o755, Data: []byte("b")}}},
	}, Config{Created: time.Unix(0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	var a, b bytes.Buffer
	if err := WriteArchive(&a, img, []string{"miniproxy:dev", "example.com/x/miniproxy:v2"}); err != nil {
		t.Fatal(err)
	}
	if err := WriteArchive(&b, img, []string{"miniproxy:dev", "example.com/x/miniproxy:v2"}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("the same image gave different archives")
	}
	dir := t.TempDir()
	archive := filepath.Join(dir, "img.tar")
	if err := os.WriteFile(archive, a.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	// docker-archive view (manifest.json).
	for _, tag := range []string{"miniproxy:dev", "example.com/x/miniproxy:v2"} {
		ref, err := name.NewTag(tag)
		if err != nil {
			t.Fatal(err)
		}
		dimg, err := tarball.ImageFromPath(archive, &ref)
		if err != nil {
			t.Fatalf("docker-archive view, %s: %v", tag, err)
		}
		cfgWant, _ := img.ConfigName()
		if cfg, err := dimg.ConfigName(); err != nil || cfg != cfgWant {
			t.Errorf("docker-archive view, %s: config %v (%v), want %v", tag, cfg, err, cfgWant)
		}
	}

	// OCI layout view (index.json), with containerd's names.
	lay := filepath.Join(dir, "layout")
	if err := os.Mkdir(lay, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tar", "-xf", archive, "-C", lay).CombinedOutput(); err != nil {
		t.Fatalf("tar -x: %v: %s", err, out)
	}
	idx, err := layout.ImageIndexFromPath(lay)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range im.Manifests {
		if d.Digest != want {
			t.Errorf("index entry %v, want %v", d.Digest, want)
		}
		names = append(names, d.Annotations["io.containerd.image.name"]+"|"+d.Annotations["org.opencontainers.image.ref.name"])
	}
	if got := strings.Join(names, " "); got != "docker.io/library/miniproxy:dev|dev example.com/x/miniproxy:v2|v2" {
		t.Errorf("index names %q", got)
	}
	oimg, err := idx.Image(want)
	if err != nil {
		t.Fatal(err)
	}
	if d, err := oimg.Digest(); err != nil || d != want {
		t.Errorf("OCI view digest %v (%v), want %v", d, err, want)
	}
	ls, err := oimg.Layers()
	if err != nil || len(ls) != 2 {
		t.Fatalf("OCI view layers %d (%v), want 2", len(ls), err)
	}
}
