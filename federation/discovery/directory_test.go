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
	built  chan struct{} // when not nil, gets a token at each build's start
}

func (f *fakeDirectory) Snapshot(ns, name string) (*pb.EndpointSet, error) {
	return &pb.EndpointSet{Namespace: ns, Service: name}, nil
}

func (f *fakeDirectory) Directory() (*pb.Directory, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.builds++
	if f.built != nil {
		f.built <- struct{}{}
	}
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
	s := NewServer(src, nil, nil) // the default debounce of 200 ms: 100 notifications take far less, even on a loaded machine
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

	// Nothing changed: the rebuild sends nothing. Had it sent the same
	// directory again, the next Recv below would get it instead of the
	// change.
	src.mu.Lock()
	src.built = make(chan struct{}, 1)
	src.mu.Unlock()
	s.NotifyDirectory()
	select {
	case <-src.built:
	case <-ctx.Done():
		t.Fatal("no rebuild after a notification")
	}
	s.dir.build.Lock() // held by the rebuild until it is done
	src.mu.Lock()
	src.built = nil
	before := src.builds
	src.mu.Unlock()
	s.dir.build.Unlock()

	src.set(&pb.Directory{LocalCluster: "east", Services: append(first.Services, &pb.VirtualService{Namespace: "a", Name: "c", Ips: []string{"10.0.0.2"}})}, nil)
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

// TestCloseStopsRebuild: Close cancels the rebuild a notification scheduled
// (it would read the source after its owner stopped), waits for one that
// is running, and later notifications schedule nothing; a stream still gets
// the directory, built on demand.
func TestCloseStopsRebuild(t *testing.T) {
	src := &fakeDirectory{dir: &pb.Directory{LocalCluster: "east"}}
	s := NewServer(src, nil, nil)
	s.dir.debounce = 10 * time.Millisecond
	sub := &subscriber{dirty: make(chan struct{}, 1)}
	s.dir.mu.Lock()
	s.dir.subs[sub] = struct{}{} // a watching stream
	s.dir.mu.Unlock()

	s.NotifyDirectory() // scheduled, not yet run
	s.Close()
	s.NotifyDirectory()
	// Each notification's rebuild would have run within 10ms; give them
	// 50 times that.
	time.Sleep(500 * time.Millisecond)
	src.mu.Lock()
	builds := src.builds
	src.mu.Unlock()
	if builds != 0 {
		t.Fatalf("%d directory builds after Close, want none", builds)
	}
	if d, err := s.current(); err != nil || d.LocalCluster != "east" {
		t.Fatalf("directory on demand after Close: %v, %v", d, err)
	}

	// A rebuild that is running when Close is called has ended when it
	// returns.
	s = NewServer(src, nil, nil)
	s.dir.debounce = time.Millisecond
	s.dir.mu.Lock()
	s.dir.subs[sub] = struct{}{}
	s.dir.mu.Unlock()
	src.mu.Lock()
	src.built = make(chan struct{})
	src.mu.Unlock()
	s.NotifyDirectory()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		<-src.built // the rebuild is inside Directory
		s.Close()
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if !s.dir.build.TryLock() { // a rebuild holds it until it is done
		t.Fatal("the rebuild is still running after Close returned")
	}
	s.dir.build.Unlock()
	s.dir.mu.Lock()
	cur := s.dir.cur
	s.dir.mu.Unlock()
	if cur == nil {
		t.Fatal("the rebuild that was running did not store its directory")
	}
}
