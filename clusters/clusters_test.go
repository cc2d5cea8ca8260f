package clusters

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mcscrd "sigs.k8s.io/mcs-api/config/crd"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/federation/about"
	"github.com/fedmesh/fedmesh/federation/crds"
	policyv1alpha1 "github.com/fedmesh/fedmesh/policy/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite the CRD copies in base/crds from the embedded CRDs")

// TestCRDCopies keeps base/crds identical to the CRDs fedmesh embeds and
// installs in tests, so nobody edits one and forgets the other.
func TestCRDCopies(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []byte
	}{
		{"multicluster.x-k8s.io_serviceexports.yaml", mcscrd.ServiceExportCRD},
		{"multicluster.x-k8s.io_serviceimports.yaml", mcscrd.ServiceImportCRD},
		{"about.k8s.io_clusterproperties.yaml", about.CRD},
		{"gateway.networking.k8s.io_httproutes.yaml", crds.HTTPRouteCRD},
		{"gateway.networking.k8s.io_grpcroutes.yaml", crds.GRPCRouteCRD},
		{"gateway.networking.k8s.io_referencegrants.yaml", crds.ReferenceGrantCRD},
		{"policy.fedmesh.dev_authorizationpolicies.yaml", policyv1alpha1.AuthorizationPolicyCRD},
		{"policy.fedmesh.dev_ratelimitpolicies.yaml", policyv1alpha1.RateLimitPolicyCRD},
		{"policy.fedmesh.dev_failoverpolicies.yaml", policyv1alpha1.FailoverPolicyCRD},
	} {
		t.Run(tc.file, func(t *testing.T) {
			path := filepath.Join("base", "crds", tc.file)
			if *update {
				if err := os.WriteFile(path, tc.want, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("%s differs from the embedded CRD (run go test ./clusters -update):\n%s", path, cmp.Diff(string(tc.want), string(got)))
			}
		})
	}
}

// TestKindConfigs checks that every cluster has a kind configuration named
// after it and that no two clusters' pod or service CIDRs overlap.
func TestKindConfigs(t *testing.T) {
	type kindConfig struct {
		Kind       string `json:"kind"`
		APIVersion string `json:"apiVersion"`
		Name       string `json:"name"`
		Networking struct {
			PodSubnet     string `json:"podSubnet"`
			ServiceSubnet string `json:"serviceSubnet"`
		} `json:"networking"`
		Nodes []struct {
			Role string `json:"role"`
		} `json:"nodes"`
	}
	seen := map[netip.Prefix]string{}
	for _, name := range Names {
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("kind", name+".yaml"))
			if err != nil {
				t.Fatal(err)
			}
			var c kindConfig
			if err := yaml.UnmarshalStrict(raw, &c); err != nil {
				t.Fatalf("parse: %v", err)
			}
			if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" || c.Name != name || len(c.Nodes) == 0 {
				t.Fatalf("got kind %q apiVersion %q name %q with %d nodes", c.Kind, c.APIVersion, c.Name, len(c.Nodes))
			}
			for _, s := range []string{c.Networking.PodSubnet, c.Networking.ServiceSubnet} {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					t.Fatalf("subnet %q: %v", s, err)
				}
				for q, owner := range seen {
					if p.Overlaps(q) {
						t.Errorf("%s overlaps %s of %s", p, q, owner)
					}
				}
				seen[p] = name + " " + s
			}
		})
	}
	if len(seen) != 2*len(Names) {
		t.Fatalf("%d distinct subnets, want %d", len(seen), 2*len(Names))
	}
}

// TestKindE2EStopsWithoutTools runs kind-e2e.sh where none of its tools
// exist: it must stop at once, name every missing tool, and create nothing.
func TestKindE2EStopsWithoutTools(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	bin := t.TempDir()
	for _, tool := range []string{"dirname"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, "kind-e2e.sh")
	cmd.Env = []string{"PATH=" + bin}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("exit %v, want status 2; output:\n%s", err, out)
	}
	if want := "missing: docker kind kubectl openssl"; !strings.Contains(string(out), want) {
		t.Fatalf("output %q does not contain %q", out, want)
	}
}
