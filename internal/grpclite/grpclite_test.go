package grpclite_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fedmesh/fedmesh/internal/grpclite"
)

// raw passes messages through as bytes, so the test server sees exactly
// what the client framed.
type raw struct{}

func (raw) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(b []byte, v any) error    { *(v.(*[]byte)) = append([]byte(nil), b...); return nil }
func (raw) Name() string                       { return "proto" }
func (raw) String() string                     { return "raw" }
func (r raw) Marshal2(v any) ([]byte, error)   { return r.Marshal(v) }
func (r raw) Unmarshal2(b []byte, v any) error { return r.Unmarshal(b, v) }

// script is what the test server does for a method: it receives the one
// request, then runs the handler.
type script func(req []byte, md metadata.MD, send func([]byte) error) error

// serve runs a real grpc-go server on lis whose every method is handled by
// the script of that name.
func serve(t *testing.T, lis net.Listener, scripts map[string]script, opts ...grpc.ServerOption) {
	t.Helper()
	opts = append(opts, grpc.ForceServerCodec(raw{}), grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(st)
		sc, ok := scripts[method]
		if !ok {
			return status.Errorf(codes.Unimplemented, "no method %s", method)
		}
		var req []byte
		if err := st.RecvMsg(&req); err != nil {
			return err
		}
		md, _ := metadata.FromIncomingContext(st.Context())
		return sc(req, md, func(b []byte) error { return st.SendMsg(&b) })
	}))
	srv := grpc.NewServer(opts...)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
}

func listenUnix(t *testing.T) (net.Listener, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return lis, sock
}

func listenTCP(t *testing.T) net.Listener {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return lis
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func newClient(t *testing.T, target string, tc *tls.Config) *grpclite.Client {
	t.Helper()
	c, err := grpclite.New(target, tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestStreamOverUnixSocket(t *testing.T) {
	lis, sock := listenUnix(t)
	serve(t, lis, map[string]script{
		"/test.Svc/Stream": func(req []byte, md metadata.MD, send func([]byte) error) error {
			if got := md.Get("workload.spiffe.io"); len(got) != 1 || got[0] != "true" {
				return status.Errorf(codes.InvalidArgument, "metadata workload.spiffe.io = %q", got)
			}
			for i := range 3 {
				if err := send(fmt.Appendf(nil, "%s-%d", req, i)); err != nil {
					return err
				}
			}
			if err := send(nil); err != nil { // an empty message is a message
				return err
			}
			return nil
		},
	})
	for _, target := range []string{"unix://" + sock, "unix:" + sock} {
		c := newClient(t, target, nil)
		st, err := c.ServerStream(ctx(t), "/test.Svc/Stream", map[string]string{"workload.spiffe.io": "true"}, []byte("hello"))
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		var got []string
		for {
			m, err := st.Recv(1 << 10)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: recv: %v", target, err)
			}
			got = append(got, string(m))
		}
		if want := "hello-0,hello-1,hello-2,"; strings.Join(got, ",") != want {
			t.Fatalf("%s: got %q, want %q", target, strings.Join(got, ","), want)
		}
		if _, err := st.Recv(1 << 10); err != io.EOF {
			t.Fatalf("%s: Recv after the end = %v, want io.EOF again", target, err)
		}
	}
}

func TestStatusErrors(t *testing.T) {
	lis := listenTCP(t)
	serve(t, lis, map[string]script{
		// Trailers-only: the status comes in the response headers.
		"/test.Svc/Denied": func([]byte, metadata.MD, func([]byte) error) error {
			return status.Error(codes.PermissionDenied, "no identity issued: 100% sure\nsecond line")
		},
		// A status after messages comes in trailers.
		"/test.Svc/Late": func(_ []byte, _ metadata.MD, send func([]byte) error) error {
			if err := send([]byte("one")); err != nil {
				return err
			}
			return status.Error(codes.Unavailable, "going away")
		},
		"/test.Svc/Big": func(_ []byte, _ metadata.MD, send func([]byte) error) error {
			return send(make([]byte, 2048))
		},
		"/test.Svc/Two": func(_ []byte, _ metadata.MD, send func([]byte) error) error {
			_ = send([]byte("a"))
			return send([]byte("b"))
		},
	})
	c := newClient(t, lis.Addr().String(), nil)

	st, err := c.ServerStream(ctx(t), "/test.Svc/Denied", nil, nil)
	if err == nil { // grpc-go may also send it after the headers
		_, err = st.Recv(1024)
	}
	var e *grpclite.Error
	if !errors.As(err, &e) || e.Code != grpclite.PermissionDenied || e.Message != "no identity issued: 100% sure\nsecond line" {
		t.Fatalf("denied call: %#v, want PermissionDenied with the message decoded", err)
	}

	st, err = c.ServerStream(ctx(t), "/test.Svc/Late", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(1024); err != nil || string(m) != "one" {
		t.Fatalf("first message: %q, %v", m, err)
	}
	if _, err := st.Recv(1024); grpclite.CodeOf(err) != grpclite.Unavailable || !strings.Contains(err.Error(), "going away") {
		t.Fatalf("end of stream: %v, want Unavailable going away", err)
	}

	st, err = c.ServerStream(ctx(t), "/test.Svc/Big", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(1024); grpclite.CodeOf(err) != grpclite.ResourceExhausted || !strings.Contains(err.Error(), "2048 bytes") {
		t.Fatalf("oversized message: %v, want ResourceExhausted naming its size", err)
	}

	if _, err := c.Unary(ctx(t), "/test.Svc/Nope", nil, nil, 1024); grpclite.CodeOf(err) != grpclite.Unimplemented {
		t.Fatalf("unknown method: %v, want Unimplemented", err)
	}
	if _, err := c.Unary(ctx(t), "/test.Svc/Two", nil, nil, 1024); grpclite.CodeOf(err) != grpclite.Internal || !strings.Contains(err.Error(), "more than one") {
		t.Fatalf("unary with two answers: %v, want Internal", err)
	}
}

func TestUnaryAgainstGRPCHealth(t *testing.T) {
	lis := listenTCP(t)
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("shop", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)

	c := newClient(t, lis.Addr().String(), nil)
	check := func(svc string) (healthpb.HealthCheckResponse_ServingStatus, error) {
		req, _ := proto.Marshal(&healthpb.HealthCheckRequest{Service: svc})
		b, err := c.Unary(ctx(t), "/grpc.health.v1.Health/Check", nil, req, 1024)
		if err != nil {
			return 0, err
		}
		var resp healthpb.HealthCheckResponse
		if err := proto.Unmarshal(b, &resp); err != nil {
			t.Fatalf("answer does not decode: %v", err)
		}
		return resp.GetStatus(), nil
	}
	if s, err := check(""); err != nil || s != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("overall health: %v, %v", s, err)
	}
	if s, err := check("shop"); err != nil || s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("shop health: %v, %v", s, err)
	}
	if _, err := check("unknown"); grpclite.CodeOf(err) != grpclite.NotFound {
		t.Fatalf("unknown service: %v, want NotFound", err)
	}
}

func TestTLS(t *testing.T) {
	// httptest's certificate names 127.0.0.1.
	ts := httptest.NewTLSServer(nil)
	certs, leaf := ts.TLS.Certificates, ts.Certificate()
	ts.Close()
	lis := listenTCP(t)
	serve(t, lis, map[string]script{
		"/test.Svc/Echo": func(req []byte, _ metadata.MD, send func([]byte) error) error { return send(req) },
	}, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: certs})))
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	c := newClient(t, lis.Addr().String(), &tls.Config{RootCAs: roots})
	if b, err := c.Unary(ctx(t), "/test.Svc/Echo", nil, []byte("over tls"), 1024); err != nil || string(b) != "over tls" {
		t.Fatalf("unary over TLS: %q, %v", b, err)
	}
	// Cleartext HTTP/2 to a TLS server fails, and says so.
	plain := newClient(t, lis.Addr().String(), nil)
	if _, err := plain.Unary(ctx(t), "/test.Svc/Echo", nil, nil, 1024); grpclite.CodeOf(err) != grpclite.Unavailable {
		t.Fatalf("cleartext to a TLS server: %v, want Unavailable", err)
	}
	// A server whose certificate does not verify is refused.
	untrusting := newClient(t, lis.Addr().String(), &tls.Config{RootCAs: x509.NewCertPool()})
	if _, err := untrusting.Unary(ctx(t), "/test.Svc/Echo", nil, nil, 1024); grpclite.CodeOf(err) != grpclite.Unavailable || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("untrusted server: %v, want Unavailable naming the certificate", err)
	}
}

func TestUnreachableAndCanceled(t *testing.T) {
	lis := listenTCP(t)
	addr := lis.Addr().String()
	lis.Close()
	c := newClient(t, addr, nil)
	if _, err := c.ServerStream(ctx(t), "/test.Svc/X", nil, nil); grpclite.CodeOf(err) != grpclite.Unavailable {
		t.Fatalf("nothing listening: %v, want Unavailable", err)
	}

	lis = listenTCP(t)
	started := make(chan struct{})
	serve(t, lis, map[string]script{
		"/test.Svc/Hang": func(_ []byte, _ metadata.MD, send func([]byte) error) error {
			if err := send([]byte("first")); err != nil {
				return err
			}
			close(started)
			time.Sleep(time.Hour) // until the client goes
			return nil
		},
	})
	c = newClient(t, lis.Addr().String(), nil)
	cctx, cancel := context.WithCancel(ctx(t))
	st, err := c.ServerStream(cctx, "/test.Svc/Hang", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(1024); err != nil {
		t.Fatal(err)
	}
	<-started
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if _, err := st.Recv(1024); grpclite.CodeOf(err) != grpclite.Canceled {
		t.Fatalf("canceled: %v, want Canceled", err)
	}

	for _, bad := range []string{"unix://host/path", "unix:", "no-port", ""} {
		if _, err := grpclite.New(bad, nil); err == nil {
			t.Errorf("New(%q) accepted a bad target", bad)
		}
	}
}

// TestKeepaliveAgainstControllerPolicy: a quiet stream stays up against a
// server configured as the federation controller is (it permits pings and
// pings first), and the same client against grpc-go's default policy is
// told "too_many_pings", which is why the controller sets one. Intervals
// are scaled down about 20x.
func TestKeepaliveAgainstControllerPolicy(t *testing.T) {
	defer grpclite.SetPingAfter(2 * time.Second)()
	quiet := map[string]script{
		"/test.Svc/Quiet": func(_ []byte, _ metadata.MD, send func([]byte) error) error {
			if err := send([]byte("only")); err != nil {
				return err
			}
			time.Sleep(time.Hour)
			return nil
		},
	}
	run := func(opts ...grpc.ServerOption) error {
		lis := listenTCP(t)
		serve(t, lis, quiet, opts...)
		c := newClient(t, lis.Addr().String(), nil)
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := c.ServerStream(cctx, "/test.Svc/Quiet", nil, nil)
		if err != nil {
			return err
		}
		if _, err := st.Recv(1024); err != nil {
			return err
		}
		_, err = st.Recv(1024) // until the deadline, or the server gives up on us
		return err
	}
	controllerLike := []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 500 * time.Millisecond, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 1300 * time.Millisecond, Timeout: 500 * time.Millisecond}),
	}
	errs := make(chan error, 2)
	go func() { errs <- run(controllerLike...) }()
	// grpc-go's default: pings more often than every 5 minutes are strikes.
	dflt := run()
	if grpclite.CodeOf(dflt) != grpclite.Unavailable || !strings.Contains(dflt.Error(), "too_many_pings") {
		t.Errorf("quiet stream against grpc-go's default policy ended with %v, want GOAWAY too_many_pings", dflt)
	}
	if err := <-errs; grpclite.CodeOf(err) != grpclite.DeadlineExceeded {
		t.Errorf("quiet stream against the controller's policy ended with %v, want it to last until the deadline", err)
	}
}
