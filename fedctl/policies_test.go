package fedctl

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func TestRouteStatusReadsMeshParentsOnly(t *testing.T) {
	o := &unstructured.Unstructured{Object: map[string]any{
		"metadata": map[string]any{"namespace": "demo", "name": "r", "generation": int64(3)},
		"spec": map[string]any{
			"parentRefs": []any{
				map[string]any{"group": "", "kind": "Service", "name": "echo"},
				map[string]any{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
			},
			"rules": []any{map[string]any{"backendRefs": []any{
				map[string]any{"name": "echo", "port": int64(80), "weight": int64(90)},
				map[string]any{"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "echo-v2", "port": int64(80)},
			}}},
		},
		"status": map[string]any{"parents": []any{
			map[string]any{"controllerName": "other.example/controller", "conditions": []any{
				map[string]any{"type": "Accepted", "status": "False", "reason": "NotOurs", "observedGeneration": int64(3)}}},
			map[string]any{"controllerName": MeshControllerName, "conditions": []any{
				map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": int64(3)},
				map[string]any{"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "message": "no echo-v2", "observedGeneration": int64(3)}}},
		}},
	}}
	var p PolicyStatus
	routeStatus(&p, o)
	if len(p.Services) != 1 || p.Services[0] != "demo/echo" {
		t.Errorf("services = %v, want [demo/echo] (the Gateway parent is not a mesh parent)", p.Services)
	}
	if len(p.Backends) != 2 || p.Backends[0] != "Service echo=90" || p.Backends[1] != "ServiceImport echo-v2=1" {
		t.Errorf("backends = %v", p.Backends)
	}
	if p.Accepted || p.Pending || p.Reason != "ResolvedRefs=False BackendNotFound" || p.Message != "no echo-v2" {
		t.Errorf("got accepted=%v pending=%v reason=%q message=%q", p.Accepted, p.Pending, p.Reason, p.Message)
	}

	// Conditions of an older generation do not count: the new one is pending.
	o.SetGeneration(4)
	p = PolicyStatus{}
	routeStatus(&p, o)
	if p.Accepted || !p.Pending {
		t.Errorf("generation 4 with status of 3: accepted=%v pending=%v, want pending", p.Accepted, p.Pending)
	}
}

func TestPolicyStatusNamespaceWide(t *testing.T) {
	o := &unstructured.Unstructured{Object: map[string]any{
		"metadata": map[string]any{"namespace": "demo", "name": "deny", "generation": int64(1)},
		"spec":     map[string]any{"defaultDeny": true},
		"status": map[string]any{"conditions": []any{
			map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": int64(1)}}},
	}}
	var p PolicyStatus
	policyStatus(&p, o)
	if len(p.Services) != 1 || p.Services[0] != "demo/*" || !p.Accepted {
		t.Errorf("got %+v", p)
	}
}
