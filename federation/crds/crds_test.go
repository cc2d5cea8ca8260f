package crds_test

import (
	"testing"

	"github.com/fedmesh/fedmesh/federation/crds"
)

// TestAll: every embedded CRD parses strictly, once. That the API server
// accepts them is shown by every test that starts a control plane
// (controlplane installs them), and federation's TestPolicySchemas checks
// what fedmesh's own schemas admit.
func TestAll(t *testing.T) {
	all, err := crds.All()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"serviceexports.multicluster.x-k8s.io", "serviceimports.multicluster.x-k8s.io", "clusterproperties.about.k8s.io",
		"httproutes.gateway.networking.k8s.io", "grpcroutes.gateway.networking.k8s.io", "referencegrants.gateway.networking.k8s.io",
		"authorizationpolicies.policy.fedmesh.dev", "ratelimitpolicies.policy.fedmesh.dev", "failoverpolicies.policy.fedmesh.dev",
	}
	if len(all) != len(want) {
		t.Fatalf("%d CRDs, want %d", len(all), len(want))
	}
	for i, crd := range all {
		if crd.Name != want[i] {
			t.Errorf("CRD %d is %s, want %s", i, crd.Name, want[i])
		}
	}
}
