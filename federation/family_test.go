package federation_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
)

// TestIPFamilyNotSupported imports an IPv6-only service into a cluster whose
// service CIDR is IPv4 only: the import says so with its Ready condition
// instead of failing silently, and the dual-stack cluster imports it fine.
func TestIPFamilyNotSupported(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"dual", "v4"}, IPv4Only: []string{"v4"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	for _, c := range cp.Clusters {
		var peers []federation.Peer
		for _, p := range cp.Clusters {
			if p != c {
				peers = append(peers, federation.Peer{Name: p.Name, Config: p.Config})
			}
		}
		ctrl, err := federation.New(federation.Options{Config: c.Config, Peers: peers, ProbeInterval: 250 * time.Millisecond,
			LeaderElection: federation.LeaderElection{Disabled: true}, Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- ctrl.Run(ctx) }()
		defer func() { cancel(); <-done }()
	}
	dual := cp.Cluster("dual")
	kube := kubernetes.NewForConfigOrDie(dual.Config)
	for _, c := range cp.Clusters {
		if _, err := kubernetes.NewForConfigOrDie(c.Config).CoreV1().Namespaces().Create(ctx,
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "v6"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kube.CoreV1().Services("v6").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "only6"},
		Spec: corev1.ServiceSpec{IPFamilies: []corev1.IPFamily{corev1.IPv6Protocol},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mcsclient.NewForConfigOrDie(dual.Config).MulticlusterV1beta1().ServiceExports("v6").Create(ctx,
		&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "only6"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string]func(*mcsv1beta1.ServiceImport) error{
		"v4": func(si *mcsv1beta1.ServiceImport) error {
			if len(si.Spec.IPs) != 0 {
				return fmt.Errorf("ips %v in a cluster that cannot allocate IPv6", si.Spec.IPs)
			}
			return wantCondition(si.Status.Conditions, "Ready", metav1.ConditionFalse, "IPFamilyNotSupported")
		},
		"dual": func(si *mcsv1beta1.ServiceImport) error {
			if len(si.Spec.IPs) != 1 || len(si.Spec.IPs[0]) < 3 || si.Spec.IPs[0][:2] != "fd" {
				return fmt.Errorf("ips %v, want one IPv6 clusterset IP", si.Spec.IPs)
			}
			return wantCondition(si.Status.Conditions, "Ready", metav1.ConditionTrue, "Ready")
		},
	}
	for cl, check := range want {
		mcs := mcsclient.NewForConfigOrDie(cp.Cluster(cl).Config)
		eventually(t, converge, "import in "+cl, func() error {
			si, err := mcs.MulticlusterV1beta1().ServiceImports("v6").Get(ctx, "only6", metav1.GetOptions{})
			if err != nil {
				return err
			}
			return check(si)
		})
	}
}
