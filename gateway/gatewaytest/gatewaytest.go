// Package gatewaytest gives tests of the gateway and its binary real SPIFFE
// identities: one built-in issuer (identity/issuer) per trust domain, in
// process, federated over real bundle endpoints on loopback, with a
// per-workload Workload API socket for each identity a test needs. SVIDs
// come through the Workload API exactly as in production.
package gatewaytest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/identity/issuer"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/identity/workload"
)

// Workloads every domain issues, by name, with their SPIFFE ID paths.
var Workloads = map[string]string{
	"gateway": "/ns/fedmesh-system/sa/gateway",
	"web":     "/ns/shop/sa/web",
	"rogue":   "/ns/shop/sa/rogue",
}

// Domain is one trust domain with its running issuer.
type Domain struct {
	Cluster string
	TD      spiffeid.TrustDomain
	Issuer  *issuer.Issuer
	dir     string
}

// TrustDomainOf is the trust domain fedmesh gives a cluster.
func TrustDomainOf(cluster string) spiffeid.TrustDomain {
	return spiffeid.RequireTrustDomainFromString(cluster + ".fedmesh.test")
}

// Socket is the unix socket path that serves the named workload's identity.
func (d *Domain) Socket(workload string) string { return filepath.Join(d.dir, workload+".sock") }

// Addr is Socket as a Workload API address ("unix://...").
func (d *Domain) Addr(workload string) string { return "unix://" + d.Socket(workload) }

// ID is the named workload's SPIFFE ID.
func (d *Domain) ID(workload string) spiffeid.ID {
	return spiffeid.RequireFromPath(d.TD, Workloads[workload])
}

// Source opens an X509Source for the named workload, closed at cleanup.
func (d *Domain) Source(t testing.TB, name string) *workload.X509Source {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := mtls.NewSource(ctx, d.Addr(name))
	if err != nil {
		t.Fatalf("source for %s in %s: %v", name, d.Cluster, err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// Start starts one issuer per cluster, federating each pair in links both
// ways, and waits until federated bundles have been exchanged. Everything is
// stopped at cleanup.
func Start(t testing.TB, clusters []string, links [][2]string) map[string]*Domain {
	t.Helper()
	cfgs := map[string]*issuer.Config{}
	dirs := map[string]string{}
	for _, c := range clusters {
		dir, err := os.MkdirTemp("", "fmgw") // unix socket paths must stay short
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		dirs[c] = dir
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		td := TrustDomainOf(c)
		cfg := &issuer.Config{
			TrustDomain:            td,
			DataDir:                filepath.Join(dir, "data"),
			SocketPath:             filepath.Join(dir, "api.sock"),
			BundleEndpointListener: ln,
			RefreshHint:            time.Second,
		}
		for name, path := range Workloads {
			cfg.Entries = append(cfg.Entries, issuer.Entry{
				SPIFFEID: spiffeid.RequireFromPath(td, path).String(),
				Socket:   filepath.Join(dir, name+".sock"),
			})
		}
		cfgs[c] = cfg
	}
	peer := func(c string) issuer.Peer {
		return issuer.Peer{
			TrustDomain:       cfgs[c].TrustDomain,
			BundleEndpointURL: "https://" + cfgs[c].BundleEndpointListener.Addr().String(),
			EndpointID:        spiffeid.RequireFromPath(cfgs[c].TrustDomain, "/fedmesh/issuer"),
			BundleFile:        filepath.Join(cfgs[c].DataDir, "bundle.spiffe.json"),
		}
	}
	for _, l := range links {
		cfgs[l[0]].Peers = append(cfgs[l[0]].Peers, peer(l[1]))
		cfgs[l[1]].Peers = append(cfgs[l[1]].Peers, peer(l[0]))
	}
	doms := map[string]*Domain{}
	for _, c := range clusters { // New writes each bundle file ...
		iss, err := issuer.New(*cfgs[c])
		if err != nil {
			t.Fatalf("new issuer %s: %v", c, err)
		}
		doms[c] = &Domain{Cluster: c, TD: cfgs[c].TrustDomain, Issuer: iss, dir: dirs[c]}
	}
	for _, c := range clusters { // ... that the peers' Start reads.
		if err := doms[c].Issuer.Start(); err != nil {
			t.Fatalf("start issuer %s: %v", c, err)
		}
		t.Cleanup(doms[c].Issuer.Stop)
	}
	// Bundles were bootstrapped from files, so each workload's first
	// Workload API message already carries its federated bundles.
	for _, l := range links {
		src := doms[l[0]].Source(t, "gateway")
		if _, err := src.GetX509BundleForTrustDomain(doms[l[1]].TD); err != nil {
			t.Fatalf("%s has no bundle of %s: %v", l[0], l[1], err)
		}
	}
	return doms
}
