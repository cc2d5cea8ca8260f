package endpoints

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/fedmesh/fedmesh/policy"
)

func TestFileRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "eps.json")
	data := `[{"namespace":"shop","service":"checkout","port":8080,"clusters":[
	  {"name":"west","endpoints":[{"name":"a","addr":"127.0.0.1:1","ready":true}]},
	  {"name":"east","rtt":"12ms","gateway":true,"endpoints":[{"name":"b","ready":false}]}]}]`
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := FromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := st.Watch(ctx, "shop", "checkout")
	if err != nil {
		t.Fatal(err)
	}
	want := Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []Cluster{
		{Name: "west", Endpoints: []Endpoint{{Name: "a", Addr: "127.0.0.1:1", Ready: true}}},
		{Name: "east", RTT: Duration(12 * time.Millisecond), Gateway: true, Endpoints: []Endpoint{{Name: "b"}}},
	}}
	if diff := cmp.Diff(want, <-ch); diff != "" {
		t.Fatalf("set (-want +got):\n%s", diff)
	}
	// Newest wins for a slow reader.
	want.Port = 1
	st.Update(want)
	want.Port = 2
	st.Update(want)
	if got := <-ch; got.Port != 2 {
		t.Fatalf("port %d, want the newest set", got.Port)
	}
}

func TestFileErrors(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{
		"not json":     `{`,
		"no service":   `[{"namespace":"shop"}]`,
		"bad duration": `[{"namespace":"a","service":"b","clusters":[{"name":"c","rtt":"soon"}]}]`,
		"empty":        `[]`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, "f.json")
			if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := FromFile(path); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

// TestFilePolicy: a set's traffic policy travels through the JSON file and
// Static unchanged.
func TestFilePolicy(t *testing.T) {
	pol := &policy.Service{Namespace: "shop", Name: "checkout",
		Rules: []policy.Rule{{Route: "HTTPRoute shop/split", Timeout: policy.Duration(time.Second),
			Match:    policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/v2"}},
			Backends: []policy.Backend{{Kind: policy.KindServiceImport, Namespace: "shop", Name: "checkout-v2", Port: 8080, Weight: 1}}}},
		Authz:      &policy.Authorization{Policies: []string{"shop/a"}, Rules: []policy.AuthzRule{{Policy: "shop/a", TrustDomains: []string{"west.fedmesh.test"}}}},
		RateLimits: []policy.RateLimit{{Policy: "shop/rl", RequestsPerSecond: 10, Burst: 5, PerCaller: true}},
		Failover:   &policy.Failover{Policy: "shop/f", ClusterOrder: []string{"east"}, Overprovisioning: 2},
	}
	b, err := json.Marshal([]Set{{Namespace: "shop", Service: "checkout", Port: 8080, Policy: pol}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "eps.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := FromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := st.Watch(ctx, "shop", "checkout")
	if diff := cmp.Diff(pol, (<-ch).Policy); diff != "" {
		t.Fatalf("policy (-want +got):\n%s", diff)
	}
}
