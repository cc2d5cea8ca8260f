// Package discoverysource makes the federation controller's discovery API
// an endpoints.Source for the sidecar: one gRPC Watch stream per service,
// mapped onto the sidecar's Set, reconnected with jittered backoff. While the
// controller is away the sidecar keeps the last Set it received: a broken
// stream is never turned into "no endpoints", and a policy it cannot decode
// never turns into "no policy". It is also the sidecar's service directory
// in transparent mode (one WatchDirectory stream), kept the same way.
//
// It speaks gRPC with internal/grpclite and encodes the messages by hand
// (wire.go): grpc-go and the protobuf runtime would cost every sidecar
// megabytes of resident code for two streaming calls.
package discoverysource

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/internal/grpclite"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// Source is an endpoints.Source backed by a discovery API connection.
type Source struct {
	client *grpclite.Client
	log    *slog.Logger
	// Backoff bounds between reconnections; zero values mean 100ms and 5s.
	MinBackoff, MaxBackoff time.Duration

	// Every watch runs in a goroutine that Close ends and waits for; mu
	// guards closed and wg.Add, so none starts while Close waits.
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// errClosed is Watch's error after Close.
var errClosed = errors.New("discovery source closed")

var (
	_ endpoints.Source        = (*Source)(nil)
	_ sidecar.PortWatcher     = (*Source)(nil)
	_ sidecar.DirectorySource = (*Source)(nil)
)

// New wraps a gRPC client of the controller (its credentials are the
// caller's business: SPIFFE mTLS in a real deployment). The caller closes
// the client after Close.
func New(client *grpclite.Client, log *slog.Logger) *Source {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Source{client: client, log: log}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// Close ends every watch (their channels stay open, as when a watch's own
// context ends) and waits for their goroutines; the caller may then close
// the client. Watches asked for after Close fail.
func (s *Source) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
}

// spawn runs f with a context that ends with ctx or Close, in a goroutine
// Close waits for.
func (s *Source) spawn(ctx context.Context, f func(ctx context.Context)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errClosed
	}
	s.wg.Go(func() {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(s.ctx, cancel)
		defer stop()
		f(ctx)
	})
	return nil
}

// Watch implements endpoints.Source.
func (s *Source) Watch(ctx context.Context, ns, name string) (<-chan endpoints.Set, error) {
	out := make(chan endpoints.Set, 1)
	if err := s.spawn(ctx, func(ctx context.Context) { s.run(ctx, ns, name, 0, out) }); err != nil {
		return nil, err
	}
	return out, nil
}

// WatchPort implements sidecar.PortWatcher: the sets name port as the
// service port, and local endpoints are dialed at its target port.
func (s *Source) WatchPort(ctx context.Context, ns, name string, port uint16) (<-chan endpoints.Set, error) {
	out := make(chan endpoints.Set, 1)
	if err := s.spawn(ctx, func(ctx context.Context) { s.run(ctx, ns, name, port, out) }); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *Source) backoffs() (time.Duration, time.Duration) {
	minB, maxB := s.MinBackoff, s.MaxBackoff
	if minB <= 0 {
		minB = 100 * time.Millisecond
	}
	if maxB <= 0 {
		maxB = 5 * time.Second
	}
	return minB, maxB
}

func (s *Source) run(ctx context.Context, ns, name string, port uint16, out chan endpoints.Set) {
	minB, maxB := s.backoffs()
	backoff := minB
	var last *policy.Service // the last policy that decoded, kept across streams
	for ctx.Err() == nil {
		received, err := s.stream(ctx, ns, name, port, out, &last)
		if ctx.Err() != nil {
			return
		}
		if received {
			backoff = minB
		}
		s.log.Warn("discovery stream ended; keeping the last endpoints and reconnecting",
			"service", ns+"/"+name, "err", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(2*backoff, maxB)
	}
}

// stream runs one Watch; it reports whether any set arrived. A policy that
// does not decode is replaced by *last, the last good one, and logged once
// per stream.
func (s *Source) stream(ctx context.Context, ns, name string, port uint16, out chan endpoints.Set, last **policy.Service) (bool, error) {
	st, err := s.client.ServerStream(ctx, methodWatch, nil, appendWatchRequest(nil, ns, name))
	if err != nil {
		return false, err
	}
	defer st.Close()
	received, logged := false, false
	for {
		msg, err := st.Recv(maxEndpointSetBytes)
		if err != nil {
			return received, err
		}
		in, err := decodeEndpointSet(msg)
		if err != nil {
			return received, err
		}
		received = true
		set, perr := convert(in, port)
		if perr != nil {
			if !logged {
				logged = true
				s.log.Error("undecodable traffic policy; keeping the last good one",
					"service", ns+"/"+name, "err", perr, "kept", *last != nil)
			}
			set.Policy = *last
		} else {
			*last = set.Policy
		}
		publish(out, set)
	}
}

// publish replaces whatever the reader has not taken yet: newest wins.
func publish[T any](out chan T, set T) {
	for {
		select {
		case out <- set:
			return
		default:
			select {
			case <-out:
			default:
			}
		}
	}
}

// maxEndpointSetBytes bounds an EndpointSet message. A set takes about 80
// bytes per endpoint, so this allows some 200,000 endpoints besides the
// policy; grpc-go's default, which the sidecar had before, was 4 MiB.
const maxEndpointSetBytes = 16 << 20

// convert maps a discovery EndpointSet onto the sidecar's Set and returns
// why its policy did not decode. The service port is port, or when it is 0
// the first port of the set (sidecars address one port per upstream).
// Local endpoints are dialed at their address and the target port of that
// service port (matched by name, else the endpoint's first port); remote
// clusters are reached through the local gateway: their endpoints carry the
// same address (ip:target port, as the remote cluster's gateway knows them)
// so the sidecar can ask the gateway for one pod, or only readiness when
// there is no port to name. The policy is decoded into Set.Policy; one that
// does not decode is left out (nil).
func convert(in endpointSet, port uint16) (endpoints.Set, error) {
	out := endpoints.Set{Namespace: in.Namespace, Service: in.Service}
	p, perr := policy.Decode(in.Policy)
	out.Policy = p
	var portName string
	if len(in.Ports) > 0 {
		out.Port = uint16(in.Ports[0].Port)
		portName = in.Ports[0].Name
	}
	if port != 0 {
		out.Port, portName = port, ""
		for _, p := range in.Ports {
			if p.Port == int32(port) {
				portName = p.Name
			}
		}
	}
	for _, cl := range in.Clusters {
		c := endpoints.Cluster{Name: cl.Name, Gateway: !cl.Local, Endpoints: []endpoints.Endpoint{}}
		if cl.RTTMicros > 0 && !cl.Local { // the gateway's RTT orders remote clusters
			c.RTT = endpoints.Duration(time.Duration(min(cl.RTTMicros, int64(time.Hour/time.Microsecond))) * time.Microsecond)
		}
		for i, e := range cl.Endpoints {
			ep := endpoints.Endpoint{Name: fmt.Sprintf("%s/%d", cl.Name, i), Ready: e.Ready && !e.Terminating}
			port := targetPort(e, portName)
			if cl.Local {
				if port > 0 {
					ep.Addr = net.JoinHostPort(e.Address, strconv.Itoa(int(port)))
				} else {
					continue // no port to dial
				}
				ep.Name = ep.Addr
			} else if ip, err := netip.ParseAddr(e.Address); err == nil && port > 0 {
				ep.Addr = netip.AddrPortFrom(ip, uint16(port)).String() // canonical, as the gateway compares it
				ep.Name = cl.Name + "/" + ep.Addr
			}
			c.Endpoints = append(c.Endpoints, ep)
		}
		out.Clusters = append(out.Clusters, c)
	}
	return out, perr
}

func targetPort(e endpoint, name string) int32 {
	for _, p := range e.Ports {
		if p.Name == name {
			return p.Port
		}
	}
	if len(e.Ports) > 0 {
		return e.Ports[0].Port
	}
	return 0
}

// WatchDirectory implements sidecar.DirectorySource: one WatchDirectory
// stream, reconnected with jittered backoff; while the controller is away
// the sidecar keeps the last directory.
func (s *Source) WatchDirectory(ctx context.Context) (<-chan []sidecar.VirtualService, error) {
	out := make(chan []sidecar.VirtualService, 1)
	err := s.spawn(ctx, func(ctx context.Context) {
		minB, maxB := s.backoffs()
		backoff := minB
		for ctx.Err() == nil {
			received, err := s.directory(ctx, out)
			if ctx.Err() != nil {
				return
			}
			if received {
				backoff = minB
			}
			s.log.Warn("service directory stream ended; keeping the last directory and reconnecting", "err", err, "backoff", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff/2 + rand.N(backoff/2+1)):
			}
			backoff = min(2*backoff, maxB)
		}
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (s *Source) directory(ctx context.Context, out chan []sidecar.VirtualService) (bool, error) {
	st, err := s.client.ServerStream(ctx, methodWatchDirectory, nil, nil) // an empty DirectoryRequest
	if err != nil {
		return false, err
	}
	defer st.Close()
	received := false
	for {
		msg, err := st.Recv(maxDirectoryBytes)
		if err != nil {
			return received, err
		}
		in, err := decodeDirectory(msg)
		if err != nil {
			return received, err
		}
		received = true
		publish(out, convertDirectory(in))
	}
}

// maxDirectoryBytes bounds a directory message (gRPC's default is 4 MiB,
// about 30,000 services; this allows ten times that).
const maxDirectoryBytes = 64 << 20

// convertDirectory maps a discovery Directory onto the sidecar's entries,
// unchecked: the sidecar skips (and logs) entries that make no sense.
func convertDirectory(in directory) []sidecar.VirtualService {
	out := make([]sidecar.VirtualService, 0, len(in.Services))
	for _, vs := range in.Services {
		e := sidecar.VirtualService{Namespace: vs.Namespace, Name: vs.Name, Imported: vs.Imported, IPs: vs.IPs}
		for _, p := range vs.Ports {
			e.Ports = append(e.Ports, sidecar.ServicePort{Name: p.Name, Port: p.Port, Protocol: p.Protocol, AppProtocol: p.AppProtocol})
		}
		out = append(out, e)
	}
	return out
}
