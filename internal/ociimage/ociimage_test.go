package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

// readTar returns every regular file of a tarball by name.
func readTar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = data
		}
	}
}

func TestWriteLayout(t *testing.T) {
	imgs := []Image{
		{Name: "ghcr.io/fedmesh/fedmesh:dev", User: "65532:65532", Entrypoint: []string{"/usr/local/bin/a"},
			Files: []File{{Path: "usr/local/bin/a", Data: []byte("binary a")}, {Path: "usr/local/bin/b", Data: []byte("binary b")}}},
		{Name: "fedmesh.local/pause:1", Entrypoint: []string{"/pause"}, Files: []File{{Path: "/pause", Data: []byte("p")}}},
	}
	var out bytes.Buffer
	if err := Write(&out, imgs...); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, out.Bytes())
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Fatalf("oci-layout: %q", files["oci-layout"])
	}
	// Every blob's name is its digest.
	for name, data := range files {
		if hexd, ok := strings.CutPrefix(name, "blobs/sha256/"); ok {
			sum := sha256.Sum256(data)
			if hex.EncodeToString(sum[:]) != hexd {
				t.Errorf("blob %s holds content of another digest", name)
			}
		}
	}
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 2 {
		t.Fatalf("index has %d manifests, want 2", len(index.Manifests))
	}
	for i, m := range index.Manifests {
		if got := m.Annotations[annotationImageName]; got != imgs[i].Name {
			t.Errorf("manifest %d is named %q, want %q", i, got, imgs[i].Name)
		}
		var man struct {
			Config descriptor   `json:"config"`
			Layers []descriptor `json:"layers"`
		}
		if err := json.Unmarshal(files[blobPath(m.Digest)], &man); err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			Config struct {
				User       string
				Entrypoint []string
			} `json:"config"`
			RootFS struct {
				DiffIDs []string `json:"diff_ids"`
			} `json:"rootfs"`
		}
		if err := json.Unmarshal(files[blobPath(man.Config.Digest)], &cfg); err != nil {
			t.Fatal(err)
		}
		if cfg.Config.User != imgs[i].User || strings.Join(cfg.Config.Entrypoint, " ") != strings.Join(imgs[i].Entrypoint, " ") {
			t.Errorf("image %s config: %+v", imgs[i].Name, cfg.Config)
		}
		if len(man.Layers) != 1 || cfg.RootFS.DiffIDs[0] != man.Layers[0].Digest {
			t.Fatalf("image %s: layers %+v, diff ids %v", imgs[i].Name, man.Layers, cfg.RootFS.DiffIDs)
		}
		layer := readTar(t, files[blobPath(man.Layers[0].Digest)])
		for _, f := range imgs[i].Files {
			p := strings.TrimPrefix(f.Path, "/")
			if !bytes.Equal(layer[p], f.Data) {
				t.Errorf("image %s: layer file %s = %q, want %q", imgs[i].Name, p, layer[p], f.Data)
			}
		}
	}
	var docker []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &docker); err != nil {
		t.Fatal(err)
	}
	if len(docker) != 2 || docker[0].RepoTags[0] != imgs[0].Name || files[docker[1].Layers[0]] == nil {
		t.Fatalf("manifest.json: %+v", docker)
	}

	// The same input gives the same bytes.
	var again bytes.Buffer
	if err := Write(&again, imgs...); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), again.Bytes()) {
		t.Error("two writes of the same images differ")
	}
}

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
		tag  string
	}{
		{"ghcr.io/fedmesh/fedmesh:dev", true, "dev"},
		{"localhost:5000/pause:3.10", true, "3.10"},
		{"ghcr.io/fedmesh/fedmesh", false, ""},
		{"localhost:5000/pause", false, ""},
		{"Ghcr.io/x:1", false, ""},
		{"x:", false, ""},
		{"x@sha256:ab", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := validName(tc.name)
			if (err == nil) != tc.ok {
				t.Fatalf("validName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
			}
			if tc.ok && tagOf(tc.name) != tc.tag {
				t.Errorf("tagOf(%q) = %q, want %q", tc.name, tagOf(tc.name), tc.tag)
			}
		})
	}
}
