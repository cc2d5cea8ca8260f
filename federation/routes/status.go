package routes

import (
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// MergeParents returns a route's status.parents with fedmesh's entries
// replaced by desired, other controllers' entries kept, and each
// condition's lastTransitionTime kept while its status does not change;
// changed reports whether the result differs from existing.
func MergeParents(existing, desired []gwv1.RouteParentStatus, now metav1.Time) (merged []gwv1.RouteParentStatus, changed bool) {
	var ours []gwv1.RouteParentStatus
	for _, p := range existing {
		if p.ControllerName == ControllerName {
			ours = append(ours, p)
		} else {
			merged = append(merged, p)
		}
	}
	for _, d := range desired {
		var conds []metav1.Condition
		for _, o := range ours {
			if equality.Semantic.DeepEqual(o.ParentRef, d.ParentRef) {
				conds = append(conds, o.Conditions...)
				break
			}
		}
		for _, c := range d.Conditions {
			c.LastTransitionTime = now
			meta.SetStatusCondition(&conds, c)
		}
		// Keep only the condition types fedmesh sets.
		keep := conds[:0]
		for _, c := range conds {
			if meta.FindStatusCondition(d.Conditions, c.Type) != nil {
				keep = append(keep, c)
			}
		}
		d.Conditions = keep
		merged = append(merged, d)
	}
	return merged, !equality.Semantic.DeepEqual(nonNil(existing), nonNil(merged))
}

// MergeCondition sets a policy's condition, keeping lastTransitionTime
// while its status does not change; changed reports whether anything did.
func MergeCondition(existing []metav1.Condition, desired metav1.Condition, now metav1.Time) (merged []metav1.Condition, changed bool) {
	merged = make([]metav1.Condition, len(existing))
	copy(merged, existing)
	desired.LastTransitionTime = now
	changed = meta.SetStatusCondition(&merged, desired)
	return merged, changed
}

func nonNil(p []gwv1.RouteParentStatus) []gwv1.RouteParentStatus {
	if p == nil {
		return []gwv1.RouteParentStatus{}
	}
	return p
}
