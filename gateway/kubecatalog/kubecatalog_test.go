package kubecatalog

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/gateway"
)

func ptr[T any](v T) *T { return &v }

func endpoint(ip string, ready, terminating bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{ip},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr(ready), Terminating: ptr(terminating)},
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: "pod-" + ip},
	}
}

// TestCatalogOnAPIServer runs the catalog against a real kube-apiserver and
// etcd: only exported services are visible, only local ready endpoints are
// returned, on the target port matched by name, and changes arrive through
// the informers.
func TestCatalogOnAPIServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"east"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	cfg := cp.Cluster("east").Config
	kube := kubernetes.NewForConfigOrDie(cfg)
	mcs := mcsclient.NewForConfigOrDie(cfg)
	const ns = "shop"
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "checkout"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 8080, TargetPort: intstr.FromInt32(9090)},
			{Name: "admin", Port: 9000, TargetPort: intstr.FromInt32(9001)},
		}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	slice := func(name string, lbl map[string]string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		l := map[string]string{discoveryv1.LabelServiceName: "checkout"}
		for k, v := range lbl {
			l[k] = v
		}
		return &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: l},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{
				{Name: ptr("http"), Port: ptr(int32(9090)), Protocol: ptr(corev1.ProtocolTCP)},
				{Name: ptr("admin"), Port: ptr(int32(9001)), Protocol: ptr(corev1.ProtocolTCP)},
			},
			Endpoints: eps,
		}
	}
	for _, s := range []*discoveryv1.EndpointSlice{
		slice("checkout-local", nil,
			endpoint("10.0.0.1", true, false),
			endpoint("10.0.0.2", false, false), // not ready
			endpoint("10.0.0.3", true, true),   // terminating
		),
		slice("checkout-west", map[string]string{SourceClusterLabel: "west"}, endpoint("10.9.0.1", true, false)),
	} {
		if _, err := kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	cctx, stop := context.WithCancel(ctx)
	cat := New(kube, mcs, 0, nil)
	defer func() { stop(); cat.Wait() }() // before the control plane stops
	if err := cat.Start(cctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	if eps, exported := cat.Lookup(ns, "checkout", 8080); exported || eps != nil {
		t.Fatalf("not yet exported, got %v, %v", eps, exported)
	}

	if _, err := mcs.MulticlusterV1beta1().ServiceExports(ns).Create(ctx, &mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "checkout"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "export seen", func() bool { _, ok := cat.Lookup(ns, "checkout", 8080); return ok })
	for _, tc := range []struct {
		port     int32
		exported bool
		want     []string
	}{
		{8080, true, []string{"10.0.0.1:9090"}},
		{9000, true, []string{"10.0.0.1:9001"}},
		{1234, false, nil}, // not a port of the Service
	} {
		eps, ok := cat.Lookup(ns, "checkout", tc.port)
		if ok != tc.exported {
			t.Errorf("port %d: exported %v, want %v", tc.port, ok, tc.exported)
		}
		if d := cmp.Diff(tc.want, addrs(eps)); d != "" {
			t.Errorf("port %d endpoints (-want +got):\n%s", tc.port, d)
		}
	}

	// 10.0.0.2 becomes ready.
	s, err := kube.DiscoveryV1().EndpointSlices(ns).Get(ctx, "checkout-local", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Endpoints[1].Conditions.Ready = ptr(true)
	if _, err := kube.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "readiness flip", func() bool {
		eps, _ := cat.Lookup(ns, "checkout", 8080)
		return cmp.Equal(addrs(eps), []string{"10.0.0.1:9090", "10.0.0.2:9090"})
	})

	if err := mcs.MulticlusterV1beta1().ServiceExports(ns).Delete(ctx, "checkout", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "unexport", func() bool { _, ok := cat.Lookup(ns, "checkout", 8080); return !ok })
}

func addrs(eps []gateway.Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.Addr.String())
	}
	slices.Sort(out)
	return out
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
