package sidecar_test

import (
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestStopDuringPrewarm: a remote cluster's first endpoint set makes the
// pool prewarm a connection through the gateway. When the sidecar stops
// while that dial is still in its handshake (a gateway that accepts and
// never answers, and a handshake timeout far longer than the test), Run
// must end the dial and wait for it before closing the gateway client, and
// return promptly: the prewarm goroutine once outlived Run and closed its
// connection while Run was closing the client (a data race CI caught in
// TestExpectContinue/gateways), and CheckGoroutines finds such a goroutine.
func TestStopDuringPrewarm(t *testing.T) {
	testutil.CheckGoroutines(t)
	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c // held open, never answered
		}
	}()
	t.Cleanup(func() {
		silent.Close()
		for c := range accepted {
			c.Close()
		}
	})
	for _, proto := range []string{sidecar.ProtocolHTTP, sidecar.ProtocolGRPC} {
		t.Run(proto, func(t *testing.T) {
			src := &endpoints.Static{}
			src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
				{Name: "east", Gateway: true, Endpoints: []endpoints.Endpoint{{Name: "east-1", Ready: true}}},
			}})
			client := startSidecar(t, "client", sidecar.Config{
				Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src,
				GatewayEgress: silent.Addr().String(), HandshakeTimeout: 5 * time.Minute, NoActiveChecks: true,
				Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0", Protocol: proto}},
			})
			select {
			case c := <-accepted: // the prewarm dial reached the gateway and waits for its handshake
				defer c.Close()
			case <-time.After(10 * time.Second):
				t.Fatal("no prewarm dial reached the gateway within 10s")
			}
			start := time.Now()
			client.stop()
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("Run took %s to return with a prewarm dial in its handshake; want it ended at once", d)
			}
			// Checked before the gateway's end of the dial closes (which
			// would end a leaked dial too, before CheckGoroutines looks).
			if stacks := goroutinesIn("sidecar.(*backendPool).prewarm"); stacks != "" {
				t.Errorf("Run returned while its prewarm dial still runs:\n%s", stacks)
			}
		})
	}
}

// goroutinesIn returns the stacks of the goroutines that are running fn
// (a function name as stacks print it), "" when none is.
func goroutinesIn(fn string) string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
