package routes

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// Policy kinds, as in ObjectKey.
const (
	KindAuthorizationPolicy = "AuthorizationPolicy"
	KindRateLimitPolicy     = "RateLimitPolicy"
	KindFailoverPolicy      = "FailoverPolicy"
)

// policyResult is one policy after validation: what it contributes now
// (its own generation or the last accepted one), and its condition.
type policyResult struct {
	key     ObjectKey
	meta    metav1.ObjectMeta
	contrib *goodPolicy
	cond    metav1.Condition
}

// policyErr is why a policy is not accepted: TargetNotFound or Invalid.
type policyErr struct {
	reason string
	msg    string
}

// evaluate applies the keep-last-good rule to one policy's validation.
func (c *Compiler) evaluate(kind string, meta metav1.ObjectMeta, ns string, compiled *goodPolicy, perr *policyErr) policyResult {
	res := policyResult{key: ObjectKey{kind, meta.Name}, meta: meta}
	gen := meta.Generation
	switch {
	case perr == nil:
		compiled.namespace, compiled.generation = ns, gen
		c.policies[meta.UID] = compiled
		res.contrib = compiled
		msg := "accepted"
		if compiled.target != "" {
			msg = "accepted for Service " + compiled.target
		} else {
			msg = "accepted for every service in namespace " + ns
		}
		res.cond = condition(v1alpha1.ConditionAccepted, true, v1alpha1.ReasonAccepted, msg, gen)
	case perr.reason == v1alpha1.ReasonTargetNotFound:
		// The target is gone: nothing to protect, nothing contributed.
		delete(c.policies, meta.UID)
		res.cond = condition(v1alpha1.ConditionAccepted, false, perr.reason, perr.msg+"; the policy has no effect", gen)
	default:
		good, ok := c.policies[meta.UID]
		if ok {
			res.contrib = good
		}
		res.cond = condition(v1alpha1.ConditionAccepted, false, perr.reason, rejected(gen, good.generationOr(), ok, perr.msg), gen)
	}
	return res
}

func (g *goodPolicy) generationOr() int64 {
	if g == nil {
		return 0
	}
	return g.generation
}

// policiesOf compiles the namespace's policies into the services.
func (c *Compiler) policiesOf(in Input, seen map[types.UID]bool, out *Output, svc func(string) *policy.Service) {
	ns := in.Namespace
	var authz []policyResult
	for _, p := range in.AuthorizationPolicies {
		seen[p.UID] = true
		g, perr := compileAuthz(in.Cluster, p)
		authz = append(authz, c.evaluate(KindAuthorizationPolicy, p.ObjectMeta, ns, g, perr))
	}
	var limits []policyResult
	for _, p := range in.RateLimitPolicies {
		seen[p.UID] = true
		g, perr := compileRateLimit(in.Cluster, p)
		limits = append(limits, c.evaluate(KindRateLimitPolicy, p.ObjectMeta, ns, g, perr))
	}
	var failovers []policyResult
	for _, p := range in.FailoverPolicies {
		seen[p.UID] = true
		g, perr := compileFailover(in.Cluster, p)
		failovers = append(failovers, c.evaluate(KindFailoverPolicy, p.ObjectMeta, ns, g, perr))
	}
	byName := func(a, b policyResult) int { return strings.Compare(a.meta.Name, b.meta.Name) }
	slices.SortFunc(authz, byName)
	slices.SortFunc(limits, byName)

	// Authorization: targeted policies plus the namespace-wide ones.
	var wide []policyResult
	targeted := map[string][]policyResult{}
	deny := false
	for _, r := range authz {
		if r.contrib == nil {
			continue
		}
		if r.contrib.target == "" {
			wide = append(wide, r)
			deny = deny || r.contrib.authz.defaultDeny
		} else {
			targeted[r.contrib.target] = append(targeted[r.contrib.target], r)
		}
	}
	applyAuthz := func(name string) {
		t := targeted[name]
		if len(t) == 0 && !deny {
			return
		}
		a := &policy.Authorization{}
		for _, r := range slices.Concat(t, wide) {
			a.Policies = append(a.Policies, ns+"/"+r.meta.Name)
			a.Rules = append(a.Rules, r.contrib.authz.rules...)
		}
		slices.Sort(a.Policies)
		svc(name).Authz = a
	}
	if deny {
		for _, s := range in.Cluster.Services(ns) {
			applyAuthz(s.Name)
		}
	}
	for _, name := range sortedNames(targeted) {
		applyAuthz(name)
	}

	for _, r := range limits {
		if r.contrib != nil {
			s := svc(r.contrib.target)
			s.RateLimits = append(s.RateLimits, *r.contrib.rateLimit)
		}
	}

	// Failover: one per service, the oldest (ties by name); the others are
	// Conflicted.
	slices.SortFunc(failovers, func(a, b policyResult) int {
		if c := a.meta.CreationTimestamp.Compare(b.meta.CreationTimestamp.Time); c != 0 {
			return c
		}
		return strings.Compare(a.meta.Name, b.meta.Name)
	})
	winner := map[string]string{}
	for i, r := range failovers {
		if r.contrib == nil {
			continue
		}
		if w, ok := winner[r.contrib.target]; ok {
			failovers[i].cond = condition(v1alpha1.ConditionAccepted, false, v1alpha1.ReasonConflicted,
				fmt.Sprintf("FailoverPolicy %s/%s targets the same service %s and is older (or, created in the same second, first by name); this policy has no effect", ns, w, r.contrib.target),
				r.meta.Generation)
			continue
		}
		winner[r.contrib.target] = r.meta.Name
		svc(r.contrib.target).Failover = r.contrib.failover
	}

	for _, rs := range [][]policyResult{authz, limits, failovers} {
		for _, r := range rs {
			out.Policies[r.key] = r.cond
		}
	}
}

// target checks a targetRef against the kinds a policy accepts and the
// cluster; it returns the service name.
func target(cl Cluster, ns string, ref v1alpha1.TargetRef, allowImport bool) (string, *policyErr) {
	switch {
	case ref.Group == groupCore && ref.Kind == kindService:
		if cl.Service(ns, ref.Name) == nil {
			return "", &policyErr{v1alpha1.ReasonTargetNotFound, fmt.Sprintf("targetRef: Service %s/%s does not exist", ns, ref.Name)}
		}
	case allowImport && ref.Group == groupMultiCluster && ref.Kind == kindServiceImport:
		if !cl.ServiceImportExists(ns, ref.Name) {
			return "", &policyErr{v1alpha1.ReasonTargetNotFound, fmt.Sprintf("targetRef: ServiceImport %s/%s does not exist", ns, ref.Name)}
		}
	case allowImport:
		return "", &policyErr{v1alpha1.ReasonInvalid, fmt.Sprintf("targetRef: kind %q of group %q: want Service (group \"\") or ServiceImport (group %s)", ref.Kind, ref.Group, groupMultiCluster)}
	default:
		return "", &policyErr{v1alpha1.ReasonInvalid, fmt.Sprintf("targetRef: kind %q of group %q: want Service (group \"\")", ref.Kind, ref.Group)}
	}
	return ref.Name, nil
}

var methodRE = regexp.MustCompile(`^[A-Z]+$`)

func compileAuthz(cl Cluster, p *v1alpha1.AuthorizationPolicy) (*goodPolicy, *policyErr) {
	name := p.Namespace + "/" + p.Name
	g := &goodPolicy{authz: &authzContribution{defaultDeny: p.Spec.DefaultDeny && p.Spec.TargetRef == nil}}
	var errs []string
	for i, r := range p.Spec.Rules {
		where := fmt.Sprintf("rules[%d]", i)
		ar := policy.AuthzRule{Policy: name}
		if len(r.From.IDs)+len(r.From.Prefixes)+len(r.From.TrustDomains) == 0 {
			errs = append(errs, where+".from names no caller (give ids, prefixes or trustDomains)")
		}
		for j, id := range r.From.IDs {
			if _, err := spiffeid.FromString(id); err != nil {
				errs = append(errs, fmt.Sprintf("%s.from.ids[%d] %q: %v", where, j, id, err))
			}
			ar.IDs = append(ar.IDs, id)
		}
		for j, pre := range r.From.Prefixes {
			td, _, _ := strings.Cut(strings.TrimPrefix(pre, "spiffe://"), "/")
			if !strings.HasPrefix(pre, "spiffe://") {
				errs = append(errs, fmt.Sprintf("%s.from.prefixes[%d] %q: must start with spiffe://", where, j, pre))
			} else if _, err := spiffeid.TrustDomainFromString(td); err != nil {
				errs = append(errs, fmt.Sprintf("%s.from.prefixes[%d] %q: %v", where, j, pre, err))
			}
			ar.Prefixes = append(ar.Prefixes, pre)
		}
		for j, td := range r.From.TrustDomains {
			if _, err := spiffeid.TrustDomainFromString(td); err != nil {
				errs = append(errs, fmt.Sprintf("%s.from.trustDomains[%d] %q: %v", where, j, td, err))
			}
			ar.TrustDomains = append(ar.TrustDomains, td)
		}
		for j, port := range r.Ports {
			if port < 1 || port > 65535 {
				errs = append(errs, fmt.Sprintf("%s.ports[%d] %d: not a port", where, j, port))
			}
			ar.Ports = append(ar.Ports, uint16(port))
		}
		for j, m := range r.Methods {
			if !methodRE.MatchString(m) {
				errs = append(errs, fmt.Sprintf("%s.methods[%d] %q: want an upper-case HTTP method such as GET", where, j, m))
			}
			ar.Methods = append(ar.Methods, m)
		}
		for j, pm := range r.Paths {
			if pm.Type != policy.PathExact && pm.Type != policy.PathPrefix {
				errs = append(errs, fmt.Sprintf("%s.paths[%d].type %q: want Exact or PathPrefix", where, j, pm.Type))
			}
			if !strings.HasPrefix(pm.Value, "/") {
				errs = append(errs, fmt.Sprintf("%s.paths[%d].value %q: must start with /", where, j, pm.Value))
			}
			ar.Paths = append(ar.Paths, policy.PathMatch{Type: pm.Type, Value: pm.Value})
		}
		g.authz.rules = append(g.authz.rules, ar)
	}
	if p.Spec.TargetRef != nil {
		t, perr := target(cl, p.Namespace, *p.Spec.TargetRef, false)
		if perr != nil {
			return nil, perr
		}
		g.target = t
	}
	if len(errs) > 0 {
		return nil, &policyErr{v1alpha1.ReasonInvalid, joinErrs(errs)}
	}
	return g, nil
}

func compileRateLimit(cl Cluster, p *v1alpha1.RateLimitPolicy) (*goodPolicy, *policyErr) {
	t, perr := target(cl, p.Namespace, p.Spec.TargetRef, false)
	if perr != nil {
		return nil, perr
	}
	var errs []string
	rl := policy.RateLimit{Policy: p.Namespace + "/" + p.Name, PerCaller: p.Spec.PerCaller,
		RequestsPerSecond: float64(p.Spec.RequestsPerSecond), Burst: int(p.Spec.RequestsPerSecond)}
	if p.Spec.RequestsPerSecond <= 0 {
		errs = append(errs, fmt.Sprintf("requestsPerSecond %d: must be above 0", p.Spec.RequestsPerSecond))
	}
	if b := p.Spec.Burst; b != nil {
		if *b <= 0 {
			errs = append(errs, fmt.Sprintf("burst %d: must be above 0", *b))
		}
		rl.Burst = int(*b)
	}
	if port := p.Spec.Port; port != nil {
		if svc := cl.Service(p.Namespace, t); !containsPortOf(svc.Spec.Ports, *port) {
			errs = append(errs, fmt.Sprintf("port %d: Service %s/%s has no such port (ports %v)", *port, p.Namespace, t, servicePorts(svc)))
		}
		rl.Port = uint16(*port)
	}
	if len(errs) > 0 {
		return nil, &policyErr{v1alpha1.ReasonInvalid, joinErrs(errs)}
	}
	return &goodPolicy{target: t, rateLimit: &rl}, nil
}

func compileFailover(cl Cluster, p *v1alpha1.FailoverPolicy) (*goodPolicy, *policyErr) {
	t, perr := target(cl, p.Namespace, p.Spec.TargetRef, true)
	if perr != nil {
		return nil, perr
	}
	var errs []string
	f := &policy.Failover{Policy: p.Namespace + "/" + p.Name, Overprovisioning: float64(v1alpha1.DefaultOverprovPct) / 100}
	seen := map[string]bool{}
	for i, c := range p.Spec.ClusterOrder {
		if c == "" || seen[c] {
			errs = append(errs, fmt.Sprintf("clusterOrder[%d] %q: empty or repeated", i, c))
		}
		seen[c] = true
		f.ClusterOrder = append(f.ClusterOrder, c)
	}
	if pct := p.Spec.OverprovisioningPercent; pct != nil {
		if *pct < 100 || *pct > 1000 {
			errs = append(errs, fmt.Sprintf("overprovisioningPercent %d: want 100..1000", *pct))
		}
		f.Overprovisioning = float64(*pct) / 100
	}
	dur := func(field, s string) policy.Duration {
		if s == "" {
			return 0
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Sprintf("%s %q: want a duration such as \"1s\"", field, s))
		}
		return policy.Duration(d)
	}
	if od := p.Spec.OutlierDetection; od != nil {
		pos := func(field string, v *int32) int {
			if v == nil {
				return 0
			}
			if *v < 1 {
				errs = append(errs, fmt.Sprintf("outlierDetection.%s %d: must be above 0", field, *v))
			}
			return int(*v)
		}
		f.Consecutive5xx = pos("consecutive5xx", od.Consecutive5xx)
		f.ConsecutiveConnectFailures = pos("consecutiveConnectFailures", od.ConsecutiveConnectFailures)
		f.BaseEjection = dur("outlierDetection.baseEjectionTime", od.BaseEjectionTime)
		f.MaxEjection = dur("outlierDetection.maxEjectionTime", od.MaxEjectionTime)
		if f.BaseEjection > 0 && f.MaxEjection > 0 && f.MaxEjection < f.BaseEjection {
			errs = append(errs, fmt.Sprintf("outlierDetection.maxEjectionTime %s is shorter than baseEjectionTime %s", od.MaxEjectionTime, od.BaseEjectionTime))
		}
		if v := od.MaxEjectedPercent; v != nil {
			if *v < 0 || *v > 100 {
				errs = append(errs, fmt.Sprintf("outlierDetection.maxEjectedPercent %d: want 0..100", *v))
			}
			f.MaxEjectedPercent = int(*v)
		}
	}
	f.StaleAfter = dur("staleAfter", p.Spec.StaleAfter)
	if len(errs) > 0 {
		return nil, &policyErr{v1alpha1.ReasonInvalid, joinErrs(errs)}
	}
	return &goodPolicy{target: t, failover: f}, nil
}
