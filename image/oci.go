package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Layer is one image layer and the history line `docker history` shows.
type Layer struct {
	CreatedBy string
	Entries   []Entry
}

// Config is the image configuration beyond its layers.
type Config struct {
	Created time.Time
	Labels  map[string]string
}

// NewImage assembles an OCI image (OCI manifest and config media types,
// gzip layers) from layers; its digest depends only on the arguments.
func NewImage(layers []Layer, c Config) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		var buf bytes.Buffer
		if err := WriteTar(&buf, l.Entries, c.Created); err != nil {
			return nil, err
		}
		data := buf.Bytes()
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, fmt.Errorf("layer %q: %w", l.CreatedBy, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer:     layer,
			MediaType: types.OCILayer,
			History:   v1.History{Created: v1.Time{Time: c.Created}, CreatedBy: l.CreatedBy, Comment: "mkimage"},
		})
		if err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Created = v1.Time{Time: c.Created}
	cf.Config = v1.Config{
		Entrypoint: append([]string(nil), Entrypoint...),
		Env:        []string{"PATH=" + Path},
		Labels:     c.Labels,
	}
	return mutate.ConfigFile(img, cf)
}

// WriteArchive writes img as one tarball that is at the same time an OCI
// image layout (oci-layout, index.json, blobs/sha256/...) and a
// docker-archive (manifest.json naming the same blobs), the shape
// `docker save` writes since Docker 25:
//   - containerd (`ctr images import`, and so `kind load image-archive`)
//     reads index.json and names the image after its io.containerd.image.name
//     annotation;
//   - `docker load` reads manifest.json (every Docker version) or the OCI
//     layout (Docker 25 and later, and the containerd image store).
//
// Entries are sorted and carry fixed metadata, so equal images give equal
// archives.
func WriteArchive(w io.Writer, img v1.Image, tags []string) error {
	manifest, err := img.RawManifest()
	if err != nil {
		return err
	}
	mdigest, err := img.Digest()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	cdigest, err := img.ConfigName()
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"oci-layout":                  []byte(`{"imageLayoutVersion":"1.0.0"}`),
		"blobs/sha256/" + mdigest.Hex: manifest,
		"blobs/sha256/" + cdigest.Hex: config,
	}
	type dockerManifest struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	dm := dockerManifest{Config: "blobs/sha256/" + cdigest.Hex}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return err
		}
		files["blobs/sha256/"+d.Hex] = b
		dm.Layers = append(dm.Layers, "blobs/sha256/"+d.Hex)
	}
	index := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for _, t := range tags {
		ref, err := name.NewTag(t)
		if err != nil {
			return fmt.Errorf("tag %q: %w", t, err)
		}
		dm.RepoTags = append(dm.RepoTags, t)
		index.Manifests = append(index.Manifests, v1.Descriptor{
			MediaType: mt, Digest: mdigest, Size: int64(len(manifest)),
			Annotations: map[string]string{
				// containerd's name for the image (what kubelet asks for).
				"io.containerd.image.name": containerdName(ref),
				// The OCI layout's own ref: the tag alone.
				"org.opencontainers.image.ref.name": ref.TagStr(),
			},
		})
	}
	if files["index.json"], err = json.Marshal(index); err != nil {
		return err
	}
	if files["manifest.json"], err = json.Marshal([]dockerManifest{dm}); err != nil {
		return err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	tw := tar.NewWriter(w)
	dirs := map[string]bool{}
	for _, n := range names {
		for _, d := range []string{"blobs/", "blobs/sha256/"} {
			if strings.HasPrefix(n, d) && !dirs[d] {
				dirs[d] = true
				if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
					return err
				}
			}
		}
		h := &tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(files[n])), ModTime: time.Unix(0, 0)}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return err
		}
	}
	return tw.Close()
}

// containerdName is a tag as containerd and kubelet spell it:
// "miniproxy:dev" is "docker.io/library/miniproxy:dev" (go-containerregistry
// says index.docker.io).
func containerdName(ref name.Tag) string {
	reg := ref.Context().RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return reg + "/" + ref.Context().RepositoryStr() + ":" + ref.TagStr()
}
