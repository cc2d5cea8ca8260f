// Package discovery serves the discovery API (discoveryv1): the federation
// controller streams to every sidecar the endpoint set of each service the
// sidecar uses — local endpoints with readiness, every other exporting
// cluster's endpoints with their health and staleness, and the local
// gateway's egress — and the cluster's service directory (every Service and
// ServiceImport by its virtual IPs, for sidecars in transparent mode), so
// sidecars never watch the API server and keep serving from their last
// state when the controller is away.
package discovery

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
)

// Source is what the server streams from: the federation controller.
type Source interface {
	// Snapshot returns the complete current endpoint set of a service, or
	// an error with a gRPC status (Unavailable while not leading).
	Snapshot(namespace, service string) (*discoveryv1.EndpointSet, error)
}

// Server implements discoveryv1.DiscoveryServer. Call Notify for every
// service that may have changed; streams then resend only if their set did.
type Server struct {
	discoveryv1.UnimplementedDiscoveryServer
	src Source
	log *slog.Logger

	mu   sync.Mutex
	subs map[string]map[*subscriber]struct{} // by namespace/service

	streams prometheus.Gauge
	sent    prometheus.Counter

	dir *directory // WatchDirectory, when src is a DirectorySource
}

type subscriber struct{ dirty chan struct{} }

// AllServices is a key passed to Notify to wake every stream (for example
// when the local gateway's egress addresses change).
const AllServices = "*"

// NewServer builds a server over src; metrics go on reg when it is not nil.
func NewServer(src Source, log *slog.Logger, reg prometheus.Registerer) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		src: src, log: log, subs: map[string]map[*subscriber]struct{}{},
		streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "fedmesh_federation_discovery_streams",
			Help: "Open discovery streams (Watch and WatchDirectory)."}),
		sent: prometheus.NewCounter(prometheus.CounterOpts{Name: "fedmesh_federation_discovery_updates_total",
			Help: "Endpoint sets sent on discovery streams."}),
	}
	if reg != nil {
		reg.MustRegister(s.streams, s.sent)
	}
	s.dir = newDirectory(reg)
	return s
}

// Notify marks a service (namespace/service, or AllServices) as possibly
// changed. It never blocks.
func (s *Server) Notify(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wake := func(subs map[*subscriber]struct{}) {
		for sub := range subs {
			select {
			case sub.dirty <- struct{}{}:
			default: // already marked; the stream will read the latest state
			}
		}
	}
	if key == AllServices {
		for _, subs := range s.subs {
			wake(subs)
		}
		return
	}
	wake(s.subs[key])
}

// Watch streams one service's endpoint set: complete at once, then complete
// again after each change.
func (s *Server) Watch(req *discoveryv1.WatchRequest, stream discoveryv1.Discovery_WatchServer) error {
	if errs := validation.IsDNS1123Label(req.GetNamespace()); len(errs) > 0 {
		return status.Errorf(codes.InvalidArgument, "namespace %q: %v", req.GetNamespace(), errs)
	}
	if errs := validation.IsDNS1035Label(req.GetService()); len(errs) > 0 {
		return status.Errorf(codes.InvalidArgument, "service %q: %v", req.GetService(), errs)
	}
	key := req.GetNamespace() + "/" + req.GetService()
	sub := &subscriber{dirty: make(chan struct{}, 1)}
	sub.dirty <- struct{}{} // send the first snapshot at once
	s.mu.Lock()
	if s.subs[key] == nil {
		s.subs[key] = map[*subscriber]struct{}{}
	}
	s.subs[key][sub] = struct{}{}
	s.mu.Unlock()
	s.streams.Inc()
	defer func() {
		s.mu.Lock()
		delete(s.subs[key], sub)
		if len(s.subs[key]) == 0 {
			delete(s.subs, key)
		}
		s.mu.Unlock()
		s.streams.Dec()
	}()

	var last *discoveryv1.EndpointSet
	var version uint64
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.dirty:
		}
		set, err := s.src.Snapshot(req.GetNamespace(), req.GetService())
		if err != nil {
			return err
		}
		if last != nil && proto.Equal(set, last) {
			continue
		}
		last = proto.Clone(set).(*discoveryv1.EndpointSet)
		version++
		set.Version = version
		if err := stream.Send(set); err != nil {
			return fmt.Errorf("send endpoint set of %s: %w", key, err)
		}
		s.sent.Inc()
	}
}
