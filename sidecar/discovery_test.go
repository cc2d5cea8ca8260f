package sidecar_test

import (
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/grpclite"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/discoverysource"
)

// discoveryServer serves each service's sets from its own channel.
type discoveryServer struct {
	pb.UnimplementedDiscoveryServer
	sets map[string]chan *pb.EndpointSet
}

func (d *discoveryServer) Watch(req *pb.WatchRequest, st pb.Discovery_WatchServer) error {
	ch := d.sets[req.GetNamespace()+"/"+req.GetService()]
	for {
		select {
		case <-st.Context().Done():
			return nil
		case set := <-ch:
			if err := st.Send(set); err != nil {
				return err
			}
		}
	}
}

// TestGarbagePolicyKeepsRoutes: through the real discovery API client, a
// route rule sends every request to checkout-v2; an undecodable policy that
// follows (with new endpoints) changes the endpoints but not the routing.
func TestGarbagePolicyKeepsRoutes(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	own := startBackend(t, west, "own", nil, nil)
	own2 := startBackend(t, west, "own-2", nil, nil)
	v2 := startBackend(t, west, "v2", nil, nil)

	srv := &discoveryServer{sets: map[string]chan *pb.EndpointSet{
		"shop/checkout": make(chan *pb.EndpointSet, 4), "shop/checkout-v2": make(chan *pb.EndpointSet, 4)}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	pb.RegisterDiscoveryServer(g, srv)
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)
	conn, err := grpclite.New(ln.Addr().String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)

	mk := func(name string, pol []byte, bs ...*backend) *pb.EndpointSet {
		cl := &pb.Cluster{Name: "west", Local: true}
		for _, b := range bs {
			ap := netip.MustParseAddrPort(b.inbound)
			cl.Endpoints = append(cl.Endpoints, &pb.Endpoint{Address: ap.Addr().String(), Ready: true,
				Ports: []*pb.Port{{Name: "http", Port: int32(ap.Port())}}})
		}
		return &pb.EndpointSet{Namespace: "shop", Service: name, LocalCluster: "west", Policy: pol,
			Ports: []*pb.Port{{Name: "http", Port: 8080}}, Clusters: []*pb.Cluster{cl}}
	}
	good, err := policy.Encode(&policy.Service{Namespace: "shop", Name: "checkout", Rules: []policy.Rule{{
		Route: "HTTPRoute shop/all-to-v2", Backends: []policy.Backend{backendRef(policy.KindService, "checkout-v2", 1)}}}})
	if err != nil {
		t.Fatal(err)
	}
	srv.sets["shop/checkout"] <- mk("checkout", good, own)
	srv.sets["shop/checkout-v2"] <- mk("checkout-v2", nil, v2)

	srcLogs := &testutil.SyncBuffer{}
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"),
		Endpoints: discoverysource.New(conn, slog.New(slog.NewTextHandler(srcLogs, nil))),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	url := "http://" + client.UpstreamAddr(0).String() + "/"
	servedBy := func() string { return get(t, "GET", url, nil).Header.Get("X-Served-By") }
	waitFor(t, "routed to v2", 10*time.Second, func() bool { return servedBy() == "v2" })

	srv.sets["shop/checkout"] <- mk("checkout", []byte(`{"rules":[{"backends":"garbage"}]}`), own2)
	waitFor(t, "new endpoints applied", 10*time.Second, func() bool {
		return strings.Contains(srcLogs.String(), "undecodable traffic policy") &&
			len(client.State().Upstreams[0].Targets) == 1 && client.State().Upstreams[0].Targets[0].Addr == own2.inbound
	})
	for range 20 {
		if by := servedBy(); by != "v2" {
			t.Fatalf("after a garbage policy a request was served by %q, want v2 (the last good policy)", by)
		}
	}
}
