package discovery

import (
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
)

// DirectorySource is a Source that also lists the cluster's service
// directory (every Service and ServiceImport by its virtual IPs).
type DirectorySource interface {
	// Directory returns the complete current directory (Version unset), or
	// an error with a gRPC status (Unavailable while not leading).
	Directory() (*discoveryv1.Directory, error)
}

// DefaultDirectoryDebounce is how long the server waits after a change
// before it rebuilds the directory: every change in that window (a
// deployment rolling out, a namespace of Services created) is one message.
const DefaultDirectoryDebounce = 200 * time.Millisecond

// directory is the server's shared state for WatchDirectory: one directory
// built per change, whatever the number of streams, and sent by each
// stream at its own pace (a slow stream skips to the newest version).
type directory struct {
	debounce time.Duration

	build sync.Mutex // serializes builds

	mu      sync.Mutex
	cur     *discoveryv1.Directory // immutable once stored; nil: build on demand
	version uint64
	pending *time.Timer // the scheduled rebuild, nil when none
	closed  bool        // Close was called: no more rebuilds are scheduled
	subs    map[*subscriber]struct{}
	// rebuilds counts scheduled and running rebuilds, so Close can wait
	// for them.
	rebuilds sync.WaitGroup

	builds prometheus.Counter
	sent   prometheus.Counter
	sizeB  prometheus.Gauge
}

func newDirectory(reg prometheus.Registerer) *directory {
	d := &directory{
		debounce: DefaultDirectoryDebounce,
		subs:     map[*subscriber]struct{}{},
		builds: prometheus.NewCounter(prometheus.CounterOpts{Name: "fedmesh_federation_directory_builds_total",
			Help: "Service directories built for WatchDirectory streams (at most one per debounce window)."}),
		sent: prometheus.NewCounter(prometheus.CounterOpts{Name: "fedmesh_federation_directory_updates_total",
			Help: "Service directories sent on WatchDirectory streams."}),
		sizeB: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fedmesh_federation_directory_bytes",
			Help: "Encoded size of the current service directory."}),
	}
	if reg != nil {
		reg.MustRegister(d.builds, d.sent, d.sizeB)
	}
	return d
}

// NotifyDirectory marks the service directory as possibly changed (a
// Service or ServiceImport of the local cluster was added, changed or
// deleted). It never blocks; the directory is rebuilt once after the
// debounce window, and only while some stream watches it.
func (s *Server) NotifyDirectory() {
	d := s.dir
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.subs) == 0 {
		d.cur = nil // built afresh by the next stream
		return
	}
	if d.pending != nil || d.closed {
		return
	}
	d.rebuilds.Add(1)
	d.pending = time.AfterFunc(d.debounce, func() {
		defer d.rebuilds.Done()
		s.rebuildDirectory()
	})
}

// Close stops the directory rebuild scheduled by NotifyDirectory and waits
// for one that is running; notifications after Close schedule nothing.
// Streams keep working: they build the directory on demand. The federation
// controller closes its server when Run returns, so no rebuild reads its
// caches after that.
func (s *Server) Close() {
	d := s.dir
	d.mu.Lock()
	d.closed = true
	if d.pending != nil && d.pending.Stop() {
		d.pending = nil
		d.rebuilds.Done() // it will never run
	}
	d.mu.Unlock()
	d.rebuilds.Wait()
}

// rebuildDirectory builds the directory and wakes every stream if it
// changed. A failed build (not leading) also wakes them: each then gets the
// error and ends, and its sidecar reconnects to the leader.
func (s *Server) rebuildDirectory() {
	d := s.dir
	d.build.Lock()
	defer d.build.Unlock()
	d.mu.Lock()
	d.pending = nil
	d.mu.Unlock()
	next, err := s.buildDirectory()
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.cur = nil
	} else if d.cur != nil && equalDirectory(d.cur, next) {
		return
	} else {
		d.cur = next
	}
	for sub := range d.subs {
		select {
		case sub.dirty <- struct{}{}:
		default:
		}
	}
}

// buildDirectory asks the source for a directory and gives it the next
// version. The caller holds d.build.
func (s *Server) buildDirectory() (*discoveryv1.Directory, error) {
	src, ok := s.src.(DirectorySource)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this discovery server has no service directory")
	}
	next, err := src.Directory()
	if err != nil {
		return nil, err
	}
	d := s.dir
	d.builds.Inc()
	d.mu.Lock()
	d.version++
	next.Version = d.version
	d.mu.Unlock()
	d.sizeB.Set(float64(proto.Size(next)))
	return next, nil
}

func equalDirectory(a, b *discoveryv1.Directory) bool {
	va, vb := a.Version, b.Version
	if va == vb {
		return proto.Equal(a, b)
	}
	// Compare without the versions; the messages are never mutated once
	// stored, so compare shallow copies.
	ca := proto.Clone(a).(*discoveryv1.Directory)
	cb := proto.Clone(b).(*discoveryv1.Directory)
	ca.Version, cb.Version = 0, 0
	return proto.Equal(ca, cb)
}

// current returns the directory to send, building it when none is stored.
func (s *Server) current() (*discoveryv1.Directory, error) {
	d := s.dir
	d.mu.Lock()
	cur := d.cur
	d.mu.Unlock()
	if cur != nil {
		return cur, nil
	}
	d.build.Lock()
	defer d.build.Unlock()
	d.mu.Lock()
	cur = d.cur
	d.mu.Unlock()
	if cur != nil {
		return cur, nil
	}
	next, err := s.buildDirectory()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.cur = next
	d.mu.Unlock()
	return next, nil
}

// WatchDirectory streams the service directory: complete at once, then
// complete again after each change. Every stream sends the same immutable
// message, built once per change.
func (s *Server) WatchDirectory(_ *discoveryv1.DirectoryRequest, stream discoveryv1.Discovery_WatchDirectoryServer) error {
	d := s.dir
	sub := &subscriber{dirty: make(chan struct{}, 1)}
	sub.dirty <- struct{}{}
	d.mu.Lock()
	d.subs[sub] = struct{}{}
	d.mu.Unlock()
	s.streams.Inc()
	defer func() {
		d.mu.Lock()
		delete(d.subs, sub)
		d.mu.Unlock()
		s.streams.Dec()
	}()
	var sent uint64
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.dirty:
		}
		cur, err := s.current()
		if err != nil {
			return err
		}
		if cur.Version == sent {
			continue
		}
		if err := stream.Send(cur); err != nil {
			return fmt.Errorf("send service directory: %w", err)
		}
		sent = cur.Version
		d.sent.Inc()
	}
}
