package sidecar_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestOpaqueTCP: bytes pass both ways with half-close through client and
// server sidecars; a dead endpoint is skipped before the first byte.
func TestOpaqueTCP(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	testutil.Serve(echo, func(c net.Conn) {
		_, _ = io.Copy(c, c) // echo until the caller half-closes
	})
	server := startSidecar(t, "server", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: echo.Addr().String(),
	})
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "db", Service: "redis", Port: 6379, Clusters: []endpoints.Cluster{{Name: "west", Endpoints: []endpoints.Endpoint{
		{Name: "dead", Addr: deadAddr, Ready: true},
		{Name: "live", Addr: server.InboundAddr().String(), Ready: true},
	}}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "db", Service: "redis", Port: 6379, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolTCP}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	for i := range 4 { // some of these pick the dead endpoint first
		c, err := net.Dial("tcp", client.UpstreamAddr(0).String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("hello through two sidecars")
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		_ = c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != string(msg) {
			t.Fatalf("connection %d: got %q, %v", i, got, err)
		}
	}
	if n := metricSum(t, client.reg, "fedmesh_sidecar_ejections_total"); n != 1 {
		t.Errorf("%v ejections, want the dead endpoint once", n)
	}
}
