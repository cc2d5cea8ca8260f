package routes

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/fedmesh/fedmesh/policy"
)

// routeSpec is what an HTTPRoute or a GRPCRoute says, in HTTP terms.
type routeSpec struct {
	kind       string
	meta       metav1.ObjectMeta
	parentRefs []gwv1.ParentReference
	rules      []ruleSpec
	// unsupported lists what fedmesh does not implement, for
	// Accepted=False UnsupportedValue.
	unsupported []string
}

type ruleSpec struct {
	matches        []policy.Match
	backends       []gwv1.BackendRef
	timeout        policy.Duration
	backendTimeout policy.Duration
	retry          *policy.Retry
	reqHeaders     *policy.HeaderModifier
	respHeaders    *policy.HeaderModifier
}

// Compile one route: write its status into out and return the items it
// contributes (this generation's, or the last accepted one's).
func (c *Compiler) route(in Input, r routeSpec, out *Output) []item {
	ns := r.meta.Namespace
	var refReason gwv1.RouteConditionReason
	var refErrs []string
	unsupported := r.unsupported
	type compiled struct {
		rule policy.Rule
		idx  [2]int
		m    policy.Match
	}
	var rules []compiled
	for i, rs := range r.rules {
		var backends []policy.Backend
		var sum int32
		for j, br := range rs.backends {
			b, reason, err := resolveBackend(in.Cluster, r.kind, ns, br)
			if err != nil {
				where := fmt.Sprintf("rules[%d].backendRefs[%d]: %v", i, j, err)
				if reason == gwv1.RouteReasonUnsupportedValue {
					unsupported = append(unsupported, where)
					continue
				}
				if refReason == "" {
					refReason = reason
				}
				refErrs = append(refErrs, where)
				continue
			}
			sum += b.Weight
			backends = append(backends, b)
		}
		if len(rs.backends) == 0 {
			unsupported = append(unsupported, fmt.Sprintf("rules[%d] has no backendRefs; a mesh route rule needs at least one", i))
		} else if sum == 0 && len(backends) == len(rs.backends) {
			unsupported = append(unsupported, fmt.Sprintf("rules[%d]: every backendRef has weight 0, so the rule could only answer 500; give at least one backend a weight above 0", i))
		}
		matches := rs.matches
		if len(matches) == 0 {
			matches = []policy.Match{{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/"}}}
		}
		for k, m := range matches {
			rules = append(rules, compiled{idx: [2]int{i, k}, m: m, rule: policy.Rule{
				Route: r.kind + " " + ns + "/" + r.meta.Name, Match: m, Backends: backends,
				Timeout: rs.timeout, BackendTimeout: rs.backendTimeout, Retry: rs.retry,
				RequestHeaders: rs.reqHeaders, ResponseHeaders: rs.respHeaders,
			}})
		}
	}
	valid := len(unsupported) == 0 && len(refErrs) == 0
	gen := r.meta.Generation
	good, haveGood := c.routes[r.meta.UID]

	var parents []gwv1.RouteParentStatus
	var items []item
	seenParent := map[string]bool{}
	for _, pr := range r.parentRefs {
		group, kind := string(gwv1.GroupName), "Gateway"
		if pr.Group != nil {
			group = string(*pr.Group)
		}
		if pr.Kind != nil {
			kind = string(*pr.Kind)
		}
		if group != groupCore || kind != kindService {
			continue // Gateways and other parents are not ours
		}
		pns := ns
		if pr.Namespace != nil && *pr.Namespace != "" {
			pns = string(*pr.Namespace)
		}
		var port uint16
		if pr.Port != nil {
			port = uint16(*pr.Port)
		}
		key := fmt.Sprintf("%s/%s:%d", pns, pr.Name, port)
		if seenParent[key] {
			continue
		}
		seenParent[key] = true
		ref := normalizedParent(pr, pns)
		target := fmt.Sprintf("Service %s/%s", pns, pr.Name)
		if port != 0 {
			target += fmt.Sprintf(" port %d", port)
		}

		var accepted metav1.Condition
		parentOK := false
		svc := in.Cluster.Service(pns, string(pr.Name))
		switch {
		case pns != ns:
			accepted = condition(string(gwv1.RouteConditionAccepted), false, string(gwv1.RouteReasonUnsupportedValue),
				fmt.Sprintf("parentRef %s is in another namespace: consumer routes are not supported, attach the route in the Service's namespace", target), gen)
		case svc == nil:
			accepted = condition(string(gwv1.RouteConditionAccepted), false, string(gwv1.RouteReasonNoMatchingParent),
				fmt.Sprintf("parent %s does not exist", target), gen)
		case port != 0 && !containsPortOf(svc.Spec.Ports, int32(port)):
			accepted = condition(string(gwv1.RouteConditionAccepted), false, string(gwv1.RouteReasonNoMatchingParent),
				fmt.Sprintf("parent Service %s/%s has no port %d (ports %v)", pns, pr.Name, port, servicePorts(svc)), gen)
		case len(unsupported) > 0:
			accepted = condition(string(gwv1.RouteConditionAccepted), false, string(gwv1.RouteReasonUnsupportedValue),
				rejected(gen, good.generationOr(), haveGood, joinErrs(unsupported)), gen)
			parentOK = true
		default:
			parentOK = true
			msg := fmt.Sprintf("attached to %s", target)
			if !valid {
				msg = rejected(gen, good.generationOr(), haveGood, "backendRefs do not resolve (see ResolvedRefs)")
			}
			accepted = condition(string(gwv1.RouteConditionAccepted), true, string(gwv1.RouteReasonAccepted), msg, gen)
		}
		var resolved metav1.Condition
		if len(refErrs) > 0 {
			resolved = condition(string(gwv1.RouteConditionResolvedRefs), false, string(refReason),
				rejected(gen, good.generationOr(), haveGood, joinErrs(refErrs)), gen)
		} else {
			resolved = condition(string(gwv1.RouteConditionResolvedRefs), true, string(gwv1.RouteReasonResolvedRefs), "every backendRef resolved", gen)
		}
		parents = append(parents, gwv1.RouteParentStatus{ParentRef: ref, ControllerName: ControllerName,
			Conditions: []metav1.Condition{accepted, resolved}})

		if valid && parentOK {
			for _, cr := range rules {
				rule := cr.rule
				rule.Port = port
				items = append(items, item{service: string(pr.Name), rule: rule, order: orderKey{
					match: cr.m, created: r.meta.CreationTimestamp.Time, kind: r.kind, name: r.meta.Name, rule: cr.idx[0], match2: cr.idx[1]}})
			}
		}
	}
	out.Routes[ObjectKey{r.kind, r.meta.Name}] = parents
	if valid {
		c.routes[r.meta.UID] = &goodRoute{namespace: ns, generation: gen, items: items}
		return items
	}
	if haveGood {
		return good.items
	}
	return nil
}

func (g *goodRoute) generationOr() int64 {
	if g == nil {
		return 0
	}
	return g.generation
}

func containsPortOf(ports []corev1.ServicePort, port int32) bool {
	for _, p := range ports {
		if p.Port == port {
			return true
		}
	}
	return false
}

func normalizedParent(pr gwv1.ParentReference, ns string) gwv1.ParentReference {
	g, k := gwv1.Group(groupCore), gwv1.Kind(kindService)
	n := gwv1.Namespace(ns)
	out := pr
	out.Group, out.Kind = &g, &k
	if pr.Namespace != nil {
		out.Namespace = &n
	}
	return out
}

// resolveBackend resolves one backendRef of a route in namespace ns.
func resolveBackend(cl Cluster, routeKind, ns string, br gwv1.BackendRef) (policy.Backend, gwv1.RouteConditionReason, error) {
	group, kind := groupCore, kindService
	if br.Group != nil {
		group = string(*br.Group)
	}
	if br.Kind != nil {
		kind = string(*br.Kind)
	}
	bns := ns
	if br.Namespace != nil && *br.Namespace != "" {
		bns = string(*br.Namespace)
	}
	weight := int32(1)
	if br.Weight != nil {
		weight = *br.Weight
	}
	b := policy.Backend{Namespace: bns, Name: string(br.Name), Weight: weight}
	if br.Port != nil {
		b.Port = uint16(*br.Port)
	}
	var what string
	switch {
	case group == groupCore && kind == kindService:
		b.Kind, what = policy.KindService, fmt.Sprintf("Service %s/%s", bns, br.Name)
	case group == groupMultiCluster && kind == kindServiceImport:
		b.Kind, what = policy.KindServiceImport, fmt.Sprintf("ServiceImport %s/%s", bns, br.Name)
	default:
		return b, gwv1.RouteReasonInvalidKind, fmt.Errorf("kind %q of group %q is not a backend fedmesh can route to (Service, or ServiceImport of %s)", kind, group, groupMultiCluster)
	}
	if b.Port == 0 {
		return b, gwv1.RouteReasonUnsupportedValue, fmt.Errorf("%s needs a port", what)
	}
	if bns != ns && !granted(cl.ReferenceGrants(bns), routeKind, ns, group, kind, string(br.Name)) {
		return b, gwv1.RouteReasonRefNotPermitted, fmt.Errorf("%s is in another namespace and no ReferenceGrant in %s allows %ss from %s to refer to it", what, bns, routeKind, ns)
	}
	exists := false
	if b.Kind == policy.KindService {
		svc := cl.Service(bns, string(br.Name))
		exists = svc != nil
		if exists && !containsPortOf(svc.Spec.Ports, int32(b.Port)) {
			return b, gwv1.RouteReasonBackendNotFound, fmt.Errorf("%s has no port %d", what, b.Port)
		}
	} else {
		exists = cl.ServiceImportExists(bns, string(br.Name))
	}
	if !exists {
		return b, gwv1.RouteReasonBackendNotFound, fmt.Errorf("%s does not exist", what)
	}
	return b, "", nil
}

func granted(grants []*gwv1.ReferenceGrant, routeKind, fromNS, group, kind, name string) bool {
	for _, g := range grants {
		from := false
		for _, f := range g.Spec.From {
			if string(f.Group) == gwv1.GroupName && string(f.Kind) == routeKind && string(f.Namespace) == fromNS {
				from = true
				break
			}
		}
		if !from {
			continue
		}
		for _, t := range g.Spec.To {
			if string(t.Group) == group && string(t.Kind) == kind && (t.Name == nil || *t.Name == "" || string(*t.Name) == name) {
				return true
			}
		}
	}
	return false
}

func fromHTTPRoute(r *gwv1.HTTPRoute) routeSpec {
	rs := routeSpec{kind: policy.KindHTTPRoute, meta: r.ObjectMeta, parentRefs: r.Spec.ParentRefs}
	bad := func(format string, a ...any) { rs.unsupported = append(rs.unsupported, fmt.Sprintf(format, a...)) }
	for i, rule := range r.Spec.Rules {
		var out ruleSpec
		for k, m := range rule.Matches {
			pm, err := httpMatch(m)
			if err != nil {
				bad("rules[%d].matches[%d]: %v", i, k, err)
				continue
			}
			out.matches = append(out.matches, pm)
		}
		for k, f := range rule.Filters {
			switch {
			case f.Type == gwv1.HTTPRouteFilterRequestHeaderModifier && f.RequestHeaderModifier != nil:
				out.reqHeaders = headerModifier(f.RequestHeaderModifier)
			case f.Type == gwv1.HTTPRouteFilterResponseHeaderModifier && f.ResponseHeaderModifier != nil:
				out.respHeaders = headerModifier(f.ResponseHeaderModifier)
			default:
				bad("rules[%d].filters[%d]: filter %s is not supported (fedmesh supports RequestHeaderModifier and ResponseHeaderModifier)", i, k, f.Type)
			}
		}
		for j, b := range rule.BackendRefs {
			if len(b.Filters) > 0 {
				bad("rules[%d].backendRefs[%d]: per-backend filters are not supported", i, j)
			}
			out.backends = append(out.backends, b.BackendRef)
		}
		if t := rule.Timeouts; t != nil {
			var err error
			if out.timeout, err = duration(t.Request); err != nil {
				bad("rules[%d].timeouts.request: %v", i, err)
			}
			if out.backendTimeout, err = duration(t.BackendRequest); err != nil {
				bad("rules[%d].timeouts.backendRequest: %v", i, err)
			}
		}
		if rt := rule.Retry; rt != nil {
			out.retry = &policy.Retry{Attempts: 1}
			if rt.Attempts != nil {
				out.retry.Attempts = *rt.Attempts
			}
			for _, c := range rt.Codes {
				out.retry.Codes = append(out.retry.Codes, int(c))
			}
			var err error
			if out.retry.Backoff, err = duration(rt.Backoff); err != nil {
				bad("rules[%d].retry.backoff: %v", i, err)
			}
		}
		if rule.SessionPersistence != nil {
			bad("rules[%d].sessionPersistence is not supported", i)
		}
		rs.rules = append(rs.rules, out)
	}
	return rs
}

func fromGRPCRoute(r *gwv1.GRPCRoute) routeSpec {
	rs := routeSpec{kind: policy.KindGRPCRoute, meta: r.ObjectMeta, parentRefs: r.Spec.ParentRefs}
	bad := func(format string, a ...any) { rs.unsupported = append(rs.unsupported, fmt.Sprintf(format, a...)) }
	for i, rule := range r.Spec.Rules {
		var out ruleSpec
		for k, m := range rule.Matches {
			pm, err := grpcMatch(m)
			if err != nil {
				bad("rules[%d].matches[%d]: %v", i, k, err)
				continue
			}
			out.matches = append(out.matches, pm)
		}
		if len(rule.Matches) == 0 {
			out.matches = []policy.Match{{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/"}, Method: "POST"}}
		}
		for k, f := range rule.Filters {
			switch {
			case f.Type == gwv1.GRPCRouteFilterRequestHeaderModifier && f.RequestHeaderModifier != nil:
				out.reqHeaders = headerModifier(f.RequestHeaderModifier)
			case f.Type == gwv1.GRPCRouteFilterResponseHeaderModifier && f.ResponseHeaderModifier != nil:
				out.respHeaders = headerModifier(f.ResponseHeaderModifier)
			default:
				bad("rules[%d].filters[%d]: filter %s is not supported (fedmesh supports RequestHeaderModifier and ResponseHeaderModifier)", i, k, f.Type)
			}
		}
		for j, b := range rule.BackendRefs {
			if len(b.Filters) > 0 {
				bad("rules[%d].backendRefs[%d]: per-backend filters are not supported", i, j)
			}
			out.backends = append(out.backends, b.BackendRef)
		}
		if rule.SessionPersistence != nil {
			bad("rules[%d].sessionPersistence is not supported", i)
		}
		rs.rules = append(rs.rules, out)
	}
	return rs
}

func httpMatch(m gwv1.HTTPRouteMatch) (policy.Match, error) {
	out := policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/"}}
	if p := m.Path; p != nil {
		if p.Type != nil {
			out.Path.Type = string(*p.Type)
		}
		if p.Value != nil {
			out.Path.Value = *p.Value
		}
		switch out.Path.Type {
		case policy.PathExact, policy.PathPrefix:
			if !strings.HasPrefix(out.Path.Value, "/") {
				return out, fmt.Errorf("path %q must start with /", out.Path.Value)
			}
		case policy.PathRegex:
			if _, err := regexp.Compile(out.Path.Value); err != nil {
				return out, fmt.Errorf("path regular expression: %v", err)
			}
		default:
			return out, fmt.Errorf("path match type %q is not supported", out.Path.Type)
		}
	}
	if m.Method != nil {
		out.Method = string(*m.Method)
	}
	for _, h := range m.Headers {
		v, err := valueMatch(h.Type, string(h.Name), h.Value)
		if err != nil {
			return out, fmt.Errorf("header %s: %v", h.Name, err)
		}
		out.Headers = append(out.Headers, v)
	}
	for _, q := range m.QueryParams {
		v, err := valueMatch(q.Type, string(q.Name), q.Value)
		if err != nil {
			return out, fmt.Errorf("query parameter %s: %v", q.Name, err)
		}
		out.Query = append(out.Query, v)
	}
	return out, nil
}

// grpcMatch compiles a GRPCRouteMatch to HTTP/2 terms: path /service/method,
// method POST, headers.
func grpcMatch(m gwv1.GRPCRouteMatch) (policy.Match, error) {
	out := policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/"}, Method: "POST"}
	if mm := m.Method; mm != nil {
		svc, meth := deref(mm.Service), deref(mm.Method)
		typ := gwv1.GRPCMethodMatchExact
		if mm.Type != nil {
			typ = *mm.Type
		}
		switch typ {
		case gwv1.GRPCMethodMatchExact:
			switch {
			case svc != "" && meth != "":
				out.Path = &policy.PathMatch{Type: policy.PathExact, Value: "/" + svc + "/" + meth}
			case svc != "":
				out.Path = &policy.PathMatch{Type: policy.PathPrefix, Value: "/" + svc + "/"}
			case meth != "":
				out.Path = &policy.PathMatch{Type: policy.PathRegex, Value: "^/[^/]+/" + regexp.QuoteMeta(meth) + "$"}
			default:
				return out, fmt.Errorf("method match names neither service nor method")
			}
		case gwv1.GRPCMethodMatchRegularExpression:
			s, mt := "[^/]+", "[^/]+"
			if svc != "" {
				s = svc
			}
			if meth != "" {
				mt = meth
			}
			re := "^/(?:" + s + ")/(?:" + mt + ")$"
			if _, err := regexp.Compile(re); err != nil {
				return out, fmt.Errorf("method regular expression: %v", err)
			}
			out.Path = &policy.PathMatch{Type: policy.PathRegex, Value: re}
		default:
			return out, fmt.Errorf("method match type %q is not supported", typ)
		}
	}
	for _, h := range m.Headers {
		var t *gwv1.HeaderMatchType
		if h.Type != nil {
			v := gwv1.HeaderMatchType(*h.Type)
			t = &v
		}
		v, err := valueMatch(t, string(h.Name), h.Value)
		if err != nil {
			return out, fmt.Errorf("header %s: %v", h.Name, err)
		}
		out.Headers = append(out.Headers, v)
	}
	return out, nil
}

func valueMatch[T ~string](typ *T, name, value string) (policy.ValueMatch, error) {
	v := policy.ValueMatch{Type: policy.MatchExact, Name: name, Value: value}
	if typ != nil {
		v.Type = string(*typ)
	}
	switch v.Type {
	case policy.MatchExact:
	case policy.MatchRegex:
		if _, err := regexp.Compile(value); err != nil {
			return v, fmt.Errorf("regular expression: %v", err)
		}
	default:
		return v, fmt.Errorf("match type %q is not supported", v.Type)
	}
	return v, nil
}

func headerModifier(f *gwv1.HTTPHeaderFilter) *policy.HeaderModifier {
	m := &policy.HeaderModifier{Remove: f.Remove}
	for _, h := range f.Set {
		m.Set = append(m.Set, policy.Header{Name: string(h.Name), Value: h.Value})
	}
	for _, h := range f.Add {
		m.Add = append(m.Add, policy.Header{Name: string(h.Name), Value: h.Value})
	}
	return m
}

func duration(d *gwv1.Duration) (policy.Duration, error) {
	if d == nil {
		return 0, nil
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil {
		return 0, err
	}
	if v < 0 {
		return 0, fmt.Errorf("%s is negative", *d)
	}
	return policy.Duration(v), nil
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
