package fedctl

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/fedmesh/fedmesh/federation"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("%s differs (-want +got; go test -update rewrites it):\n%s", name, diff)
	}
}

func TestStatusGolden(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	st := &Status{
		Clusters: []ClusterStatus{
			{Context: "fedmesh-east", ClusterID: "east", APIServer: "https://127.0.0.1:6443", Reachable: true,
				Controller: ControllerStatus{Leader: "east-0", Renewed: now.Add(-time.Second), Version: "(devel) 28d2133abcde", Local: true},
				Peers: []federation.PeerStatus{{Name: "north", ClusterID: "north", Reachable: true},
					{Name: "west", ClusterID: "west", Stale: true, StaleSince: now.Add(-42 * time.Second)}},
				Trust: &TrustStatus{TrustDomain: "east.fedmesh.test", Roots: 2, RootsExpire: now.Add(23 * time.Hour), SVIDs: 3, SVIDsExpire: now.Add(42 * time.Minute)},
				Gateways: []GatewayStatus{
					{Admin: "http://127.0.0.1:9101", OpenStreams: 3, Peers: []GatewayPeerStatus{
						{Cluster: "north", Up: true, Replicas: 2, RTTP50MS: 0.41, RTTP99MS: 1.2},
						{Cluster: "west", Up: true, Replicas: 1, RTTP50MS: 25.3, RTTP99MS: 40.1, LossPct: 2.5}}},
					{Admin: "http://127.0.0.1:9102", Error: "dial tcp 127.0.0.1:9102: connect: connection refused"},
				},
				Exports: 2, Imports: 2},
			{Context: "fedmesh-north", ClusterID: "north", APIServer: "https://127.0.0.1:6444", Reachable: true,
				Controller: ControllerStatus{Leader: "north-0", Renewed: now.Add(-2 * time.Second), Replicas: 2, Ready: 1},
				Trust:      &TrustStatus{TrustDomain: "north.fedmesh.test", Source: "gateway fedmesh-gateway-0"},
				Gateways:   []GatewayStatus{{Admin: "pod fedmesh-gateway-0:15000", Error: "not reachable through the API server's pod proxy: error trying to reach service: dial tcp 10.244.0.7:15000: connect: connection refused"}},
				Unknown: []Unknown{
					{What: "peers", Why: "controller admin not reachable through the API server's pod proxy: the Lease holder \"north-0\" is not a pod in fedmesh-system (pods \"north-0\" not found)"},
					{What: "trust roots", Why: "no other member holds a ConfigMap trust-bundle-north (fedctl link writes one when the bundle is known)"},
				},
				ServiceExports: []ObjectStatus{{Namespace: "demo", Name: "echo", Conditions: []Condition{
					{Type: "Valid", Status: "True", Reason: "Valid"}, {Type: "Conflict", Status: "False", Reason: "NoConflict"}}}},
				ServiceImports: []ObjectStatus{
					{Namespace: "demo", Name: "echo", Type: "ClusterSetIP", Clusters: []string{"east", "north"}, Conditions: []Condition{{Type: "Ready", Status: "True", Reason: "Ready"}}},
					{Namespace: "shop", Name: "cart", Type: "ClusterSetIP", Clusters: []string{"east"}, Conditions: []Condition{
						{Type: "Ready", Status: "True", Reason: "Ready"},
						{Type: federation.ConditionStale, Status: "True", Reason: "PeerUnreachable", Message: "serving the last known state of east"}}},
				},
				Exports: 1, Imports: 2},
			{Context: "kind-other", APIServer: "https://127.0.0.1:6446", Reachable: true,
				Error: "not a fedmesh member: get clusterproperty cluster.clusterset.k8s.io: the server could not find the requested resource"},
			{Context: "fedmesh-west", APIServer: "https://127.0.0.1:6445", Error: "dial tcp 127.0.0.1:6445: connect: connection refused"},
		},
		Services: []ServiceStatus{
			{Namespace: "demo", Name: "echo", ExportedBy: []string{"east", "north"}, Imports: map[string]ImportSummary{
				"east":  {Ready: true, ReadyEndpoints: map[string]int{"east": 2, "north": 1, "west": 2}, Stale: []string{"west"}},
				"north": {Ready: true, ReadyEndpoints: map[string]int{"east": 2, "north": 1}},
			}},
			{Namespace: "shop", Name: "cart", ExportedBy: []string{"east"}, Conflict: "PortConflict: ports of north differ",
				Invalid: []string{"north: NoService"}, Imports: map[string]ImportSummary{"east": {Ready: false, ReadyEndpoints: map[string]int{}}}},
		},
		Policies: []PolicyStatus{
			{Cluster: "east", Kind: "HTTPRoute", Namespace: "demo", Name: "echo-canary", Services: []string{"demo/echo"},
				Backends: []string{"Service echo=90", "ServiceImport echo-v2=10"}, Accepted: true},
			{Cluster: "east", Kind: "HTTPRoute", Namespace: "demo", Name: "broken", Services: []string{"demo/echo"},
				Backends: []string{"Service nope=1"}, Reason: "ResolvedRefs=False BackendNotFound",
				Message: "backendRef Service demo/nope not found; nothing of this route is in force"},
			{Cluster: "north", Kind: "AuthorizationPolicy", Namespace: "demo", Name: "deny-all", Services: []string{"demo/*"}, Accepted: true},
			{Cluster: "north", Kind: "RateLimitPolicy", Namespace: "demo", Name: "echo-rl", Services: []string{"demo/echo"}, Pending: true,
				Reason: "no status from the fedmesh controller yet"},
		},
	}
	var buf bytes.Buffer
	renderStatus(&buf, st, colors{}, now)
	golden(t, "status.golden", buf.Bytes())

	buf.Reset()
	if err := printObject(&buf, st, "json"); err != nil {
		t.Fatal(err)
	}
	golden(t, "status.json.golden", buf.Bytes())
}

func TestExportDryRunGolden(t *testing.T) {
	var out, errOut bytes.Buffer
	cmd := NewCommand(&out, &errOut)
	cmd.SetArgs([]string{"export", "echo", "-n", "demo", "--exported-label", "tier=gold", "--dry-run=client", "-o", "yaml", "--dir", t.TempDir()})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("%v: %s", err, errOut.String())
	}
	golden(t, "export.golden", out.Bytes())
}

func TestUsageErrors(t *testing.T) {
	for name, args := range map[string][]string{
		"unknown flag":       {"status", "--nope"},
		"bad output":         {"export", "x", "--dry-run=client", "-o", "xml"},
		"bad dry-run":        {"export", "x", "--dry-run=server"},
		"one cluster for up": {"up", "--clusters", "east"},
		"export needs name":  {"export"},
	} {
		t.Run(name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			cmd := NewCommand(&out, &errOut)
			cmd.SetArgs(append(args, "--dir", t.TempDir()))
			err := cmd.Execute()
			if err == nil {
				t.Fatal("want an error")
			}
			if code := ExitCode(err); code != 2 {
				t.Errorf("exit code %d for %v (%v), want 2", code, args, err)
			}
		})
	}
}

func TestLinkGolden(t *testing.T) {
	out, err := renderLink(&LinkInput{
		ClusterID: "west", APIServer: "https://127.0.0.1:6443", CAData: []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
		Token: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln", TokenExpires: time.Date(2027, 11, 21, 12, 0, 0, 0, time.UTC),
		TrustDomain: "west.fedmesh.test", Bundle: []byte(`{"keys":[]}`), BundleEndpoint: "https://127.0.0.1:8443",
		Gateways: []string{"127.0.0.1:15443", "127.0.0.1:15453"},
	})
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "link.golden", out)
}
