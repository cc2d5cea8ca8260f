package issuer

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

var (
	eastTD  = spiffeid.RequireTrustDomainFromString("east.fedmesh.test")
	westTD  = spiffeid.RequireTrustDomainFromString("west.fedmesh.test")
	northTD = spiffeid.RequireTrustDomainFromString("north.fedmesh.test")
)

func workloadID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/ns/shop/sa/checkout")
}

// mesh is a set of issuers whose bundle endpoints listen on loopback.
type mesh map[spiffeid.TrustDomain]*testIssuer

// newMesh creates one issuer per trust domain, federating as links says
// (both directions), bootstrapped from each peer's bundle file, and starts
// them. Refresh hints are 1s, the shortest a bundle can carry.
func newMesh(t *testing.T, tds []spiffeid.TrustDomain, links [][2]spiffeid.TrustDomain, tweak func(td spiffeid.TrustDomain, c *Config)) mesh {
	t.Helper()
	cfgs := map[spiffeid.TrustDomain]*Config{}
	for _, td := range tds {
		c := newTestConfig(t, td.Name())
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c.BundleEndpointListener = ln
		c.RefreshHint = time.Second // the smallest a bundle can carry
		cfgs[td] = &c
	}
	peer := func(td spiffeid.TrustDomain) Peer {
		return Peer{
			TrustDomain:       td,
			BundleEndpointURL: "https://" + cfgs[td].BundleEndpointListener.Addr().String(),
			EndpointID:        spiffeid.RequireFromPath(td, "/fedmesh/issuer"),
			BundleFile:        filepath.Join(cfgs[td].DataDir, bundleFile),
		}
	}
	for _, l := range links {
		cfgs[l[0]].Peers = append(cfgs[l[0]].Peers, peer(l[1]))
		cfgs[l[1]].Peers = append(cfgs[l[1]].Peers, peer(l[0]))
	}
	m := mesh{}
	for _, td := range tds { // New writes each bundle file ...
		if tweak != nil {
			tweak(td, cfgs[td])
		}
		m[td] = newTestIssuer(t, *cfgs[td])
	}
	for _, td := range tds { // ... that the peers' Start then reads.
		if err := m[td].Start(); err != nil {
			t.Fatalf("start %s: %v", td, err)
		}
	}
	return m
}

// echoServer accepts mTLS connections and echoes lines back, recording the
// peer ID or handshake error of each connection.
type echoServer struct {
	ln      net.Listener
	wg      sync.WaitGroup
	results chan error // one per accepted connection: nil or handshake error
	mu      sync.Mutex
	peers   []spiffeid.ID
}

func newEchoServer(t *testing.T, cfg *tls.Config) *echoServer {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln, results: make(chan error, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				tc := c.(*tls.Conn)
				_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
				err := tc.Handshake()
				if err == nil {
					var id spiffeid.ID
					id, err = mtls.PeerIDFromConn(tc)
					s.mu.Lock()
					s.peers = append(s.peers, id)
					s.mu.Unlock()
				}
				s.results <- err
				if err != nil {
					return
				}
				_ = tc.SetDeadline(time.Time{}) // authenticated: no deadline
				r := bufio.NewReader(tc)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := tc.Write([]byte(line)); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *echoServer) addr() string { return s.ln.Addr().String() }

// dial performs the client side of a handshake and returns the connection.
func dial(addr string, cfg *tls.Config) (*tls.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	// TLS 1.3 clients finish before the server has checked their
	// certificate; one round trip makes a server-side refusal visible.
	if err := echo(c, "hello"); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func echo(c *tls.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// withBundles is a Source whose bundles are overridden: used to let a
// client trust a server out of band, so that only the server's verdict is
// tested.
type withBundles struct {
	mtls.Source
	bundles x509bundle.Source
}

func (w withBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return w.bundles.GetX509BundleForTrustDomain(td)
}

// TestFederatedMTLS: issuers of east and west federate through their real
// bundle endpoints, so a west workload and an east workload complete mTLS
// with SVIDs from the Workload API; north is not federated with east and is
// refused, and authorization by trust domain or exact ID is enforced.
func TestFederatedMTLS(t *testing.T) {
	testutil.CheckGoroutines(t)
	m := newMesh(t, []spiffeid.TrustDomain{eastTD, westTD, northTD}, [][2]spiffeid.TrustDomain{{eastTD, westTD}}, nil)
	src := map[spiffeid.TrustDomain]*workloadapi.X509Source{}
	for td, iss := range m {
		src[td] = newSource(t, iss.addr())
	}
	// East's workloads hold west's bundle (through the federated bundles of
	// the Workload API) and nothing of north's.
	if _, err := src[eastTD].GetX509BundleForTrustDomain(westTD); err != nil {
		t.Fatalf("east workload lacks west's bundle: %v", err)
	}
	if _, err := src[eastTD].GetX509BundleForTrustDomain(northTD); err == nil {
		t.Fatalf("east workload holds north's bundle, but east does not federate with north")
	}
	// North's client is told east's roots out of band, so the refusal below
	// is east's, not north's.
	northKnowsEast := withBundles{src[northTD], x509bundle.NewSet(m[eastTD].Bundle().X509Bundle(), m[northTD].Bundle().X509Bundle())}

	tests := []struct {
		name    string
		authz   tlsconfig.Authorizer // east server's
		client  mtls.Source
		wantErr bool
	}{
		{"west admitted by trust domain", mtls.MemberOf(eastTD, westTD), src[westTD], false},
		{"west admitted by exact id", mtls.OneOf(workloadID(westTD)), src[westTD], false},
		{"west refused by authorizer", mtls.MemberOf(eastTD), src[westTD], true},
		{"west refused by id authorizer", mtls.OneOf(workloadID(northTD)), src[westTD], true},
		{"east admitted locally", mtls.MemberOf(eastTD), src[eastTD], false},
		{"north not federated", mtls.MemberOf(eastTD, westTD, northTD), northKnowsEast, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newEchoServer(t, mtls.ServerConfig(src[eastTD], tt.authz))
			c, err := dial(srv.addr(), mtls.ClientConfig(tt.client, mtls.MemberOf(eastTD)))
			serverErr := <-srv.results
			if tt.wantErr {
				if err == nil || serverErr == nil {
					t.Fatalf("handshake succeeded (client err %v, server err %v), want refusal", err, serverErr)
				}
				return
			}
			if err != nil || serverErr != nil {
				t.Fatalf("handshake failed: client %v, server %v", err, serverErr)
			}
			defer c.Close()
			id, err := mtls.PeerID(c.ConnectionState())
			if err != nil || id != workloadID(eastTD) {
				t.Errorf("client sees server %s (%v), want %s", id, err, workloadID(eastTD))
			}
			want, _ := tt.client.GetX509SVID()
			srv.mu.Lock()
			defer srv.mu.Unlock()
			if len(srv.peers) != 1 || srv.peers[0] != want.ID {
				t.Errorf("server saw peers %v, want [%s]", srv.peers, want.ID)
			}
		})
	}
}

// TestCARotationUnderLiveConnection: both trust domains rotate their CA
// (prepare, then activate) while an mTLS connection between them is open.
// Each new root reaches the peer only through its bundle endpoint; the live
// connection keeps working, new handshakes with the re-issued SVIDs succeed,
// and the retired root stays in the bundle.
func TestCARotationUnderLiveConnection(t *testing.T) {
	testutil.CheckGoroutines(t)
	m := newMesh(t, []spiffeid.TrustDomain{eastTD, westTD}, [][2]spiffeid.TrustDomain{{eastTD, westTD}}, nil)
	east, west := newSource(t, m[eastTD].addr()), newSource(t, m[westTD].addr())
	srv := newEchoServer(t, mtls.ServerConfig(east, mtls.MemberOf(eastTD, westTD)))
	clientCfg := mtls.ClientConfig(west, mtls.MemberOf(eastTD))
	live, err := dial(srv.addr(), clientCfg)
	if err != nil {
		t.Fatalf("first handshake: %v (server: %v)", err, <-srv.results)
	}
	defer live.Close()
	<-srv.results

	for _, rotating := range []spiffeid.TrustDomain{westTD, eastTD} {
		peerTD := eastTD
		if rotating == eastTD {
			peerTD = westTD
		}
		rotSrc, peerSrc := map[spiffeid.TrustDomain]*workloadapi.X509Source{eastTD: east, westTD: west}[rotating], map[spiffeid.TrustDomain]*workloadapi.X509Source{eastTD: east, westTD: west}[peerTD]
		iss := m[rotating]
		oldRoot := iss.ca.signer().cert
		oldSVID, _ := rotSrc.GetX509SVID()

		if err := iss.caStep(stepPrepare, time.Now()); err != nil {
			t.Fatal(err)
		}
		newRoot := iss.ca.next.cert
		// The peer's workloads learn the new root via bundle endpoint fetch
		// -> peer issuer -> Workload API stream.
		waitFor(t, rotating.Name()+"'s new root to reach "+peerTD.Name()+"'s workload", func() bool {
			b, err := peerSrc.GetX509BundleForTrustDomain(rotating)
			return err == nil && b.HasX509Authority(newRoot)
		})
		if err := iss.caStep(stepActivate, time.Now()); err != nil {
			t.Fatal(err)
		}
		waitFor(t, rotating.Name()+"'s workload to get an SVID from the new CA", func() bool {
			s, err := rotSrc.GetX509SVID()
			return err == nil && s.Certificates[0].CheckSignatureFrom(newRoot) == nil
		})
		b := iss.Bundle()
		if !b.HasX509Authority(oldRoot) || !b.HasX509Authority(newRoot) {
			t.Errorf("%s bundle after activation lacks old or new root (%d roots)", rotating, len(b.X509Authorities()))
		}
		// SVIDs signed before the rotation still verify at the peer.
		if _, _, err := x509svid.Verify(oldSVID.Certificates, peerSrc); err != nil {
			t.Errorf("pre-rotation %s svid no longer verifies at %s: %v", rotating, peerTD, err)
		}
		if err := echo(live, "still here after "+rotating.Name()+" rotated"); err != nil {
			t.Fatalf("live connection broke after %s rotated: %v", rotating, err)
		}
		c, err := dial(srv.addr(), clientCfg)
		if err != nil {
			t.Fatalf("new handshake after %s rotated: %v", rotating, err)
		}
		if err := <-srv.results; err != nil {
			t.Fatalf("server refused new handshake after %s rotated: %v", rotating, err)
		}
		c.Close()
	}
}

// TestBundleEndpointAuthentication: a peer's endpoint is trusted only if it
// presents the configured SPIFFE ID under a root from the bootstrap bundle;
// otherwise fetches fail and the held bundle does not change.
func TestBundleEndpointAuthentication(t *testing.T) {
	testutil.CheckGoroutines(t)
	tests := []struct {
		name   string
		tweak  func(c *Config, north *testIssuer)
		wantOK bool
	}{
		{"correct id and bootstrap", func(*Config, *testIssuer) {}, true},
		{"wrong endpoint id", func(c *Config, _ *testIssuer) {
			c.Peers[0].EndpointID = spiffeid.RequireFromPath(westTD, "/some/other/server")
		}, false},
		{"bootstrap bundle of another trust domain", func(c *Config, north *testIssuer) {
			// north's roots, presented as west's: nothing west's endpoint
			// presents chains to them.
			c.Peers[0].BundleFile = north.BundleFile()
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testutil.CheckGoroutines(t)
			northCfg := newTestConfig(t, northTD.Name())
			northCfg.RefreshHint = time.Second // the hint east retries a failing peer with
			north := newTestIssuer(t, northCfg)
			m := newMesh(t, []spiffeid.TrustDomain{eastTD, westTD}, [][2]spiffeid.TrustDomain{{eastTD, westTD}}, func(td spiffeid.TrustDomain, c *Config) {
				if td != eastTD {
					return
				}
				tt.tweak(c, north)
			})
			if err := m[westTD].caStep(stepPrepare, time.Now()); err != nil {
				t.Fatal(err)
			}
			want := m[westTD].Bundle()
			fetches := func(result string) float64 {
				return metricValue(t, m[eastTD].metrics.peerFetches.WithLabelValues(westTD.Name(), result))
			}
			if tt.wantOK {
				waitFor(t, "east to fetch west's new bundle", func() bool {
					m[eastTD].mu.Lock()
					defer m[eastTD].mu.Unlock()
					return m[eastTD].peers[westTD].Equal(want)
				})
				if _, err := os.Stat(m[eastTD].peerBundlePath(westTD)); err != nil {
					t.Errorf("fetched bundle not kept on disk: %v", err)
				}
				return
			}
			waitFor(t, "two failed fetches", func() bool { return fetches("error") >= 2 })
			if n := fetches("updated"); n != 0 {
				t.Fatalf("%v fetches accepted from an unauthenticated endpoint", n)
			}
			m[eastTD].mu.Lock()
			defer m[eastTD].mu.Unlock()
			if m[eastTD].peers[westTD].Equal(want) {
				t.Fatalf("east took west's bundle from an unauthenticated endpoint")
			}
		})
	}
}

// TestNoTrustOnFirstUse: a peer without a bootstrap bundle is a start error.
func TestNoTrustOnFirstUse(t *testing.T) {
	testutil.CheckGoroutines(t)
	cfg := newTestConfig(t, eastTD.Name())
	cfg.Peers = []Peer{{
		TrustDomain:       westTD,
		BundleEndpointURL: "https://127.0.0.1:1",
		EndpointID:        spiffeid.RequireFromPath(westTD, "/fedmesh/issuer"),
	}}
	iss := newTestIssuer(t, cfg)
	err := iss.Start()
	if err == nil {
		t.Fatal("started without a bootstrap bundle for west")
	}
	t.Logf("error (as an operator sees it): %v", err)

	cfg.Peers[0].BundleFile = filepath.Join(shortDir(t), "missing.json")
	iss = newTestIssuer(t, cfg)
	if err := iss.Start(); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("start with a missing bootstrap file: %v, want a not-exist error", err)
	}
}

// TestRestartKeepsRoots: a new Issuer on the same data dir serves the same
// roots (including a prepared or retired one) and SVIDs issued before the
// restart still verify against it.
func TestRestartKeepsRoots(t *testing.T) {
	testutil.CheckGoroutines(t)
	tests := []struct {
		name  string
		steps []step
	}{
		{"plain", nil},
		{"with a prepared ca", []step{stepPrepare}},
		{"with a retired ca", []step{stepPrepare, stepActivate}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := newTestConfig(t, eastTD.Name())
			first := startIssuer(t, cfg)
			for _, st := range tt.steps {
				if err := first.caStep(st, time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			x, err := workloadapi.FetchX509Context(ctxT(t), workloadapi.WithAddr(first.addr()))
			if err != nil {
				t.Fatal(err)
			}
			before := first.Bundle()
			signer := first.ca.signer().cert
			first.Stop()

			second := startIssuer(t, cfg)
			after := second.Bundle()
			if !sameRoots(before.X509Authorities(), after.X509Authorities()) {
				t.Fatalf("roots changed across restart: %d before, %d after", len(before.X509Authorities()), len(after.X509Authorities()))
			}
			if !after.JWTBundle().Equal(before.JWTBundle()) {
				t.Errorf("jwt authorities changed across restart")
			}
			if s1, s2 := seq(before), seq(after); s1 != s2 {
				t.Errorf("sequence %d before, %d after", s1, s2)
			}
			if !second.ca.signer().cert.Equal(signer) {
				t.Errorf("signing ca changed across restart")
			}
			if _, _, err := x509svid.Verify(x.DefaultSVID().Certificates, after.X509Bundle()); err != nil {
				t.Errorf("svid from before the restart does not verify after it: %v", err)
			}
		})
	}

	t.Run("corrupt state is an error, not a new root", func(t *testing.T) {
		cfg := newTestConfig(t, eastTD.Name())
		newTestIssuer(t, cfg).Stop()
		if err := os.WriteFile(filepath.Join(cfg.DataDir, caFile), []byte(`{"authorities":[]}`), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := New(cfg); err == nil {
			t.Fatal("new issuer over corrupt ca state succeeded")
		} else {
			t.Logf("error: %v", err)
		}
	})

	t.Run("state of another trust domain is refused", func(t *testing.T) {
		cfg := newTestConfig(t, eastTD.Name())
		newTestIssuer(t, cfg).Stop()
		cfg.TrustDomain = westTD
		cfg.Entries[0].SPIFFEID = workloadID(westTD).String()
		if _, err := New(cfg); err == nil {
			t.Fatal("west issuer loaded east's ca")
		}
	})
}

func sameRoots(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}
