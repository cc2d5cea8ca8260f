package federation_test

import (
	"context"
	"encoding/json"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/policy"
)

// freeLoopbackAddr returns a loopback address with a port free right now.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// weightTracker counts the streams that have received the policy whose
// first backend has the target weight.
type weightTracker struct {
	mu        sync.Mutex
	target    int32
	got       []int32 // per stream: the last weight received
	remaining int
	done      chan struct{}
}

func (w *weightTracker) arm(target int32) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.target, w.remaining, w.done = target, 0, make(chan struct{})
	for _, g := range w.got {
		if g != target {
			w.remaining++
		}
	}
	if w.remaining == 0 {
		close(w.done)
	}
	return w.done
}

func (w *weightTracker) seen(stream int, weight int32) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.got[stream] == weight {
		return
	}
	w.got[stream] = weight
	if weight == w.target && w.done != nil {
		w.remaining--
		if w.remaining == 0 {
			close(w.done)
		}
	}
}

// BenchmarkRouteChangePropagation: 100 discovery Watch streams (one gRPC
// connection each, as 100 sidecars) on one service of east; an HTTPRoute's
// weights are changed until every stream has received the new compiled
// policy, over 30 changes. The controller is the real binary.
func BenchmarkRouteChangePropagation(b *testing.B) {
	e := needBench(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := "bench-route"
	e.namespace(b, ns)
	for _, name := range []string{"api", "api-v1", "api-v2"} {
		if _, err := e.kube["east"].CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
		}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	gw := gwclient.NewForConfigOrDie(e.cp.Cluster("east").Config)
	rules := func(w int32) []gwv1.HTTPRouteRule {
		return []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{
			backendRef("", "Service", "api-v1", w), backendRef("", "Service", "api-v2", 1000-w)}}}
	}
	if _, err := gw.GatewayV1().HTTPRoutes(ns).Create(ctx, &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "split", Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{serviceParent("api")}},
			Rules: rules(500)},
	}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}

	const streams = 100
	tr := &weightTracker{got: make([]int32, streams)}
	for i := range streams {
		conn, err := grpc.NewClient(e.discovery["east"], grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		client := pb.NewDiscoveryClient(conn)
		// Like a sidecar: reconnect while the controller is not serving yet.
		go func() {
			for ctx.Err() == nil {
				stream, err := client.Watch(ctx, &pb.WatchRequest{Namespace: ns, Service: "api"})
				for err == nil {
					var set *pb.EndpointSet
					if set, err = stream.Recv(); err == nil {
						if p, derr := policy.Decode(set.Policy); derr == nil && p != nil && len(p.Rules) > 0 && len(p.Rules[0].Backends) > 0 {
							tr.seen(i, p.Rules[0].Backends[0].Weight)
						}
					}
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	select {
	case <-tr.arm(500):
	case <-time.After(30 * time.Second):
		tr.mu.Lock()
		b.Fatalf("the first policy did not reach every stream in 30s: %d remaining, weights %v; logs in %s", tr.remaining, tr.got, e.cp.Dir)
	}

	const changes = 30
	var lat []time.Duration
	var n int32
	for b.Loop() {
		lat = lat[:0]
		for range changes {
			n++
			w := 500 + n%400 // never the weight in force
			patch, err := json.Marshal(map[string]any{"spec": map[string]any{"rules": rules(w)}})
			if err != nil {
				b.Fatal(err)
			}
			done := tr.arm(w)
			start := time.Now()
			if _, err := gw.GatewayV1().HTTPRoutes(ns).Patch(ctx, "split", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
				b.Fatal(err)
			}
			select {
			case <-done:
				lat = append(lat, time.Since(start))
			case <-time.After(10 * time.Second):
				b.Fatalf("weight %d did not reach every stream in 10s", w)
			}
		}
	}
	b.ReportMetric(ms(percentile(lat, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 0.99)), "p99-ms")
}
