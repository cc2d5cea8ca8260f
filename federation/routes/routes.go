// Package routes turns the Gateway API routes attached to services (GAMMA)
// and fedmesh's traffic policies into package policy's Service, the one
// thing a sidecar applies, and says in their status what became of each.
//
// It is pure logic: the controller hands it one namespace's routes and
// policies and a view of the cluster, and gets back the compiled policy of
// every service and the desired status of every object. It exists apart
// from the controller because this is where the safety rule of issue 8
// lives and is tested: an object that is not fully accepted never changes
// the data plane. A Compiler remembers, by UID, the last generation of each
// route and policy that was accepted, and keeps serving it while a newer
// generation is rejected.
package routes

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// ControllerName is the controllerName of fedmesh's entries in a route's
// status.parents.
const ControllerName gwv1.GatewayController = "fedmesh.dev/mesh-controller"

// Groups and kinds routes refer to.
const (
	groupCore         = ""
	groupMultiCluster = "multicluster.x-k8s.io"
	kindService       = "Service"
	kindServiceImport = "ServiceImport"
)

// Cluster is the compiler's view of the objects routes and policies refer
// to, in any namespace of the own cluster.
type Cluster interface {
	// Service returns a Service, or nil.
	Service(namespace, name string) *corev1.Service
	// Services lists the Services of a namespace that workloads serve
	// (not fedmesh's derived Services).
	Services(namespace string) []*corev1.Service
	// ServiceImportExists reports whether a ServiceImport exists.
	ServiceImportExists(namespace, name string) bool
	// ReferenceGrants lists the ReferenceGrants of a namespace.
	ReferenceGrants(namespace string) []*gwv1.ReferenceGrant
}

// Input is one namespace's routes and policies.
type Input struct {
	Namespace             string
	HTTPRoutes            []*gwv1.HTTPRoute
	GRPCRoutes            []*gwv1.GRPCRoute
	AuthorizationPolicies []*v1alpha1.AuthorizationPolicy
	RateLimitPolicies     []*v1alpha1.RateLimitPolicy
	FailoverPolicies      []*v1alpha1.FailoverPolicy
	Cluster               Cluster
}

// Output is what a namespace compiles to.
type Output struct {
	// Services holds the compiled policy of every service of the namespace
	// that has any, by name. Services without policy are absent.
	Services map[string]*policy.Service
	// Routes holds, by kind and name, fedmesh's desired entries in each
	// route's status.parents (one per Service parentRef; none for routes
	// that only have Gateway parents). Conditions carry no transition time;
	// MergeParents adds it.
	Routes map[ObjectKey][]gwv1.RouteParentStatus
	// Policies holds, by kind and name, each policy's desired Accepted
	// condition.
	Policies map[ObjectKey]metav1.Condition
}

// ObjectKey names a route or policy within the namespace.
type ObjectKey struct {
	Kind string // HTTPRoute, GRPCRoute, AuthorizationPolicy, RateLimitPolicy, FailoverPolicy
	Name string
}

func (k ObjectKey) String() string { return k.Kind + " " + k.Name }

// Compiler compiles namespaces and remembers, per route and policy UID, the
// last generation that was accepted. It is safe for concurrent use.
type Compiler struct {
	mu       sync.Mutex
	routes   map[types.UID]*goodRoute
	policies map[types.UID]*goodPolicy
}

// NewCompiler returns a Compiler with no memory: after a restart an
// invalid route or policy is simply absent.
func NewCompiler() *Compiler {
	return &Compiler{routes: map[types.UID]*goodRoute{}, policies: map[types.UID]*goodPolicy{}}
}

// goodRoute is the last accepted generation of a route, compiled.
type goodRoute struct {
	namespace  string
	generation int64
	items      []item
}

// item is one rule×match of a route attached to one service, with what
// orders it.
type item struct {
	service string
	rule    policy.Rule
	order   orderKey
}

// goodPolicy is the last accepted generation of a policy, compiled.
type goodPolicy struct {
	namespace  string
	generation int64
	authz      *authzContribution
	rateLimit  *policy.RateLimit
	failover   *policy.Failover
	target     string // service name; "" for a namespace-wide AuthorizationPolicy
}

type authzContribution struct {
	defaultDeny bool
	rules       []policy.AuthzRule
}

// Compile compiles one namespace. It updates the Compiler's memory: routes
// and policies that are accepted now are remembered, those of the
// namespace that no longer exist are forgotten.
func (c *Compiler) Compile(in Input) Output {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := Output{
		Services: map[string]*policy.Service{},
		Routes:   map[ObjectKey][]gwv1.RouteParentStatus{},
		Policies: map[ObjectKey]metav1.Condition{},
	}
	seen := map[types.UID]bool{}
	var items []item
	for _, r := range in.HTTPRoutes {
		seen[r.UID] = true
		items = append(items, c.route(in, fromHTTPRoute(r), &out)...)
	}
	for _, r := range in.GRPCRoutes {
		seen[r.UID] = true
		items = append(items, c.route(in, fromGRPCRoute(r), &out)...)
	}
	sort.SliceStable(items, func(i, j int) bool { return items[i].order.less(items[j].order) })
	svc := func(name string) *policy.Service {
		s := out.Services[name]
		if s == nil {
			s = &policy.Service{Namespace: in.Namespace, Name: name}
			out.Services[name] = s
		}
		return s
	}
	for _, it := range items {
		s := svc(it.service)
		s.Rules = append(s.Rules, it.rule)
	}

	c.policiesOf(in, seen, &out, svc)

	for uid, g := range c.routes {
		if g.namespace == in.Namespace && !seen[uid] {
			delete(c.routes, uid)
		}
	}
	for uid, g := range c.policies {
		if g.namespace == in.Namespace && !seen[uid] {
			delete(c.policies, uid)
		}
	}
	for name, s := range out.Services {
		if s.IsZero() {
			delete(out.Services, name)
		}
	}
	return out
}

// rejected formats the message of a rejected generation and says what is
// served instead.
func rejected(generation int64, good int64, haveGood bool, why string) string {
	if haveGood {
		return fmt.Sprintf("serving generation %d; generation %d rejected: %s", good, generation, why)
	}
	return fmt.Sprintf("generation %d rejected: %s; nothing of it is served (no generation was accepted since the controller started)", generation, why)
}

func condition(typ string, ok bool, reason, msg string, generation int64) metav1.Condition {
	st := metav1.ConditionFalse
	if ok {
		st = metav1.ConditionTrue
	}
	return metav1.Condition{Type: typ, Status: st, Reason: reason, Message: msg, ObservedGeneration: generation}
}

func servicePorts(s *corev1.Service) []int32 {
	var out []int32
	for _, p := range s.Spec.Ports {
		out = append(out, p.Port)
	}
	return out
}

func joinErrs(errs []string) string { return strings.Join(errs, "; ") }

func sortedNames[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
