package sidecar_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// grpcApp is a gRPC test service (grpc-go's interop TestService) that says
// who it is in a header and can be told to refuse with UNAVAILABLE.
type grpcApp struct {
	testpb.UnimplementedTestServiceServer
	health      *health.Server
	name        string
	unavailable atomic.Bool
	calls       atomic.Int64
}

func (a *grpcApp) UnaryCall(ctx context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	a.calls.Add(1)
	if a.unavailable.Load() {
		// Trailers-only, as a server refusing before any work answers.
		return nil, status.Error(codes.Unavailable, a.name+" is draining")
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs("served-by", a.name))
	if st := in.GetResponseStatus(); st.GetCode() != 0 {
		return nil, status.Error(codes.Code(st.GetCode()), st.GetMessage())
	}
	return &testpb.SimpleResponse{Payload: &testpb.Payload{Body: append([]byte(a.name+":"), in.GetPayload().GetBody()...)}}, nil
}

func (a *grpcApp) FullDuplexCall(stream testpb.TestService_FullDuplexCallServer) error {
	_ = stream.SendHeader(metadata.Pairs("served-by", a.name))
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			stream.SetTrailer(metadata.Pairs("echoed-by", a.name))
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

// testClient is a gRPC TestService client (plaintext HTTP/2, as an app
// beside its sidecar) of the listener at addr, closed with the test.
func testClient(t testing.TB, addr string) testpb.TestServiceClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return testpb.NewTestServiceClient(cc)
}

func startGRPCApp(t testing.TB, name string) (*grpcApp, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &grpcApp{name: name, health: health.NewServer()}
	srv := grpc.NewServer()
	testpb.RegisterTestServiceServer(srv, a)
	healthpb.RegisterHealthServer(srv, a.health)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return a, ln.Addr().String()
}

// TestGRPCThroughHTTP2Upstream: gRPC through a grpc upstream, with the
// sidecars speaking HTTP/2 inside their mTLS connection. Unary calls are
// balanced over two pods per call (not per connection), each pod's
// sidecar holding one connection from the client sidecar; a full-duplex
// stream echoes every message while it stays open and its trailers arrive;
// a gRPC error status and message pass through unchanged; a pod answering
// UNAVAILABLE is retried on the other pod (no call fails) and ejected; the
// same client works on an http upstream (HTTP/2 detected by its preface).
// One pod's sidecar parses requests (HTTP inbound), the other splices.
func TestGRPCThroughHTTP2Upstream(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	a, aAddr := startGRPCApp(t, "a")
	b, bAddr := startGRPCApp(t, "b")
	sa := startSidecar(t, "a", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: aAddr, InboundProtocol: sidecar.ProtocolHTTP,
	})
	sb := startSidecar(t, "b", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: bAddr,
	})
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 9090, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{
			{Name: "a", Addr: sa.InboundAddr().String(), Ready: true},
			{Name: "b", Addr: sb.InboundAddr().String(), Ready: true},
		}}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{
			{Namespace: "shop", Service: "checkout", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolGRPC},
			{Namespace: "shop", Service: "checkout", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolHTTP},
		},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	for _, up := range []struct {
		name string
		idx  int
	}{{"grpc upstream", 0}, {"http upstream (HTTP/2 by preface)", 1}} {
		tc := testClient(t, client.UpstreamAddr(up.idx).String())
		by := map[string]int{}
		for i := range 100 {
			var hdr metadata.MD
			resp, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{Payload: &testpb.Payload{Body: fmt.Appendf(nil, "%d", i)}}, grpc.Header(&hdr))
			if err != nil {
				t.Fatalf("%s: unary call %d: %v", up.name, i, err)
			}
			who := strings.Join(hdr.Get("served-by"), ",")
			if want := fmt.Sprintf("%s:%d", who, i); string(resp.GetPayload().GetBody()) != want {
				t.Fatalf("%s: call %d answered %q, want %q", up.name, i, resp.GetPayload().GetBody(), want)
			}
			by[who]++
		}
		// One client connection, yet both pods serve calls: the sidecar
		// balances each call (P2C over latency, so not evenly), where a
		// TCP upstream would tie the connection to one pod.
		if by["a"] < 1 || by["b"] < 1 {
			t.Errorf("%s: 100 calls on one client connection served by %v, want both pods", up.name, by)
		}
	}
	tc := testClient(t, client.UpstreamAddr(0).String())

	// An error status and its message come back as the app sent them.
	_, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "cart is empty ü"}})
	if st, _ := status.FromError(err); st.Code() != codes.FailedPrecondition || st.Message() != "cart is empty ü" {
		t.Errorf("error status through the sidecars = %v, want FailedPrecondition %q", err, "cart is empty ü")
	}

	// A full-duplex stream: every message echoed while the stream is open,
	// trailers at the end.
	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		body := fmt.Appendf(nil, "msg-%d", i)
		if err := stream.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: body}}); err != nil {
			t.Fatalf("stream send %d: %v", i, err)
		}
		got, err := stream.Recv()
		if err != nil || string(got.GetPayload().GetBody()) != string(body) {
			t.Fatalf("stream message %d: %q, %v; want %q", i, got.GetPayload().GetBody(), err, body)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v, want EOF", err)
	}
	if tr := stream.Trailer().Get("echoed-by"); len(tr) != 1 {
		t.Errorf("stream trailers = %v, want echoed-by", stream.Trailer())
	}

	// The pod that served most calls answers UNAVAILABLE: every call
	// still succeeds (retried on the other) and the refusing pod is
	// ejected, so it soon gets no calls at all.
	bad, good := a, b
	if b.calls.Load() > a.calls.Load() {
		bad, good = b, a
	}
	bad.unavailable.Store(true)
	before := bad.calls.Load()
	for i := range 100 {
		var hdr metadata.MD
		if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{}, grpc.Header(&hdr)); err != nil {
			t.Fatalf("call %d while pod %s refuses: %v", i, bad.name, err)
		}
		if who := hdr.Get("served-by"); len(who) != 1 || who[0] != good.name {
			t.Fatalf("call %d served by %v, want %s", i, who, good.name)
		}
	}
	if n := bad.calls.Load() - before; n < 1 || n > 10 {
		t.Errorf("pod %s got %d of 100 calls while refusing every one; want 1-10 (tried, then ejected)", bad.name, n)
	}
	if n := metricSum(t, client.reg, "fedmesh_sidecar_retries_total"); n < 1 {
		t.Errorf("retries_total = %v, want the UNAVAILABLE answers retried", n)
	}
	if n := metricSum(t, client.reg, "fedmesh_sidecar_ejections_total"); n < 1 {
		t.Errorf("ejections_total = %v, want pod a ejected", n)
	}
	// Each pod's sidecar saw at most a couple of connections from the
	// client sidecar: HTTP/2 multiplexes the calls of both upstreams.
	for _, s := range []*runningSidecar{sa, sb} {
		if n := metricSum(t, s.reg, "fedmesh_sidecar_inbound_connections_total"); n < 1 || n > 3 {
			t.Errorf("a pod's sidecar accepted %v inbound connections for 300+ calls, want 1-3 (HTTP/2 multiplexing)", n)
		}
	}
}

// TestHTTP2ThroughSidecars: plain HTTP/2 without TLS from the app (h2c
// prior knowledge) through an http2 upstream to an h2c app; the request
// body and headers arrive, and the answer's trailers come back.
func TestHTTP2ThroughSidecars(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	appSrv := &http.Server{Protocols: &protos, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Checksum")
		fmt.Fprintf(w, "%s %s %s %s", r.Proto, r.Method, r.URL.Path, body)
		w.Header().Set("X-Checksum", fmt.Sprint(len(body)))
	})}
	go func() { _ = appSrv.Serve(ln) }()
	t.Cleanup(func() { _ = appSrv.Close() })

	server := startSidecar(t, "server", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: ln.Addr().String(), InboundProtocol: sidecar.ProtocolHTTP,
	})
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "web", Port: 80, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{{Name: "web-0", Addr: server.InboundAddr().String(), Ready: true}}}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "web", Port: 80, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolHTTP2}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	var cp http.Protocols
	cp.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: &cp}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	for i := range 20 {
		resp, err := hc.Post("http://"+client.UpstreamAddr(0).String()+"/orders", "text/plain", strings.NewReader(fmt.Sprintf("order-%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("HTTP/2.0 POST /orders order-%d", i); resp.StatusCode != 200 || string(body) != want || resp.ProtoMajor != 2 {
			t.Fatalf("request %d: %s %q (proto %s), want 200 %q over HTTP/2", i, resp.Status, body, resp.Proto, want)
		}
		if got, want := resp.Trailer.Get("X-Checksum"), fmt.Sprint(len(fmt.Sprintf("order-%d", i))); got != want {
			t.Fatalf("request %d: trailer X-Checksum = %q, want %q", i, got, want)
		}
	}
	// An HTTP/1.1 client on the same http2 upstream is served too.
	resp, err := http.Get("http://" + client.UpstreamAddr(0).String() + "/h1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "HTTP/2.0 GET /h1 " {
		t.Errorf("HTTP/1.1 client on an http2 upstream: %s %q, want the app to see HTTP/2.0 GET /h1", resp.Status, body)
	}
}

// TestGRPCHealthCheck: a grpc upstream checks its endpoints with the
// standard gRPC health check, through their sidecars. A pod whose app says
// NOT_SERVING (while still answering calls) is ejected and gets no calls;
// once it says SERVING again it is back and serves again.
func TestGRPCHealthCheck(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	a, aAddr := startGRPCApp(t, "a")
	_, bAddr := startGRPCApp(t, "b")
	var eps []endpoints.Endpoint
	for name, addr := range map[string]string{"a": aAddr, "b": bAddr} {
		s := startSidecar(t, name, sidecar.Config{
			Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
			InboundAddr: "127.0.0.1:0", AppAddr: addr,
		})
		eps = append(eps, endpoints.Endpoint{Name: name, Addr: s.InboundAddr().String(), Ready: true})
	}
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 9090, Clusters: []endpoints.Cluster{{Name: "west", Endpoints: eps}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolGRPC}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	tc := testClient(t, client.UpstreamAddr(0).String())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	servedBy := func(n int) map[string]int {
		by := map[string]int{}
		for range n {
			var hdr metadata.MD
			if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{}, grpc.Header(&hdr)); err != nil {
				t.Fatalf("call: %v", err)
			}
			by[strings.Join(hdr.Get("served-by"), ",")]++
			time.Sleep(2 * time.Millisecond) // spread over several check rounds' worth of decay
		}
		return by
	}

	a.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	waitFor(t, "pod a ejected by the gRPC health check", 5*time.Second, func() bool {
		return metricSum(t, client.reg, "fedmesh_sidecar_ejections_total") >= 1
	})
	if by := servedBy(100); by["a"] != 0 {
		t.Fatalf("pod a says NOT_SERVING, yet served %d of 100 calls (%v)", by["a"], by)
	}
	a.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	waitFor(t, "pod a serving again", 5*time.Second, func() bool { return servedBy(20)["a"] > 0 })
}

// TestInboundPolicyOverHTTP2: a server sidecar that parses requests applies
// its AuthorizationPolicy to each HTTP/2 request: on one multiplexed
// connection from the caller's sidecar, the gRPC method a path rule admits
// is served and another is refused with PERMISSION_DENIED, never reaching
// the app.
func TestInboundPolicyOverHTTP2(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	a, aAddr := startGRPCApp(t, "a")
	src := &endpoints.Static{}
	server := startSidecar(t, "server", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: aAddr, InboundProtocol: sidecar.ProtocolHTTP,
		Service: sidecar.ServiceName{Namespace: "shop", Name: "checkout"}, ServicePort: 9090, Endpoints: src,
	})
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 9090,
		Clusters: []endpoints.Cluster{{Name: "west", Endpoints: []endpoints.Endpoint{{Name: "a", Addr: server.InboundAddr().String(), Ready: true}}}},
		Policy: &policy.Service{Namespace: "shop", Name: "checkout", Authz: &policy.Authorization{Policies: []string{"shop/unary-only"}, Rules: []policy.AuthzRule{
			{Policy: "shop/unary-only", IDs: []string{west.ID("web").String()}, Methods: []string{"POST"},
				Paths: []policy.PathMatch{{Type: policy.PathExact, Value: "/grpc.testing.TestService/UnaryCall"}}},
		}}},
	})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolGRPC}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	tc := testClient(t, client.UpstreamAddr(0).String())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	waitFor(t, "policy in force", 5*time.Second, func() bool {
		_, err := tc.EmptyCall(ctx, &testpb.Empty{})
		return status.Code(err) == codes.PermissionDenied
	})
	before := a.calls.Load()
	for i := range 10 {
		if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{}); err != nil {
			t.Fatalf("admitted call %d: %v", i, err)
		}
		stream, err := tc.FullDuplexCall(ctx)
		if err == nil {
			_, err = stream.Recv()
		}
		if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "shop/unary-only") {
			t.Fatalf("refused stream %d: %v, want PermissionDenied naming shop/unary-only", i, err)
		}
	}
	if n := a.calls.Load() - before; n != 10 {
		t.Errorf("the app served %d unary calls, want 10 (refused streams never reach it)", n)
	}
}
