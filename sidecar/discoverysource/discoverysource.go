// Package discoverysource makes the federation controller's discovery API
// an endpoints.Source for the sidecar: one gRPC Watch stream per service,
// mapped onto the sidecar's Set, reconnected with jittered backoff. While the
// controller is away the sidecar keeps the last Set it received: a broken
// stream is never turned into "no endpoints", and a policy it cannot decode
// never turns into "no policy". It is also the sidecar's service directory
// in transparent mode (one WatchDirectory stream), kept the same way.
package discoverysource

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"time"

	"google.golang.org/grpc"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// Source is an endpoints.Source backed by a discovery API connection.
type Source struct {
	client pb.DiscoveryClient
	log    *slog.Logger
	// Backoff bounds between reconnections; zero values mean 100ms and 5s.
	MinBackoff, MaxBackoff time.Duration
}

var (
	_ endpoints.Source        = (*Source)(nil)
	_ sidecar.PortWatcher     = (*Source)(nil)
	_ sidecar.DirectorySource = (*Source)(nil)
)

// New wraps a gRPC connection to the controller (its credentials are the
// caller's business: SPIFFE mTLS in a real deployment).
func New(conn grpc.ClientConnInterface, log *slog.Logger) *Source {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Source{client: pb.NewDiscoveryClient(conn), log: log}
}

// Watch implements endpoints.Source.
func (s *Source) Watch(ctx context.Context, ns, name string) (<-chan endpoints.Set, error) {
	out := make(chan endpoints.Set, 1)
	go s.run(ctx, ns, name, 0, out)
	return out, nil
}

// WatchPort implements sidecar.PortWatcher: the sets name port as the
// service port, and local endpoints are dialed at its target port.
func (s *Source) WatchPort(ctx context.Context, ns, name string, port uint16) (<-chan endpoints.Set, error) {
	out := make(chan endpoints.Set, 1)
	go s.run(ctx, ns, name, port, out)
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
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.client.Watch(ctx, &pb.WatchRequest{Namespace: ns, Service: name})
	if err != nil {
		return false, err
	}
	received, logged := false, false
	for {
		in, err := st.Recv()
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

// Convert maps a discovery EndpointSet onto the sidecar's Set. The service
// port is the first port of the set (sidecars address one port per
// upstream). Local endpoints are dialed at their address and the target port
// of that service port (matched by name, else the endpoint's first port);
// remote clusters are reached through the local gateway: their endpoints
// carry the same address (ip:target port, as the remote cluster's gateway
// knows them) so the sidecar can ask the gateway for one pod, or only
// readiness when there is no port to name. The policy is decoded into Set.Policy; one that does
// not decode is left out (nil).
func Convert(in *pb.EndpointSet) endpoints.Set {
	out, _ := convert(in, 0)
	return out
}

// convert is Convert for a given service port (0: the first) that also
// returns why the policy did not decode.
func convert(in *pb.EndpointSet, port uint16) (endpoints.Set, error) {
	out := endpoints.Set{Namespace: in.GetNamespace(), Service: in.GetService()}
	p, perr := policy.Decode(in.GetPolicy())
	out.Policy = p
	var portName string
	if len(in.GetPorts()) > 0 {
		out.Port = uint16(in.GetPorts()[0].GetPort())
		portName = in.GetPorts()[0].GetName()
	}
	if port != 0 {
		out.Port, portName = port, ""
		for _, p := range in.GetPorts() {
			if p.GetPort() == int32(port) {
				portName = p.GetName()
			}
		}
	}
	for _, cl := range in.GetClusters() {
		c := endpoints.Cluster{Name: cl.GetName(), Gateway: !cl.GetLocal(), Endpoints: []endpoints.Endpoint{}}
		for i, e := range cl.GetEndpoints() {
			ep := endpoints.Endpoint{Name: fmt.Sprintf("%s/%d", cl.GetName(), i), Ready: e.GetReady() && !e.GetTerminating()}
			port := targetPort(e, portName)
			if cl.GetLocal() {
				if port > 0 {
					ep.Addr = net.JoinHostPort(e.GetAddress(), strconv.Itoa(int(port)))
				} else {
					continue // no port to dial
				}
				ep.Name = ep.Addr
			} else if ip, err := netip.ParseAddr(e.GetAddress()); err == nil && port > 0 {
				ep.Addr = netip.AddrPortFrom(ip, uint16(port)).String() // canonical, as the gateway compares it
				ep.Name = cl.GetName() + "/" + ep.Addr
			}
			c.Endpoints = append(c.Endpoints, ep)
		}
		out.Clusters = append(out.Clusters, c)
	}
	return out, perr
}

func targetPort(e *pb.Endpoint, name string) int32 {
	for _, p := range e.GetPorts() {
		if p.GetName() == name {
			return p.GetPort()
		}
	}
	if len(e.GetPorts()) > 0 {
		return e.GetPorts()[0].GetPort()
	}
	return 0
}

// WatchDirectory implements sidecar.DirectorySource: one WatchDirectory
// stream, reconnected with jittered backoff; while the controller is away
// the sidecar keeps the last directory.
func (s *Source) WatchDirectory(ctx context.Context) (<-chan []sidecar.VirtualService, error) {
	out := make(chan []sidecar.VirtualService, 1)
	go func() {
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
	}()
	return out, nil
}

func (s *Source) directory(ctx context.Context, out chan []sidecar.VirtualService) (bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.client.WatchDirectory(ctx, &pb.DirectoryRequest{}, grpc.MaxCallRecvMsgSize(maxDirectoryBytes))
	if err != nil {
		return false, err
	}
	received := false
	for {
		in, err := st.Recv()
		if err != nil {
			return received, err
		}
		received = true
		publish(out, ConvertDirectory(in))
	}
}

// maxDirectoryBytes bounds a directory message (gRPC's default is 4 MiB,
// about 30,000 services; this allows ten times that).
const maxDirectoryBytes = 64 << 20

// ConvertDirectory maps a discovery Directory onto the sidecar's entries,
// unchecked: the sidecar skips (and logs) entries that make no sense.
func ConvertDirectory(in *pb.Directory) []sidecar.VirtualService {
	out := make([]sidecar.VirtualService, 0, len(in.GetServices()))
	for _, vs := range in.GetServices() {
		e := sidecar.VirtualService{Namespace: vs.GetNamespace(), Name: vs.GetName(), Imported: vs.GetImported(), IPs: vs.GetIps()}
		for _, p := range vs.GetPorts() {
			e.Ports = append(e.Ports, sidecar.ServicePort{Name: p.GetName(), Port: p.GetPort(), Protocol: p.GetProtocol(), AppProtocol: p.GetAppProtocol()})
		}
		out = append(out, e)
	}
	return out
}
