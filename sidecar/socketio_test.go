package sidecar_test

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/rawio"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestSocketIOModes: requests go through a client sidecar in each
// --socket-io mode, and /state and fedmesh_sidecar_socket_io_raw say
// which path its sockets take. Auto's path depends on the CPU share of the
// whole test process (internal/rawio tests the switch): /state and the
// metric must agree on it.
func TestSocketIOModes(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	b := startBackend(t, west, "west-1", nil, nil)
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{{Name: "west", Endpoints: eps(b)}}})
	for _, tc := range []struct {
		mode  rawio.Mode
		state string
		raw   float64
	}{{rawio.Auto, "auto (std)", 0}, {rawio.Raw, "raw", 1}, {rawio.Std, "std", 0}} {
		client := startSidecar(t, "client-"+tc.mode.String(), sidecar.Config{
			Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), SocketIO: tc.mode,
			Endpoints: src,
			Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
		})
		waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)
		for range 20 {
			resp, err := http.Get("http://" + client.UpstreamAddr(0).String() + "/")
			if err != nil {
				t.Fatalf("%s: %v", tc.mode, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("X-Served-By"), "west-1") {
				t.Fatalf("%s: %d from %q: %s", tc.mode, resp.StatusCode, resp.Header.Get("X-Served-By"), body)
			}
		}
		// Auto's path is the process-wide switch's (rawio.Busy, tested in
		// internal/rawio), which earlier load in this process may have left
		// on raw: the expectation comes from the switch, read before and
		// after the figures under test, never from those figures.
		var raw float64
		var state string
		for try := 0; ; try++ {
			busy := rawio.Busy()
			raw = metricSum(t, client.reg, "fedmesh_sidecar_socket_io_raw")
			state = client.State().SocketIO
			if rawio.Busy() == busy {
				if tc.mode == rawio.Auto && busy {
					tc.state, tc.raw = "auto (raw)", 1
				}
				break
			}
			if try == 10 {
				t.Fatalf("%s: the auto switch flipped during each of 10 reads", tc.mode)
			}
		}
		if state != tc.state || raw != tc.raw {
			t.Errorf("%s: /state socketIO %q, fedmesh_sidecar_socket_io_raw %v; want %q, %v", tc.mode, state, raw, tc.state, tc.raw)
		}
	}
}
