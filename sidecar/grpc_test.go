package sidecar_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestGRPCStreamThroughTCPUpstream: a gRPC app (plaintext HTTP/2, as apps
// beside a sidecar speak) is reached through a TCP upstream: client ->
// client sidecar -> mTLS -> server sidecar -> app. A unary call answers and
// a server stream delivers every update in order while it stays open;
// many calls share the one HTTP/2 connection. The sidecar does not parse
// HTTP/2 (no per-request routing or retries for gRPC yet); it carries it
// end to end with mTLS between the pods.
func TestGRPCStreamThroughTCPUpstream(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	hs.SetServingStatus("shop.Checkout", healthpb.HealthCheckResponse_SERVING)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)

	server := startSidecar(t, "server", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: ln.Addr().String(),
	})
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 9090, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{{Name: "checkout-0", Addr: server.InboundAddr().String(), Ready: true}}}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolTCP}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	cc, err := grpc.NewClient("passthrough:///"+client.UpstreamAddr(0).String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for i := range 50 {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "shop.Checkout"})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("unary call %d through the sidecars: %v, %v", i, resp, err)
		}
	}

	stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: "shop.Checkout"})
	if err != nil {
		t.Fatal(err)
	}
	want := []healthpb.HealthCheckResponse_ServingStatus{healthpb.HealthCheckResponse_SERVING}
	if got, err := stream.Recv(); err != nil || got.GetStatus() != want[0] {
		t.Fatalf("stream's first message: %v, %v", got, err)
	}
	for i := range 20 {
		st := healthpb.HealthCheckResponse_NOT_SERVING
		if i%2 == 1 {
			st = healthpb.HealthCheckResponse_SERVING
		}
		hs.SetServingStatus("shop.Checkout", st)
		got, err := stream.Recv()
		if err != nil || got.GetStatus() != st {
			t.Fatalf("stream message %d: %v, %v; want %v", i+1, got, err, st)
		}
		// Unary calls interleave with the open stream on the same
		// connection.
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "shop.Checkout"}); err != nil {
			t.Fatalf("unary call beside the open stream: %v", err)
		}
	}
	// /state names the workload's SVID and its expiry (fedctl status shows
	// the earliest of a cluster's).
	if sv := client.State().SVID; sv.ID != west.ID("web").String() || !sv.Expires.After(time.Now()) || sv.Error != "" {
		t.Errorf("client /state svid = %+v, want %s expiring in the future", sv, west.ID("web"))
	}
	if n := metricSum(t, server.reg, "fedmesh_sidecar_inbound_connections_total"); n != 1 {
		t.Errorf("server sidecar accepted %v inbound connections, want 1 (every call on one HTTP/2 connection)", n)
	}
}
