package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// daemonSetContainer reads the miniproxy container from the manifest users
// apply.
func daemonSetContainer(t *testing.T) corev1.Container {
	t.Helper()
	raw, err := os.ReadFile("../deploy/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		var ds appsv1.DaemonSet
		if err := yaml.Unmarshal([]byte(doc), &ds); err != nil {
			t.Fatalf("deploy/daemonset.yaml: %v", err)
		}
		if ds.Kind != "DaemonSet" {
			continue
		}
		for _, c := range ds.Spec.Template.Spec.Containers {
			if c.Name == "miniproxy" {
				return c
			}
		}
	}
	t.Fatal("deploy/daemonset.yaml has no DaemonSet with a miniproxy container")
	return corev1.Container{}
}

// checkManifestAgainst holds the DaemonSet's container to an image config:
// the command runs the entrypoint's binary, the image is the one `make image`
// tags and is never pulled, and every mount point's parent exists in the
// image's file list.
func checkManifestAgainst(t *testing.T, c corev1.Container, entrypoint []string, exists func(p string) bool) {
	t.Helper()
	if len(c.Command) == 0 || len(entrypoint) == 0 || c.Command[0] != entrypoint[0] {
		t.Errorf("DaemonSet command %q does not start with the image entrypoint %q", c.Command, entrypoint)
	}
	if !exists(c.Command[0]) {
		t.Errorf("DaemonSet command %s is not a file in the image", c.Command[0])
	}
	if c.Image != DefaultTag {
		t.Errorf("DaemonSet image %q, but make image tags %q", c.Image, DefaultTag)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %q, want IfNotPresent: no registry serves this image", c.ImagePullPolicy)
	}
	for _, m := range c.VolumeMounts {
		if !exists(path.Dir(m.MountPath)) {
			t.Errorf("volume mount %s: %s is not in the image", m.MountPath, path.Dir(m.MountPath))
		}
	}
}

// The manifest against the image config and file list a build produces,
// without the Debian packages: the app layer and the fixed entries.
func TestDaemonSetMatchesImageSpec(t *testing.T) {
	c := daemonSetContainer(t)
	dir := t.TempDir()
	bin := dir + "/fake"
	if err := os.WriteFile(bin, []byte("#!"), 0o755); err != nil {
		t.Fatal(err)
	}
	entries := []Entry{
		{Path: Miniproxy, Type: tar.TypeReg, Mode: 0o755, Src: bin},
		{Path: "/lib", Type: tar.TypeSymlink, Link: MergedUsr["/lib"]},
		{Path: "/usr/lib/x86_64-linux-gnu/libc.so.6", Type: tar.TypeReg, Mode: 0o644, Data: []byte("x")},
	}
	for p, m := range EmptyDirs {
		entries = append(entries, Entry{Path: p, Type: tar.TypeDir, Mode: m})
	}
	img, err := NewImage([]Layer{{CreatedBy: "test", Entries: entries}}, Config{Created: time.Unix(0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	paths := map[string]bool{"/": true}
	for _, e := range withParents(entries) {
		paths[e.Path] = true
	}
	checkManifestAgainst(t, c, cf.Config.Entrypoint, func(p string) bool { return paths[p] })
}

// dockerfile is a Dockerfile as (instruction, arguments) pairs with line
// continuations joined and comments dropped.
type instruction struct{ cmd, args string }

func parseDockerfile(t *testing.T, raw []byte) []instruction {
	t.Helper()
	var out []instruction
	var cur strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.Join(strings.Fields(args), " ")})
		cur.Reset()
	}
	return out
}

// The Dockerfile ships what mkimage ships: a Debian 12 build stage runs
// mkimage -rootfs (the same selection code, so the same packages and
// paths), and the final stage is that directory alone with the same
// entrypoint and PATH.
func TestDockerfileMatchesImageSpec(t *testing.T) {
	raw, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	ins := parseDockerfile(t, raw)
	var stages [][]instruction
	for _, in := range ins {
		if in.cmd == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("instruction %s before FROM", in.cmd)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], in)
	}
	if len(stages) != 2 {
		t.Fatalf("want a build stage and a final stage, got %d stages", len(stages))
	}
	build, final := stages[0], stages[1]
	from := strings.Fields(build[0].args)
	if len(from) != 3 || !strings.HasSuffix(from[0], "-bookworm") || !strings.EqualFold(from[1], "AS") {
		t.Fatalf("build stage FROM %q: want a Debian 12 (bookworm) image named with AS", build[0].args)
	}
	stage := from[2]
	ranMkimage := slices.ContainsFunc(build, func(in instruction) bool {
		return in.cmd == "RUN" && strings.Contains(in.args, "go run ./image/mkimage") && strings.Contains(in.args, "-rootfs /rootfs")
	})
	if !ranMkimage {
		t.Error("the build stage does not run `go run ./image/mkimage ... -rootfs /rootfs`")
	}
	want := []instruction{
		{"FROM", "scratch"},
		{"COPY", "--from=" + stage + " /rootfs /"},
		{"ENV", "PATH=" + Path},
	}
	ep, _ := json.Marshal(Entrypoint)
	want = append(want, instruction{"ENTRYPOINT", string(ep)})
	got := slices.Clone(final)
	for i := range got {
		if got[i].cmd == "ENTRYPOINT" {
			// Compare the exec form as data, not as spacing.
			var v []string
			if err := json.Unmarshal([]byte(got[i].args), &v); err != nil {
				t.Fatalf("ENTRYPOINT %s is not the exec (JSON) form: %v", got[i].args, err)
			}
			b, _ := json.Marshal(v)
			got[i].args = string(b)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("final stage:\n got %q\nwant %q", got, want)
	}
}
