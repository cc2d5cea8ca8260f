package sidecar

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/textproto"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar/balancer"
)

// router is an upstream's compiled route rules, in the controller's
// (Gateway API precedence) order. It is built when a set arrives and read
// per request through an atomic pointer; regexes are compiled here, never
// on the request path.
type router struct {
	rules []*route
	// tcp is the first match-all rule, the only kind a TCP upstream
	// applies (it splits connections by weight); nil when there is none.
	tcp *route
}

// route is one compiled rule.
type route struct {
	name     string
	match    string // the match in words, for /state
	method   string
	path     pathMatcher
	headers  []valueMatcher
	query    []valueMatcher
	backends []routeBackend

	timeout        time.Duration // 0: the sidecar's
	backendTimeout time.Duration
	attempts       int   // attempts per request including the first; 0: the sidecar's
	codes          []int // retried statuses; nil: 5xx
	backoff        time.Duration
	reqHeaders     *headerMod
	respHeaders    *headerMod
}

type routeBackend struct {
	desc   string // "Kind ns/name:port=weight", for /state
	pool   *backendPool
	picker *balancer.Picker // pool.all (ServiceImport) or pool.local (Service)
	weight int
	count  *imetrics.Counter
}

type pathMatcher struct {
	kind  string // "" matches every path
	value string
	re    *regexp.Regexp
}

type valueMatcher struct {
	name  string // canonical for headers
	value string
	re    *regexp.Regexp
}

type headerMod struct {
	set, add []policy.Header // canonical names
	remove   []string
}

// anchored compiles a Gateway API RegularExpression as a full match (the
// expression must match the whole value), like Envoy does.
func anchored(expr string) (*regexp.Regexp, error) { return regexp.Compile(`^(?:` + expr + `)$`) }

// compileRouter builds the router of pol's rules for u's port. pools
// returns (and creates, starting its watch) the pool of a backend service.
// A rule that does not compile (a bad regular expression, which the
// controller should have refused) is skipped and logged. It returns nil
// when no rule applies to the port, and the pools in use.
func compileRouter(u *upstream, pol *policy.Service, pools func(ns, name string, port uint16) *backendPool) (*router, map[*backendPool]bool) {
	used := map[*backendPool]bool{}
	if pol == nil || len(pol.Rules) == 0 {
		return nil, used
	}
	r := &router{}
	for i, pr := range pol.Rules {
		if pr.Port != 0 && pr.Port != u.cfg.Port {
			continue
		}
		rt, err := compileRoute(pr)
		if err != nil {
			u.s.log.Error("route rule skipped", "upstream", u.cfg.String(), "route", pr.Route, "rule", i, "err", err)
			continue
		}
		for _, b := range pr.Backends {
			if b.Weight <= 0 {
				continue
			}
			p := pools(b.Namespace, b.Name, b.Port)
			used[p] = true
			pk := p.all
			if b.Kind == policy.KindService {
				pk = p.local
			}
			rt.backends = append(rt.backends, routeBackend{desc: fmt.Sprintf("%s=%d", b, b.Weight), pool: p, picker: pk, weight: int(b.Weight),
				count: u.s.m.routes.WithLabelValues(u.cfg.String(), pr.Route, b.String())})
		}
		rt.match = describeMatch(pr.Match)
		r.rules = append(r.rules, rt)
		if r.tcp == nil && rt.matchesAll() {
			r.tcp = rt
		}
	}
	if len(r.rules) == 0 {
		return nil, used
	}
	return r, used
}

func compileRoute(pr policy.Rule) (*route, error) {
	rt := &route{name: pr.Route, method: pr.Match.Method,
		timeout: time.Duration(pr.Timeout), backendTimeout: time.Duration(pr.BackendTimeout)}
	if pm := pr.Match.Path; pm != nil {
		rt.path = pathMatcher{kind: pm.Type, value: pm.Value}
		switch pm.Type {
		case policy.PathExact:
		case policy.PathPrefix:
			// Segment semantics: "/foo/" and "/foo" both match /foo and
			// /foo/bar, never /foobar.
			if v := strings.TrimRight(pm.Value, "/"); v != "" {
				rt.path.value = v
			} else {
				rt.path = pathMatcher{} // "/" matches everything
			}
		case policy.PathRegex:
			re, err := anchored(pm.Value)
			if err != nil {
				return nil, err
			}
			rt.path.re = re
		default:
			return nil, fmt.Errorf("path match type %q: %w", pm.Type, errUnknownMatch)
		}
	}
	var err error
	if rt.headers, err = compileValues(pr.Match.Headers, true); err != nil {
		return nil, err
	}
	if rt.query, err = compileValues(pr.Match.Query, false); err != nil {
		return nil, err
	}
	if rr := pr.Retry; rr != nil {
		rt.attempts = max(rr.Attempts, 0) + 1
		rt.codes = slices.Clone(rr.Codes)
		rt.backoff = time.Duration(rr.Backoff)
	}
	rt.reqHeaders = compileMod(pr.RequestHeaders)
	rt.respHeaders = compileMod(pr.ResponseHeaders)
	return rt, nil
}

var errUnknownMatch = errors.New("unknown match type")

func compileValues(in []policy.ValueMatch, header bool) ([]valueMatcher, error) {
	var out []valueMatcher
	for _, v := range in {
		m := valueMatcher{name: v.Name, value: v.Value}
		if header {
			m.name = textproto.CanonicalMIMEHeaderKey(v.Name)
		}
		switch v.Type {
		case policy.MatchExact, "":
		case policy.MatchRegex:
			re, err := anchored(v.Value)
			if err != nil {
				return nil, err
			}
			m.re = re
		default:
			return nil, fmt.Errorf("value match type %q: %w", v.Type, errUnknownMatch)
		}
		out = append(out, m)
	}
	return out, nil
}

func compileMod(in *policy.HeaderModifier) *headerMod {
	if in == nil || (len(in.Set) == 0 && len(in.Add) == 0 && len(in.Remove) == 0) {
		return nil
	}
	m := &headerMod{}
	for _, h := range in.Set {
		m.set = append(m.set, policy.Header{Name: textproto.CanonicalMIMEHeaderKey(h.Name), Value: h.Value})
	}
	for _, h := range in.Add {
		m.add = append(m.add, policy.Header{Name: textproto.CanonicalMIMEHeaderKey(h.Name), Value: h.Value})
	}
	for _, n := range in.Remove {
		m.remove = append(m.remove, textproto.CanonicalMIMEHeaderKey(n))
	}
	return m
}

// apply modifies h: Set replaces, Add appends, Remove deletes (Gateway
// API's HTTPHeaderFilter). host, when not nil, receives a Set or Add of
// Host (the request's Host is not in its header map).
func (m *headerMod) apply(h http.Header, host *string) {
	for _, s := range m.set {
		if s.Name == "Host" && host != nil {
			*host = s.Value
			continue
		}
		h[s.Name] = []string{s.Value}
	}
	for _, a := range m.add {
		if a.Name == "Host" && host != nil {
			*host = a.Value
			continue
		}
		h[a.Name] = append(h[a.Name], a.Value)
	}
	for _, n := range m.remove {
		delete(h, n)
	}
}

func (rt *route) matchesAll() bool {
	return rt.method == "" && rt.path.kind == "" && len(rt.headers) == 0 && len(rt.query) == 0
}

// match returns the first rule that fits req, nil when none does.
func (r *router) match(req *http.Request) *route {
	for _, rt := range r.rules {
		if rt.matches(req) {
			return rt
		}
	}
	return nil
}

func (rt *route) matches(req *http.Request) bool {
	if rt.method != "" && rt.method != req.Method {
		return false
	}
	if !rt.path.matches(req.URL.Path) {
		return false
	}
	for i := range rt.headers {
		m := &rt.headers[i]
		vs, ok := req.Header[m.name]
		if !ok || len(vs) == 0 || !m.matches(vs[0]) {
			return false
		}
	}
	for i := range rt.query {
		m := &rt.query[i]
		v, ok := queryValue(req.URL.RawQuery, m.name)
		if !ok || !m.matches(v) {
			return false
		}
	}
	return true
}

func (p *pathMatcher) matches(path string) bool {
	switch p.kind {
	case "":
		return true
	case policy.PathExact:
		return path == p.value
	case policy.PathPrefix:
		rest, ok := strings.CutPrefix(path, p.value)
		return ok && (rest == "" || rest[0] == '/')
	default:
		return p.re.MatchString(path)
	}
}

func (m *valueMatcher) matches(v string) bool {
	if m.re != nil {
		return m.re.MatchString(v)
	}
	return v == m.value
}

// queryValue returns the first value of the query parameter name without
// parsing the whole query (and without allocating unless a key or value is
// escaped).
func queryValue(raw, name string) (string, bool) {
	for raw != "" {
		var pair string
		pair, raw, _ = strings.Cut(raw, "&")
		k, v, _ := strings.Cut(pair, "=")
		if strings.ContainsAny(k, "%+") {
			uk, err := url.QueryUnescape(k)
			if err != nil {
				continue
			}
			k = uk
		}
		if k != name {
			continue
		}
		if strings.ContainsAny(v, "%+") {
			uv, err := url.QueryUnescape(v)
			if err != nil {
				return "", false
			}
			v = uv
		}
		return v, true
	}
	return "", false
}

// pick chooses a backend by weight among those with an available target;
// when none has one, among those with any target at all (their pickers'
// panic mode); nil when no backend has a target.
func (rt *route) pick(now time.Time) *routeBackend {
	var buf [16]int
	ws := buf[:0]
	total := 0
	for i := range rt.backends {
		w := 0
		if b := &rt.backends[i]; b.picker.HasAvailable(now) {
			w = b.weight
		}
		ws = append(ws, w)
		total += w
	}
	if total == 0 {
		for i := range rt.backends {
			w := 0
			if b := &rt.backends[i]; !b.picker.Empty() {
				w = b.weight
			}
			ws[i] = w
			total += w
		}
		if total == 0 {
			return nil
		}
	}
	n := rand.IntN(total)
	for i, w := range ws {
		if n < w {
			return &rt.backends[i]
		}
		n -= w
	}
	return nil
}

// retryable reports whether an answer with code may be retried.
func (rt *route) retryable(code int) bool {
	if rt == nil || rt.codes == nil {
		return code >= 500
	}
	return slices.Contains(rt.codes, code)
}

// describeMatch is a match in words for /state: "PathPrefix /api, GET,
// header x-canary Exact yes".
func describeMatch(m policy.Match) string {
	var parts []string
	if m.Path != nil {
		parts = append(parts, m.Path.Type+" "+m.Path.Value)
	}
	if m.Method != "" {
		parts = append(parts, m.Method)
	}
	for _, h := range m.Headers {
		parts = append(parts, "header "+h.Name+" "+h.Type+" "+h.Value)
	}
	for _, q := range m.Query {
		parts = append(parts, "query "+q.Name+" "+q.Type+" "+q.Value)
	}
	if len(parts) == 0 {
		return "every request"
	}
	return strings.Join(parts, ", ")
}

// plan is how one request is served after the upstream's route rules: the
// backend service's pool and picker, and the limits the matching rule sets.
type plan struct {
	rt             *route // nil: no rule matched
	bp             *backendPool
	picker         *balancer.Picker
	reqTimeout     time.Duration
	attemptTimeout time.Duration
	maxAttempts    int
}

// planFor applies the first route rule that matches req: its backend by
// weight, timeouts, attempts and request header changes. With none, the
// upstream's own service serves with the defaults. ok is false when a rule
// matched but none of its backends has an endpoint.
func (u *upstream) planFor(req *http.Request, now time.Time) (p plan, ok bool) {
	p = plan{bp: u.own, picker: u.own.all, reqTimeout: u.s.cfg.RequestTimeout,
		attemptTimeout: u.s.cfg.AttemptTimeout, maxAttempts: u.s.cfg.MaxAttempts}
	r := u.router.Load()
	if r == nil {
		return p, true
	}
	if p.rt = r.match(req); p.rt == nil {
		return p, true
	}
	b := p.rt.pick(now)
	if b == nil {
		return p, false
	}
	b.count.Inc()
	p.bp, p.picker = b.pool, b.picker
	if p.rt.timeout > 0 {
		p.reqTimeout = p.rt.timeout
	}
	if p.rt.backendTimeout > 0 {
		p.attemptTimeout = p.rt.backendTimeout
	}
	if p.rt.attempts > 0 {
		p.maxAttempts = p.rt.attempts
	}
	if p.rt.reqHeaders != nil {
		p.rt.reqHeaders.apply(req.Header, &req.Host)
	}
	return p, true
}
