package federation_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/federation/crds"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/federation/routes"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// discoveryClient serves a controller's discovery API on loopback.
func discoveryClient(t testing.TB, ctrl *federation.Controller) pb.DiscoveryClient {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterDiscoveryServer(srv, ctrl.Discovery())
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewDiscoveryClient(conn)
}

// policyStream collects the decoded policies a Watch stream receives.
type policyStream struct{ sets chan *pb.EndpointSet }

func watchPolicy(t *testing.T, ctx context.Context, client pb.DiscoveryClient, ns, svc string) *policyStream {
	t.Helper()
	stream, err := client.Watch(ctx, &pb.WatchRequest{Namespace: ns, Service: svc})
	if err != nil {
		t.Fatal(err)
	}
	ps := &policyStream{sets: make(chan *pb.EndpointSet, 100)}
	go func() {
		for {
			set, err := stream.Recv()
			if err != nil {
				close(ps.sets)
				return
			}
			ps.sets <- set
		}
	}()
	return ps
}

// until waits for a set whose policy satisfies ok.
func (ps *policyStream) until(t *testing.T, what string, ok func(*policy.Service) error) *policy.Service {
	t.Helper()
	var p *policy.Service
	ps.untilSet(t, what, func(set *pb.EndpointSet) error {
		var err error
		if p, err = policy.Decode(set.Policy); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return ok(p)
	})
	return p
}

// untilSet waits for a set that satisfies ok.
func (ps *policyStream) untilSet(t *testing.T, what string, ok func(*pb.EndpointSet) error) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	var last error
	for {
		select {
		case set, open := <-ps.sets:
			if !open {
				t.Fatalf("%s: stream ended (last mismatch: %v)", what, last)
			}
			if last = ok(set); last == nil {
				return
			}
		case <-timeout:
			t.Fatalf("%s: not seen on the stream in 10s: %v", what, last)
		}
	}
}

func port(p int32) *gwv1.PortNumber { return &p }

func serviceParent(name string) gwv1.ParentReference {
	g, k := gwv1.Group(""), gwv1.Kind("Service")
	return gwv1.ParentReference{Group: &g, Kind: &k, Name: gwv1.ObjectName(name), Port: port(80)}
}

func backendRef(group, kind, name string, weight int32) gwv1.HTTPBackendRef {
	g, k := gwv1.Group(group), gwv1.Kind(kind)
	return gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{Weight: &weight,
		BackendObjectReference: gwv1.BackendObjectReference{Group: &g, Kind: &k, Name: gwv1.ObjectName(name), Port: port(80)}}}
}

func canaryRoute(ns, name, parent string, stable, canary int32) *gwv1.HTTPRoute {
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{serviceParent(parent)}},
			Rules: []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{
				backendRef("", "Service", parent+"-v2", stable),
				backendRef("multicluster.x-k8s.io", "ServiceImport", parent, canary),
			}}},
		},
	}
}

func routeCondition(gw gwclient.Interface, ns, name, typ string, status metav1.ConditionStatus, reason, msgPart string) func() error {
	return func() error {
		r, err := gw.GatewayV1().HTTPRoutes(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, p := range r.Status.Parents {
			if p.ControllerName != routes.ControllerName {
				continue
			}
			if err := wantCondition(p.Conditions, typ, status, reason); err != nil {
				return err
			}
			c, _ := condition(p.Conditions, typ)
			if c.ObservedGeneration != r.Generation {
				return fmt.Errorf("%s observedGeneration %d, route at %d", typ, c.ObservedGeneration, r.Generation)
			}
			if !strings.Contains(c.Message, msgPart) {
				return fmt.Errorf("%s message %q lacks %q", typ, c.Message, msgPart)
			}
			return nil
		}
		return fmt.Errorf("no fedmesh parent status: %+v", r.Status.Parents)
	}
}

func policyCondition(dyn dynamic.Interface, gvr_ string, ns, name string, status metav1.ConditionStatus, reason, msgPart string) func() error {
	return func() error {
		u, err := dyn.Resource(v1alpha1.SchemeGroupVersion.WithResource(gvr_)).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var st v1alpha1.PolicyStatus
		if m, ok := u.Object["status"].(map[string]any); ok {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &st); err != nil {
				return err
			}
		}
		if err := wantCondition(st.Conditions, v1alpha1.ConditionAccepted, status, reason); err != nil {
			return err
		}
		c, _ := condition(st.Conditions, v1alpha1.ConditionAccepted)
		if c.ObservedGeneration != u.GetGeneration() || !strings.Contains(c.Message, msgPart) {
			return fmt.Errorf("observedGeneration %d (object %d), message %q lacks %q", c.ObservedGeneration, u.GetGeneration(), c.Message, msgPart)
		}
		return nil
	}
}

func createPolicy(t *testing.T, dyn dynamic.Interface, res string, obj runtime.Object) {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
	if _, err := dyn.Resource(v1alpha1.SchemeGroupVersion.WithResource(res)).Namespace(u.GetNamespace()).Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create %s %s: %v", u.GetKind(), u.GetName(), err)
	}
}

// TestTrafficPolicy drives east's controller through the traffic policy
// life cycle on real API servers: a valid route's compiled policy reaches
// a discovery Watch stream; invalid generations (all weights 0, an unknown
// backend, an unsupported filter) get their status and reason and leave
// the served policy as it was; a route that was never valid serves
// nothing; a policy naming a missing service is TargetNotFound; the newer
// of two FailoverPolicies for one service is Conflicted.
func TestTrafficPolicy(t *testing.T) {
	need(t)
	env.mu.Lock()
	ctrl := env.ctrls["east"].ctrl
	env.mu.Unlock()
	cfg := env.cp.Cluster("east").Config
	gw := gwclient.NewForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	ns := env.ns(t, "east")
	for _, s := range []string{"api", "api-v2", "web", "web-v2"} {
		env.service(t, "east", ns, s, nil)
	}
	env.export(t, "east", ns, "api", nil)
	eventually(t, 10*time.Second, "ServiceImport api in east", func() error { _, err := env.getImport("east", ns, "api"); return err })

	client := discoveryClient(t, ctrl)
	stream := watchPolicy(t, ctx, client, ns, "api")

	routesAPI := gw.GatewayV1().HTTPRoutes(ns)
	r, err := routesAPI.Create(ctx, canaryRoute(ns, "canary", "api", 90, 10), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantBackends := []policy.Backend{
		{Kind: policy.KindService, Namespace: ns, Name: "api-v2", Port: 80, Weight: 90},
		{Kind: policy.KindServiceImport, Namespace: ns, Name: "api", Port: 80, Weight: 10},
	}
	served := stream.until(t, "the canary route's policy", func(p *policy.Service) error {
		if p == nil || len(p.Rules) != 1 {
			return fmt.Errorf("policy %+v", p)
		}
		return diffErr(wantBackends, p.Rules[0].Backends)
	})
	eventually(t, 10*time.Second, "canary Accepted", routeCondition(gw, ns, "canary", "Accepted", "True", "Accepted", "attached to Service"))
	eventually(t, 10*time.Second, "canary ResolvedRefs", routeCondition(gw, ns, "canary", "ResolvedRefs", "True", "ResolvedRefs", ""))

	unchanged := func(what string) {
		t.Helper()
		set, err := ctrl.Snapshot(ns, "api")
		if err != nil {
			t.Fatal(err)
		}
		p, err := policy.Decode(set.Policy)
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(served, p); d != "" {
			t.Fatalf("%s changed the served policy (-before +after):\n%s", what, d)
		}
	}
	for _, tc := range []struct {
		name                string
		mutate              func(*gwv1.HTTPRoute)
		typ, reason, detail string
	}{
		{"all weights 0", func(r *gwv1.HTTPRoute) {
			r.Spec.Rules[0].BackendRefs[0].Weight = new(int32(0))
			r.Spec.Rules[0].BackendRefs[1].Weight = new(int32(0))
		}, "Accepted", "UnsupportedValue", "every backendRef has weight 0"},
		{"unknown backend", func(r *gwv1.HTTPRoute) {
			r.Spec.Rules[0].BackendRefs[0] = backendRef("", "Service", "nope", 1)
		}, "ResolvedRefs", "BackendNotFound", "nope does not exist"},
		{"unsupported filter", func(r *gwv1.HTTPRoute) {
			r.Spec.Rules[0].Filters = []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterURLRewrite,
				URLRewrite: &gwv1.HTTPURLRewriteFilter{Hostname: new(gwv1.PreciseHostname("example.com"))}}}
		}, "Accepted", "UnsupportedValue", "filter URLRewrite is not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := canaryRoute(ns, "canary", "api", 90, 10)
			tc.mutate(bad)
			cur, err := routesAPI.Get(ctx, "canary", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			bad.ObjectMeta = cur.ObjectMeta
			upd, err := routesAPI.Update(ctx, bad, metav1.UpdateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			keep := fmt.Sprintf("serving generation %d; generation %d rejected: ", r.Generation, upd.Generation)
			eventually(t, 10*time.Second, tc.name+" status", routeCondition(gw, ns, "canary", tc.typ, "False", tc.reason, keep))
			eventually(t, 10*time.Second, tc.name+" status detail", routeCondition(gw, ns, "canary", tc.typ, "False", tc.reason, tc.detail))
			unchanged(tc.name)
		})
	}
	// Nothing but the first valid policy was ever sent on the stream.
	select {
	case set := <-stream.sets:
		p, _ := policy.Decode(set.Policy)
		if d := cmp.Diff(served, p); d != "" {
			t.Errorf("stream received a changed policy:\n%s", d)
		}
	default:
	}

	// A route that was never valid serves nothing.
	webStream := watchPolicy(t, ctx, client, ns, "web")
	bad := canaryRoute(ns, "web-canary", "web", 1, 1)
	bad.Spec.Rules[0].BackendRefs[1] = backendRef("", "Service", "missing", 1)
	if _, err := routesAPI.Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "never-valid route status", routeCondition(gw, ns, "web-canary", "ResolvedRefs", "False", "BackendNotFound", "nothing of it is served"))
	eventually(t, 5*time.Second, "rejected route counted", func() error {
		if v := gaugeLabels(t, "east", "fedmesh_federation_traffic_objects", "kind", "HTTPRoute", "verdict", "rejected"); v < 1 {
			return fmt.Errorf("fedmesh_federation_traffic_objects{HTTPRoute,rejected} = %v", v)
		}
		return nil
	})
	if set, err := ctrl.Snapshot(ns, "web"); err != nil || len(set.Policy) != 0 {
		t.Fatalf("web policy %q (%v), want none", set.GetPolicy(), err)
	}
	webStream.until(t, "web's first set", func(p *policy.Service) error {
		if p != nil {
			return fmt.Errorf("policy %+v", p)
		}
		return nil
	})

	// Policies: a missing target, and a FailoverPolicy conflict.
	createPolicy(t, dyn, "authorizationpolicies", &v1alpha1.AuthorizationPolicy{TypeMeta: metav1.TypeMeta{Kind: "AuthorizationPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "to-nowhere"},
		Spec: v1alpha1.AuthorizationPolicySpec{TargetRef: &v1alpha1.TargetRef{Kind: "Service", Name: "gone"},
			Rules: []v1alpha1.AuthorizationRule{{From: v1alpha1.Callers{TrustDomains: []string{"east.fedmesh"}}}}}})
	eventually(t, 10*time.Second, "TargetNotFound", policyCondition(dyn, "authorizationpolicies", ns, "to-nowhere", "False", v1alpha1.ReasonTargetNotFound, "Service "+ns+"/gone does not exist"))

	failover := func(name string) *v1alpha1.FailoverPolicy {
		return &v1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"}, ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: v1alpha1.FailoverPolicySpec{TargetRef: v1alpha1.TargetRef{Group: "multicluster.x-k8s.io", Kind: "ServiceImport", Name: "api"},
				ClusterOrder: []string{"west", "north"}, StaleAfter: "30s"}}
	}
	createPolicy(t, dyn, "failoverpolicies", failover("first"))
	// The second is created in a later second, so it is younger by timestamp too.
	eventually(t, 10*time.Second, "first FailoverPolicy accepted", policyCondition(dyn, "failoverpolicies", ns, "first", "True", v1alpha1.ReasonAccepted, ""))
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	createPolicy(t, dyn, "failoverpolicies", failover("a-second"))
	eventually(t, 10*time.Second, "second FailoverPolicy conflicted", policyCondition(dyn, "failoverpolicies", ns, "a-second", "False", v1alpha1.ReasonConflicted, ns+"/first"))
	stream.until(t, "failover policy on the stream", func(p *policy.Service) error {
		if p == nil || p.Failover == nil || p.Failover.Policy != ns+"/first" || p.Failover.Overprovisioning != 1.4 || time.Duration(p.Failover.StaleAfter) != 30*time.Second {
			return fmt.Errorf("failover %+v", p.Failover)
		}
		return diffErr(served.Rules, p.Rules)
	})
}

func diffErr(want, got any) error {
	if d := cmp.Diff(want, got); d != "" {
		return fmt.Errorf("(-want +got):\n%s", d)
	}
	return nil
}

// TestWithoutTrafficCRDs: on a cluster without the Gateway API and fedmesh
// policy CRDs (an older cluster), the controller leads and serves
// discovery, without policy.
func TestWithoutTrafficCRDs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"old"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	cfg := cp.Cluster("old").Config
	ext := apiext.NewForConfigOrDie(cfg)
	for _, name := range []string{"httproutes.gateway.networking.k8s.io", "grpcroutes.gateway.networking.k8s.io", "referencegrants.gateway.networking.k8s.io",
		"authorizationpolicies.policy.fedmesh.dev", "ratelimitpolicies.policy.fedmesh.dev", "failoverpolicies.policy.fedmesh.dev"} {
		if err := ext.ApiextensionsV1().CustomResourceDefinitions().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	kube := kubernetes.NewForConfigOrDie(cfg)
	eventually(t, 20*time.Second, "CRDs gone", func() error {
		for _, gv := range []string{"gateway.networking.k8s.io/v1", "policy.fedmesh.dev/v1alpha1"} {
			if _, err := kube.Discovery().ServerResourcesForGroupVersion(gv); err == nil {
				return fmt.Errorf("%s still served", gv)
			}
		}
		return nil
	})
	ctrl, err := federation.New(federation.Options{Config: cfg, IgnorePeerSecrets: true, LeaderElection: federation.LeaderElection{Disabled: true}, Logger: testLogger(),
		CRDPollInterval: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- ctrl.Run(runCtx) }()
	defer func() { stop(); <-done }()
	select {
	case <-ctrl.Leading():
	case err := <-done:
		t.Fatalf("controller stopped: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("controller did not lead in 20s")
	}
	kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{})
	if _, err := kube.CoreV1().Services("demo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "api"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	set, err := ctrl.Snapshot("demo", "api")
	if err != nil || len(set.Policy) != 0 {
		t.Fatalf("snapshot %v, policy %q", err, set.GetPolicy())
	}

	// The CRDs installed while it runs: traffic policy starts without a
	// restart, and a route gets its status.
	if err := crds.Install(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	gw := gwclient.NewForConfigOrDie(cfg)
	route := &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: "demo"},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{serviceParent("api")}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{backendRef("", "Service", "nope", 1)}}},
		},
	}
	eventually(t, 20*time.Second, "route created once its CRD is served", func() error {
		_, err := gw.GatewayV1().HTTPRoutes("demo").Create(ctx, route, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	})
	eventually(t, 20*time.Second, "route judged after the CRDs appeared", routeCondition(gw, "demo", "api", "ResolvedRefs", metav1.ConditionFalse, "BackendNotFound", "nope"))
}

// TestPolicySchemas: the API server accepts fedmesh policies the CRD
// schemas allow and refuses, as Invalid, what they forbid.
func TestPolicySchemas(t *testing.T) {
	need(t)
	ctx := context.Background()
	dyn := dynamic.NewForConfigOrDie(env.cp.Cluster("east").Config)
	ns := env.ns(t, "east")
	create := func(obj runtime.Object, res string) error {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
		if err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{Object: m}
		u.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
		u.SetNamespace(ns)
		_, err = dyn.Resource(v1alpha1.SchemeGroupVersion.WithResource(res)).Namespace(ns).Create(ctx, u, metav1.CreateOptions{})
		return err
	}
	target := v1alpha1.TargetRef{Kind: "Service", Name: "api"}
	for _, tc := range []struct {
		name string
		obj  runtime.Object
		res  string
		ok   bool
	}{
		{"authz", &v1alpha1.AuthorizationPolicy{TypeMeta: metav1.TypeMeta{Kind: "AuthorizationPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "a"},
			Spec: v1alpha1.AuthorizationPolicySpec{TargetRef: &target, Rules: []v1alpha1.AuthorizationRule{{
				From: v1alpha1.Callers{IDs: []string{"spiffe://east.fedmesh/ns/demo/sa/client"}}, Ports: []int32{80},
				Paths: []v1alpha1.PathMatch{{Type: "PathPrefix", Value: "/api"}}}}}}, "authorizationpolicies", true},
		{"authz bad path type", &v1alpha1.AuthorizationPolicy{TypeMeta: metav1.TypeMeta{Kind: "AuthorizationPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "b"},
			Spec: v1alpha1.AuthorizationPolicySpec{Rules: []v1alpha1.AuthorizationRule{{
				Paths: []v1alpha1.PathMatch{{Type: "Regex", Value: "/api"}}}}}}, "authorizationpolicies", false},
		{"ratelimit", &v1alpha1.RateLimitPolicy{TypeMeta: metav1.TypeMeta{Kind: "RateLimitPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "r"},
			Spec: v1alpha1.RateLimitPolicySpec{TargetRef: target, RequestsPerSecond: 100, PerCaller: true}}, "ratelimitpolicies", true},
		{"ratelimit zero", &v1alpha1.RateLimitPolicy{TypeMeta: metav1.TypeMeta{Kind: "RateLimitPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "r0"},
			Spec: v1alpha1.RateLimitPolicySpec{TargetRef: target}}, "ratelimitpolicies", false},
		{"failover", &v1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "f"},
			Spec: v1alpha1.FailoverPolicySpec{TargetRef: v1alpha1.TargetRef{Group: "multicluster.x-k8s.io", Kind: "ServiceImport", Name: "api"},
				ClusterOrder: []string{"west"}, OverprovisioningPercent: new(int32(140)), StaleAfter: "30s",
				OutlierDetection: &v1alpha1.OutlierDetection{Consecutive5xx: new(int32(5)), BaseEjectionTime: "1s"}}}, "failoverpolicies", true},
		{"failover overprovisioning 50", &v1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"}, ObjectMeta: metav1.ObjectMeta{Name: "f50"},
			Spec: v1alpha1.FailoverPolicySpec{TargetRef: target, OverprovisioningPercent: new(int32(50))}}, "failoverpolicies", false},
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
