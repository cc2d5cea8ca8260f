package sidecar

import (
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/policy"
)

// ServiceName names the service a workload serves.
type ServiceName struct {
	Namespace string
	Name      string
}

// IsZero reports whether no service is named.
func (n ServiceName) IsZero() bool { return n.Namespace == "" && n.Name == "" }

func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// inboundPolicy is the own service's authorization and rate limits,
// compiled when a set arrives and read per connection (and per request for
// HTTP) through an atomic pointer.
type inboundPolicy struct {
	authz  *authzPolicy // nil: the default (trust domains, or Config.Allow)
	limits []*limiter   // those for the service port
}

type authzPolicy struct {
	policies string // every contributing policy, for denials
	rules    []authzRule
}

type authzRule struct {
	policy   string
	ids      []string
	prefixes []string
	tds      []string
	methods  []string
	paths    []pathMatcher
}

// verdict is what an authorization policy says about a caller's
// connection.
type verdict uint8

const (
	deny       verdict = iota
	admit              // every request of the connection
	perRequest         // only requests some method/path rule admits (HTTP)
)

func (r *authzRule) callerMatches(id, td string) bool {
	return slices.Contains(r.ids, id) || slices.Contains(r.tds, td) ||
		slices.ContainsFunc(r.prefixes, func(p string) bool { return strings.HasPrefix(id, p) })
}

func (r *authzRule) httpOnly() bool { return len(r.methods) > 0 || len(r.paths) > 0 }

// connection decides for a caller's connection; policy names the rule's
// policy that admits it wholesale.
func (a *authzPolicy) connection(id, td string) (v verdict, policy string) {
	for i := range a.rules {
		r := &a.rules[i]
		if !r.callerMatches(id, td) {
			continue
		}
		if !r.httpOnly() {
			return admit, r.policy
		}
		v = perRequest
	}
	return v, ""
}

// request decides for one HTTP request.
func (a *authzPolicy) request(id, td, method, path string) (bool, string) {
	for i := range a.rules {
		r := &a.rules[i]
		if !r.callerMatches(id, td) {
			continue
		}
		if len(r.methods) > 0 && !slices.Contains(r.methods, method) {
			continue
		}
		if len(r.paths) > 0 && !slices.ContainsFunc(r.paths, func(p pathMatcher) bool { return p.matches(path) }) {
			continue
		}
		return true, r.policy
	}
	return false, a.policies
}

// compileInbound builds the inbound policy for port. Buckets of limits
// that did not change are kept (limiters, owned by the caller's goroutine,
// maps their identity to them), so a policy update does not refill them.
// A path rule that does not compile admits nothing.
func compileInbound(p *policy.Service, port uint16, limiters map[string]*limiter) (*inboundPolicy, []error) {
	in := &inboundPolicy{}
	var errs []error
	if p == nil {
		clear(limiters)
		return in, nil
	}
	if az := p.Authz; az != nil {
		in.authz = &authzPolicy{policies: strings.Join(az.Policies, ",")}
		for _, r := range az.Rules {
			if len(r.Ports) > 0 && !slices.Contains(r.Ports, port) {
				continue
			}
			cr := authzRule{policy: r.Policy, ids: r.IDs, prefixes: r.Prefixes, tds: r.TrustDomains, methods: r.Methods}
			ok := true
			for _, pm := range r.Paths {
				rt, err := compileRoute(policy.Rule{Match: policy.Match{Path: &pm}})
				if err != nil {
					errs = append(errs, err)
					ok = false
					break
				}
				if rt.path.kind == "" {
					rt.path = pathMatcher{kind: policy.PathPrefix, value: ""} // "/" prefix: every path
				}
				cr.paths = append(cr.paths, rt.path)
			}
			if ok {
				in.authz.rules = append(in.authz.rules, cr)
			}
		}
	}
	seen := map[string]bool{}
	for _, l := range p.RateLimits {
		if l.Port != 0 && l.Port != port {
			continue
		}
		if l.RequestsPerSecond <= 0 {
			continue
		}
		k := l.Policy + "|" + strconv.Itoa(int(l.Port)) + "|" + strconv.FormatFloat(l.RequestsPerSecond, 'g', -1, 64) +
			"|" + strconv.Itoa(l.Burst) + "|" + strconv.FormatBool(l.PerCaller)
		seen[k] = true
		lm := limiters[k]
		if lm == nil {
			lm = newLimiter(l)
			limiters[k] = lm
		}
		in.limits = append(in.limits, lm)
	}
	for k := range limiters {
		if !seen[k] {
			delete(limiters, k)
		}
	}
	return in, errs
}

// maxCallers bounds a per-caller limiter's buckets; beyond it idle ones
// are evicted.
const maxCallers = 4096

// limiter is one RateLimit: a token bucket, or one per caller.
type limiter struct {
	policy    string
	rate      float64 // tokens per nanosecond
	burst     float64
	perCaller bool
	shared    bucket

	mu      sync.Mutex
	callers map[string]*bucket
}

func newLimiter(l policy.RateLimit) *limiter {
	lm := &limiter{policy: l.Policy, rate: l.RequestsPerSecond / 1e9, burst: max(float64(l.Burst), 1), perCaller: l.PerCaller}
	lm.shared.init(lm.burst)
	if l.PerCaller {
		lm.callers = map[string]*bucket{}
	}
	return lm
}

// bucket is a token bucket; a tiny mutex keeps take allocation-free.
type bucket struct {
	mu     sync.Mutex
	tokens float64
	last   int64 // nanoseconds on the sidecar's monotonic clock
}

func (b *bucket) init(burst float64) { b.tokens = burst }

// take takes one token at now, or says how long until one is there.
func (b *bucket) take(now int64, rate, burst float64) (bool, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if now > b.last {
		b.tokens = min(burst, b.tokens+float64(now-b.last)*rate)
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration(math.Ceil((1 - b.tokens) / rate))
}

// take takes a token for caller at now (nanoseconds).
func (l *limiter) take(now int64, caller string) (bool, time.Duration) {
	if !l.perCaller {
		return l.shared.take(now, l.rate, l.burst)
	}
	l.mu.Lock()
	b := l.callers[caller]
	if b == nil {
		if len(l.callers) >= maxCallers {
			l.evict(now)
		}
		b = &bucket{last: now}
		b.init(l.burst)
		l.callers[caller] = b
	}
	l.mu.Unlock()
	return b.take(now, l.rate, l.burst)
}

// evict drops the buckets that have refilled (idle long enough that a new
// bucket is the same), else the longest idle one (l.mu held).
func (l *limiter) evict(now int64) {
	full := int64(l.burst / l.rate)
	var oldest string
	oldestAt := int64(math.MaxInt64)
	for k, b := range l.callers {
		b.mu.Lock()
		last := b.last
		b.mu.Unlock()
		if now-last >= full {
			delete(l.callers, k)
			continue
		}
		if last < oldestAt {
			oldest, oldestAt = k, last
		}
	}
	if len(l.callers) >= maxCallers {
		delete(l.callers, oldest)
	}
}

// retryAfter is a wait in whole seconds, rounded up, at least 1.
func retryAfter(d time.Duration) string {
	return strconv.FormatInt(max(1, int64(math.Ceil(d.Seconds()))), 10)
}

// denyLog logs a refused caller once per window, in a bounded map.
type denyLog struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

const (
	denyLogWindow = 10 * time.Second
	denyLogMax    = 1024
)

// should reports whether a denial of caller at now is to be logged.
func (d *denyLog) should(caller string, now time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.seen == nil {
		d.seen = map[string]time.Time{}
	}
	if at, ok := d.seen[caller]; ok && now.Sub(at) < denyLogWindow {
		return false
	}
	if len(d.seen) >= denyLogMax {
		for k, at := range d.seen {
			if now.Sub(at) >= denyLogWindow {
				delete(d.seen, k)
			}
		}
		if len(d.seen) >= denyLogMax {
			return false // a flood of distinct callers: the metric counts them
		}
	}
	d.seen[caller] = now
	return true
}
