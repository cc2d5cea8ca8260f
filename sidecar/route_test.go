package sidecar_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

func svcSet(name string, p *policy.Service, clusters ...endpoints.Cluster) endpoints.Set {
	return endpoints.Set{Namespace: "shop", Service: name, Port: 8080, Policy: p, Clusters: clusters}
}

func backendRef(kind, name string, weight int32) policy.Backend {
	return policy.Backend{Kind: kind, Namespace: "shop", Name: name, Port: 8080, Weight: weight}
}

func prefix(v string) policy.Match {
	return policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: v}}
}

// TestRouteWeightedSplitThroughGateway: a rule sends 80% to checkout-v1 as
// a Service (own cluster only, although v1 also runs in east) and 20% to
// checkout-v2 as a ServiceImport that only runs in east, behind a real
// gateway pair whose east side forwards only to checkout-v2: the tunnel
// header must name the backend's service, not the upstream's. 2,000
// requests land within 3 percentage points of the weights.
func TestRouteWeightedSplitThroughGateway(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	own := startBackend(t, west, "own", []spiffeid.TrustDomain{east.TD}, nil)
	v1 := startBackend(t, west, "v1-west", []spiffeid.TrustDomain{east.TD}, nil)
	v2 := startBackend(t, east, "v2-east", []spiffeid.TrustDomain{west.TD}, nil)

	eastCat := &gateway.StaticCatalog{}
	eastCat.Set("shop", "checkout-v2", 8080, gwEndpoints(v2)...)
	eastGW := startGateway(t, east, eastCat, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(t, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })

	eastGWCluster := endpoints.Cluster{Name: "east", Gateway: true, RTT: endpoints.Duration(time.Millisecond),
		Endpoints: []endpoints.Endpoint{{Name: "e", Ready: true}}}
	pol := &policy.Service{Namespace: "shop", Name: "checkout", Rules: []policy.Rule{{
		Route: "HTTPRoute shop/canary", Match: prefix("/"),
		Backends: []policy.Backend{backendRef(policy.KindService, "checkout-v1", 80), backendRef(policy.KindServiceImport, "checkout-v2", 20)},
	}}}
	src := &endpoints.Static{}
	src.Update(svcSet("checkout", pol, endpoints.Cluster{Name: "west", Endpoints: eps(own)}))
	src.Update(svcSet("checkout-v1", nil, endpoints.Cluster{Name: "west", Endpoints: eps(v1)}, eastGWCluster))
	src.Update(svcSet("checkout-v2", nil, endpoints.Cluster{Name: "west"}, eastGWCluster))
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	url := "http://" + client.UpstreamAddr(0).String() + "/"
	// The backends' sets arrive on their own watches, after the own one.
	waitFor(t, "both backends answer", 10*time.Second, func() bool {
		got := map[string]bool{}
		for _, r := range <-load(url, 2, 0, 60, nil) {
			got[r.by] = true
		}
		return got["v1-west"] && got["v2-east"]
	})

	const n = 2000
	by := map[string]int{}
	for _, r := range <-load(url, 8, 0, n, nil) {
		if r.err != nil || r.status != 200 {
			t.Fatalf("request failed: status %d, err %v", r.status, r.err)
		}
		by[r.by]++
	}
	share := float64(by["v1-west"]) / n * 100
	t.Logf("%d requests: %v (v1 %.1f%%, want 80 ± 3)", n, by, share)
	if share < 77 || share > 83 || by["v1-west"]+by["v2-east"] != n {
		t.Errorf("split %v: v1 %.1f%%, want 80 ± 3 and nothing elsewhere", by, share)
	}
	if got := metricSum(t, client.reg, "fedmesh_sidecar_route_requests_total"); got < n {
		t.Errorf("fedmesh_sidecar_route_requests_total = %v, want >= %d", got, n)
	}
}

// get sends one request through the client sidecar.
func get(t *testing.T, method, url string, hdr map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// TestRouteMatches: every match kind routes as written, first match wins,
// unmatched requests go to the upstream's own service; header modifiers
// change what the app receives and what the client gets back; a rule's
// timeouts and retry policy replace the sidecar's.
func TestRouteMatches(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	own := startBackend(t, west, "own", nil, nil)
	a := startBackend(t, west, "a", nil, nil)
	b := startBackend(t, west, "b", nil, nil)
	slow := startBackend(t, west, "slow", nil, nil)
	slow.app.delay.Store(int64(2 * time.Second))
	var flaky []*backend
	for _, n := range []string{"flaky-1", "flaky-2", "flaky-3", "flaky-4"} {
		f := startBackend(t, west, n, nil, nil)
		f.app.fail.Store(503)
		flaky = append(flaky, f)
	}
	to := func(name string) []policy.Backend { return []policy.Backend{backendRef(policy.KindService, name, 1)} }
	rules := []policy.Rule{
		{Route: "exact", Match: policy.Match{Path: &policy.PathMatch{Type: policy.PathExact, Value: "/exact"}}, Backends: to("a")},
		{Route: "prefix", Match: prefix("/foo/"), Backends: to("b")},
		{Route: "regex", Match: policy.Match{Path: &policy.PathMatch{Type: policy.PathRegex, Value: "/re/[0-9]+"}}, Backends: to("a")},
		{Route: "header", Match: policy.Match{Headers: []policy.ValueMatch{{Type: policy.MatchExact, Name: "x-env", Value: "canary"}}}, Backends: to("a")},
		{Route: "header-re", Match: policy.Match{Headers: []policy.ValueMatch{{Type: policy.MatchRegex, Name: "X-User", Value: "tester-.*"}}}, Backends: to("b")},
		{Route: "method", Match: policy.Match{Method: http.MethodDelete}, Backends: to("b")},
		{Route: "query", Match: policy.Match{Query: []policy.ValueMatch{{Type: policy.MatchExact, Name: "version", Value: "2"}}}, Backends: to("a")},
		{Route: "other-port", Port: 9090, Match: prefix("/port"), Backends: to("a")},
		{Route: "mods", Match: prefix("/mods"), Backends: to("b"),
			RequestHeaders:  &policy.HeaderModifier{Set: []policy.Header{{Name: "x-set", Value: "set"}}, Add: []policy.Header{{Name: "X-Add", Value: "added"}}, Remove: []string{"x-remove"}},
			ResponseHeaders: &policy.HeaderModifier{Set: []policy.Header{{Name: "X-Resp", Value: "r"}}, Remove: []string{"x-app-secret"}}},
		{Route: "timeout", Match: prefix("/timeout"), Backends: to("slow"), Timeout: policy.Duration(300 * time.Millisecond)},
		{Route: "backend-timeout", Match: prefix("/backend-timeout"), Backends: to("slow"), Timeout: policy.Duration(5 * time.Second),
			BackendTimeout: policy.Duration(200 * time.Millisecond), Retry: &policy.Retry{Attempts: 0}},
		{Route: "retry", Match: prefix("/retry"), Backends: to("flaky"), Retry: &policy.Retry{Attempts: 2, Codes: []int{503}}},
		{Route: "no-retry", Match: prefix("/no-retry"), Backends: to("flaky"), Retry: &policy.Retry{Attempts: 2, Codes: []int{500}}},
	}
	src := &endpoints.Static{}
	src.Update(svcSet("checkout", &policy.Service{Namespace: "shop", Name: "checkout", Rules: rules}, endpoints.Cluster{Name: "west", Endpoints: eps(own)}))
	for name, bs := range map[string][]*backend{"a": {a}, "b": {b}, "slow": {slow}, "flaky": flaky} {
		src.Update(svcSet(name, nil, endpoints.Cluster{Name: "west", Endpoints: eps(bs...)}))
	}
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	base := "http://" + client.UpstreamAddr(0).String()
	waitFor(t, "backend sets", 10*time.Second, func() bool {
		return get(t, "GET", base+"/exact", nil).Header.Get("X-Served-By") == "a" &&
			get(t, "GET", base+"/foo", nil).Header.Get("X-Served-By") == "b"
	})

	// /state lists the rules for this port in the order they are tried.
	st := client.State().Upstreams[0].Routes
	if len(st) != len(rules)-1 || st[0].Route != "exact" || st[0].Match != "Exact /exact" ||
		len(st[0].Backends) != 1 || st[0].Backends[0] != "Service shop/a:8080=1" ||
		st[3].Match != "header x-env Exact canary" {
		t.Errorf("/state routes: %+v", st)
	}
	for _, r := range st {
		if r.Route == "other-port" {
			t.Errorf("/state lists the rule for port 9090 on the 8080 upstream")
		}
	}

	tests := []struct {
		name, method, path string
		hdr                map[string]string
		want               string
	}{
		{"exact", "GET", "/exact", nil, "a"},
		{"exact is not a prefix", "GET", "/exact/more", nil, "own"},
		{"prefix itself", "GET", "/foo", nil, "b"},
		{"prefix with trailing slash", "GET", "/foo/", nil, "b"},
		{"prefix subpath", "GET", "/foo/bar", nil, "b"},
		{"prefix is per segment", "GET", "/foobar", nil, "own"},
		{"regex", "GET", "/re/42", nil, "a"},
		{"regex matches whole path", "GET", "/re/42/x", nil, "own"},
		{"header name is case-insensitive", "GET", "/", map[string]string{"X-ENV": "canary"}, "a"},
		{"header value is exact", "GET", "/", map[string]string{"X-Env": "Canary"}, "own"},
		{"header regex", "GET", "/", map[string]string{"x-user": "tester-7"}, "b"},
		{"method", "DELETE", "/", nil, "b"},
		{"query", "GET", "/?a=1&version=2", nil, "a"},
		{"query other value", "GET", "/?version=3", nil, "own"},
		{"rule for another port", "GET", "/port", nil, "own"},
		{"first match wins", "GET", "/exact", map[string]string{"X-User": "tester-1"}, "a"},
		{"nothing matches", "GET", "/", nil, "own"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := get(t, tt.method, base+tt.path, tt.hdr)
			if got := resp.Header.Get("X-Served-By"); got != tt.want || resp.StatusCode != 200 {
				t.Errorf("%s %s %v: served by %q (status %d), want %q", tt.method, tt.path, tt.hdr, got, resp.StatusCode, tt.want)
			}
		})
	}

	t.Run("header modifiers", func(t *testing.T) {
		resp := get(t, "GET", base+"/mods", map[string]string{"X-Echo": "1", "X-Set": "original", "X-Add": "first", "X-Remove": "gone"})
		h := resp.Header
		if got := h.Get("Echo-X-Set"); got != "set" {
			t.Errorf("app saw X-Set %q, want set", got)
		}
		if got := h.Values("Echo-X-Add"); strings.Join(got, ",") != "first,added" {
			t.Errorf("app saw X-Add %q, want first,added", got)
		}
		if got := h.Get("Echo-X-Remove"); got != "" {
			t.Errorf("app saw X-Remove %q, want it removed", got)
		}
		if h.Get("X-Resp") != "r" || h.Get("X-App-Secret") != "" {
			t.Errorf("client got X-Resp %q, X-App-Secret %q; want r and nothing", h.Get("X-Resp"), h.Get("X-App-Secret"))
		}
		if own := get(t, "GET", base+"/", map[string]string{"X-Echo": "1"}); own.Header.Get("X-App-Secret") == "" {
			t.Error("response modifier applied outside its rule")
		}
	})

	for _, path := range []string{"/timeout", "/backend-timeout"} {
		t.Run("rule"+path, func(t *testing.T) {
			start := time.Now()
			resp := get(t, "GET", base+path, nil)
			if took := time.Since(start); resp.StatusCode != http.StatusGatewayTimeout || took > 1500*time.Millisecond {
				t.Errorf("status %d after %s, want 504 well before the app's 2s", resp.StatusCode, took)
			}
		})
	}

	hits := func() (n int64) {
		for _, f := range flaky {
			n += f.app.hits.Load()
		}
		return n
	}
	t.Run("retry codes", func(t *testing.T) {
		h0 := hits()
		if resp := get(t, "GET", base+"/retry", nil); resp.StatusCode != 503 {
			t.Errorf("status %d, want the last 503", resp.StatusCode)
		}
		if n := hits() - h0; n != 3 {
			t.Errorf("%d attempts, want 1 + 2 retries", n)
		}
		h0 = hits()
		if resp := get(t, "GET", base+"/no-retry", nil); resp.StatusCode != 503 {
			t.Errorf("status %d, want 503 passed through", resp.StatusCode)
		}
		if n := hits() - h0; n != 1 {
			t.Errorf("%d attempts, want 1: 503 is not among the rule's retried codes", n)
		}
	})
}

// TestRouteTCPSplit: a TCP upstream splits connections by the weights of a
// match-all rule and ignores rules it cannot evaluate (a header match).
func TestRouteTCPSplit(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	own := startBackend(t, west, "own", nil, nil)
	a := startBackend(t, west, "a", nil, nil)
	b := startBackend(t, west, "b", nil, nil)
	src := &endpoints.Static{}
	src.Update(svcSet("checkout", &policy.Service{Namespace: "shop", Name: "checkout", Rules: []policy.Rule{
		{Route: "header", Match: policy.Match{Headers: []policy.ValueMatch{{Name: "X-A", Value: "1"}}}, Backends: []policy.Backend{backendRef(policy.KindService, "own", 1)}},
		{Route: "split", Backends: []policy.Backend{backendRef(policy.KindService, "a", 3), backendRef(policy.KindServiceImport, "b", 1)}},
	}}, endpoints.Cluster{Name: "west", Endpoints: eps(own)}))
	src.Update(svcSet("a", nil, endpoints.Cluster{Name: "west", Endpoints: eps(a)}))
	src.Update(svcSet("b", nil, endpoints.Cluster{Name: "west", Endpoints: eps(b)}))
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolTCP}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	addr := client.UpstreamAddr(0).String()
	conn := func() string { // one request on a connection of its own
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("connection failed: %v", err)
		}
		resp.Body.Close()
		return resp.Header.Get("X-Served-By")
	}
	waitFor(t, "backend sets", 10*time.Second, func() bool {
		got := map[string]bool{}
		for range 40 {
			got[conn()] = true
		}
		return got["a"] && got["b"]
	})
	const n = 300
	by := map[string]int{}
	for range n {
		by[conn()]++
	}
	share := float64(by["a"]) / n * 100
	t.Logf("%d connections: %v: a %.1f%% (want 75)", n, by, share)
	if by["own"] != 0 || share < 67 || share > 83 {
		t.Errorf("split %v: a %.1f%%, want 75 ± 8 and nothing to own", by, share)
	}
}
