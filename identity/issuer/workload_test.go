package issuer

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestFetchX509SVID: go-spiffe's own client fetches SVIDs over the real unix
// socket; they verify with x509svid against the bundle and follow the
// X.509-SVID standard, for several lifetimes.
func TestFetchX509SVID(t *testing.T) {
	testutil.CheckGoroutines(t)
	tests := []struct {
		name     string
		svidTTL  time.Duration
		entryTTL string
		wantTTL  time.Duration
	}{
		{name: "default 1h", wantTTL: time.Hour},
		{name: "issuer ttl 1m", svidTTL: time.Minute, wantTTL: time.Minute},
		{name: "entry ttl overrides", svidTTL: time.Hour, entryTTL: "10m", wantTTL: 10 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := newTestConfig(t, "east.fedmesh.test")
			cfg.SVIDTTL = tt.svidTTL
			cfg.Entries[0].TTL = tt.entryTTL
			iss := startIssuer(t, cfg)

			ctx := ctxT(t)
			x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(iss.addr()))
			if err != nil {
				t.Fatalf("fetch x509 context: %v", err)
			}
			if len(x509ctx.SVIDs) != 1 {
				t.Fatalf("got %d svids, want 1", len(x509ctx.SVIDs))
			}
			svid := x509ctx.SVIDs[0]
			want := spiffeid.RequireFromString("spiffe://east.fedmesh.test/ns/shop/sa/checkout")
			id, chains, err := x509svid.Verify(svid.Certificates, x509ctx.Bundles)
			if err != nil {
				t.Fatalf("verify svid with x509svid: %v", err)
			}
			if id != want || svid.ID != want {
				t.Errorf("svid id %s (verified %s), want %s", svid.ID, id, want)
			}
			if root := chains[0][len(chains[0])-1]; !iss.Bundle().HasX509Authority(root) {
				t.Errorf("chain root %s is not in the issuer's bundle", root.Subject)
			}
			checkSVIDStandard(t, svid.Certificates[0], tt.wantTTL)

			bundles, err := workloadapi.FetchX509Bundles(ctx, workloadapi.WithAddr(iss.addr()))
			if err != nil {
				t.Fatalf("fetch x509 bundles: %v", err)
			}
			b, err := bundles.GetX509BundleForTrustDomain(cfg.TrustDomain)
			if err != nil {
				t.Fatalf("own bundle missing from FetchX509Bundles: %v", err)
			}
			if !b.Equal(iss.Bundle().X509Bundle()) {
				t.Errorf("FetchX509Bundles bundle differs from the issuer's")
			}
		})
	}
}

// checkSVIDStandard checks the X.509-SVID standard's leaf rules.
func checkSVIDStandard(t *testing.T, leaf *x509.Certificate, ttl time.Duration) {
	t.Helper()
	if len(leaf.URIs) != 1 {
		t.Errorf("leaf has %d URI SANs, want exactly 1", len(leaf.URIs))
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		t.Errorf("leaf IsCA=%v BasicConstraintsValid=%v, want a valid non-CA", leaf.IsCA, leaf.BasicConstraintsValid)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %b, want digitalSignature only", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ext key usage %v, want serverAuth+clientAuth", leaf.ExtKeyUsage)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore) - backdate; got < ttl-2*time.Second || got > ttl+2*time.Second {
		t.Errorf("lifetime %s, want %s", got, ttl)
	}
}

// TestJWT: JWT-SVIDs fetched through go-spiffe validate through the issuer's
// ValidateJWTSVID and against FetchJWTBundles, and only for their audience.
func TestJWT(t *testing.T) {
	testutil.CheckGoroutines(t)
	iss := startIssuer(t, newTestConfig(t, "east.fedmesh.test"))
	ctx := ctxT(t)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(iss.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	svid, err := client.FetchJWTSVID(ctx, jwtParams("spiffe://west.fedmesh.test/ns/shop/sa/cart"))
	if err != nil {
		t.Fatalf("fetch jwt-svid: %v", err)
	}
	if svid.ID.String() != "spiffe://east.fedmesh.test/ns/shop/sa/checkout" {
		t.Errorf("jwt-svid id %s", svid.ID)
	}
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("fetch jwt bundles: %v", err)
	}
	if _, err := jwtParse(svid.Marshal(), bundles, "spiffe://west.fedmesh.test/ns/shop/sa/cart"); err != nil {
		t.Errorf("jwt-svid does not validate against FetchJWTBundles: %v", err)
	}

	tests := []struct {
		name     string
		audience string
		wantCode codes.Code
	}{
		{"right audience", "spiffe://west.fedmesh.test/ns/shop/sa/cart", codes.OK},
		{"wrong audience", "spiffe://west.fedmesh.test/ns/shop/sa/other", codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := client.ValidateJWTSVID(ctx, svid.Marshal(), tt.audience)
			if status.Code(err) != tt.wantCode {
				t.Fatalf("validate: code %v (%v), want %v", status.Code(err), err, tt.wantCode)
			}
			if err == nil && got.ID != svid.ID {
				t.Errorf("validated id %s, want %s", got.ID, svid.ID)
			}
		})
	}
}

// rawClient dials the socket with plain gRPC, so tests control metadata.
func rawClient(t *testing.T, addr string) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return workload.NewSpiffeWorkloadAPIClient(cc)
}

// call runs one Workload API method and returns its first error.
type call func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error

func firstRecv[T any](s grpc.ServerStreamingClient[T], err error) error {
	if err != nil {
		return err
	}
	_, err = s.Recv()
	return err
}

var methods = []struct {
	name string
	call call
}{
	{"FetchX509SVID", func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		return firstRecv(c.FetchX509SVID(ctx, &workload.X509SVIDRequest{}))
	}},
	{"FetchX509Bundles", func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		return firstRecv(c.FetchX509Bundles(ctx, &workload.X509BundlesRequest{}))
	}},
	{"FetchJWTBundles", func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		return firstRecv(c.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{}))
	}},
	{"FetchJWTSVID", func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		_, err := c.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
		return err
	}},
	{"ValidateJWTSVID", func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		_, err := c.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "x", Svid: "not.a.jwt"})
		return err
	}},
}

// TestSecurityHeader: without workload.spiffe.io: true every method answers
// InvalidArgument; with a wrong value too; with it, registered callers pass.
// ValidateJWTSVID gets a valid JWT-SVID of the caller's own, so its only
// reason to refuse is the header.
func TestSecurityHeader(t *testing.T) {
	testutil.CheckGoroutines(t)
	iss := startIssuer(t, newTestConfig(t, "east.fedmesh.test"))
	c := rawClient(t, iss.addr())
	hctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hctx = metadata.NewOutgoingContext(hctx, metadata.Pairs("workload.spiffe.io", "true"))
	fetched, err := c.FetchJWTSVID(hctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
	if err != nil || len(fetched.GetSvids()) == 0 {
		t.Fatalf("fetch a jwt-svid to validate: %v (%d svids)", err, len(fetched.GetSvids()))
	}
	token := fetched.Svids[0]
	validate := func(ctx context.Context, c workload.SpiffeWorkloadAPIClient) error {
		resp, err := c.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "x", Svid: token.Svid})
		if err == nil && resp.SpiffeId != token.SpiffeId {
			return fmt.Errorf("validated as %q, want %q", resp.SpiffeId, token.SpiffeId)
		}
		return err
	}
	headers := []struct {
		name string
		md   metadata.MD
		want codes.Code
	}{
		{"missing", nil, codes.InvalidArgument},
		{"wrong value", metadata.Pairs("workload.spiffe.io", "yes"), codes.InvalidArgument},
		{"present", metadata.Pairs("workload.spiffe.io", "true"), codes.OK},
	}
	for _, h := range headers {
		for _, m := range methods {
			t.Run(h.name+"/"+m.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if h.md != nil {
					ctx = metadata.NewOutgoingContext(ctx, h.md)
				}
				call := m.call
				if m.name == "ValidateJWTSVID" {
					call = validate
				}
				if err := call(ctx, c); status.Code(err) != h.want || (h.want == codes.OK && err != nil) {
					t.Fatalf("code %v (%v), want %v", status.Code(err), err, h.want)
				}
			})
		}
	}
}

// TestAttestation: the caller's uid/gid/pid/executable and the socket it
// dialled decide its identity; with no matching entry every method answers
// PermissionDenied.
func TestAttestation(t *testing.T) {
	testutil.CheckGoroutines(t)
	me := self(t) // uid, gid, pid, path
	other := func(sel string) string {
		// same kind, a value the test process does not have
		switch {
		case sel[:9] == "unix:path":
			return "unix:path:/nonexistent/binary"
		default:
			kind := sel[:len(sel)-len(lastField(sel))]
			n, _ := strconv.Atoi(lastField(sel))
			return kind + strconv.Itoa(n+12345)
		}
	}
	tests := []struct {
		name      string
		selectors []string
		allowed   bool
	}{
		{"uid", me[:1], true},
		{"gid", me[1:2], true},
		{"pid", me[2:3], true},
		{"path", me[3:4], true},
		{"all four", me, true},
		{"other uid", []string{other(me[0])}, false},
		{"other gid", []string{other(me[1])}, false},
		{"other pid", []string{other(me[2])}, false},
		{"other path", []string{other(me[3])}, false},
		{"uid matches but path does not", []string{me[0], other(me[3])}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := newTestConfig(t, "east.fedmesh.test")
			cfg.Entries[0].Selectors = tt.selectors
			iss := startIssuer(t, cfg)
			c := rawClient(t, iss.addr())
			for _, m := range methods {
				ctx := metadata.AppendToOutgoingContext(ctxT(t), "workload.spiffe.io", "true")
				err := m.call(ctx, c)
				code := status.Code(err)
				switch {
				case !tt.allowed && code != codes.PermissionDenied:
					t.Errorf("%s: code %v (%v), want PermissionDenied", m.name, code, err)
				case tt.allowed && code == codes.PermissionDenied:
					t.Errorf("%s: PermissionDenied for a matching caller: %v", m.name, err)
				}
			}
		})
	}

	t.Run("per-workload socket", func(t *testing.T) {
		cfg := newTestConfig(t, "east.fedmesh.test")
		gwSock := filepath.Join(filepath.Dir(cfg.SocketPath), "gw.sock")
		cfg.Entries = append(cfg.Entries, Entry{
			SPIFFEID: "spiffe://east.fedmesh.test/ns/fedmesh-system/sa/gateway",
			Socket:   gwSock,
		})
		iss := startIssuer(t, cfg)
		ctx := ctxT(t)
		for _, tc := range []struct{ addr, want string }{
			{iss.addr(), "spiffe://east.fedmesh.test/ns/shop/sa/checkout"},
			{"unix://" + gwSock, "spiffe://east.fedmesh.test/ns/fedmesh-system/sa/gateway"},
		} {
			x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(tc.addr))
			if err != nil {
				t.Fatalf("fetch on %s: %v", tc.addr, err)
			}
			var got []string
			for _, s := range x.SVIDs {
				got = append(got, s.ID.String())
			}
			if !slices.Equal(got, []string{tc.want}) {
				t.Errorf("socket %s served %v, want [%s]", tc.addr, got, tc.want)
			}
		}
	})
}

func lastField(s string) string {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == ':' {
			return s[i+1:]
		}
	}
	return s
}

// TestRotationWithoutReconnect: a long-running X509Source sees its SVID
// renewed at half-life, pushed down the same stream, several times; the
// issuer accepted exactly one connection for it.
func TestRotationWithoutReconnect(t *testing.T) {
	testutil.CheckGoroutines(t)
	clock := newFakeClock()
	cfg := newTestConfig(t, "east.fedmesh.test")
	cfg.Clock = clock
	cfg.SVIDTTL = time.Hour
	iss := startIssuer(t, cfg)
	src := newSource(t, iss.addr())

	first, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	prev := first
	for round := range 3 {
		// Certificate times have whole seconds; allow for the truncation.
		renewAt := prev.Certificates[0].NotBefore.Add(backdate + 30*time.Minute + 2*time.Second)
		// The rotator must be asleep until the half-life of the served SVID.
		clock.waitForTimerBefore(t, renewAt)
		if e := clock.earliest(); e.Before(renewAt.Add(-5 * time.Second)) {
			t.Fatalf("round %d: rotator wakes at %s, before the half-life %s", round, e, renewAt)
		}
		clock.Advance(renewAt.Sub(clock.Now()))
		var cur = prev
		waitFor(t, "the source to receive a renewed svid", func() bool {
			cur, err = src.GetX509SVID()
			return err == nil && cur.Certificates[0].SerialNumber.Cmp(prev.Certificates[0].SerialNumber) != 0
		})
		if _, _, err := x509svid.Verify(cur.Certificates, src, x509svid.WithTime(clock.Now())); err != nil {
			t.Fatalf("round %d: renewed svid does not verify: %v", round, err)
		}
		if cur.ID != first.ID {
			t.Fatalf("round %d: renewed svid has id %s, want %s", round, cur.ID, first.ID)
		}
		if got := cur.Certificates[0].NotBefore; !got.After(prev.Certificates[0].NotBefore) {
			t.Fatalf("round %d: renewed svid not newer (%s vs %s)", round, got, prev.Certificates[0].NotBefore)
		}
		prev = cur
	}
	if n := metricValue(t, iss.metrics.connections); n != 1 {
		t.Errorf("issuer accepted %v connections, want 1 (the source must not reconnect)", n)
	}
	if n := metricValue(t, iss.metrics.streams); n != 1 {
		t.Errorf("%v open streams, want 1", n)
	}
	// 1 SVID for the workload + 3 renewals; no bundle endpoint configured.
	if n := metricValue(t, iss.metrics.x509Issued); n != 4 {
		t.Errorf("issued %v x509-svids, want 4", n)
	}
}

// TestStreamCarriesCompleteSet: every message on a stream has the caller's
// full SVID set and bundles, not a delta.
func TestStreamCarriesCompleteSet(t *testing.T) {
	testutil.CheckGoroutines(t)
	cfg := newTestConfig(t, "east.fedmesh.test")
	cfg.Entries = append(cfg.Entries, Entry{SPIFFEID: "spiffe://east.fedmesh.test/ns/shop/sa/audit", Selectors: self(t)[:1]})
	iss := startIssuer(t, cfg)
	c := rawClient(t, iss.addr())
	ctx := metadata.AppendToOutgoingContext(ctxT(t), "workload.spiffe.io", "true")
	s, err := c.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string) {
		msg, err := s.Recv()
		if err != nil {
			t.Fatalf("%s: recv: %v", what, err)
		}
		var ids []string
		for _, sv := range msg.Svids {
			ids = append(ids, sv.SpiffeId)
			if len(sv.Bundle) == 0 || len(sv.X509Svid) == 0 || len(sv.X509SvidKey) == 0 {
				t.Errorf("%s: svid %s lacks certificate, key or bundle", what, sv.SpiffeId)
			}
		}
		want := []string{"spiffe://east.fedmesh.test/ns/shop/sa/checkout", "spiffe://east.fedmesh.test/ns/shop/sa/audit"}
		if !slices.Equal(ids, want) {
			t.Errorf("%s: svids %v, want %v", what, ids, want)
		}
	}
	check("first message")
	// A CA change wakes every stream; the next message is again complete.
	if err := iss.caStep(stepPrepare, iss.clock.Now()); err != nil {
		t.Fatal(err)
	}
	check("after a bundle change")
	if err := s.CloseSend(); err != nil && err != io.EOF {
		t.Fatal(err)
	}
}

func jwtParams(audience string) jwtsvid.Params { return jwtsvid.Params{Audience: audience} }

func jwtParse(token string, bundles jwtbundle.Source, audience string) (*jwtsvid.SVID, error) {
	return jwtsvid.ParseAndValidate(token, bundles, []string{audience})
}

// metricValue reads a counter or gauge.
func metricValue(t testing.TB, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}
