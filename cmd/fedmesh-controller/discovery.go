package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// serveDiscovery serves the discovery API. With a Workload API socket it
// speaks SPIFFE mTLS and admits callers of its own trust domain; without
// one it refuses any address but loopback.
func serveDiscovery(ctx context.Context, addr, socket string, ctrl *federation.Controller, log *slog.Logger) (func(), error) {
	if socket == "" && !isLoopback(addr) {
		socket = os.Getenv(mtls.EndpointSocketEnv)
		if socket == "" {
			return nil, fmt.Errorf("--discovery-addr %s is not loopback: give --spiffe-socket (or $%s) so sidecars are authenticated", addr, mtls.EndpointSocketEnv)
		}
	}
	var opts []grpc.ServerOption
	stopSource := func() {}
	if socket != "" {
		src, err := mtls.NewSource(ctx, socket)
		if err != nil {
			return nil, fmt.Errorf("discovery: workload api: %w", err)
		}
		svid, err := src.GetX509SVID()
		if err != nil {
			src.Close()
			return nil, fmt.Errorf("discovery: own svid: %w", err)
		}
		td := svid.ID.TrustDomain()
		opts = append(opts, grpc.Creds(credentials.NewTLS(mtls.ServerConfig(src, mtls.MemberOf(td)))))
		stopSource = func() { src.Close() }
		log.Info("discovery API uses SPIFFE mTLS", "id", svid.ID.String(), "admits", td.String())
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		stopSource()
		return nil, fmt.Errorf("discovery listener: %w", err)
	}
	// Sidecars (internal/grpclite) ping a connection that has been silent
	// for 45 s, to notice a controller that vanished. grpc-go's default
	// policy would answer pings more often than every 5 minutes with
	// GOAWAY too_many_pings, so permit them, and ping first every 30 s so a
	// live controller keeps sidecars from pinging at all (and notices dead
	// sidecars itself).
	opts = append(opts,
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
	srv := grpc.NewServer(opts...)
	discoveryv1.RegisterDiscoveryServer(srv, ctrl.Discovery())
	go srv.Serve(ln)
	log.Info("serving the discovery API", "addr", ln.Addr().String())
	return func() { srv.Stop(); stopSource() }, nil
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
