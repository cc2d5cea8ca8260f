// Package ociimage writes container images as OCI image-layout tarballs from
// files on disk, without Docker or a registry: the local Kubernetes nodes
// (package kubenode) can pull nothing, so every image they run is made here
// from the project's own static binaries and imported into containerd with
// `ctr images import`. The same tarball loads into kind (`kind load
// image-archive`) and Docker (`docker load`), because it carries both the OCI
// index and a Docker-style manifest.json.
//
// Output is deterministic: the same files give the same digests, so an
// unchanged image is recognised as such wherever it is imported.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"sort"
	"strings"
	"time"
)

// File is one regular file of an image.
type File struct {
	// Path inside the image, e.g. "usr/local/bin/fedmesh-echo".
	Path string
	// Source is the file on disk to copy; Data is used when Source is empty.
	Source string
	Data   []byte
	// Mode defaults to 0755 (the files are mostly executables).
	Mode int64
}

// Image is a single-layer linux/amd64 image.
type Image struct {
	// Name is the full reference containerd and the manifests know it by,
	// e.g. "ghcr.io/fedmesh/fedmesh:dev".
	Name       string
	Files      []File
	Entrypoint []string
	Cmd        []string
	Env        []string // default PATH=/usr/local/bin:/usr/bin:/bin
	User       string   // e.g. "65532:65532"; empty means root
	WorkingDir string
	// Labels are the image config's labels.
	Labels map[string]string
}

const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"

	// annotationImageName is the full name containerd's importer reads
	// first; annotationRefName is the OCI one (the tag, by convention).
	annotationImageName = "io.containerd.image.name"
	annotationRefName   = "org.opencontainers.image.ref.name"
)

// epoch is the time every file and the image claim, so output is reproducible.
var epoch = time.Unix(0, 0).UTC()

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type blob struct {
	digest string
	data   []byte
}

func newBlob(data []byte) blob {
	sum := sha256.Sum256(data)
	return blob{digest: "sha256:" + hex.EncodeToString(sum[:]), data: data}
}

// Write writes one OCI image-layout tarball holding every image.
func Write(w io.Writer, images ...Image) error {
	if len(images) == 0 {
		return errors.New("no image to write")
	}
	var (
		blobs     []blob
		seen      = map[string]bool{}
		index     []descriptor
		dockerMan []map[string]any
	)
	add := func(b blob) {
		if !seen[b.digest] {
			seen[b.digest] = true
			blobs = append(blobs, b)
		}
	}
	for _, img := range images {
		if err := validName(img.Name); err != nil {
			return err
		}
		layer, err := layerTar(img.Files)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		lb := newBlob(layer)
		cfg, err := configJSON(img, lb.digest)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		cb := newBlob(cfg)
		man, err := json.Marshal(map[string]any{
			"schemaVersion": 2,
			"mediaType":     mediaManifest,
			"config":        descriptor{MediaType: mediaConfig, Digest: cb.digest, Size: int64(len(cb.data))},
			"layers":        []descriptor{{MediaType: mediaLayer, Digest: lb.digest, Size: int64(len(lb.data))}},
		})
		if err != nil {
			return err
		}
		mb := newBlob(man)
		add(lb)
		add(cb)
		add(mb)
		index = append(index, descriptor{
			MediaType: mediaManifest, Digest: mb.digest, Size: int64(len(mb.data)),
			Annotations: map[string]string{annotationImageName: img.Name, annotationRefName: tagOf(img.Name)},
			Platform:    &platform{Architecture: "amd64", OS: "linux"},
		})
		dockerMan = append(dockerMan, map[string]any{
			"Config":   blobPath(cb.digest),
			"RepoTags": []string{img.Name},
			"Layers":   []string{blobPath(lb.digest)},
		})
	}
	idx, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": mediaIndex, "manifests": index})
	if err != nil {
		return err
	}
	dm, err := json.Marshal(dockerMan)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	files := []blob{{digest: "oci-layout", data: []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {digest: "index.json", data: idx}, {digest: "manifest.json", data: dm}}
	for _, b := range blobs {
		files = append(files, blob{digest: blobPath(b.digest), data: b.data})
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.digest, Mode: 0o644, Size: int64(len(f.data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// WriteFile writes the tarball to path (through a temporary file, so a
// reader never sees half of one).
func WriteFile(path string, images ...Image) error {
	f, err := os.CreateTemp(dirOf(path), ".ociimage-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := Write(f, images...); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func dirOf(p string) string {
	if d := path.Dir(p); d != "" {
		return d
	}
	return "."
}

func blobPath(digest string) string {
	return "blobs/sha256/" + strings.TrimPrefix(digest, "sha256:")
}

// tagOf returns the tag of a reference ("dev" of "ghcr.io/fedmesh/fedmesh:dev").
func tagOf(ref string) string {
	last := ref[strings.LastIndex(ref, "/")+1:]
	if i := strings.LastIndex(last, ":"); i >= 0 {
		return last[i+1:]
	}
	return "latest"
}

// validName accepts name:tag references with a lowercase repository.
func validName(ref string) error {
	slash := strings.LastIndex(ref, "/")
	last := ref[slash+1:]
	colon := strings.LastIndex(last, ":")
	repo := ref[:slash+1] + last[:max(colon, 0)]
	if colon <= 0 || colon == len(last)-1 || strings.ContainsAny(ref, " \t\n@") || strings.ToLower(repo) != repo {
		return fmt.Errorf("image name %q: want a lowercase repository and a tag, such as ghcr.io/fedmesh/fedmesh:dev", ref)
	}
	return nil
}

// layerTar is the one layer: every file with its parent directories,
// owned by root, at the epoch.
func layerTar(files []File) ([]byte, error) {
	if len(files) == 0 {
		return nil, errors.New("an image needs at least one file")
	}
	sorted := slices.Clone(files)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Path < sorted[j].Path })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for _, f := range sorted {
		p := strings.TrimPrefix(path.Clean("/"+f.Path), "/")
		if p == "" || p == "." {
			return nil, fmt.Errorf("file path %q names no file", f.Path)
		}
		var parents []string
		for d := path.Dir(p); d != "." && d != "/" && !dirs[d]; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			dirs[parents[i]] = true
			mode := int64(0o755)
			if parents[i] == "tmp" {
				mode = 0o1777
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: parents[i] + "/", Mode: mode, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
		}
		data := f.Data
		if f.Source != "" {
			var err error
			if data, err = os.ReadFile(f.Source); err != nil {
				return nil, fmt.Errorf("read %s for %s: %w", f.Source, p, err)
			}
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o755
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func configJSON(img Image, layerDigest string) ([]byte, error) {
	env := img.Env
	if len(env) == 0 {
		env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	}
	cfg := map[string]any{
		"Env": env,
	}
	if len(img.Entrypoint) > 0 {
		cfg["Entrypoint"] = img.Entrypoint
	}
	if len(img.Cmd) > 0 {
		cfg["Cmd"] = img.Cmd
	}
	if img.User != "" {
		cfg["User"] = img.User
	}
	if img.WorkingDir != "" {
		cfg["WorkingDir"] = img.WorkingDir
	}
	if len(img.Labels) > 0 {
		cfg["Labels"] = img.Labels
	}
	return json.Marshal(map[string]any{
		"created":      epoch.Format(time.RFC3339),
		"architecture": "amd64",
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
		"history":      []map[string]any{{"created": epoch.Format(time.RFC3339), "created_by": "fedmesh ociimage"}},
	})
}
