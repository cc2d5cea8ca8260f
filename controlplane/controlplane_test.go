package controlplane

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/federation/about"
)

func TestStartThreeClusters(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	f, err := Start(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Stop()
	t.Logf("3 clusters ready in %s", time.Since(start).Round(time.Millisecond))
	if len(f.Clusters) != 3 {
		t.Fatalf("got %d clusters", len(f.Clusters))
	}
	for _, c := range f.Clusters {
		dyn := dynamic.NewForConfigOrDie(c.Config)
		id, err := about.Get(ctx, dyn, about.ClusterIDProperty)
		if err != nil || id != c.Name {
			t.Errorf("%s: cluster id = %q, %v", c.Name, id, err)
		}
		mcs := mcsclient.NewForConfigOrDie(c.Config)
		if _, err := mcs.MulticlusterV1beta1().ServiceExports("default").List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("%s: list serviceexports: %v", c.Name, err)
		}
		if _, err := mcs.MulticlusterV1alpha1().ServiceImports("default").List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("%s: v1alpha1 must stay served: %v", c.Name, err)
		}
		cs := kubernetes.NewForConfigOrDie(c.Config)
		if _, err := cs.CoreV1().Namespaces().Get(ctx, SystemNamespace, metav1.GetOptions{}); err != nil {
			t.Errorf("%s: %v", c.Name, err)
		}
	}
}
