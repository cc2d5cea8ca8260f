package crds_test

import (
	"context"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation/crds"
	policyv1alpha1 "github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// TestInstalled starts a real kube-apiserver (which installs every CRD
// through crds.Install) and has it accept a GAMMA HTTPRoute, a GRPCRoute, a
// ReferenceGrant and each fedmesh policy, and refuse a policy the schema
// forbids.
func TestInstalled(t *testing.T) {
	all, err := crds.All()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 9 {
		t.Fatalf("%d CRDs, want 9", len(all))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"east"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	cfg := cp.Cluster("east").Config
	gw := gwclient.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	const ns = "default"

	port := gwv1.PortNumber(80)
	svc := gwv1.Kind("Service")
	core := gwv1.Group("")
	route := &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "canary", Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: &core, Kind: &svc, Name: "api", Port: &port}}},
			Rules: []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{
				BackendObjectReference: gwv1.BackendObjectReference{Group: &core, Kind: &svc, Name: "api-v2", Port: &port}}}}}},
		},
	}
	if _, err := gw.GatewayV1().HTTPRoutes(ns).Create(ctx, route, metav1.CreateOptions{}); err != nil {
		t.Errorf("create HTTPRoute: %v", err)
	}
	grpc := &gwv1.GRPCRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "grpc", Namespace: ns},
		Spec: gwv1.GRPCRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: &core, Kind: &svc, Name: "api"}}},
			Rules: []gwv1.GRPCRouteRule{{BackendRefs: []gwv1.GRPCBackendRef{{BackendRef: gwv1.BackendRef{
				BackendObjectReference: gwv1.BackendObjectReference{Group: &core, Kind: &svc, Name: "api", Port: &port}}}}}},
		},
	}
	if _, err := gw.GatewayV1().GRPCRoutes(ns).Create(ctx, grpc, metav1.CreateOptions{}); err != nil {
		t.Errorf("create GRPCRoute: %v", err)
	}
	grant := &gwv1.ReferenceGrant{
		ObjectMeta: metav1.ObjectMeta{Name: "from-demo", Namespace: ns},
		Spec: gwv1.ReferenceGrantSpec{
			From: []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "demo"}},
			To:   []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service"}},
		},
	}
	if _, err := gw.GatewayV1().ReferenceGrants(ns).Create(ctx, grant, metav1.CreateOptions{}); err != nil {
		t.Errorf("create ReferenceGrant: %v", err)
	}

	create := func(obj runtime.Object, res string) error {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
		if err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{Object: m}
		u.SetAPIVersion(policyv1alpha1.SchemeGroupVersion.String())
		_, err = dyn.Resource(policyv1alpha1.SchemeGroupVersion.WithResource(res)).Namespace(ns).Create(ctx, u, metav1.CreateOptions{})
		return err
	}
	target := policyv1alpha1.TargetRef{Kind: "Service", Name: "api"}
	for _, tc := range []struct {
		name string
		obj  runtime.Object
		res  string
		ok   bool
	}{
		{"authz", &policyv1alpha1.AuthorizationPolicy{TypeMeta: metav1.TypeMeta{Kind: "AuthorizationPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "a"},
			Spec: policyv1alpha1.AuthorizationPolicySpec{TargetRef: &target, Rules: []policyv1alpha1.AuthorizationRule{{
				From: policyv1alpha1.Callers{IDs: []string{"spiffe://east.fedmesh/ns/demo/sa/client"}}, Ports: []int32{80},
				Paths: []policyv1alpha1.PathMatch{{Type: "PathPrefix", Value: "/api"}}}}}}, "authorizationpolicies", true},
		{"authz bad path type", &policyv1alpha1.AuthorizationPolicy{TypeMeta: metav1.TypeMeta{Kind: "AuthorizationPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "b"},
			Spec: policyv1alpha1.AuthorizationPolicySpec{Rules: []policyv1alpha1.AuthorizationRule{{
				Paths: []policyv1alpha1.PathMatch{{Type: "Regex", Value: "/api"}}}}}}, "authorizationpolicies", false},
		{"ratelimit", &policyv1alpha1.RateLimitPolicy{TypeMeta: metav1.TypeMeta{Kind: "RateLimitPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "r"},
			Spec: policyv1alpha1.RateLimitPolicySpec{TargetRef: target, RequestsPerSecond: 100, PerCaller: true}}, "ratelimitpolicies", true},
		{"ratelimit zero", &policyv1alpha1.RateLimitPolicy{TypeMeta: metav1.TypeMeta{Kind: "RateLimitPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "r0"},
			Spec: policyv1alpha1.RateLimitPolicySpec{TargetRef: target}}, "ratelimitpolicies", false},
		{"failover", &policyv1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "f"},
			Spec: policyv1alpha1.FailoverPolicySpec{TargetRef: policyv1alpha1.TargetRef{Group: "multicluster.x-k8s.io", Kind: "ServiceImport", Name: "api"},
				ClusterOrder: []string{"west"}, OverprovisioningPercent: new(int32(140)), StaleAfter: "30s",
				OutlierDetection: &policyv1alpha1.OutlierDetection{Consecutive5xx: new(int32(5)), BaseEjectionTime: "1s"}}}, "failoverpolicies", true},
		{"failover overprovisioning 50", &policyv1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "f50"},
			Spec: policyv1alpha1.FailoverPolicySpec{TargetRef: target, OverprovisioningPercent: new(int32(50))}}, "failoverpolicies", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := create(tc.obj, tc.res)
			switch {
			case tc.ok && err != nil:
				t.Fatalf("rejected: %v", err)
			case !tc.ok && !apierrors.IsInvalid(err):
				t.Fatalf("got %v, want Invalid", err)
			}
		})
	}
}
