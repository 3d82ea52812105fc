package guest

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// Initramfs collects the files of a gzip'd newc cpio archive. The writer is
// our own so the host needs no cpio binary.
type Initramfs struct {
	dirs  map[string]bool
	files map[string]entry
}

type entry struct {
	mode     uint32 // permission bits
	hostPath string // copied from here when set
	data     []byte // else this content
	link     string // symlink target when set
}

// NewInitramfs returns an empty archive description.
func NewInitramfs() *Initramfs {
	return &Initramfs{dirs: map[string]bool{}, files: map[string]entry{}}
}

// AddFile copies a host file into the archive at guestPath.
func (r *Initramfs) AddFile(guestPath, hostPath string, mode uint32) {
	r.addParents(guestPath)
	r.files[clean(guestPath)] = entry{mode: mode, hostPath: hostPath}
}

// AddData adds a file with the given content.
func (r *Initramfs) AddData(guestPath string, data []byte, mode uint32) {
	r.addParents(guestPath)
	r.files[clean(guestPath)] = entry{mode: mode, data: data}
}

// AddSymlink adds a symbolic link.
func (r *Initramfs) AddSymlink(guestPath, target string) {
	r.addParents(guestPath)
	r.files[clean(guestPath)] = entry{mode: 0o777, link: target}
}

// AddDir adds an empty directory (and its parents).
func (r *Initramfs) AddDir(guestPath string) {
	r.addParents(guestPath + "/x")
}

func clean(p string) string { return strings.TrimPrefix(path.Clean("/"+p), "/") }

func (r *Initramfs) addParents(p string) {
	for d := path.Dir(clean(p)); d != "." && d != "/" && d != ""; d = path.Dir(d) {
		r.dirs[d] = true
	}
}

// WriteFile writes the archive, gzip-compressed, to out.
func (r *Initramfs) WriteFile(out string) error {
	f, err := os.Create(out)
	if err != nil {
		return fmt.Errorf("create initramfs %s: %w", out, err)
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	// BestSpeed: the archive is rebuilt for every test binary and decompressed
	// by an emulated CPU; size matters less than the host's build time.
	zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	if err := r.write(zw); err != nil {
		f.Close()
		return fmt.Errorf("write initramfs %s: %w", out, err)
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return fmt.Errorf("compress initramfs %s: %w", out, err)
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("flush initramfs %s: %w", out, err)
	}
	return f.Close()
}

func (r *Initramfs) write(w io.Writer) error {
	ino := uint32(1)
	dirs := make([]string, 0, len(r.dirs))
	for d := range r.dirs {
		dirs = append(dirs, d)
	}
	// Parents sort before children, which the kernel's unpacker requires.
	sort.Strings(dirs)
	for _, d := range dirs {
		if err := writeCpio(w, ino, d, 0o040755, nil); err != nil {
			return err
		}
		ino++
	}
	names := make([]string, 0, len(r.files))
	for n := range r.files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		e := r.files[n]
		var data []byte
		mode := 0o100000 | e.mode
		switch {
		case e.link != "":
			data, mode = []byte(e.link), 0o120777
		case e.hostPath != "":
			b, err := os.ReadFile(e.hostPath)
			if err != nil {
				return fmt.Errorf("read %s for %s: %w", e.hostPath, n, err)
			}
			data = b
		default:
			data = e.data
		}
		if err := writeCpio(w, ino, n, mode, data); err != nil {
			return err
		}
		ino++
	}
	return writeCpio(w, 0, "TRAILER!!!", 0, nil)
}

// writeCpio writes one newc record: a 110-byte ASCII header, the NUL-terminated
// name padded to 4 bytes, then the data padded to 4 bytes.
func writeCpio(w io.Writer, ino uint32, name string, mode uint32, data []byte) error {
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	for len(buf)%4 != 0 {
		buf = append(buf, 0)
	}
	if _, err := w.Write(buf); err != nil {
		return err
	}
	if len(data) > 0 {
		if _, err := w.Write(data); err != nil {
			return err
		}
		if pad := (4 - len(data)%4) % 4; pad > 0 {
			if _, err := w.Write(make([]byte, pad)); err != nil {
				return err
			}
		}
	}
	return nil
}
