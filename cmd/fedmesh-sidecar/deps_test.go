package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeanDependencies keeps heavy packages out of the sidecar binary. One
// sidecar runs beside every pod and the kernel maps the binary's code into
// each one's resident set, so a dependency costs its size once per pod:
// grpc-go, the protobuf runtime and the Prometheus client cost about 4 MB.
// The sidecar speaks gRPC through internal/grpclite and protowire, and
// writes metrics with internal/metrics, instead.
func TestLeanDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-tags=grpcnotrace", "github.com/fedmesh/fedmesh/cmd/fedmesh-sidecar").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	banned := []string{
		"google.golang.org/grpc",
		"google.golang.org/protobuf/proto",
		"google.golang.org/protobuf/internal/impl",
		"google.golang.org/protobuf/reflect/protoreflect",
		"github.com/prometheus/",
		"github.com/go-jose/",
		"github.com/quic-go/",
		"k8s.io/",
		"golang.org/x/net/http2",
	}
	var found []string
	for _, pkg := range strings.Fields(string(out)) {
		for _, b := range banned {
			if strings.HasPrefix(pkg, b) {
				found = append(found, pkg)
			}
		}
	}
	if len(found) > 0 {
		t.Fatalf("the sidecar links %d packages it must not (see the comment above):\n%s", len(found), strings.Join(found, "\n"))
	}
}
