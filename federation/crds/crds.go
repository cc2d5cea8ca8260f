// Package crds installs the CustomResourceDefinitions fedmesh depends on
// (the MCS API's ServiceExport/ServiceImport, the About API's
// ClusterProperty, the Gateway API's HTTPRoute, GRPCRoute and ReferenceGrant,
// and fedmesh's own traffic policies) and waits until the API server serves
// them, so every component and test starts from the same, fully established
// schema.
package crds

import (
	"context"
	_ "embed"
	"fmt"
	"time"

	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	mcscrd "sigs.k8s.io/mcs-api/config/crd"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/federation/about"
	policyv1alpha1 "github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// The Gateway API's standard CRDs that mesh routing (GAMMA) uses, vendored
// unmodified (see gatewayapi/README.md).
var (
	//go:embed gatewayapi/gateway.networking.k8s.io_httproutes.yaml
	HTTPRouteCRD []byte
	//go:embed gatewayapi/gateway.networking.k8s.io_grpcroutes.yaml
	GRPCRouteCRD []byte
	//go:embed gatewayapi/gateway.networking.k8s.io_referencegrants.yaml
	ReferenceGrantCRD []byte
)

// All returns every CRD fedmesh installs, parsed.
func All() ([]*apiextv1.CustomResourceDefinition, error) {
	var out []*apiextv1.CustomResourceDefinition
	for _, raw := range [][]byte{
		mcscrd.ServiceExportCRD, mcscrd.ServiceImportCRD, about.CRD,
		HTTPRouteCRD, GRPCRouteCRD, ReferenceGrantCRD,
		policyv1alpha1.AuthorizationPolicyCRD, policyv1alpha1.RateLimitPolicyCRD, policyv1alpha1.FailoverPolicyCRD,
	} {
		crd := &apiextv1.CustomResourceDefinition{}
		if err := yaml.UnmarshalStrict(raw, crd); err != nil {
			return nil, fmt.Errorf("parse embedded crd: %w", err)
		}
		out = append(out, crd)
	}
	return out, nil
}

// Install creates or updates every CRD and waits until each is Established.
func Install(ctx context.Context, cfg *rest.Config) error {
	cs, err := apiext.NewForConfig(cfg)
	if err != nil {
		return err
	}
	all, err := All()
	if err != nil {
		return err
	}
	api := cs.ApiextensionsV1().CustomResourceDefinitions()
	for _, crd := range all {
		cur, err := api.Get(ctx, crd.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = api.Create(ctx, crd, metav1.CreateOptions{})
		case err == nil:
			crd.ResourceVersion = cur.ResourceVersion
			_, err = api.Update(ctx, crd, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("install crd %s: %w", crd.Name, err)
		}
	}
	for _, crd := range all {
		err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			cur, err := api.Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, c := range cur.Status.Conditions {
				if c.Type == apiextv1.Established && c.Status == apiextv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("wait for crd %s to be established: %w", crd.Name, err)
		}
	}
	return nil
}
