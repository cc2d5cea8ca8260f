package clusters

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation/crds"
)

// kustomizations lists every directory under clusters/ with a kustomization.yaml.
func kustomizations(t *testing.T) []string {
	t.Helper()
	var dirs []string
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() == "kustomization.yaml" {
			dirs = append(dirs, filepath.Dir(path))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"base", "samples"}
	for _, n := range Names {
		want = append(want, filepath.Join("overlays", n))
	}
	for _, w := range want {
		if !slices.Contains(dirs, w) {
			t.Fatalf("no kustomization in %s (found %v)", w, dirs)
		}
	}
	return dirs
}

// crdsAll is every CRD federation/crds installs.
func crdsAll(t *testing.T) []*apiextv1.CustomResourceDefinition {
	t.Helper()
	all, err := crds.All()
	if err != nil {
		t.Fatal(err)
	}
	return all
}

// render builds dir with kustomize's Go API, as kubectl apply -k does.
func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var out []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
	if len(out) == 0 {
		t.Fatalf("%s renders no objects", dir)
	}
	return out
}

type cluster struct {
	cfg    *rest.Config // admin
	kube   kubernetes.Interface
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

// apply server-side applies u; dryRun asks the API server to validate and
// admit it without persisting it.
func (c *cluster) apply(ctx context.Context, u *unstructured.Unstructured, dryRun bool) error {
	gvk := u.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		if u.GetNamespace() == "" {
			return &missingNamespace{u.GetKind() + "/" + u.GetName()}
		}
		ri = c.dyn.Resource(m.Resource).Namespace(u.GetNamespace())
	}
	data, err := json.Marshal(u)
	if err != nil {
		return err
	}
	force := true
	opts := metav1.PatchOptions{FieldManager: "fedmesh-clusters-test", Force: &force}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = ri.Patch(ctx, u.GetName(), types.ApplyPatchType, data, opts)
	return err
}

type missingNamespace struct{ obj string }

func (e *missingNamespace) Error() string { return e.obj + " is namespaced but has no namespace" }

func startCluster(t *testing.T, ctx context.Context) *cluster {
	t.Helper()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"east"}})
	if err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	t.Cleanup(cp.Stop)
	cfg := cp.Cluster("east").Config
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{cfg: cfg, kube: kube, dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Discovery()))}
}

// TestManifests renders every kustomization and has a real kube-apiserver
// accept every object with a server-side dry-run apply. The control plane
// has the MCS and ClusterProperty CRDs installed; namespaces are created for
// real first, because a dry-run namespace does not hold dry-run objects.
func TestManifests(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c := startCluster(t, ctx)
	rendered := map[string][]*unstructured.Unstructured{}
	for _, dir := range kustomizations(t) {
		rendered[dir] = render(t, dir)
		for _, u := range rendered[dir] {
			if u.GetKind() == "Namespace" {
				if err := c.apply(ctx, u, false); err != nil {
					t.Fatalf("create namespace %s: %v", u.GetName(), err)
				}
			}
		}
	}
	for dir, objs := range rendered {
		t.Run(dir, func(t *testing.T) {
			for _, u := range objs {
				if err := c.apply(ctx, u, true); err != nil {
					t.Errorf("%s %s/%s rejected: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
				}
			}
		})
	}

	// What each overlay must say, beyond being valid.
	for _, name := range Names {
		t.Run("overlays/"+name+"/content", func(t *testing.T) {
			objs := rendered[filepath.Join("overlays", name)]
			kinds := map[string]int{}
			var ctrl, inj *appsv1.Deployment
			var disco *corev1.Service
			gw := gatewayObjects{services: map[string]*corev1.Service{}}
			for _, u := range objs {
				kinds[u.GetKind()]++
				if ns := u.GetNamespace(); ns != "" && ns != "fedmesh-system" {
					t.Errorf("%s %s in namespace %s, want fedmesh-system", u.GetKind(), u.GetName(), ns)
				}
				switch u.GetKind() {
				case "Deployment":
					d := &appsv1.Deployment{}
					if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, d); err != nil {
						t.Fatal(err)
					}
					switch u.GetName() {
					case "fedmesh-federation-controller":
						ctrl = d
					case "fedmesh-injector":
						inj = d
					case "fedmesh-gateway":
						gw.deploy = d
					}
				case "Service":
					svc := &corev1.Service{}
					if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, svc); err != nil {
						t.Fatal(err)
					}
					gw.services[u.GetName()] = svc
					if u.GetName() == "fedmesh-discovery" {
						disco = svc
					}
				case "ConfigMap":
					if u.GetName() == "fedmesh-gateway-peers" {
						gw.peers = &corev1.ConfigMap{}
						if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, gw.peers); err != nil {
							t.Fatal(err)
						}
					}
				case "ClusterRole", "Role":
					var r rbacv1.ClusterRole
					if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &r); err != nil {
						t.Fatal(err)
					}
					for _, rule := range r.Rules {
						for _, s := range slices.Concat(rule.Verbs, rule.Resources, rule.APIGroups) {
							if s == "*" {
								t.Errorf("%s %s has a wildcard rule: %+v", u.GetKind(), u.GetName(), rule)
							}
						}
						if u.GetKind() == "ClusterRole" && slices.Contains(rule.Resources, "secrets") {
							t.Errorf("ClusterRole %s grants secrets cluster-wide", u.GetName())
						}
					}
				}
			}
			for _, k := range []string{"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "Role", "Deployment", "Service", "MutatingWebhookConfiguration"} {
				if kinds[k] == 0 {
					t.Errorf("no %s rendered", k)
				}
			}
			if want := len(crdsAll(t)); kinds["CustomResourceDefinition"] != want {
				t.Errorf("%d CRDs, want %d (every CRD federation/crds installs)", kinds["CustomResourceDefinition"], want)
			}
			if ctrl == nil {
				t.Fatal("no fedmesh-federation-controller Deployment")
			}
			if r := ctrl.Spec.Replicas; r == nil || *r != 2 {
				t.Errorf("controller replicas %v, want 2", r)
			}
			args := ctrl.Spec.Template.Spec.Containers[0].Args
			for _, want := range []string{"--cluster-id=" + name, "--leader-elect=true", "--namespace=fedmesh-system", "--discovery-addr=:15012"} {
				if !slices.Contains(args, want) {
					t.Errorf("controller args %q lack %s", args, want)
				}
			}
			// Injected sidecars find their cluster and the leader's
			// discovery API: the injector names both, the Service routes
			// to the ready (leading) controller's discovery port.
			if rp := ctrl.Spec.Template.Spec.Containers[0].ReadinessProbe; rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Path != "/readyz" {
				t.Errorf("controller readiness probe %+v, want /readyz (ready while leading)", rp)
			}
			if inj == nil || !slices.Contains(inj.Spec.Template.Spec.Containers[0].Args, "--cluster="+name) {
				t.Errorf("injector Deployment %v lacks --cluster=%s", inj != nil, name)
			}
			if disco == nil || len(disco.Spec.Ports) != 1 || disco.Spec.Ports[0].Port != 15012 || disco.Spec.Ports[0].TargetPort.String() != "discovery" ||
				disco.Spec.Selector["app.kubernetes.io/name"] != "fedmesh-federation-controller" {
				t.Errorf("Service fedmesh-discovery = %+v, want port 15012 to the controller's discovery port", disco)
			}
			checkGateway(t, name, gw, ctrl)
		})
	}
	t.Run("samples/content", func(t *testing.T) {
		var exports, injectNS, policies int
		for _, u := range rendered["samples"] {
			switch u.GetKind() {
			case "HTTPRoute", "AuthorizationPolicy", "RateLimitPolicy":
				policies++
			}
			if u.GetNamespace() != "" && u.GetNamespace() != "demo" {
				t.Errorf("%s %s in namespace %s, want demo", u.GetKind(), u.GetName(), u.GetNamespace())
			}
			if u.GetKind() == "ServiceExport" && u.GetName() == "echo" {
				exports++
			}
			if u.GetKind() == "Namespace" && u.GetLabels()["fedmesh.dev/inject"] == "enabled" {
				injectNS++
			}
		}
		if exports != 1 || injectNS != 1 || policies != 3 {
			t.Errorf("samples: %d ServiceExport echo, %d injection-enabled namespaces, %d routes and policies; want 1, 1 and 3", exports, injectNS, policies)
		}
	})
}

// TestRBAC installs the rendered RBAC for real and asks the API server, with
// SubjectAccessReviews, what each service account may do: what the
// controller needs must be allowed, and everything near it denied.
func TestRBAC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c := startCluster(t, ctx)
	for _, u := range render(t, filepath.Join("overlays", "east")) {
		switch u.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			if err := c.apply(ctx, u, false); err != nil {
				t.Fatalf("apply %s %s: %v", u.GetKind(), u.GetName(), err)
			}
		}
	}
	const (
		ctrl     = "system:serviceaccount:fedmesh-system:fedmesh-federation-controller"
		peer     = "system:serviceaccount:fedmesh-system:fedmesh-peer-reader"
		injector = "system:serviceaccount:fedmesh-system:fedmesh-injector"
		gw       = gatewayUser
		sys      = "fedmesh-system"
	)
	type attrs = authzv1.ResourceAttributes
	for _, tc := range []struct {
		name  string
		user  string
		attrs attrs
		allow bool
	}{
		{"ctrl watches exports", ctrl, attrs{Verb: "watch", Group: "multicluster.x-k8s.io", Resource: "serviceexports"}, true},
		{"ctrl writes export status", ctrl, attrs{Verb: "update", Group: "multicluster.x-k8s.io", Resource: "serviceexports", Subresource: "status", Namespace: "demo"}, true},
		{"ctrl creates imports", ctrl, attrs{Verb: "create", Group: "multicluster.x-k8s.io", Resource: "serviceimports", Namespace: "demo"}, true},
		{"ctrl writes import status", ctrl, attrs{Verb: "update", Group: "multicluster.x-k8s.io", Resource: "serviceimports", Subresource: "status", Namespace: "demo"}, true},
		{"ctrl deletes derived services", ctrl, attrs{Verb: "delete", Resource: "services", Namespace: "demo"}, true},
		{"ctrl updates slices", ctrl, attrs{Verb: "update", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "demo"}, true},
		{"ctrl lists namespaces", ctrl, attrs{Verb: "list", Resource: "namespaces"}, true},
		{"ctrl reads cluster id", ctrl, attrs{Verb: "get", Group: "about.k8s.io", Resource: "clusterproperties", Name: "cluster.clusterset.k8s.io"}, true},
		{"ctrl updates cluster id", ctrl, attrs{Verb: "update", Group: "about.k8s.io", Resource: "clusterproperties", Name: "cluster.clusterset.k8s.io"}, true},
		{"ctrl watches httproutes", ctrl, attrs{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "httproutes"}, true},
		{"ctrl lists grpcroutes", ctrl, attrs{Verb: "list", Group: "gateway.networking.k8s.io", Resource: "grpcroutes"}, true},
		{"ctrl watches referencegrants", ctrl, attrs{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "referencegrants"}, true},
		{"ctrl writes httproute status", ctrl, attrs{Verb: "update", Group: "gateway.networking.k8s.io", Resource: "httproutes", Subresource: "status", Namespace: "demo"}, true},
		{"ctrl writes grpcroute status", ctrl, attrs{Verb: "patch", Group: "gateway.networking.k8s.io", Resource: "grpcroutes", Subresource: "status", Namespace: "demo"}, true},
		{"ctrl watches authorization policies", ctrl, attrs{Verb: "watch", Group: "policy.fedmesh.dev", Resource: "authorizationpolicies"}, true},
		{"ctrl lists rate limit policies", ctrl, attrs{Verb: "list", Group: "policy.fedmesh.dev", Resource: "ratelimitpolicies"}, true},
		{"ctrl gets failover policies", ctrl, attrs{Verb: "get", Group: "policy.fedmesh.dev", Resource: "failoverpolicies", Namespace: "demo"}, true},
		{"ctrl writes policy status", ctrl, attrs{Verb: "update", Group: "policy.fedmesh.dev", Resource: "failoverpolicies", Subresource: "status", Namespace: "demo"}, true},
		{"ctrl may not edit routes", ctrl, attrs{Verb: "update", Group: "gateway.networking.k8s.io", Resource: "httproutes", Namespace: "demo"}, false},
		{"ctrl may not edit policies", ctrl, attrs{Verb: "update", Group: "policy.fedmesh.dev", Resource: "authorizationpolicies", Namespace: "demo"}, false},
		{"ctrl may not write referencegrants", ctrl, attrs{Verb: "create", Group: "gateway.networking.k8s.io", Resource: "referencegrants", Namespace: "demo"}, false},
		{"ctrl creates events", ctrl, attrs{Verb: "create", Resource: "events", Namespace: "demo"}, true},
		{"ctrl watches peer secrets", ctrl, attrs{Verb: "watch", Resource: "secrets", Namespace: sys}, true},
		{"ctrl renews its lease", ctrl, attrs{Verb: "update", Group: "coordination.k8s.io", Resource: "leases", Namespace: sys, Name: "fedmesh-federation-controller"}, true},
		{"ctrl may not edit exports", ctrl, attrs{Verb: "update", Group: "multicluster.x-k8s.io", Resource: "serviceexports", Namespace: "demo"}, false},
		{"ctrl may not read secrets elsewhere", ctrl, attrs{Verb: "get", Resource: "secrets", Namespace: "default"}, false},
		{"ctrl may not list secrets cluster-wide", ctrl, attrs{Verb: "list", Resource: "secrets"}, false},
		{"ctrl may not take leases elsewhere", ctrl, attrs{Verb: "update", Group: "coordination.k8s.io", Resource: "leases", Namespace: "kube-system"}, false},
		{"ctrl may not change the clusterset", ctrl, attrs{Verb: "update", Group: "about.k8s.io", Resource: "clusterproperties", Name: "clusterset.clusterset.k8s.io"}, false},
		{"ctrl may not delete cluster properties", ctrl, attrs{Verb: "delete", Group: "about.k8s.io", Resource: "clusterproperties", Name: "cluster.clusterset.k8s.io"}, false},
		{"ctrl may not delete namespaces", ctrl, attrs{Verb: "delete", Resource: "namespaces", Name: "demo"}, false},
		{"ctrl may not create pods", ctrl, attrs{Verb: "create", Resource: "pods", Namespace: "demo"}, false},
		{"peer reads slices", peer, attrs{Verb: "list", Group: "discovery.k8s.io", Resource: "endpointslices"}, true},
		{"peer reads exports", peer, attrs{Verb: "watch", Group: "multicluster.x-k8s.io", Resource: "serviceexports"}, true},
		{"peer may not write services", peer, attrs{Verb: "create", Resource: "services", Namespace: "demo"}, false},
		{"peer may not read secrets", peer, attrs{Verb: "get", Resource: "secrets", Namespace: sys}, false},
		{"injector writes events", injector, attrs{Verb: "create", Resource: "events", Namespace: "demo"}, true},
		{"injector may not read pods", injector, attrs{Verb: "get", Resource: "pods", Namespace: "demo"}, false},
		// The gateway: its catalog's informers, and the RTT annotation.
		{"gateway lists exports", gw, attrs{Verb: "list", Group: "multicluster.x-k8s.io", Resource: "serviceexports"}, true},
		{"gateway watches exports", gw, attrs{Verb: "watch", Group: "multicluster.x-k8s.io", Resource: "serviceexports"}, true},
		{"gateway lists services", gw, attrs{Verb: "list", Resource: "services"}, true},
		{"gateway watches services", gw, attrs{Verb: "watch", Resource: "services"}, true},
		{"gateway lists slices", gw, attrs{Verb: "list", Group: "discovery.k8s.io", Resource: "endpointslices"}, true},
		{"gateway watches slices", gw, attrs{Verb: "watch", Group: "discovery.k8s.io", Resource: "endpointslices"}, true},
		{"gateway patches its service", gw, attrs{Verb: "patch", Resource: "services", Namespace: sys, Name: "fedmesh-gateway"}, true},
		{"gateway may not patch other services", gw, attrs{Verb: "patch", Resource: "services", Namespace: sys, Name: "fedmesh-discovery"}, false},
		{"gateway may not patch its name elsewhere", gw, attrs{Verb: "patch", Resource: "services", Namespace: "demo", Name: "fedmesh-gateway"}, false},
		{"gateway may not update its service", gw, attrs{Verb: "update", Resource: "services", Namespace: sys, Name: "fedmesh-gateway"}, false},
		{"gateway may not delete its service", gw, attrs{Verb: "delete", Resource: "services", Namespace: sys, Name: "fedmesh-gateway"}, false},
		{"gateway may not patch service status", gw, attrs{Verb: "patch", Resource: "services", Subresource: "status", Namespace: sys, Name: "fedmesh-gateway"}, false},
		{"gateway may not create services", gw, attrs{Verb: "create", Resource: "services", Namespace: sys}, false},
		{"gateway may not write exports", gw, attrs{Verb: "update", Group: "multicluster.x-k8s.io", Resource: "serviceexports", Namespace: "demo"}, false},
		{"gateway may not write slices", gw, attrs{Verb: "create", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "demo"}, false},
		{"gateway may not read imports", gw, attrs{Verb: "list", Group: "multicluster.x-k8s.io", Resource: "serviceimports"}, false},
		{"gateway may not read secrets", gw, attrs{Verb: "get", Resource: "secrets", Namespace: sys}, false},
		{"gateway may not read pods", gw, attrs{Verb: "list", Resource: "pods"}, false},
		{"gateway may not take leases", gw, attrs{Verb: "create", Group: "coordination.k8s.io", Resource: "leases", Namespace: sys}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.attrs
			sar := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
				User: tc.user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:fedmesh-system", "system:authenticated"},
				ResourceAttributes: &a,
			}}
			got, err := c.kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Status.Allowed != tc.allow {
				t.Fatalf("%s %s: allowed=%v, want %v (%s)", tc.user, strings.TrimSpace(a.Verb+" "+a.Resource+"/"+a.Subresource), got.Status.Allowed, tc.allow, got.Status.Reason)
			}
		})
	}
	t.Run("gateway runs as its account", func(t *testing.T) { checkGatewayAccess(t, ctx, c) })
}
