// Package policy is the compiled traffic policy of one service: what the
// federation controller makes of the Gateway API routes attached to the
// service (GAMMA) and of fedmesh's AuthorizationPolicy, RateLimitPolicy and
// FailoverPolicy, and what sidecars apply per request and per connection.
//
// It is the contract between the two sides. The controller validates,
// orders and resolves everything (route precedence, backend references,
// policy targets) so the sidecar only does first-match lookups and token
// arithmetic on its hot path. It travels inside the discovery API's
// EndpointSet (field policy) as JSON of Service; a sidecar that receives no
// policy, or cannot decode it, keeps the last one it had (and the defaults
// before the first).
//
// Stdlib only: the sidecar imports it.
package policy

import (
	"encoding/json"
	"fmt"
	"time"
)

// Kinds of route and backend.
const (
	KindHTTPRoute     = "HTTPRoute"
	KindGRPCRoute     = "GRPCRoute"
	KindService       = "Service"       // core group: the service's endpoints in the caller's own cluster only
	KindServiceImport = "ServiceImport" // multicluster.x-k8s.io: every exporting cluster, with failover
)

// Path match types (Gateway API names).
const (
	PathExact  = "Exact"
	PathPrefix = "PathPrefix"
	PathRegex  = "RegularExpression"
)

// Header and query match types (Gateway API names).
const (
	MatchExact = "Exact"
	MatchRegex = "RegularExpression"
)

// Service is everything in force for one service. The zero value means
// defaults: route to the service itself (its ServiceImport when imported),
// admit every workload of the own and federated trust domains, no rate
// limit, the sidecar's built-in failover behaviour.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Rules are every accepted route rule of every route attached to the
	// service, flattened to one match each and sorted in Gateway API
	// precedence order: the first rule whose match and port fit a request
	// serves it. A request no rule matches goes to the service itself.
	Rules []Rule `json:"rules,omitempty"`
	// Authz is nil when no AuthorizationPolicy applies.
	Authz *Authorization `json:"authz,omitempty"`
	// RateLimits are enforced by the service's own (inbound) sidecars.
	RateLimits []RateLimit `json:"rateLimits,omitempty"`
	// Failover is nil when no FailoverPolicy applies.
	Failover *Failover `json:"failover,omitempty"`
}

// IsZero reports whether s carries no policy at all.
func (s *Service) IsZero() bool {
	return s == nil || (len(s.Rules) == 0 && s.Authz == nil && len(s.RateLimits) == 0 && s.Failover == nil)
}

// Rule is one route rule with one match.
type Rule struct {
	// Route is "Kind namespace/name" of the route it came from, for logs,
	// metrics and status.
	Route string `json:"route"`
	// Port, when not 0, limits the rule to requests for that service port
	// (the parentRef's port).
	Port  uint16 `json:"port,omitempty"`
	Match Match  `json:"match"`
	// Backends share traffic by Weight. Backends with weight 0 get none;
	// when every weight is 0 the rule answers 500 (Gateway API), which the
	// controller avoids by not accepting such a rule.
	Backends []Backend `json:"backends"`
	// Timeout bounds the whole request (Gateway API timeouts.request),
	// BackendTimeout each attempt (timeouts.backendRequest); 0 = sidecar
	// default.
	Timeout        Duration `json:"timeout,omitempty"`
	BackendTimeout Duration `json:"backendTimeout,omitempty"`
	// Retry is nil for the sidecar's default retry behaviour.
	Retry           *Retry          `json:"retry,omitempty"`
	RequestHeaders  *HeaderModifier `json:"requestHeaders,omitempty"`
	ResponseHeaders *HeaderModifier `json:"responseHeaders,omitempty"`
}

// Match is one HTTPRouteMatch (or GRPCRouteMatch compiled to HTTP/2 terms:
// path /service/method, method POST). Every set field must match.
type Match struct {
	Path    *PathMatch   `json:"path,omitempty"`
	Method  string       `json:"method,omitempty"`
	Headers []ValueMatch `json:"headers,omitempty"`
	Query   []ValueMatch `json:"query,omitempty"`
}

// PathMatch matches the request path.
type PathMatch struct {
	Type  string `json:"type"` // PathExact, PathPrefix, PathRegex
	Value string `json:"value"`
}

// ValueMatch matches one header (name case-insensitive) or query parameter
// (name exact).
type ValueMatch struct {
	Type  string `json:"type"` // MatchExact, MatchRegex
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Backend is one weighted backendRef, resolved by the controller.
type Backend struct {
	Kind      string `json:"kind"` // KindService or KindServiceImport
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Port      uint16 `json:"port"`
	Weight    int32  `json:"weight"`
}

func (b Backend) String() string {
	return fmt.Sprintf("%s %s/%s:%d", b.Kind, b.Namespace, b.Name, b.Port)
}

// Retry is the Gateway API's HTTPRouteRetry.
type Retry struct {
	// Attempts is the number of retries after the first attempt.
	Attempts int      `json:"attempts"`
	Codes    []int    `json:"codes,omitempty"` // status codes that are retried (5xx by default)
	Backoff  Duration `json:"backoff,omitempty"`
}

// HeaderModifier is the Gateway API's HTTPHeaderFilter.
type HeaderModifier struct {
	Set    []Header `json:"set,omitempty"`
	Add    []Header `json:"add,omitempty"`
	Remove []string `json:"remove,omitempty"`
}

// Header is a name and a value.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Authorization admits callers of a service by SPIFFE ID. A caller is
// admitted when any Rule admits it. With no rules every caller is refused
// (a namespace's default-deny with nothing allowed).
type Authorization struct {
	// Policies are "namespace/name" of every AuthorizationPolicy that
	// contributed, for logs and status.
	Policies []string    `json:"policies"`
	Rules    []AuthzRule `json:"rules,omitempty"`
}

// AuthzRule admits callers whose SPIFFE ID is one of IDs, starts with one
// of Prefixes, or belongs to one of TrustDomains, to the listed ports (all
// when empty), and for HTTP to the listed methods and paths (all when
// empty).
type AuthzRule struct {
	Policy       string      `json:"policy"`
	IDs          []string    `json:"ids,omitempty"`
	Prefixes     []string    `json:"prefixes,omitempty"`
	TrustDomains []string    `json:"trustDomains,omitempty"`
	Ports        []uint16    `json:"ports,omitempty"`
	Methods      []string    `json:"methods,omitempty"`
	Paths        []PathMatch `json:"paths,omitempty"`
}

// RateLimit is a token bucket per destination service (and port, when Port
// is set), or one per caller SPIFFE ID when PerCaller. HTTP requests take
// one token each, TCP connections one each. Enforced by every inbound
// sidecar of the service on its own share: the limit is per sidecar.
type RateLimit struct {
	Policy            string  `json:"policy"`
	Port              uint16  `json:"port,omitempty"`
	RequestsPerSecond float64 `json:"requestsPerSecond"`
	Burst             int     `json:"burst"`
	PerCaller         bool    `json:"perCaller,omitempty"`
}

// Failover overrides the sidecar's built-in failover for the service.
// Zero fields mean the built-in default (documented in docs/sidecar.md).
type Failover struct {
	Policy string `json:"policy"`
	// ClusterOrder ranks remote clusters (after the own cluster); clusters
	// not listed follow in RTT order.
	ClusterOrder []string `json:"clusterOrder,omitempty"`
	// Overprovisioning is the factor by which a priority's healthy share is
	// multiplied before traffic spills over (1.4).
	Overprovisioning float64 `json:"overprovisioning,omitempty"`
	// Outlier detection.
	Consecutive5xx             int      `json:"consecutive5xx,omitempty"`
	ConsecutiveConnectFailures int      `json:"consecutiveConnectFailures,omitempty"`
	BaseEjection               Duration `json:"baseEjection,omitempty"`
	MaxEjection                Duration `json:"maxEjection,omitempty"`
	MaxEjectedPercent          int      `json:"maxEjectedPercent,omitempty"`
	// StaleAfter: a cluster whose state has been stale (its API server
	// unreachable from the controller) this long is no longer used for
	// this service; 0 = use it as long as the controller keeps it.
	StaleAfter Duration `json:"staleAfter,omitempty"`
}

// Duration is a time.Duration that reads and writes as "250ms" in JSON.
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration: %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration: %w", err)
	}
	*d = Duration(v)
	return nil
}

// Encode is the wire form carried in the discovery API (nil for no policy).
func Encode(s *Service) ([]byte, error) {
	if s.IsZero() {
		return nil, nil
	}
	return json.Marshal(s)
}

// Decode reads what Encode wrote; empty input is no policy (nil, nil).
func Decode(b []byte) (*Service, error) {
	if len(b) == 0 {
		return nil, nil
	}
	var s Service
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decode service policy: %w", err)
	}
	return &s, nil
}
