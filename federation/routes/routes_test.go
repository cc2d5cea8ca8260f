package routes

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

type fakeCluster struct {
	services map[string]*corev1.Service // ns/name
	imports  map[string]bool
	grants   map[string][]*gwv1.ReferenceGrant
}

func (f *fakeCluster) Service(ns, name string) *corev1.Service { return f.services[ns+"/"+name] }
func (f *fakeCluster) Services(ns string) []*corev1.Service {
	var out []*corev1.Service
	for _, s := range f.services {
		if s.Namespace == ns {
			out = append(out, s)
		}
	}
	return out
}
func (f *fakeCluster) ServiceImportExists(ns, name string) bool { return f.imports[ns+"/"+name] }
func (f *fakeCluster) ReferenceGrants(ns string) []*gwv1.ReferenceGrant {
	return f.grants[ns]
}

func cluster() *fakeCluster {
	f := &fakeCluster{services: map[string]*corev1.Service{}, imports: map[string]bool{"demo/api": true}, grants: map[string][]*gwv1.ReferenceGrant{}}
	for _, n := range []string{"demo/api", "demo/api-v2", "demo/web", "other/db"} {
		ns, name, _ := strings.Cut(n, "/")
		f.services[n] = &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	}
	return f
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ptr[T any](v T) *T { return &v }

func svcParent(name string, port int32) gwv1.ParentReference {
	p := gwv1.ParentReference{Group: ptr(gwv1.Group("")), Kind: ptr(gwv1.Kind("Service")), Name: gwv1.ObjectName(name)}
	if port != 0 {
		p.Port = ptr(port)
	}
	return p
}

func backend(group, kind, ns, name string, port int32, weight int32) gwv1.HTTPBackendRef {
	b := gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{
		Group: ptr(gwv1.Group(group)), Kind: ptr(gwv1.Kind(kind)), Name: gwv1.ObjectName(name), Port: ptr(port)}, Weight: ptr(weight)}}
	if ns != "" {
		b.Namespace = ptr(gwv1.Namespace(ns))
	}
	return b
}

func httpRoute(name string, gen int64, created time.Time, rules ...gwv1.HTTPRouteRule) *gwv1.HTTPRoute {
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", UID: types.UID("uid-" + name), Generation: gen, CreationTimestamp: metav1.NewTime(created)},
		Spec:       gwv1.HTTPRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{svcParent("api", 80)}}, Rules: rules},
	}
}

func canary(w1, w2 int32) gwv1.HTTPRouteRule {
	return gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{
		backend("", "Service", "", "api", 80, w1),
		backend("multicluster.x-k8s.io", "ServiceImport", "", "api", 80, w2),
	}}
}

func parentConds(t *testing.T, out Output, kind, name string) []metav1.Condition {
	t.Helper()
	ps := out.Routes[ObjectKey{kind, name}]
	if len(ps) != 1 {
		t.Fatalf("%s %s: %d parents in status, want 1: %+v", kind, name, len(ps), ps)
	}
	if ps[0].ControllerName != ControllerName {
		t.Errorf("controllerName %q", ps[0].ControllerName)
	}
	return ps[0].Conditions
}

func wantCond(t *testing.T, conds []metav1.Condition, typ string, status metav1.ConditionStatus, reason, msgPart string) {
	t.Helper()
	c := meta.FindStatusCondition(conds, typ)
	if c == nil {
		t.Fatalf("no %s condition in %+v", typ, conds)
	}
	if c.Status != status || c.Reason != reason || !strings.Contains(c.Message, msgPart) {
		t.Errorf("%s = %s/%s %q, want %s/%s containing %q", typ, c.Status, c.Reason, c.Message, status, reason, msgPart)
	}
}

func TestRouteValidation(t *testing.T) {
	grant := &gwv1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: "other", Name: "g"}, Spec: gwv1.ReferenceGrantSpec{
		From: []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "demo"}},
		To:   []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service", Name: ptr(gwv1.ObjectName("db"))}}}}
	for _, tc := range []struct {
		name     string
		rule     gwv1.HTTPRouteRule
		parent   *gwv1.ParentReference
		grant    bool
		accepted [3]string // status, reason, message part
		resolved [3]string
		rules    int
	}{
		{name: "canary", rule: canary(90, 10), accepted: [3]string{"True", "Accepted", "attached to Service demo/api port 80"}, resolved: [3]string{"True", "ResolvedRefs", ""}, rules: 1},
		{name: "unknown backend", rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("", "Service", "", "nope", 80, 1)}},
			accepted: [3]string{"True", "Accepted", "generation 1 rejected"}, resolved: [3]string{"False", "BackendNotFound", "Service demo/nope does not exist"}},
		{name: "unknown import", rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("multicluster.x-k8s.io", "ServiceImport", "", "web", 80, 1)}},
			accepted: [3]string{"True", "Accepted", ""}, resolved: [3]string{"False", "BackendNotFound", "ServiceImport demo/web does not exist"}},
		{name: "backend port missing on service", rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("", "Service", "", "web", 81, 1)}},
			accepted: [3]string{"True", "Accepted", ""}, resolved: [3]string{"False", "BackendNotFound", "has no port 81"}},
		{name: "all weights zero", rule: canary(0, 0),
			accepted: [3]string{"False", "UnsupportedValue", "every backendRef has weight 0"}, resolved: [3]string{"True", "ResolvedRefs", ""}},
		{name: "unsupported filter", rule: gwv1.HTTPRouteRule{BackendRefs: canary(1, 1).BackendRefs, Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterURLRewrite, URLRewrite: &gwv1.HTTPURLRewriteFilter{}}}},
			accepted: [3]string{"False", "UnsupportedValue", "filter URLRewrite is not supported"}, resolved: [3]string{"True", "ResolvedRefs", ""}},
		{name: "invalid kind", rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("example.com", "Bucket", "", "b", 80, 1)}},
			accepted: [3]string{"True", "Accepted", ""}, resolved: [3]string{"False", "InvalidKind", `kind "Bucket"`}},
		{name: "cross namespace without grant", rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("", "Service", "other", "db", 80, 1)}},
			accepted: [3]string{"True", "Accepted", ""}, resolved: [3]string{"False", "RefNotPermitted", "no ReferenceGrant in other"}},
		{name: "cross namespace with grant", grant: true, rule: gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("", "Service", "other", "db", 80, 1)}},
			accepted: [3]string{"True", "Accepted", ""}, resolved: [3]string{"True", "ResolvedRefs", ""}, rules: 1},
		{name: "parent missing", parent: ptr(svcParent("gone", 0)), rule: canary(1, 1),
			accepted: [3]string{"False", "NoMatchingParent", "Service demo/gone does not exist"}, resolved: [3]string{"True", "ResolvedRefs", ""}},
		{name: "parent port missing", parent: ptr(svcParent("api", 8080)), rule: canary(1, 1),
			accepted: [3]string{"False", "NoMatchingParent", "has no port 8080"}, resolved: [3]string{"True", "ResolvedRefs", ""}},
		{name: "no backendRefs", rule: gwv1.HTTPRouteRule{},
			accepted: [3]string{"False", "UnsupportedValue", "no backendRefs"}, resolved: [3]string{"True", "ResolvedRefs", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := cluster()
			if tc.grant {
				cl.grants["other"] = []*gwv1.ReferenceGrant{grant}
			}
			r := httpRoute("r", 1, t0, tc.rule)
			if tc.parent != nil {
				r.Spec.ParentRefs = []gwv1.ParentReference{*tc.parent}
			}
			out := NewCompiler().Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{r}, Cluster: cl})
			conds := parentConds(t, out, "HTTPRoute", "r")
			wantCond(t, conds, "Accepted", metav1.ConditionStatus(tc.accepted[0]), tc.accepted[1], tc.accepted[2])
			wantCond(t, conds, "ResolvedRefs", metav1.ConditionStatus(tc.resolved[0]), tc.resolved[1], tc.resolved[2])
			for _, c := range conds {
				if c.ObservedGeneration != 1 {
					t.Errorf("%s observedGeneration %d", c.Type, c.ObservedGeneration)
				}
			}
			got := 0
			for _, s := range out.Services {
				got += len(s.Rules)
			}
			if got != tc.rules {
				t.Errorf("%d compiled rules, want %d: %+v", got, tc.rules, out.Services)
			}
		})
	}
}

func TestCanaryCompiles(t *testing.T) {
	rule := canary(90, 10)
	rule.Matches = []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr(gwv1.PathMatchPathPrefix), Value: ptr("/v1")},
		Headers: []gwv1.HTTPHeaderMatch{{Name: "x-canary", Value: "yes"}}, Method: ptr(gwv1.HTTPMethodGet)}}
	rule.Timeouts = &gwv1.HTTPRouteTimeouts{Request: ptr(gwv1.Duration("2s")), BackendRequest: ptr(gwv1.Duration("500ms"))}
	rule.Retry = &gwv1.HTTPRouteRetry{Attempts: ptr(2), Codes: []gwv1.HTTPRouteRetryStatusCode{503}, Backoff: ptr(gwv1.Duration("100ms"))}
	rule.Filters = []gwv1.HTTPRouteFilter{
		{Type: gwv1.HTTPRouteFilterRequestHeaderModifier, RequestHeaderModifier: &gwv1.HTTPHeaderFilter{Set: []gwv1.HTTPHeader{{Name: "x-a", Value: "1"}}, Remove: []string{"x-b"}}},
		{Type: gwv1.HTTPRouteFilterResponseHeaderModifier, ResponseHeaderModifier: &gwv1.HTTPHeaderFilter{Add: []gwv1.HTTPHeader{{Name: "x-c", Value: "2"}}}},
	}
	out := NewCompiler().Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{httpRoute("r", 1, t0, rule)}, Cluster: cluster()})
	want := map[string]*policy.Service{"api": {Namespace: "demo", Name: "api", Rules: []policy.Rule{{
		Route: "HTTPRoute demo/r", Port: 80,
		Match: policy.Match{Path: &policy.PathMatch{Type: "PathPrefix", Value: "/v1"}, Method: "GET", Headers: []policy.ValueMatch{{Type: "Exact", Name: "x-canary", Value: "yes"}}},
		Backends: []policy.Backend{
			{Kind: "Service", Namespace: "demo", Name: "api", Port: 80, Weight: 90},
			{Kind: "ServiceImport", Namespace: "demo", Name: "api", Port: 80, Weight: 10},
		},
		Timeout: policy.Duration(2 * time.Second), BackendTimeout: policy.Duration(500 * time.Millisecond),
		Retry:           &policy.Retry{Attempts: 2, Codes: []int{503}, Backoff: policy.Duration(100 * time.Millisecond)},
		RequestHeaders:  &policy.HeaderModifier{Set: []policy.Header{{Name: "x-a", Value: "1"}}, Remove: []string{"x-b"}},
		ResponseHeaders: &policy.HeaderModifier{Add: []policy.Header{{Name: "x-c", Value: "2"}}},
	}}}}
	if d := cmp.Diff(want, out.Services); d != "" {
		t.Fatalf("compiled (-want +got):\n%s", d)
	}
	// The wire form round-trips.
	b, err := policy.Encode(out.Services["api"])
	if err != nil {
		t.Fatal(err)
	}
	back, err := policy.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(out.Services["api"], back); d != "" {
		t.Fatalf("round trip:\n%s", d)
	}
}

func TestGatewayParentsIgnored(t *testing.T) {
	r := httpRoute("r", 1, t0, canary(1, 1))
	r.Spec.ParentRefs = []gwv1.ParentReference{{Name: "my-gateway"}}
	out := NewCompiler().Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{r}, Cluster: cluster()})
	if ps := out.Routes[ObjectKey{"HTTPRoute", "r"}]; len(ps) != 0 {
		t.Fatalf("status for a Gateway parent: %+v", ps)
	}
	if len(out.Services) != 0 {
		t.Fatalf("compiled %+v", out.Services)
	}
}

// TestKeepLastGood: a route that turns invalid keeps serving its last
// accepted generation, and says so; a deleted route is forgotten; a fresh
// compiler (a restarted controller) serves nothing of an invalid route.
func TestKeepLastGood(t *testing.T) {
	cl := cluster()
	c := NewCompiler()
	good := httpRoute("r", 3, t0, canary(90, 10))
	out := c.Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{good}, Cluster: cl})
	want := out.Services["api"]
	if want == nil || len(want.Rules) != 1 {
		t.Fatalf("generation 3 not compiled: %+v", out.Services)
	}
	for _, tc := range []struct {
		name string
		rule gwv1.HTTPRouteRule
		cond string
	}{
		{"zero weights", canary(0, 0), "Accepted"},
		{"unknown backend", gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{backend("", "Service", "", "nope", 80, 1)}}, "ResolvedRefs"},
		{"unsupported filter", gwv1.HTTPRouteRule{BackendRefs: canary(1, 1).BackendRefs, Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterRequestMirror}}}, "Accepted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := httpRoute("r", 4, t0, tc.rule)
			out := c.Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{bad}, Cluster: cl})
			if d := cmp.Diff(want, out.Services["api"]); d != "" {
				t.Errorf("policy changed by a rejected generation:\n%s", d)
			}
			wantCond(t, parentConds(t, out, "HTTPRoute", "r"), tc.cond, "False", meta.FindStatusCondition(parentConds(t, out, "HTTPRoute", "r"), tc.cond).Reason, "serving generation 3; generation 4 rejected: ")
			fresh := NewCompiler().Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{bad}, Cluster: cl})
			if len(fresh.Services) != 0 {
				t.Errorf("restarted compiler serves an invalid route: %+v", fresh.Services)
			}
			wantCond(t, parentConds(t, fresh, "HTTPRoute", "r"), tc.cond, "False", meta.FindStatusCondition(parentConds(t, fresh, "HTTPRoute", "r"), tc.cond).Reason, "nothing of it is served")
		})
	}
	// Deleted: forgotten.
	c.Compile(Input{Namespace: "demo", Cluster: cl})
	out = c.Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{httpRoute("r", 4, t0, canary(0, 0))}, Cluster: cl})
	if len(out.Services) != 0 {
		t.Fatalf("deleted route still remembered: %+v", out.Services)
	}
}

func TestPrecedence(t *testing.T) {
	m := func(pt gwv1.PathMatchType, v string, method string, headers, query int) gwv1.HTTPRouteMatch {
		hm := gwv1.HTTPRouteMatch{Path: &gwv1.HTTPPathMatch{Type: &pt, Value: &v}}
		if method != "" {
			hm.Method = ptr(gwv1.HTTPMethod(method))
		}
		for i := range headers {
			hm.Headers = append(hm.Headers, gwv1.HTTPHeaderMatch{Name: gwv1.HTTPHeaderName("h" + string(rune('a'+i))), Value: "x"})
		}
		for i := range query {
			hm.QueryParams = append(hm.QueryParams, gwv1.HTTPQueryParamMatch{Name: gwv1.HTTPHeaderName("q" + string(rune('a'+i))), Value: "x"})
		}
		return hm
	}
	rule := func(ms ...gwv1.HTTPRouteMatch) gwv1.HTTPRouteRule {
		r := canary(1, 0)
		r.Matches = ms
		return r
	}
	older := httpRoute("zeta", 1, t0, rule(m(gwv1.PathMatchPathPrefix, "/", "", 0, 0)), rule(m(gwv1.PathMatchPathPrefix, "/a", "", 1, 0)))
	newer := httpRoute("alpha", 1, t0.Add(time.Minute),
		rule(m(gwv1.PathMatchPathPrefix, "/a", "", 1, 1), m(gwv1.PathMatchExact, "/a/b", "", 0, 0)),
		rule(m(gwv1.PathMatchPathPrefix, "/a/b", "", 0, 0), m(gwv1.PathMatchPathPrefix, "/a", "GET", 0, 0)),
		rule(m(gwv1.PathMatchPathPrefix, "/", "", 0, 0)))
	sameTime := httpRoute("beta", 1, t0, rule(m(gwv1.PathMatchPathPrefix, "/", "", 0, 0)))
	grpc := &gwv1.GRPCRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "g", Namespace: "demo", UID: "uid-g", Generation: 1, CreationTimestamp: metav1.NewTime(t0)},
		Spec: gwv1.GRPCRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{svcParent("api", 0)}},
			Rules: []gwv1.GRPCRouteRule{{
				Matches: []gwv1.GRPCRouteMatch{
					{Method: &gwv1.GRPCMethodMatch{Service: ptr("pkg.Svc"), Method: ptr("Get")}, Headers: []gwv1.GRPCHeaderMatch{{Name: "x-v", Value: "2"}}},
					{Method: &gwv1.GRPCMethodMatch{Service: ptr("pkg.Svc")}},
				},
				BackendRefs: []gwv1.GRPCBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "api-v2", Port: ptr(int32(80))}}}},
			}}},
	}
	out := NewCompiler().Compile(Input{Namespace: "demo", HTTPRoutes: []*gwv1.HTTPRoute{newer, older, sameTime}, GRPCRoutes: []*gwv1.GRPCRoute{grpc}, Cluster: cluster()})
	var got []string
	for _, r := range out.Services["api"].Rules {
		s := r.Route + " " + r.Match.Path.Type + " " + r.Match.Path.Value
		if r.Match.Method != "" {
			s += " " + r.Match.Method
		}
		if n := len(r.Match.Headers); n > 0 {
			s += " h" + string(rune('0'+n))
		}
		if n := len(r.Match.Query); n > 0 {
			s += " q" + string(rune('0'+n))
		}
		got = append(got, s)
	}
	want := []string{
		"GRPCRoute demo/g Exact /pkg.Svc/Get POST h1",
		"HTTPRoute demo/alpha Exact /a/b",
		"GRPCRoute demo/g PathPrefix /pkg.Svc/ POST",
		"HTTPRoute demo/alpha PathPrefix /a/b",
		"HTTPRoute demo/alpha PathPrefix /a GET",
		"HTTPRoute demo/alpha PathPrefix /a h1 q1",
		"HTTPRoute demo/zeta PathPrefix /a h1",
		"HTTPRoute demo/beta PathPrefix /",  // oldest, then by name
		"HTTPRoute demo/zeta PathPrefix /",  // oldest, name after beta
		"HTTPRoute demo/alpha PathPrefix /", // newest
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("order (-want +got):\n%s", d)
	}
}

func authz(name string, target string, deny bool, ids ...string) *v1alpha1.AuthorizationPolicy {
	p := &v1alpha1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name, UID: types.UID("uid-" + name), Generation: 1},
		Spec: v1alpha1.AuthorizationPolicySpec{DefaultDeny: deny}}
	if target != "" {
		p.Spec.TargetRef = &v1alpha1.TargetRef{Kind: "Service", Name: target}
	}
	if len(ids) > 0 {
		p.Spec.Rules = []v1alpha1.AuthorizationRule{{From: v1alpha1.Callers{IDs: ids}, Methods: []string{"GET"}}}
	}
	return p
}

func TestAuthorization(t *testing.T) {
	const client = "spiffe://east.fedmesh/ns/demo/sa/client"
	for _, tc := range []struct {
		name     string
		policies []*v1alpha1.AuthorizationPolicy
		want     map[string][]string // service -> contributing policies (nil Authz: absent)
		conds    map[string]string   // policy -> reason
	}{
		{"none", nil, map[string][]string{}, nil},
		{"targeted", []*v1alpha1.AuthorizationPolicy{authz("a", "api", false, client)},
			map[string][]string{"api": {"demo/a"}}, map[string]string{"a": "Accepted"}},
		{"namespace-wide without deny adds rules only where targeted", []*v1alpha1.AuthorizationPolicy{authz("a", "api", false, client), authz("w", "", false, client)},
			map[string][]string{"api": {"demo/a", "demo/w"}}, map[string]string{"a": "Accepted", "w": "Accepted"}},
		{"namespace-wide alone changes nothing", []*v1alpha1.AuthorizationPolicy{authz("w", "", false, client)},
			map[string][]string{}, map[string]string{"w": "Accepted"}},
		{"default deny covers every service", []*v1alpha1.AuthorizationPolicy{authz("deny", "", true)},
			map[string][]string{"api": {"demo/deny"}, "api-v2": {"demo/deny"}, "web": {"demo/deny"}}, map[string]string{"deny": "Accepted"}},
		{"target not found", []*v1alpha1.AuthorizationPolicy{authz("a", "gone", false, client)},
			map[string][]string{}, map[string]string{"a": "TargetNotFound"}},
		{"invalid id", []*v1alpha1.AuthorizationPolicy{authz("a", "api", false, "not-a-spiffe-id")},
			map[string][]string{}, map[string]string{"a": "Invalid"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := NewCompiler().Compile(Input{Namespace: "demo", AuthorizationPolicies: tc.policies, Cluster: cluster()})
			got := map[string][]string{}
			for name, s := range out.Services {
				if s.Authz != nil {
					got[name] = s.Authz.Policies
				}
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("authz (-want +got):\n%s", d)
			}
			for name, reason := range tc.conds {
				c := out.Policies[ObjectKey{KindAuthorizationPolicy, name}]
				if c.Reason != reason || (reason == "Accepted") != (c.Status == metav1.ConditionTrue) {
					t.Errorf("%s: %s/%s %q, want reason %s", name, c.Status, c.Reason, c.Message, reason)
				}
			}
		})
	}
	out := NewCompiler().Compile(Input{Namespace: "demo", AuthorizationPolicies: []*v1alpha1.AuthorizationPolicy{authz("a", "api", false, client)}, Cluster: cluster()})
	want := &policy.Authorization{Policies: []string{"demo/a"}, Rules: []policy.AuthzRule{{Policy: "demo/a", IDs: []string{client}, Methods: []string{"GET"}}}}
	if d := cmp.Diff(want, out.Services["api"].Authz); d != "" {
		t.Errorf("compiled authz:\n%s", d)
	}
	if c := out.Policies[ObjectKey{KindAuthorizationPolicy, "a"}]; c.ObservedGeneration != 1 {
		t.Errorf("observedGeneration %d", c.ObservedGeneration)
	}
}

func TestRateLimitAndFailover(t *testing.T) {
	rl := &v1alpha1.RateLimitPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "rl", UID: "uid-rl", Generation: 1},
		Spec: v1alpha1.RateLimitPolicySpec{TargetRef: v1alpha1.TargetRef{Kind: "Service", Name: "api"}, RequestsPerSecond: 50, PerCaller: true, Port: ptr(int32(80))}}
	old := &v1alpha1.FailoverPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "old", UID: "uid-old", Generation: 1, CreationTimestamp: metav1.NewTime(t0)},
		Spec: v1alpha1.FailoverPolicySpec{TargetRef: v1alpha1.TargetRef{Group: "multicluster.x-k8s.io", Kind: "ServiceImport", Name: "api"},
			ClusterOrder: []string{"west", "north"}, StaleAfter: "30s",
			OutlierDetection: &v1alpha1.OutlierDetection{Consecutive5xx: ptr(int32(5)), ConsecutiveConnectFailures: ptr(int32(2)), BaseEjectionTime: "1s", MaxEjectionTime: "1m", MaxEjectedPercent: ptr(int32(50))}}}
	newer := &v1alpha1.FailoverPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "a-newer", UID: "uid-new", Generation: 2, CreationTimestamp: metav1.NewTime(t0.Add(time.Second))},
		Spec: v1alpha1.FailoverPolicySpec{TargetRef: v1alpha1.TargetRef{Kind: "Service", Name: "api"}, OverprovisioningPercent: ptr(int32(200))}}
	c := NewCompiler()
	out := c.Compile(Input{Namespace: "demo", RateLimitPolicies: []*v1alpha1.RateLimitPolicy{rl}, FailoverPolicies: []*v1alpha1.FailoverPolicy{newer, old}, Cluster: cluster()})
	want := &policy.Service{Namespace: "demo", Name: "api",
		RateLimits: []policy.RateLimit{{Policy: "demo/rl", Port: 80, RequestsPerSecond: 50, Burst: 50, PerCaller: true}},
		Failover: &policy.Failover{Policy: "demo/old", ClusterOrder: []string{"west", "north"}, Overprovisioning: 1.4,
			Consecutive5xx: 5, ConsecutiveConnectFailures: 2, BaseEjection: policy.Duration(time.Second), MaxEjection: policy.Duration(time.Minute),
			MaxEjectedPercent: 50, StaleAfter: policy.Duration(30 * time.Second)}}
	if d := cmp.Diff(want, out.Services["api"]); d != "" {
		t.Fatalf("compiled (-want +got):\n%s", d)
	}
	if cnd := out.Policies[ObjectKey{KindFailoverPolicy, "a-newer"}]; cnd.Reason != v1alpha1.ReasonConflicted || !strings.Contains(cnd.Message, "demo/old") || cnd.ObservedGeneration != 2 {
		t.Errorf("newer failover policy: %+v", cnd)
	}
	if cnd := out.Policies[ObjectKey{KindFailoverPolicy, "old"}]; cnd.Reason != v1alpha1.ReasonAccepted {
		t.Errorf("older failover policy: %+v", cnd)
	}

	// A rejected generation keeps the last accepted one.
	bad := old.DeepCopy()
	bad.Generation = 2
	bad.Spec.StaleAfter = "soon"
	badRL := rl.DeepCopy()
	badRL.Generation = 2
	badRL.Spec.Port = ptr(int32(9999))
	out = c.Compile(Input{Namespace: "demo", RateLimitPolicies: []*v1alpha1.RateLimitPolicy{badRL}, FailoverPolicies: []*v1alpha1.FailoverPolicy{newer, bad}, Cluster: cluster()})
	if d := cmp.Diff(want, out.Services["api"]); d != "" {
		t.Fatalf("rejected generations changed the policy (-want +got):\n%s", d)
	}
	for _, k := range []ObjectKey{{KindFailoverPolicy, "old"}, {KindRateLimitPolicy, "rl"}} {
		if cnd := out.Policies[k]; cnd.Reason != v1alpha1.ReasonInvalid || !strings.Contains(cnd.Message, "serving generation 1; generation 2 rejected") {
			t.Errorf("%s: %+v", k, cnd)
		}
	}
	if cnd := out.Policies[ObjectKey{KindFailoverPolicy, "old"}]; !strings.Contains(cnd.Message, `staleAfter "soon"`) {
		t.Errorf("message does not name the field: %q", cnd.Message)
	}
}

func TestMergeParents(t *testing.T) {
	other := gwv1.RouteParentStatus{ParentRef: gwv1.ParentReference{Name: "gw"}, ControllerName: "example.com/gateway",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted"}}}
	desired := []gwv1.RouteParentStatus{{ParentRef: svcParent("api", 80), ControllerName: ControllerName,
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted", Message: "m", ObservedGeneration: 1}}}}
	now := metav1.NewTime(t0)
	merged, changed := MergeParents([]gwv1.RouteParentStatus{other}, desired, now)
	if !changed || len(merged) != 2 || merged[0].ControllerName != "example.com/gateway" {
		t.Fatalf("first merge: changed=%v %+v", changed, merged)
	}
	again, changed := MergeParents(merged, desired, metav1.NewTime(t0.Add(time.Hour)))
	if changed {
		t.Fatalf("same desired status changed the route: %+v", again)
	}
	if !again[1].Conditions[0].LastTransitionTime.Equal(&now) {
		t.Errorf("transition time moved: %v", again[1].Conditions[0].LastTransitionTime)
	}
	desired[0].Conditions[0].ObservedGeneration = 2
	if _, changed := MergeParents(merged, desired, now); !changed {
		t.Errorf("new observedGeneration not a change")
	}
}
