package federation_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fedmesh/fedmesh/federation"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
)

// TestServiceDirectory watches east's service directory over a real gRPC
// connection while Services and exports change in the real API servers: a
// Service appears with the cluster IPs the API server allocated and its
// ports (names, appProtocol), a headless Service does not, an import
// appears with its spec.ips (its derived Service's cluster IPs) while the
// derived Service itself is not listed, a port change arrives as a new
// complete directory, two streams see the same versions, and a burst of
// changes arrives as fewer messages than changes.
func TestServiceDirectory(t *testing.T) {
	need(t)
	env.mu.Lock()
	client := discoveryClient(t, env.ctrls["east"].ctrl)
	env.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	ns := env.ns(t)
	h2c := "kubernetes.io/h2c"
	web := env.service(t, "east", ns, "web", func(s *corev1.Service) {
		s.Spec.Ports = []corev1.ServicePort{
			{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80},
			{Name: "api", Protocol: corev1.ProtocolTCP, Port: 9090, AppProtocol: &h2c},
		}
	})
	env.service(t, "east", ns, "db", func(s *corev1.Service) { s.Spec.ClusterIP = corev1.ClusterIPNone })
	env.service(t, "east", ns, "api", nil)
	env.export(t, "east", ns, "api", nil)
	env.service(t, "west", ns, "api", nil)
	env.export(t, "west", ns, "api", nil)
	var importIPs []string
	eventually(t, 20*time.Second, "import of api with ips", func() error {
		imp, err := env.getImport("east", ns, "api")
		if err != nil {
			return err
		}
		if len(imp.Spec.IPs) == 0 {
			return fmt.Errorf("no ips yet")
		}
		importIPs = imp.Spec.IPs
		return nil
	})

	stream, err := client.WatchDirectory(ctx, &pb.DirectoryRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recvUntil := func(st pb.Discovery_WatchDirectoryClient, what string, ok func(*pb.Directory) error) *pb.Directory {
		t.Helper()
		var last error
		for range 50 {
			d, err := st.Recv()
			if err != nil {
				t.Fatalf("%s: recv: %v (last mismatch: %v)", what, err, last)
			}
			if last = ok(d); last == nil {
				return d
			}
		}
		t.Fatalf("%s: not seen in 50 updates: %v", what, last)
		return nil
	}
	find := func(d *pb.Directory, name string, imported bool) *pb.VirtualService {
		for _, vs := range d.Services {
			if vs.Namespace == ns && vs.Name == name && vs.Imported == imported {
				return vs
			}
		}
		return nil
	}
	first := recvUntil(stream, "web, api and its import", func(d *pb.Directory) error {
		if d.LocalCluster != "east" {
			return fmt.Errorf("local cluster %q", d.LocalCluster)
		}
		w := find(d, "web", false)
		if w == nil {
			return fmt.Errorf("no web")
		}
		if !slices.Equal(w.Ips, web.Spec.ClusterIPs) || len(w.Ips) == 0 {
			return fmt.Errorf("web ips %v, want %v", w.Ips, web.Spec.ClusterIPs)
		}
		want := []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}, {Name: "api", Protocol: "TCP", Port: 9090, AppProtocol: h2c}}
		if !slices.EqualFunc(w.Ports, want, func(a, b *pb.Port) bool { return proto.Equal(a, b) }) {
			return fmt.Errorf("web ports %v", w.Ports)
		}
		if find(d, "db", false) != nil {
			return fmt.Errorf("headless db is listed")
		}
		if find(d, "api", false) == nil {
			return fmt.Errorf("no Service api")
		}
		imp := find(d, "api", true)
		if imp == nil || !slices.Equal(imp.Ips, importIPs) || len(imp.Ports) != 1 || imp.Ports[0].Port != 80 {
			return fmt.Errorf("import api %v, want ips %v", imp, importIPs)
		}
		if find(d, federation.DerivedServiceName("api"), false) != nil {
			return fmt.Errorf("the derived Service is listed")
		}
		return nil
	})

	// A second stream starts from the same directory, version included.
	stream2, err := client.WatchDirectory(ctx, &pb.DirectoryRequest{})
	if err != nil {
		t.Fatal(err)
	}
	second := recvUntil(stream2, "web on the second stream", func(d *pb.Directory) error {
		if find(d, "web", false) == nil {
			return fmt.Errorf("no web")
		}
		return nil
	})
	if second.Version < first.Version {
		t.Errorf("second stream version %d < first's %d", second.Version, first.Version)
	}

	cur, err := env.kube["east"].CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Ports = append(cur.Spec.Ports, corev1.ServicePort{Name: "tcp-db", Protocol: corev1.ProtocolTCP, Port: 5432})
	if _, err := env.kube["east"].CoreV1().Services(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	hasPort := func(d *pb.Directory) error {
		if w := find(d, "web", false); w == nil || len(w.Ports) != 3 || w.Ports[2].Name != "tcp-db" {
			return fmt.Errorf("web %v", w)
		}
		return nil
	}
	a := recvUntil(stream, "new port of web", hasPort)
	b := recvUntil(stream2, "new port of web on the second stream", hasPort)
	if a.Version <= first.Version {
		t.Errorf("version %d after %d: must increase", a.Version, first.Version)
	}
	if a.Version != b.Version || !proto.Equal(a, b) {
		t.Errorf("streams differ: version %d vs %d", a.Version, b.Version)
	}

	// A burst of 10 new Services arrives in fewer than 10 messages.
	var wg sync.WaitGroup
	errs := make([]error, 10)
	for i := range 10 {
		wg.Go(func() {
			_, errs[i] = env.kube["east"].CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("burst-%d", i), Namespace: ns},
				Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80}}},
			}, metav1.CreateOptions{})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	msgs := 0
	recvUntil(stream, "the burst", func(d *pb.Directory) error {
		msgs++
		for i := range 10 {
			if find(d, fmt.Sprintf("burst-%d", i), false) == nil {
				return fmt.Errorf("no burst-%d", i)
			}
		}
		return nil
	})
	t.Logf("10 new Services arrived in %d directory messages", msgs)
	if msgs >= 10 {
		t.Errorf("10 changes made %d messages: not debounced", msgs)
	}
}
