package discovery

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
)

// fakeDirectory is a DirectorySource whose directory the test sets.
type fakeDirectory struct {
	mu     sync.Mutex
	dir    *pb.Directory
	err    error
	builds int
}

func (f *fakeDirectory) Snapshot(ns, name string) (*pb.EndpointSet, error) {
	return &pb.EndpointSet{Namespace: ns, Service: name}, nil
}

func (f *fakeDirectory) Directory() (*pb.Directory, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.builds++
	if f.err != nil {
		return nil, f.err
	}
	return &pb.Directory{LocalCluster: f.dir.LocalCluster, Services: f.dir.Services}, nil
}

func (f *fakeDirectory) set(d *pb.Directory, err error) {
	f.mu.Lock()
	f.dir, f.err = d, err
	f.mu.Unlock()
}

// TestWatchDirectory: a stream gets the directory at once; a notification
// that changes nothing sends nothing; a change arrives with a higher
// version; a burst of notifications is one build; a source that stops
// leading ends the stream with its status.
func TestWatchDirectory(t *testing.T) {
	src := &fakeDirectory{dir: &pb.Directory{LocalCluster: "east", Services: []*pb.VirtualService{{Namespace: "a", Name: "b", Ips: []string{"10.0.0.1"}}}}}
	s := NewServer(src, nil, nil)
	s.dir.debounce = 20 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	pb.RegisterDiscoveryServer(g, s)
	go g.Serve(ln)
	defer g.Stop()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := pb.NewDiscoveryClient(conn).WatchDirectory(ctx, &pb.DirectoryRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil || len(first.Services) != 1 || first.Version == 0 {
		t.Fatalf("first directory %v, %v", first, err)
	}

	s.NotifyDirectory() // nothing changed: nothing is sent
	src.set(&pb.Directory{LocalCluster: "east", Services: append(first.Services, &pb.VirtualService{Namespace: "a", Name: "c", Ips: []string{"10.0.0.2"}})}, nil)
	src.mu.Lock()
	before := src.builds
	src.mu.Unlock()
	time.Sleep(50 * time.Millisecond) // the first notification's build is done
	for range 100 {
		s.NotifyDirectory()
	}
	next, err := st.Recv()
	if err != nil || len(next.Services) != 2 || next.Version <= first.Version {
		t.Fatalf("after a change: %v, %v (first version %d)", next, err, first.Version)
	}
	src.mu.Lock()
	builds := src.builds - before
	src.mu.Unlock()
	if builds > 2 {
		t.Errorf("100 notifications made %d builds", builds)
	}

	src.set(nil, status.Error(codes.Unavailable, "not leading"))
	s.NotifyDirectory()
	if _, err := st.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after losing the lead: %v, want Unavailable", err)
	}
}
