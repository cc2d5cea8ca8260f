// Command ociimage writes a container image from static binaries as an OCI
// image-layout tarball (with a Docker-style manifest.json), for machines
// without Docker: `ctr -n k8s.io images import`, `kind load image-archive`
// and `docker load` all read it. See package internal/ociimage.
//
//	ociimage -o fedmesh.tar -name ghcr.io/fedmesh/fedmesh:dev \
//	  -entrypoint /usr/local/bin/fedmesh-controller -user 65532:65532 \
//	  bin/fedmesh-controller bin/fedmesh-gateway=usr/local/bin/fedmesh-gateway
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/fedmesh/fedmesh/internal/ociimage"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	out := fs.String("o", "", "tarball to write (required)")
	name := fs.String("name", "", "image reference with a tag, e.g. ghcr.io/fedmesh/fedmesh:dev (required)")
	entrypoint := fs.String("entrypoint", "", "entrypoint, words separated by spaces")
	cmd := fs.String("cmd", "", "default arguments, words separated by spaces")
	user := fs.String("user", "", "user[:group] the image runs as, e.g. 65532:65532")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: ociimage -o FILE -name REF [flags] SRC[=PATH-IN-IMAGE]...\n(PATH-IN-IMAGE defaults to usr/local/bin/<base name of SRC>)")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || *name == "" || fs.NArg() == 0 {
		fs.Usage()
		return errors.New("-o, -name and at least one file are required")
	}
	img := ociimage.Image{Name: *name, Entrypoint: strings.Fields(*entrypoint), Cmd: strings.Fields(*cmd), User: *user}
	for _, a := range fs.Args() {
		src, dst, ok := strings.Cut(a, "=")
		if !ok {
			dst = "usr/local/bin/" + filepath.Base(src)
		}
		img.Files = append(img.Files, ociimage.File{Path: dst, Source: src})
	}
	return ociimage.WriteFile(*out, img)
}
