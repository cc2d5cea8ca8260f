package fedctl

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// PolicyStatus is one route or traffic policy in one cluster, and whether
// that cluster's controller accepted it.
type PolicyStatus struct {
	Cluster   string `json:"cluster"`
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Services it attaches to (route parentRefs, policy targetRef);
	// "*" for a namespace-wide policy.
	Services []string `json:"services"`
	// Backends are a route's weighted backendRefs ("Kind name=weight").
	Backends []string `json:"backends,omitempty"`
	// Accepted is true when every condition the controller wrote is true;
	// Pending when it has written none for the current generation.
	Accepted bool   `json:"accepted"`
	Pending  bool   `json:"pending,omitempty"`
	Reason   string `json:"reason,omitempty"`
	Message  string `json:"message,omitempty"`
}

// policyKinds are the resources status reads: the Gateway API's mesh routes
// and fedmesh's policies.
var policyKinds = []struct {
	kind  string
	gvr   schema.GroupVersionResource
	route bool
}{
	{"HTTPRoute", schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}, true},
	{"GRPCRoute", schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "grpcroutes"}, true},
	{"AuthorizationPolicy", schema.GroupVersionResource{Group: "policy.fedmesh.dev", Version: "v1alpha1", Resource: "authorizationpolicies"}, false},
	{"RateLimitPolicy", schema.GroupVersionResource{Group: "policy.fedmesh.dev", Version: "v1alpha1", Resource: "ratelimitpolicies"}, false},
	{"FailoverPolicy", schema.GroupVersionResource{Group: "policy.fedmesh.dev", Version: "v1alpha1", Resource: "failoverpolicies"}, false},
}

// gatherPolicies lists every route and policy of one cluster. A resource
// the cluster does not serve (CRDs not installed) is skipped.
func gatherPolicies(ctx context.Context, dyn dynamic.Interface, cluster string) ([]PolicyStatus, error) {
	var out []PolicyStatus
	for _, k := range policyKinds {
		list, err := dyn.Resource(k.gvr).Namespace("").List(ctx, metav1.ListOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("list %s: %w", k.gvr.Resource, err)
		}
		for _, o := range list.Items {
			p := PolicyStatus{Cluster: cluster, Kind: k.kind, Namespace: o.GetNamespace(), Name: o.GetName()}
			if k.route {
				routeStatus(&p, &o)
			} else {
				policyStatus(&p, &o)
			}
			out = append(out, p)
		}
	}
	return out, nil
}

// routeStatus reads a GAMMA route: parentRefs of kind Service, and the
// conditions fedmesh's controller wrote for them.
func routeStatus(p *PolicyStatus, o *unstructured.Unstructured) {
	parents, _, _ := unstructured.NestedSlice(o.Object, "spec", "parentRefs")
	for _, pr := range parents {
		m, _ := pr.(map[string]any)
		if str(m, "kind") == "Service" && str(m, "group") == "" {
			p.Services = append(p.Services, orDefault(str(m, "namespace"), o.GetNamespace())+"/"+str(m, "name"))
		}
	}
	rules, _, _ := unstructured.NestedSlice(o.Object, "spec", "rules")
	for _, r := range rules {
		rm, _ := r.(map[string]any)
		refs, _, _ := unstructured.NestedSlice(rm, "backendRefs")
		for _, b := range refs {
			bm, _ := b.(map[string]any)
			w, ok, _ := unstructured.NestedInt64(bm, "weight")
			if !ok {
				w = 1
			}
			p.Backends = append(p.Backends, fmt.Sprintf("%s %s=%d", orDefault(str(bm, "kind"), "Service"), str(bm, "name"), w))
		}
	}
	statuses, _, _ := unstructured.NestedSlice(o.Object, "status", "parents")
	var conds []any
	for _, s := range statuses {
		sm, _ := s.(map[string]any)
		if str(sm, "controllerName") != MeshControllerName {
			continue
		}
		cs, _, _ := unstructured.NestedSlice(sm, "conditions")
		conds = append(conds, cs...)
	}
	judge(p, conds, o.GetGeneration())
}

// policyStatus reads a fedmesh policy: its targetRef and Accepted condition.
func policyStatus(p *PolicyStatus, o *unstructured.Unstructured) {
	if name, ok, _ := unstructured.NestedString(o.Object, "spec", "targetRef", "name"); ok && name != "" {
		p.Services = []string{o.GetNamespace() + "/" + name}
	} else {
		p.Services = []string{o.GetNamespace() + "/*"}
	}
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	judge(p, conds, o.GetGeneration())
}

// judge sets Accepted when every condition is true, else the first false
// one's reason and message; Pending when none is about this generation.
func judge(p *PolicyStatus, conds []any, gen int64) {
	current := 0
	p.Accepted = true
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if g, ok, _ := unstructured.NestedInt64(m, "observedGeneration"); ok && g != gen {
			continue
		}
		current++
		if str(m, "status") != "True" && p.Accepted {
			p.Accepted = false
			p.Reason = str(m, "type") + "=" + str(m, "status") + " " + str(m, "reason")
			p.Message = str(m, "message")
		}
	}
	if current == 0 {
		p.Accepted, p.Pending, p.Reason = false, true, "no status from the fedmesh controller yet"
	}
}

// MeshControllerName is the controllerName fedmesh writes in route status.
const MeshControllerName = "fedmesh.dev/mesh-controller"

func str(m map[string]any, k string) string {
	s, _ := m[k].(string)
	return s
}

// renderPolicies prints routes and policies grouped by service.
func renderPolicies(w io.Writer, st *Status, c colors) {
	if len(st.Policies) == 0 {
		return
	}
	type row struct{ svc, line string }
	var rows []row
	for _, p := range st.Policies {
		state := c.good("accepted")
		switch {
		case p.Pending:
			state = c.bad("pending")
		case !p.Accepted:
			state = c.bad("REJECTED " + p.Reason)
		}
		detail := strings.Join(p.Backends, " ")
		if !p.Accepted && p.Message != "" {
			detail = firstLine(p.Message)
		}
		for _, s := range p.Services {
			rows = append(rows, row{s, fmt.Sprintf("%s\t%s\t%s %s\t%s\t%s", s, p.Cluster, p.Kind, p.Namespace+"/"+p.Name, state, orDefault(detail, "-"))})
		}
	}
	slices.SortStableFunc(rows, func(a, b row) int { return strings.Compare(a.svc, b.svc) })
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tCLUSTER\tROUTE / POLICY\tSTATE\tBACKENDS / WHY")
	for _, r := range rows {
		fmt.Fprintln(tw, r.line)
	}
	tw.Flush()
}
