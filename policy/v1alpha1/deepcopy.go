package v1alpha1

import (
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// Hand-written deep copies (the module pins no code generator); every type
// holds only strings, numbers, bools, slices and pointers to those.

func ptrCopy[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

// DeepCopyInto copies in into out.
func (in *PolicyStatus) DeepCopyInto(out *PolicyStatus) {
	out.Conditions = nil
	if in.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(in.Conditions))
		for i := range in.Conditions {
			in.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
}

// DeepCopyInto copies in into out.
func (in *AuthorizationRule) DeepCopyInto(out *AuthorizationRule) {
	out.From = Callers{IDs: slices.Clone(in.From.IDs), Prefixes: slices.Clone(in.From.Prefixes), TrustDomains: slices.Clone(in.From.TrustDomains)}
	out.Ports = slices.Clone(in.Ports)
	out.Methods = slices.Clone(in.Methods)
	out.Paths = slices.Clone(in.Paths)
}

// DeepCopyInto copies in into out.
func (in *AuthorizationPolicySpec) DeepCopyInto(out *AuthorizationPolicySpec) {
	*out = *in
	out.TargetRef = ptrCopy(in.TargetRef)
	out.Rules = nil
	if in.Rules != nil {
		out.Rules = make([]AuthorizationRule, len(in.Rules))
		for i := range in.Rules {
			in.Rules[i].DeepCopyInto(&out.Rules[i])
		}
	}
}

// DeepCopyInto copies in into out.
func (in *AuthorizationPolicy) DeepCopyInto(out *AuthorizationPolicy) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	in.Spec.DeepCopyInto(&out.Spec)
	in.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy.
func (in *AuthorizationPolicy) DeepCopy() *AuthorizationPolicy {
	if in == nil {
		return nil
	}
	out := new(AuthorizationPolicy)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *AuthorizationPolicy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (in *AuthorizationPolicyList) DeepCopyObject() runtime.Object {
	if in == nil {
		return nil
	}
	out := &AuthorizationPolicyList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]AuthorizationPolicy, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyInto copies in into out.
func (in *RateLimitPolicy) DeepCopyInto(out *RateLimitPolicy) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = in.Spec
	out.Spec.Port = ptrCopy(in.Spec.Port)
	out.Spec.Burst = ptrCopy(in.Spec.Burst)
	in.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy.
func (in *RateLimitPolicy) DeepCopy() *RateLimitPolicy {
	if in == nil {
		return nil
	}
	out := new(RateLimitPolicy)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *RateLimitPolicy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (in *RateLimitPolicyList) DeepCopyObject() runtime.Object {
	if in == nil {
		return nil
	}
	out := &RateLimitPolicyList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]RateLimitPolicy, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyInto copies in into out.
func (in *FailoverPolicy) DeepCopyInto(out *FailoverPolicy) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = in.Spec
	out.Spec.ClusterOrder = slices.Clone(in.Spec.ClusterOrder)
	out.Spec.OverprovisioningPercent = ptrCopy(in.Spec.OverprovisioningPercent)
	if od := in.Spec.OutlierDetection; od != nil {
		c := *od
		c.Consecutive5xx = ptrCopy(od.Consecutive5xx)
		c.ConsecutiveConnectFailures = ptrCopy(od.ConsecutiveConnectFailures)
		c.MaxEjectedPercent = ptrCopy(od.MaxEjectedPercent)
		out.Spec.OutlierDetection = &c
	}
	in.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy.
func (in *FailoverPolicy) DeepCopy() *FailoverPolicy {
	if in == nil {
		return nil
	}
	out := new(FailoverPolicy)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *FailoverPolicy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyObject implements runtime.Object.
func (in *FailoverPolicyList) DeepCopyObject() runtime.Object {
	if in == nil {
		return nil
	}
	out := &FailoverPolicyList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]FailoverPolicy, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}
