// Package about carries the About API's ClusterProperty (KEP-2149), which
// names a cluster and its clusterset. The upstream Go module is not available
// from the module proxy, so fedmesh keeps the CRD and a minimal type here and
// talks to the API through the dynamic client.
package about

import (
	"context"
	_ "embed"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// CRD is the ClusterProperty CustomResourceDefinition.
//
//go:embed clusterproperty.yaml
var CRD []byte

const (
	// ClusterIDProperty names the property whose value is this cluster's ID
	// within its clusterset.
	ClusterIDProperty = "cluster.clusterset.k8s.io"
	// ClusterSetProperty names the property whose value is the clusterset.
	ClusterSetProperty = "clusterset.clusterset.k8s.io"
)

// Resource is the ClusterProperty resource for the dynamic client.
var Resource = schema.GroupVersionResource{Group: "about.k8s.io", Version: "v1alpha1", Resource: "clusterproperties"}

// ClusterProperty is a cluster-scoped name/value pair.
type ClusterProperty struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ClusterPropertySpec `json:"spec"`
}

// ClusterPropertySpec holds the property's value.
type ClusterPropertySpec struct {
	Value string `json:"value"`
}

// Get returns the value of the named property.
func Get(ctx context.Context, c dynamic.Interface, name string) (string, error) {
	u, err := c.Resource(Resource).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get clusterproperty %s: %w", name, err)
	}
	v, ok, err := unstructured.NestedString(u.Object, "spec", "value")
	if err != nil || !ok || v == "" {
		return "", fmt.Errorf("clusterproperty %s has no spec.value", name)
	}
	return v, nil
}

// Set creates or updates the named property.
func Set(ctx context.Context, c dynamic.Interface, name, value string) error {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "about.k8s.io/v1alpha1",
		"kind":       "ClusterProperty",
		"metadata":   map[string]any{"name": name},
		"spec":       map[string]any{"value": value},
	}}
	ri := c.Resource(Resource)
	cur, err := ri.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = ri.Create(ctx, u, metav1.CreateOptions{})
	case err == nil:
		if err = unstructured.SetNestedField(cur.Object, value, "spec", "value"); err == nil {
			_, err = ri.Update(ctx, cur, metav1.UpdateOptions{})
		}
	}
	if err != nil {
		return fmt.Errorf("set clusterproperty %s: %w", name, err)
	}
	return nil
}
