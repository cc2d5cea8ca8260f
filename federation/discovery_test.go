package federation_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
)

// TestDiscovery watches a service exported by east and west through east's
// discovery API over a real gRPC connection: local and remote endpoints
// arrive, a readiness flip in west arrives as a new complete set, and so
// does a change of the gateway's egress addresses.
func TestDiscovery(t *testing.T) {
	need(t)
	env.mu.Lock()
	client := discoveryClient(t, env.ctrls["east"].ctrl)
	env.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Bad input gets InvalidArgument, not a stream.
	bad, err := client.Watch(ctx, &pb.WatchRequest{Namespace: "Not_A_Namespace", Service: "x"})
	if err == nil {
		_, err = bad.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad namespace: %v, want InvalidArgument", err)
	}

	ns := env.ns(t)
	env.service(t, "east", ns, "api", nil)
	env.endpoints(t, "east", ns, "api", "api-1", []bool{true, false}, "10.1.7")
	env.export(t, "east", ns, "api", nil)
	env.service(t, "west", ns, "api", nil)
	env.endpoints(t, "west", ns, "api", "api-1", []bool{true}, "10.2.7")
	env.export(t, "west", ns, "api", nil)

	stream, err := client.Watch(ctx, &pb.WatchRequest{Namespace: ns, Service: "api"})
	if err != nil {
		t.Fatal(err)
	}
	recvUntil := func(what string, ok func(*pb.EndpointSet) error) *pb.EndpointSet {
		t.Helper()
		var last error
		for range 50 {
			set, err := stream.Recv()
			if err != nil {
				t.Fatalf("%s: recv: %v (last mismatch: %v)", what, err, last)
			}
			if last = ok(set); last == nil {
				return set
			}
		}
		t.Fatalf("%s: not seen in 50 updates: %v", what, last)
		return nil
	}
	first := recvUntil("local and remote endpoints", func(s *pb.EndpointSet) error {
		if !s.Imported || s.LocalCluster != "east" || len(s.Clusters) != 2 {
			return fmt.Errorf("imported=%v local=%s clusters=%d", s.Imported, s.LocalCluster, len(s.Clusters))
		}
		e, w := s.Clusters[0], s.Clusters[1]
		if !e.Local || e.Name != "east" || e.Total != 2 || e.Ready != 1 {
			return fmt.Errorf("east %+v", e)
		}
		if w.Local || w.Name != "west" || w.Total != 1 || w.Ready != 1 || w.Stale || w.Endpoints[0].Address != "10.2.7.1" {
			return fmt.Errorf("west %+v", w)
		}
		if len(s.Ports) != 1 || s.Ports[0].Port != 80 || len(w.Endpoints[0].Ports) != 1 || w.Endpoints[0].Ports[0].Port != 8080 {
			return fmt.Errorf("ports %v / %v", s.Ports, w.Endpoints[0].Ports)
		}
		return nil
	})

	env.endpoints(t, "west", ns, "api", "api-1", []bool{false}, "10.2.7")
	next := recvUntil("west's endpoint not ready", func(s *pb.EndpointSet) error {
		if len(s.Clusters) != 2 || s.Clusters[1].Ready != 0 {
			return fmt.Errorf("clusters %v", s.Clusters)
		}
		return nil
	})
	if next.Version <= first.Version {
		t.Errorf("version %d after %d: must increase", next.Version, first.Version)
	}

	gw := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: federation.GatewayService, Namespace: controlplane.SystemNamespace,
		Annotations: map[string]string{federation.AnnotationEgress: "127.0.0.1:15001, 127.0.0.1:15002"}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "egress", Port: 15001}}}}
	if _, err := env.kube["east"].CoreV1().Services(controlplane.SystemNamespace).Create(ctx, gw, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer env.kube["east"].CoreV1().Services(controlplane.SystemNamespace).Delete(context.Background(), gw.Name, metav1.DeleteOptions{})
	recvUntil("egress addresses", func(s *pb.EndpointSet) error {
		if len(s.Egress) != 2 || s.Egress[0] != "127.0.0.1:15001" || s.Egress[1] != "127.0.0.1:15002" {
			return fmt.Errorf("egress %v", s.Egress)
		}
		return nil
	})

	// The gateway's measured RTT per peer cluster reaches the remote
	// clusters of every set; the local cluster has none.
	setRTT := func(v string) {
		t.Helper()
		patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, federation.AnnotationPeerRTT, v)
		if _, err := env.kube["east"].CoreV1().Services(controlplane.SystemNamespace).Patch(ctx, gw.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setRTT(`{"west":1234,"north":50000}`)
	recvUntil("west's RTT", func(s *pb.EndpointSet) error {
		if len(s.Clusters) != 2 || s.Clusters[0].RttMicros != 0 || s.Clusters[1].RttMicros != 1234 {
			return fmt.Errorf("clusters %v", s.Clusters)
		}
		return nil
	})
	// An annotation that does not decode is no RTT at all, not a broken set.
	setRTT(`{"west":"fast"}`)
	recvUntil("no RTT from a bad annotation", func(s *pb.EndpointSet) error {
		if len(s.Clusters) != 2 || s.Clusters[1].RttMicros != 0 || len(s.Clusters[1].Endpoints) != 1 {
			return fmt.Errorf("clusters %v", s.Clusters)
		}
		return nil
	})
}
