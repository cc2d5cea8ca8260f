package workload_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/workload"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestMatchesGoSPIFFE reads the same identity through this client and
// go-spiffe's own, from fedmesh's issuer with a federated trust domain, and
// wants the same SVID and the same bundles.
func TestMatchesGoSPIFFE(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"east", "west"}, [][2]string{{"east", "west"}})
	east, west := doms["east"], doms["west"]
	addr := east.Addr("web")

	src, err := workload.NewX509Source(ctxT(t, 10*time.Second), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	ref, err := workloadapi.FetchX509Context(ctxT(t, 10*time.Second), workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}

	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	want := ref.DefaultSVID()
	if svid.ID != east.ID("web") || svid.ID != want.ID {
		t.Fatalf("SVID %s, go-spiffe %s, want %s", svid.ID, want.ID, east.ID("web"))
	}
	if len(svid.Certificates) != len(want.Certificates) || !svid.Certificates[0].Equal(want.Certificates[0]) {
		t.Fatal("the SVID's certificates differ from go-spiffe's")
	}
	if !svid.PrivateKey.(interface{ Equal(crypto.PrivateKey) bool }).Equal(want.PrivateKey) {
		t.Fatal("the SVID's private key differs from go-spiffe's")
	}
	for _, td := range []spiffeid.TrustDomain{east.TD, west.TD} {
		got, err := src.GetX509BundleForTrustDomain(td)
		if err != nil {
			t.Fatalf("bundle of %s: %v", td, err)
		}
		exp, err := ref.Bundles.GetX509BundleForTrustDomain(td)
		if err != nil {
			t.Fatalf("go-spiffe has no bundle of %s: %v", td, err)
		}
		if !got.Equal(exp) {
			t.Fatalf("bundle of %s differs from go-spiffe's", td)
		}
	}
	if _, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("north.fedmesh.test")); err == nil {
		t.Fatal("a bundle for a trust domain nobody federates with")
	}
}

// --- a scripted Workload API server (go-spiffe's generated service) ---

type ca struct {
	td   spiffeid.TrustDomain
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func newCA(t *testing.T, td string) *ca {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := spiffeid.RequireTrustDomainFromString(td)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: td},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{d.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &ca{td: d, key: key, cert: cert}
}

// svid issues an X509SVID message for path in the CA's trust domain.
func (c *ca) svid(t *testing.T, path string, serial int64) *pb.X509SVID {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id := spiffeid.RequireFromPath(c.td, path)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, URIs: []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	pk, _ := x509.MarshalPKCS8PrivateKey(key)
	return &pb.X509SVID{SpiffeId: id.String(), X509Svid: der, X509SvidKey: pk, Bundle: c.cert.Raw}
}

// fake serves FetchX509SVID from a script: each call takes the next
// stream's script, a list of responses (nil: end the stream with err).
type fake struct {
	pb.UnimplementedSpiffeWorkloadAPIServer
	mu      sync.Mutex
	streams [][]step
	calls   int
	hold    chan struct{} // the last stream stays open until this closes
}

type step struct {
	resp *pb.X509SVIDResponse
	err  error
}

func (f *fake) FetchX509SVID(_ *pb.X509SVIDRequest, st grpc.ServerStreamingServer[pb.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(st.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request") // as SPIRE answers
	}
	f.mu.Lock()
	i := f.calls
	f.calls++
	var script []step
	if i < len(f.streams) {
		script = f.streams[i]
	}
	f.mu.Unlock()
	for _, s := range script {
		if s.err != nil {
			return s.err
		}
		if err := st.Send(s.resp); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case <-f.hold:
	case <-st.Context().Done():
	}
	return nil
}

// callCount is how many FetchX509SVID calls have begun.
func (f *fake) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fake) serve(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fmwl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterSpiffeWorkloadAPIServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	t.Cleanup(func() { close(f.hold) })
	return "unix://" + sock
}

func waitSerial(t *testing.T, src *workload.X509Source, serial int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, err := src.GetX509SVID()
		if err == nil && s.Certificates[0].SerialNumber.Int64() == serial {
			return
		}
		if time.Now().After(deadline) {
			got := int64(-1)
			if err == nil {
				got = s.Certificates[0].SerialNumber.Int64()
			}
			t.Fatalf("SVID serial %d (err %v), want %d", got, err, serial)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRotationAndRecovery: the source follows rotations on a stream, keeps
// the last good identity through a response that does not parse and through
// a broken stream, and reconnects.
func TestRotationAndRecovery(t *testing.T) {
	east, west := newCA(t, "east.fedmesh.test"), newCA(t, "west.fedmesh.test")
	resp := func(serial int64) *pb.X509SVIDResponse {
		return &pb.X509SVIDResponse{
			Svids:            []*pb.X509SVID{east.svid(t, "/ns/shop/sa/web", serial), east.svid(t, "/ns/shop/sa/other", 99)},
			FederatedBundles: map[string][]byte{"spiffe://west.fedmesh.test": west.cert.Raw},
		}
	}
	bad := resp(3)
	bad.Svids[0].X509Svid = []byte("not a certificate")
	f := &fake{hold: make(chan struct{}), streams: [][]step{
		{{err: status.Error(codes.PermissionDenied, "no identity issued")}},
		{{resp: resp(1)}, {resp: bad}, {resp: resp(2)}, {err: status.Error(codes.Unavailable, "agent restarting")}},
		{{resp: resp(4)}},
	}}
	addr := f.serve(t)

	src, err := workload.NewX509Source(ctxT(t, 10*time.Second), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	waitSerial(t, src, 4) // 1, then 2 (the bad one kept 1), then 4 after the reconnect
	svid, _ := src.GetX509SVID()
	if svid.ID.String() != "spiffe://east.fedmesh.test/ns/shop/sa/web" {
		t.Fatalf("default SVID %s, want the first of the response", svid.ID)
	}
	for _, ca := range []*ca{east, west} {
		b, err := src.GetX509BundleForTrustDomain(ca.td)
		if err != nil || !b.HasX509Authority(ca.cert) {
			t.Fatalf("bundle of %s: %v (has CA: %v)", ca.td, err, err == nil && b.HasX509Authority(ca.cert))
		}
	}
	f.mu.Lock()
	calls := f.calls
	f.mu.Unlock()
	if calls != 3 {
		t.Fatalf("%d calls, want 3 (denied, broken, current)", calls)
	}
	src.Close()
	if _, err := src.GetX509SVID(); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("after Close: %v, want an error saying it is closed", err)
	}
}

// TestBadResponseKept: after a good response, one that does not parse
// never replaces the identity. The stream then breaks, and the source's
// reconnect (the fake's second call) shows that it has read the bad one.
func TestBadResponseKept(t *testing.T) {
	east := newCA(t, "east.fedmesh.test")
	good := &pb.X509SVIDResponse{Svids: []*pb.X509SVID{east.svid(t, "/web", 1)}}
	for name, bad := range map[string]*pb.X509SVIDResponse{
		"no SVID":       {},
		"bad key":       {Svids: []*pb.X509SVID{{SpiffeId: "spiffe://east.fedmesh.test/web", X509Svid: good.Svids[0].X509Svid, X509SvidKey: []byte{1, 2}, Bundle: east.cert.Raw}}},
		"bad bundle":    {Svids: []*pb.X509SVID{{SpiffeId: good.Svids[0].SpiffeId, X509Svid: good.Svids[0].X509Svid, X509SvidKey: good.Svids[0].X509SvidKey, Bundle: []byte("junk")}}},
		"bad td in map": {Svids: good.Svids, FederatedBundles: map[string][]byte{"not a trust domain!": east.cert.Raw}},
	} {
		t.Run(name, func(t *testing.T) {
			f := &fake{hold: make(chan struct{}), streams: [][]step{{{resp: good}, {resp: bad}, {err: status.Error(codes.Unavailable, "agent restarting")}}}}
			src, err := workload.NewX509Source(ctxT(t, 10*time.Second), f.serve(t))
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			deadline := time.Now().Add(5 * time.Second)
			for f.callCount() < 2 {
				if time.Now().After(deadline) {
					t.Fatal("the source did not reconnect within 5s after the broken stream")
				}
				time.Sleep(5 * time.Millisecond)
			}
			svid, err := src.GetX509SVID()
			if err != nil || svid == nil || !bytes.Equal(svid.Certificates[0].Raw, good.Svids[0].X509Svid) {
				t.Fatalf("identity after a bad response: %v", err)
			}
		})
	}
}

func TestNewSourceErrors(t *testing.T) {
	// Never an identity: the error says why, not only that time ran out.
	f := &fake{hold: make(chan struct{})}
	for range 100 {
		f.streams = append(f.streams, []step{{err: status.Error(codes.PermissionDenied, "no identity issued")}})
	}
	_, err := workload.NewX509Source(ctxT(t, 500*time.Millisecond), f.serve(t))
	if err == nil || !strings.Contains(err.Error(), "no identity issued") || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("error %v, want the deadline and the server's last answer", err)
	}

	// InvalidArgument is final: no waiting for the deadline.
	f = &fake{hold: make(chan struct{}), streams: [][]step{{{err: status.Error(codes.InvalidArgument, "bad request")}}}}
	start := time.Now()
	_, err = workload.NewX509Source(ctxT(t, 10*time.Second), f.serve(t))
	if err == nil || !strings.Contains(err.Error(), "bad request") || time.Since(start) > 5*time.Second {
		t.Fatalf("error %v after %v, want InvalidArgument at once", err, time.Since(start))
	}

	// Nothing listening.
	_, err = workload.NewX509Source(ctxT(t, 300*time.Millisecond), "unix:///nonexistent/fedmesh.sock")
	if err == nil || !strings.Contains(err.Error(), "nonexistent") {
		t.Fatalf("error %v, want one naming the socket", err)
	}

	for _, bad := range []string{"", "/run/spire.sock", "http://127.0.0.1:1"} {
		if _, err := workload.NewX509Source(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "unix://") {
			t.Errorf("address %q: %v, want an error showing the accepted forms", bad, err)
		}
	}
}
