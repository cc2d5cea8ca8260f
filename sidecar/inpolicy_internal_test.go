package sidecar

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

func TestBucket(t *testing.T) {
	testutil.CheckGoroutines(t)
	l := newLimiter(policy.RateLimit{Policy: "p", RequestsPerSecond: 10, Burst: 3})
	const s = int64(time.Second)
	now := 5 * s
	var got []bool
	for range 4 {
		ok, _ := l.take(now, "")
		got = append(got, ok)
	}
	if fmt.Sprint(got) != "[true true true false]" {
		t.Fatalf("burst of 3: %v", got)
	}
	if _, wait := l.take(now, ""); wait != 100*time.Millisecond {
		t.Errorf("wait %s, want 100ms at 10/s", wait)
	}
	if ok, _ := l.take(now+s/10, ""); !ok {
		t.Error("no token after 100ms at 10/s")
	}
	if ok, _ := l.take(now+100*s, ""); !ok {
		t.Error("no token after a long pause")
	}
	n := 0
	for range 10 {
		if ok, _ := l.take(now+100*s, ""); ok {
			n++
		}
	}
	if n != 2 {
		t.Errorf("refill is capped at the burst: %d more tokens, want 2", n)
	}
	if got := retryAfter(100 * time.Millisecond); got != "1" {
		t.Errorf("Retry-After %s, want 1 (rounded up)", got)
	}
	if got := retryAfter(2100 * time.Millisecond); got != "3" {
		t.Errorf("Retry-After %s, want 3", got)
	}
}

func TestPerCallerBucketsBounded(t *testing.T) {
	testutil.CheckGoroutines(t)
	l := newLimiter(policy.RateLimit{Policy: "p", RequestsPerSecond: 1, Burst: 1, PerCaller: true})
	now := int64(time.Hour)
	for i := range maxCallers + 100 {
		if ok, _ := l.take(now, fmt.Sprint("caller-", i)); !ok {
			t.Fatalf("caller %d: no token in its own bucket", i)
		}
	}
	if len(l.callers) > maxCallers {
		t.Fatalf("%d buckets, bound %d", len(l.callers), maxCallers)
	}
	if ok, _ := l.take(now, fmt.Sprint("caller-", maxCallers+99)); ok {
		t.Error("a recent caller's bucket was evicted or refilled")
	}
	// Once idle long enough to have refilled, buckets are evicted together.
	if ok, _ := l.take(now+int64(2*time.Second), "new"); !ok || len(l.callers) > maxCallers {
		t.Errorf("after idling: ok=%v, %d buckets", ok, len(l.callers))
	}
}

func TestDenyLogOncePerWindow(t *testing.T) {
	testutil.CheckGoroutines(t)
	var d denyLog
	t0 := time.Now()
	if !d.should("a", t0) || d.should("a", t0.Add(time.Second)) || !d.should("b", t0) {
		t.Fatal("want the first denial of each caller logged, not the second")
	}
	if !d.should("a", t0.Add(denyLogWindow)) {
		t.Error("not logged again after the window")
	}
	for i := range 2 * denyLogMax {
		d.should(fmt.Sprint(i), t0)
	}
	if len(d.seen) > denyLogMax {
		t.Errorf("%d entries, bound %d", len(d.seen), denyLogMax)
	}
}

func TestAuthzDecisions(t *testing.T) {
	testutil.CheckGoroutines(t)
	in, errs := compileInbound(&policy.Service{Authz: &policy.Authorization{Policies: []string{"ns/a", "ns/b"}, Rules: []policy.AuthzRule{
		{Policy: "ns/a", IDs: []string{"spiffe://w/ns/shop/sa/web"}},
		{Policy: "ns/b", Prefixes: []string{"spiffe://w/ns/ops/"}, Methods: []string{"GET"}, Paths: []policy.PathMatch{{Type: policy.PathPrefix, Value: "/metrics"}}},
		{Policy: "ns/c", TrustDomains: []string{"east"}, Ports: []uint16{9090}},
		{Policy: "ns/d", TrustDomains: []string{"north"}, Ports: []uint16{8080}},
		{Policy: "ns/bad", TrustDomains: []string{"south"}, Paths: []policy.PathMatch{{Type: policy.PathRegex, Value: "("}}},
	}}}, 8080, map[string]*limiter{})
	if len(errs) != 1 {
		t.Errorf("errors %v, want the bad regex", errs)
	}
	a := in.authz
	for _, tt := range []struct {
		id, td string
		want   verdict
	}{
		{"spiffe://w/ns/shop/sa/web", "w", admit},
		{"spiffe://w/ns/ops/sa/prom", "w", perRequest},
		{"spiffe://east/ns/x/sa/y", "east", deny},    // port 9090 only
		{"spiffe://north/ns/x/sa/y", "north", admit}, // port 8080
		{"spiffe://south/ns/x/sa/y", "south", deny},  // its rule did not compile
		{"spiffe://w/ns/shop/sa/webby", "w", deny},
	} {
		if v, _ := a.connection(tt.id, tt.td); v != tt.want {
			t.Errorf("%s: verdict %d, want %d", tt.id, v, tt.want)
		}
	}
	for _, tt := range []struct {
		method, path string
		want         bool
	}{{"GET", "/metrics", true}, {"GET", "/metrics/x", true}, {"GET", "/metricsx", false}, {"POST", "/metrics", false}} {
		if ok, _ := a.request("spiffe://w/ns/ops/sa/prom", "w", tt.method, tt.path); ok != tt.want {
			t.Errorf("%s %s: %v, want %v", tt.method, tt.path, ok, tt.want)
		}
	}
	if _, by := a.request("spiffe://x/y", "x", "GET", "/"); by != "ns/a,ns/b" {
		t.Errorf("denial names %q, want every policy", by)
	}
}

func TestLimitersSurvivePolicyUpdates(t *testing.T) {
	testutil.CheckGoroutines(t)
	lims := map[string]*limiter{}
	p := &policy.Service{RateLimits: []policy.RateLimit{{Policy: "a", RequestsPerSecond: 1, Burst: 1}, {Policy: "b", Port: 9090, RequestsPerSecond: 1, Burst: 1}}}
	in1, _ := compileInbound(p, 8080, lims)
	in2, _ := compileInbound(p, 8080, lims)
	if len(in1.limits) != 1 || in1.limits[0] != in2.limits[0] {
		t.Fatalf("limits %v then %v: want the one for port 8080, kept", in1.limits, in2.limits)
	}
	p.RateLimits[0].RequestsPerSecond = 2
	if in3, _ := compileInbound(p, 8080, lims); in3.limits[0] == in1.limits[0] || len(lims) != 1 {
		t.Error("a changed limit kept its old bucket, or the old one was not dropped")
	}
}

func TestRouteMatching(t *testing.T) {
	testutil.CheckGoroutines(t)
	mk := func(m policy.Match) *route {
		rt, err := compileRoute(policy.Rule{Match: m})
		if err != nil {
			t.Fatal(err)
		}
		return rt
	}
	req := func(method, target string, hdr ...string) *http.Request {
		u, _ := url.ParseRequestURI(target)
		r := &http.Request{Method: method, URL: u, Header: http.Header{}}
		for i := 0; i+1 < len(hdr); i += 2 {
			r.Header.Add(hdr[i], hdr[i+1])
		}
		return r
	}
	prefix := func(v string) policy.Match {
		return policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: v}}
	}
	tests := []struct {
		name  string
		match policy.Match
		req   *http.Request
		want  bool
	}{
		{"prefix root", prefix("/"), req("GET", "/anything"), true},
		{"prefix equal", prefix("/foo"), req("GET", "/foo"), true},
		{"prefix segment", prefix("/foo"), req("GET", "/foo/bar"), true},
		{"prefix not a segment", prefix("/foo"), req("GET", "/foobar"), false},
		{"prefix with slash", prefix("/foo/"), req("GET", "/foo"), true},
		{"exact", policy.Match{Path: &policy.PathMatch{Type: policy.PathExact, Value: "/a"}}, req("GET", "/a/"), false},
		{"regex anchored", policy.Match{Path: &policy.PathMatch{Type: policy.PathRegex, Value: "/v[0-9]"}}, req("GET", "/v1x"), false},
		{"method", policy.Match{Method: "POST"}, req("GET", "/"), false},
		{"header case", policy.Match{Headers: []policy.ValueMatch{{Name: "x-a", Value: "1"}}}, req("GET", "/", "X-A", "1"), true},
		{"header first value", policy.Match{Headers: []policy.ValueMatch{{Name: "X-A", Value: "2"}}}, req("GET", "/", "X-A", "1", "X-A", "2"), false},
		{"header missing", policy.Match{Headers: []policy.ValueMatch{{Name: "X-A", Type: policy.MatchRegex, Value: ".*"}}}, req("GET", "/"), false},
		{"query escaped", policy.Match{Query: []policy.ValueMatch{{Name: "a b", Value: "c&d"}}}, req("GET", "/?x=1&a+b=c%26d"), true},
		{"query name exact", policy.Match{Query: []policy.ValueMatch{{Name: "A", Value: "1"}}}, req("GET", "/?a=1"), false},
		{"query regex", policy.Match{Query: []policy.ValueMatch{{Name: "v", Type: policy.MatchRegex, Value: "[23]"}}}, req("GET", "/?v=3"), true},
		{"all set", policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/x"}, Method: "GET",
			Headers: []policy.ValueMatch{{Name: "h", Value: "v"}}, Query: []policy.ValueMatch{{Name: "q", Value: "1"}}},
			req("GET", "/x/y?q=1", "H", "v"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := mk(tt.match).matches(tt.req); got != tt.want {
				t.Errorf("matches = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestOrderClusters(t *testing.T) {
	testutil.CheckGoroutines(t)
	cl := func(name string, rtt time.Duration) endpoints.Cluster {
		return endpoints.Cluster{Name: name, RTT: endpoints.Duration(rtt)}
	}
	// "new" has no RTT measured yet: after every measured cluster.
	in := []endpoints.Cluster{cl("new", 0), cl("far", 50*time.Millisecond), cl("near", time.Millisecond), cl("home", 0), cl("mid", 10*time.Millisecond)}
	names := func(cs []endpoints.Cluster) (out []string) {
		for _, c := range cs {
			out = append(out, c.Name)
		}
		return out
	}
	for _, tt := range []struct {
		order []string
		want  []string
	}{
		{nil, []string{"home", "near", "mid", "far", "new"}},
		{[]string{"far"}, []string{"home", "far", "near", "mid", "new"}},
		{[]string{"mid", "far", "home"}, []string{"home", "mid", "far", "near", "new"}},
		{[]string{"new"}, []string{"home", "new", "near", "mid", "far"}},
	} {
		cs := append([]endpoints.Cluster(nil), in...)
		orderClusters(cs, "home", tt.order)
		if diff := cmp.Diff(tt.want, names(cs)); diff != "" {
			t.Errorf("order %v (-want +got):\n%s", tt.order, diff)
		}
	}
}

// TestFailoverPolicyOnSet: a set's FailoverPolicy orders remote clusters,
// replaces the overprovisioning factor of both views and the outlier
// settings of new health groups; without one, today's defaults return.
func TestFailoverPolicyOnSet(t *testing.T) {
	testutil.CheckGoroutines(t)
	m, err := newMetrics(imetrics.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	s := &Sidecar{cfg: Config{Cluster: "home", MaxIdlePerTarget: 1, HandshakeTimeout: time.Second}, log: slog.New(slog.DiscardHandler), m: m, own: newOwner()}
	t.Cleanup(s.own.stop) // the gateway targets' prewarm dials
	p := newBackendPool(s, "shop", "checkout", 8080)
	set := endpoints.Set{Namespace: "shop", Service: "checkout", Clusters: []endpoints.Cluster{
		{Name: "near", Gateway: true, RTT: endpoints.Duration(time.Millisecond), Endpoints: []endpoints.Endpoint{{Name: "n", Ready: true}}},
		{Name: "far", Gateway: true, RTT: endpoints.Duration(50 * time.Millisecond), Endpoints: []endpoints.Endpoint{{Name: "f", Ready: true}}},
		{Name: "home", Endpoints: []endpoints.Endpoint{{Name: "h1", Addr: "127.0.0.1:1", Ready: true}, {Name: "h2", Addr: "127.0.0.1:2", Ready: true}}},
	}, Policy: &policy.Service{Failover: &policy.Failover{Policy: "shop/fo", ClusterOrder: []string{"far"}, Overprovisioning: 2, Consecutive5xx: 2}}}
	order := func() (out []string) {
		for _, prio := range p.all.Targets() {
			out = append(out, prio[0].Cluster)
		}
		return out
	}
	p.apply(set)
	if diff := cmp.Diff([]string{"home", "far", "near"}, order()); diff != "" {
		t.Errorf("priorities (-want +got):\n%s", diff)
	}
	if p.all.Overprovisioning() != 2 || p.local.Overprovisioning() != 2 {
		t.Errorf("overprovisioning %v/%v, want 2", p.all.Overprovisioning(), p.local.Overprovisioning())
	}
	if ts := p.local.Targets(); len(ts) != 1 || len(ts[0]) != 2 || ts[0][0].Cluster != "home" {
		t.Errorf("local view %v, want the two home targets", ts)
	}
	h := p.all.Targets()[0][0]
	h.Outlier.Report(health.ServerFailure)
	h.Outlier.Report(health.ServerFailure)
	if !h.Outlier.Ejected(time.Now()) {
		t.Error("not ejected after the policy's 2 consecutive 5xx")
	}
	set.Policy = nil
	p.apply(set)
	if diff := cmp.Diff([]string{"home", "near", "far"}, order()); diff != "" {
		t.Errorf("priorities without a policy (-want +got):\n%s", diff)
	}
	if p.all.Overprovisioning() != balancer.DefaultOverprovisioning {
		t.Errorf("overprovisioning %v, want the default back", p.all.Overprovisioning())
	}
}

// BenchmarkRateLimit: tokens taken from a shared bucket and from a
// per-caller bucket by 4 goroutines at once; reports ns and allocations per
// take (measured inside one iteration, so `-benchtime 1x` gives figures).
func BenchmarkRateLimit(b *testing.B) {
	for b.Loop() {
		for _, perCaller := range []bool{false, true} {
			l := newLimiter(policy.RateLimit{Policy: "p", RequestsPerSecond: 1e6, Burst: 100, PerCaller: perCaller})
			epoch := time.Now()
			const workers, n = 4, 100_000
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			m0, t0 := ms.Mallocs, time.Now()
			var wg sync.WaitGroup
			for w := range workers {
				caller := fmt.Sprint("spiffe://west.fedmesh.test/ns/shop/sa/web-", w)
				wg.Go(func() {
					for range n {
						l.take(int64(time.Since(epoch)), caller)
					}
				})
			}
			wg.Wait()
			d := time.Since(t0)
			runtime.ReadMemStats(&ms)
			name := "shared"
			if perCaller {
				name = "per-caller"
			}
			b.ReportMetric(float64(d.Nanoseconds())/(workers*n), name+"-ns-per-take")
			b.ReportMetric(float64(ms.Mallocs-m0-workers*4)/(workers*n), name+"-allocs-per-take")
		}
	}
}
