package fedctl_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// checkGRPCThroughMesh makes gRPC calls through a client pod's sidecar
// outbound (an http upstream: the sidecar recognises HTTP/2 by its preface
// and carries each call over HTTP/2 inside the mTLS to an echo pod's
// sidecar, which checks it against demo/echo's policies): unary health
// checks answered SERVING by a pod of want, and a server stream whose
// first message arrives while it stays open.
func checkGRPCThroughMesh(t *testing.T, outbound, admin, want string) {
	t.Helper()
	u, err := url.Parse(outbound)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("passthrough:///"+u.Host, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A drill may just have restored pods. While only some are back, the
	// overprovisioning rule rightly sends part of the traffic to the next
	// priority, so wait (up to 10 s) until the client's /state puts the whole
	// load on its own cluster, then every call must be served at home.
	waitHomeLoad(t, admin, want)
	for try := 0; ; try++ {
		var hdr metadata.MD
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&hdr))
		if got := hdr.Get("fedmesh-cluster"); err == nil && len(got) == 1 && got[0] == want {
			break
		}
		if try == 50 {
			t.Fatalf("gRPC through %s's client sidecar: still not served at home after 5s: %v, cluster %v", want, err, hdr.Get("fedmesh-cluster"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for i := range 20 {
		var hdr metadata.MD
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&hdr))
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("gRPC health check %d through %s's client sidecar: %v, %v", i, want, resp, err)
		}
		if got := hdr.Get("fedmesh-cluster"); len(got) != 1 || got[0] != want {
			t.Fatalf("gRPC call %d through %s's client sidecar served by cluster %v, want %s", i, want, got, want)
		}
	}
	stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC stream through %s's client sidecar: %v, %v", want, m, err)
	}
}

// waitHomeLoad waits until every upstream of the sidecar whose admin
// address is admin sends its whole load to priority 0, its own cluster.
func waitHomeLoad(t *testing.T, admin, cluster string) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		resp, err := http.Get(strings.TrimSuffix(admin, "/") + "/state")
		if err != nil {
			last = err.Error()
			continue
		}
		var st struct {
			Upstreams []struct {
				Upstream string    `json:"upstream"`
				Loads    []float64 `json:"loads"`
			} `json:"upstreams"`
		}
		err = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if err != nil {
			last = err.Error()
			continue
		}
		home := len(st.Upstreams) > 0
		for _, u := range st.Upstreams {
			home = home && len(u.Loads) > 0 && u.Loads[0] == 1
		}
		if home {
			return
		}
		last = fmt.Sprintf("%+v", st.Upstreams)
	}
	t.Fatalf("%s's client sidecar did not put its whole load on its own pods within 10s: %s", cluster, last)
}
