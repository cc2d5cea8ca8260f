package discoverysource

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/internal/grpclite"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

func TestConvert(t *testing.T) {
	in := &pb.EndpointSet{Namespace: "demo", Service: "echo", LocalCluster: "east", Imported: true,
		Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}},
		Clusters: []*pb.Cluster{
			{Name: "east", Local: true, RttMicros: 5, Endpoints: []*pb.Endpoint{
				{Address: "127.0.0.10", Ready: true, Ports: []*pb.Port{{Name: "metrics", Port: 9090}, {Name: "http", Port: 15006}}},
				{Address: "127.0.0.11", Ready: true, Terminating: true, Ports: []*pb.Port{{Name: "http", Port: 15006}}},
				{Address: "127.0.0.12", Ready: true}, // no port: cannot be dialed
			}},
			{Name: "west", Stale: true, RttMicros: 1500, Endpoints: []*pb.Endpoint{{Address: "10.2.0.1", Ready: true}, {Address: "10.2.0.2"}}},
			// Remote pods with their target port: named to the gateway one
			// by one (an IPv6 address in canonical form).
			{Name: "north", Endpoints: []*pb.Endpoint{
				{Address: "10.3.0.1", Ready: true, Ports: []*pb.Port{{Name: "http", Port: 8080}}},
				{Address: "fd00:0:0::7", Ready: true, Ports: []*pb.Port{{Name: "http", Port: 8080}}},
			}},
		}}
	want := endpoints.Set{Namespace: "demo", Service: "echo", Port: 80, Clusters: []endpoints.Cluster{
		{Name: "east", Endpoints: []endpoints.Endpoint{
			{Name: "127.0.0.10:15006", Addr: "127.0.0.10:15006", Ready: true},
			{Name: "127.0.0.11:15006", Addr: "127.0.0.11:15006", Ready: false},
		}},
		{Name: "west", Gateway: true, RTT: endpoints.Duration(1500 * time.Microsecond), Endpoints: []endpoints.Endpoint{{Name: "west/0", Ready: true}, {Name: "west/1"}}},
		{Name: "north", Gateway: true, Endpoints: []endpoints.Endpoint{
			{Name: "north/10.3.0.1:8080", Addr: "10.3.0.1:8080", Ready: true},
			{Name: "north/[fd00::7]:8080", Addr: "[fd00::7]:8080", Ready: true},
		}},
	}}
	got, err := convert(decoded(t, in), 0)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// decoded is m as the sidecar receives it: marshaled by the controller's
// generated code, decoded by wire.go.
func decoded(t *testing.T, m *pb.EndpointSet) endpointSet {
	t.Helper()
	set, err := decodeEndpointSet(marshal(t, m))
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// dial is the sidecar's client of a discovery API at addr (cleartext, as
// on loopback).
func dial(t *testing.T, addr string) *grpclite.Client {
	t.Helper()
	c, err := grpclite.New(addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// server is a discovery server on a real gRPC listener whose sets the test
// pushes.
type server struct {
	pb.UnimplementedDiscoveryServer
	sets chan *pb.EndpointSet
}

func (s *server) Watch(_ *pb.WatchRequest, st pb.Discovery_WatchServer) error {
	for {
		select {
		case <-st.Context().Done():
			return nil
		case set, ok := <-s.sets:
			if !ok {
				return nil
			}
			if err := st.Send(set); err != nil {
				return err
			}
		}
	}
}

func serve(t *testing.T, addr string, s pb.DiscoveryServer) (*grpc.Server, string) {
	t.Helper()
	var ln net.Listener
	var err error
	for range 50 { // the port of a stopped server may take a moment to free
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	pb.RegisterDiscoveryServer(g, s)
	go g.Serve(ln)
	return g, ln.Addr().String()
}

// TestKeepsLastSetAcrossOutage: sets arrive; the controller goes away and
// nothing is delivered (not an empty set); it comes back and the new set
// arrives on the same channel.
func TestKeepsLastSetAcrossOutage(t *testing.T) {
	srv := &server{sets: make(chan *pb.EndpointSet, 4)}
	g, addr := serve(t, "127.0.0.1:0", srv)
	src := New(dial(t, addr), nil)
	src.MinBackoff, src.MaxBackoff = 20*time.Millisecond, 100*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ch, _ := src.Watch(ctx, "demo", "echo")

	mk := func(ready bool) *pb.EndpointSet {
		return &pb.EndpointSet{Namespace: "demo", Service: "echo", Ports: []*pb.Port{{Name: "http", Port: 80}},
			Clusters: []*pb.Cluster{{Name: "east", Local: true, Endpoints: []*pb.Endpoint{{Address: "127.0.0.1", Ready: ready, Ports: []*pb.Port{{Name: "http", Port: 8080}}}}}}}
	}
	srv.sets <- mk(true)
	if got := <-ch; !got.Clusters[0].Endpoints[0].Ready {
		t.Fatalf("first set %+v", got)
	}
	g.Stop()
	select {
	case got := <-ch:
		t.Fatalf("a set was delivered while the controller was away: %+v", got)
	case <-time.After(300 * time.Millisecond):
	}
	srv2 := &server{sets: make(chan *pb.EndpointSet, 4)}
	g2, _ := serve(t, addr, srv2)
	defer g2.Stop()
	srv2.sets <- mk(false)
	select {
	case got := <-ch:
		if got.Clusters[0].Endpoints[0].Ready {
			t.Fatalf("after reconnect: %+v", got)
		}
	case <-ctx.Done():
		t.Fatal("no set after the controller came back")
	}
}

// TestGarbagePolicyKeepsLastGood: a policy that does not decode never turns
// into "no policy": the set carries the last good policy, the failure is
// logged once per stream, and an explicitly empty policy still clears it.
func TestGarbagePolicyKeepsLastGood(t *testing.T) {
	srv := &server{sets: make(chan *pb.EndpointSet, 8)}
	g, addr := serve(t, "127.0.0.1:0", srv)
	defer g.Stop()
	var logs syncBuf
	src := New(dial(t, addr), slog.New(slog.NewTextHandler(&logs, nil)))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ch, _ := src.Watch(ctx, "demo", "echo")

	good := &policy.Service{Namespace: "demo", Name: "echo", Rules: []policy.Rule{{Route: "HTTPRoute demo/r",
		Backends: []policy.Backend{{Kind: policy.KindService, Namespace: "demo", Name: "echo-v2", Port: 80, Weight: 1}}}}}
	enc, err := policy.Encode(good)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(p []byte, n int) *pb.EndpointSet {
		eps := make([]*pb.Endpoint, n)
		for i := range eps {
			eps[i] = &pb.Endpoint{Address: "127.0.0.1", Ready: true}
		}
		return &pb.EndpointSet{Namespace: "demo", Service: "echo", Policy: p, Clusters: []*pb.Cluster{{Name: "west", Endpoints: eps}}}
	}
	recv := func() endpoints.Set {
		t.Helper()
		select {
		case s := <-ch:
			return s
		case <-ctx.Done():
			t.Fatal("no set")
		}
		return endpoints.Set{}
	}
	srv.sets <- mk(enc, 1)
	if got := recv(); cmp.Diff(good, got.Policy) != "" {
		t.Fatalf("first policy: %s", cmp.Diff(good, got.Policy))
	}
	for i := range 2 {
		srv.sets <- mk([]byte(`{"rules":[{"timeout":"forever"}]}`), 2+i)
		got := recv()
		if len(got.Clusters[0].Endpoints) != 2+i {
			t.Fatalf("garbage policy %d: endpoints not updated: %+v", i, got)
		}
		if diff := cmp.Diff(good, got.Policy); diff != "" {
			t.Fatalf("garbage policy %d replaced the last good one (-want +got):\n%s", i, diff)
		}
	}
	if n := strings.Count(logs.String(), "undecodable traffic policy"); n != 1 {
		t.Errorf("logged %d times, want once per stream:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "duration") {
		t.Errorf("the log does not say why: %s", logs.String())
	}
	srv.sets <- mk(nil, 1)
	if got := recv(); got.Policy != nil {
		t.Fatalf("empty policy did not clear it: %+v", got.Policy)
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestConvertPort: a set watched for one service port names that port and
// dials local endpoints at its target port, not the first port's.
func TestConvertPort(t *testing.T) {
	in := &pb.EndpointSet{Namespace: "demo", Service: "echo", LocalCluster: "east",
		Ports: []*pb.Port{{Name: "http", Port: 80}, {Name: "grpc", Port: 9090}},
		Clusters: []*pb.Cluster{{Name: "east", Local: true, Endpoints: []*pb.Endpoint{
			{Address: "127.0.0.10", Ready: true, Ports: []*pb.Port{{Name: "http", Port: 8080}, {Name: "grpc", Port: 9443}}}}}}}
	for _, tc := range []struct {
		port     uint16
		wantPort uint16
		wantAddr string
	}{{0, 80, "127.0.0.10:8080"}, {80, 80, "127.0.0.10:8080"}, {9090, 9090, "127.0.0.10:9443"}} {
		got, _ := convert(decoded(t, in), tc.port)
		if got.Port != tc.wantPort || got.Clusters[0].Endpoints[0].Addr != tc.wantAddr {
			t.Errorf("port %d: set port %d, endpoint %s; want %d, %s", tc.port, got.Port, got.Clusters[0].Endpoints[0].Addr, tc.wantPort, tc.wantAddr)
		}
	}
}

// dirServer serves directories the test pushes.
type dirServer struct {
	pb.UnimplementedDiscoveryServer
	dirs chan *pb.Directory
}

func (s *dirServer) WatchDirectory(_ *pb.DirectoryRequest, st pb.Discovery_WatchDirectoryServer) error {
	for {
		select {
		case <-st.Context().Done():
			return nil
		case d := <-s.dirs:
			if err := st.Send(d); err != nil {
				return err
			}
		}
	}
}

// TestDirectoryAcrossOutage: the directory arrives converted; while the
// controller is away nothing is delivered (the sidecar keeps the last one);
// after it comes back the new one arrives on the same channel.
func TestDirectoryAcrossOutage(t *testing.T) {
	srv := &dirServer{dirs: make(chan *pb.Directory, 2)}
	g, addr := serve(t, "127.0.0.1:0", srv)
	src := New(dial(t, addr), nil)
	src.MinBackoff, src.MaxBackoff = 20*time.Millisecond, 100*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ch, _ := src.WatchDirectory(ctx)
	srv.dirs <- &pb.Directory{LocalCluster: "east", Version: 1, Services: []*pb.VirtualService{
		{Namespace: "demo", Name: "echo", Imported: true, Ips: []string{"10.97.0.1"}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80, AppProtocol: "http"}}}}}
	want := []sidecar.VirtualService{{Namespace: "demo", Name: "echo", Imported: true, IPs: []string{"10.97.0.1"},
		Ports: []sidecar.ServicePort{{Name: "http", Protocol: "TCP", Port: 80, AppProtocol: "http"}}}}
	if diff := cmp.Diff(want, <-ch); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	g.Stop()
	select {
	case got := <-ch:
		t.Fatalf("a directory was delivered while the controller was away: %+v", got)
	case <-time.After(300 * time.Millisecond):
	}
	srv2 := &dirServer{dirs: make(chan *pb.Directory, 2)}
	g2, _ := serve(t, addr, srv2)
	defer g2.Stop()
	srv2.dirs <- &pb.Directory{LocalCluster: "east", Version: 1}
	select {
	case got := <-ch:
		if len(got) != 0 {
			t.Fatalf("after reconnect: %+v", got)
		}
	case <-ctx.Done():
		t.Fatal("no directory after the controller came back")
	}
}

// scriptServer answers each Watch stream in turn with the next list of
// sets, then holds the stream open.
type scriptServer struct {
	pb.UnimplementedDiscoveryServer
	mu      sync.Mutex
	streams [][]*pb.EndpointSet
}

func (s *scriptServer) Watch(_ *pb.WatchRequest, st pb.Discovery_WatchServer) error {
	s.mu.Lock()
	var sets []*pb.EndpointSet
	if len(s.streams) > 0 {
		sets, s.streams = s.streams[0], s.streams[1:]
	}
	s.mu.Unlock()
	for _, set := range sets {
		if err := st.Send(set); err != nil {
			return err
		}
	}
	<-st.Context().Done()
	return nil
}

// TestUndecodableSetEndsStream: a message that does not decode (here a
// namespace that is not UTF-8, which protobuf-go refuses too) ends the
// stream, as a failed Recv did with grpc-go: it is logged, nothing is
// delivered for it, and the next stream's set arrives.
func TestUndecodableSetEndsStream(t *testing.T) {
	mk := func(ready bool) *pb.EndpointSet {
		return &pb.EndpointSet{Namespace: "demo", Service: "echo", Ports: []*pb.Port{{Name: "http", Port: 80}},
			Clusters: []*pb.Cluster{{Name: "east", Local: true, Endpoints: []*pb.Endpoint{{Address: "127.0.0.1", Ready: ready, Ports: []*pb.Port{{Name: "http", Port: 8080}}}}}}}
	}
	bad := mk(false)
	// Unknown fields are sent as they are: this one is field 1 with bytes
	// that are not UTF-8.
	bad.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte{0xff}))
	srv := &scriptServer{streams: [][]*pb.EndpointSet{{mk(true), bad}, {mk(false)}}}
	g, addr := serve(t, "127.0.0.1:0", srv)
	defer g.Stop()
	var logs syncBuf
	src := New(dial(t, addr), slog.New(slog.NewTextHandler(&logs, nil)))
	src.MinBackoff, src.MaxBackoff = 20*time.Millisecond, 100*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ch, _ := src.Watch(ctx, "demo", "echo")
	for {
		select {
		case got := <-ch:
			if got.Namespace != "demo" {
				t.Fatalf("delivered %+v", got)
			}
			if got.Clusters[0].Endpoints[0].Ready {
				continue // the first stream's good set
			}
		case <-ctx.Done():
			t.Fatalf("no set from the second stream; logs:\n%s", logs.String())
		}
		break
	}
	if l := logs.String(); !strings.Contains(l, "decode EndpointSet: namespace: invalid UTF-8") {
		t.Errorf("the log does not say why the stream ended:\n%s", l)
	}
}

// TestCloseEndsWatches: Close ends every kind of watch, whose contexts the
// caller has not ended (a sidecar's Run may still be winding down), and
// returns only once their goroutines have; a watch asked for afterwards
// fails. Before Close existed these goroutines outlived the sidecar and used
// the client after its owner had closed it.
func TestCloseEndsWatches(t *testing.T) {
	testutil.CheckGoroutines(t)
	srv := &server{sets: make(chan *pb.EndpointSet, 4)}
	g, addr := serve(t, "127.0.0.1:0", srv)
	t.Cleanup(g.Stop)
	src := New(dial(t, addr), nil)
	ctx := context.Background() // never ends: only Close stops the watches
	srv.sets <- &pb.EndpointSet{Namespace: "demo", Service: "echo", Clusters: []*pb.Cluster{{Name: "east", Local: true}}}
	ch, err := src.Watch(ctx, "demo", "echo")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch: // the stream is up
	case <-time.After(10 * time.Second):
		t.Fatal("no set within 10s")
	}
	if _, err := src.WatchPort(ctx, "demo", "other", 80); err != nil {
		t.Fatal(err)
	}
	if _, err := src.WatchDirectory(ctx); err != nil { // the server has no directory: it retries with backoff
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { src.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return within 10s")
	}
	if _, err := src.Watch(ctx, "demo", "echo"); err == nil {
		t.Error("Watch after Close succeeded, want an error")
	}
}
