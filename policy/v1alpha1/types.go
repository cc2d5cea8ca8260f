// Package v1alpha1 is the Kubernetes API of fedmesh's traffic policies
// (group policy.fedmesh.dev): AuthorizationPolicy, RateLimitPolicy and
// FailoverPolicy, with their CustomResourceDefinitions. Users and fedctl
// write these objects; the federation controller validates them, reports
// the result in status.conditions (GEP-713 reasons) and compiles them into
// package policy, which is all a sidecar ever sees. The sidecar therefore
// never imports this package and its Kubernetes dependencies.
package v1alpha1

import (
	_ "embed"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group and Version of the API.
const (
	Group   = "policy.fedmesh.dev"
	Version = "v1alpha1"
)

// SchemeGroupVersion is the group and version of every type here.
var SchemeGroupVersion = schema.GroupVersion{Group: Group, Version: Version}

// Resources for the dynamic client.
var (
	AuthorizationPolicies = SchemeGroupVersion.WithResource("authorizationpolicies")
	RateLimitPolicies     = SchemeGroupVersion.WithResource("ratelimitpolicies")
	FailoverPolicies      = SchemeGroupVersion.WithResource("failoverpolicies")
)

// The CustomResourceDefinitions, as installed by federation/crds and
// clusters/base.
var (
	//go:embed crds/policy.fedmesh.dev_authorizationpolicies.yaml
	AuthorizationPolicyCRD []byte
	//go:embed crds/policy.fedmesh.dev_ratelimitpolicies.yaml
	RateLimitPolicyCRD []byte
	//go:embed crds/policy.fedmesh.dev_failoverpolicies.yaml
	FailoverPolicyCRD []byte
)

// Kinds of the policy status condition and its reasons (GEP-713).
const (
	ConditionAccepted = "Accepted"

	ReasonAccepted       = "Accepted"
	ReasonTargetNotFound = "TargetNotFound" // the targetRef names a service that does not exist
	ReasonInvalid        = "Invalid"        // a field is invalid; the message says which
	ReasonConflicted     = "Conflicted"     // another policy of the same kind targets the same service and wins
)

// Target kinds and groups.
const (
	KindService        = "Service"
	KindServiceImport  = "ServiceImport"
	GroupCore          = ""
	GroupMultiCluster  = "multicluster.x-k8s.io"
	DefaultOverprovPct = 140 // FailoverPolicy.spec.overprovisioningPercent when unset
)

var (
	// SchemeBuilder registers the types.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds the types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion,
		&AuthorizationPolicy{}, &AuthorizationPolicyList{},
		&RateLimitPolicy{}, &RateLimitPolicyList{},
		&FailoverPolicy{}, &FailoverPolicyList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}

// TargetRef names the service a policy applies to, in the policy's own
// namespace.
type TargetRef struct {
	// Group is "" for a Service, multicluster.x-k8s.io for a ServiceImport.
	Group string `json:"group"`
	Kind  string `json:"kind"`
	Name  string `json:"name"`
}

// PolicyStatus is the status of every fedmesh policy.
type PolicyStatus struct {
	// Conditions has one condition, Accepted.
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// AuthorizationPolicy admits callers of a service by SPIFFE ID. Once any
// policy targets a service (or a namespace-wide policy has defaultDeny),
// only callers some rule admits get through.
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              AuthorizationPolicySpec `json:"spec"`
	Status            PolicyStatus            `json:"status,omitempty"`
}

// AuthorizationPolicySpec is what an AuthorizationPolicy says.
type AuthorizationPolicySpec struct {
	// TargetRef is the Service (kind Service, group ""); nil applies the
	// rules to every service in the namespace.
	TargetRef *TargetRef `json:"targetRef,omitempty"`
	// DefaultDeny, only without targetRef: services of the namespace refuse
	// every caller that no rule admits, even without a targeted policy.
	DefaultDeny bool                `json:"defaultDeny,omitempty"`
	Rules       []AuthorizationRule `json:"rules,omitempty"`
}

// AuthorizationRule admits the callers in From to the listed ports,
// methods and paths (each: all when empty).
type AuthorizationRule struct {
	From    Callers     `json:"from"`
	Ports   []int32     `json:"ports,omitempty"`
	Methods []string    `json:"methods,omitempty"`
	Paths   []PathMatch `json:"paths,omitempty"`
}

// Callers are SPIFFE IDs: exact, by prefix, or by trust domain.
type Callers struct {
	IDs          []string `json:"ids,omitempty"`
	Prefixes     []string `json:"prefixes,omitempty"`
	TrustDomains []string `json:"trustDomains,omitempty"`
}

// PathMatch is an Exact or PathPrefix match of the request path.
type PathMatch struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

// AuthorizationPolicyList is a list of AuthorizationPolicy.
type AuthorizationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AuthorizationPolicy `json:"items"`
}

// RateLimitPolicy is a token bucket enforced by every inbound sidecar of
// the target service (the limit is per sidecar).
type RateLimitPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              RateLimitPolicySpec `json:"spec"`
	Status            PolicyStatus        `json:"status,omitempty"`
}

// RateLimitPolicySpec is what a RateLimitPolicy says.
type RateLimitPolicySpec struct {
	TargetRef TargetRef `json:"targetRef"`
	// Port limits the bucket to one service port; all ports when unset.
	Port              *int32 `json:"port,omitempty"`
	RequestsPerSecond int32  `json:"requestsPerSecond"`
	// Burst defaults to requestsPerSecond.
	Burst *int32 `json:"burst,omitempty"`
	// PerCaller keeps one bucket per caller SPIFFE ID.
	PerCaller bool `json:"perCaller,omitempty"`
}

// RateLimitPolicyList is a list of RateLimitPolicy.
type RateLimitPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []RateLimitPolicy `json:"items"`
}

// FailoverPolicy overrides the sidecars' built-in failover for a service.
// At most one applies per service: the oldest (ties by name); the others
// are Conflicted.
type FailoverPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              FailoverPolicySpec `json:"spec"`
	Status            PolicyStatus       `json:"status,omitempty"`
}

// FailoverPolicySpec is what a FailoverPolicy says.
type FailoverPolicySpec struct {
	// TargetRef is a Service (group "") or a ServiceImport
	// (group multicluster.x-k8s.io).
	TargetRef TargetRef `json:"targetRef"`
	// ClusterOrder ranks remote clusters after the own one; unlisted
	// clusters follow in RTT order.
	ClusterOrder []string `json:"clusterOrder,omitempty"`
	// OverprovisioningPercent is 100..1000; default 140 (factor 1.4).
	OverprovisioningPercent *int32            `json:"overprovisioningPercent,omitempty"`
	OutlierDetection        *OutlierDetection `json:"outlierDetection,omitempty"`
	// StaleAfter (a duration such as "30s"): a cluster whose state has been
	// stale this long is no longer offered for this service.
	StaleAfter string `json:"staleAfter,omitempty"`
}

// OutlierDetection tunes passive health checking; durations are strings
// such as "1s".
type OutlierDetection struct {
	Consecutive5xx             *int32 `json:"consecutive5xx,omitempty"`
	ConsecutiveConnectFailures *int32 `json:"consecutiveConnectFailures,omitempty"`
	BaseEjectionTime           string `json:"baseEjectionTime,omitempty"`
	MaxEjectionTime            string `json:"maxEjectionTime,omitempty"`
	MaxEjectedPercent          *int32 `json:"maxEjectedPercent,omitempty"`
}

// FailoverPolicyList is a list of FailoverPolicy.
type FailoverPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []FailoverPolicy `json:"items"`
}
