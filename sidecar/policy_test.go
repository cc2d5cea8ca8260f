package sidecar_test

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// TestInboundPolicy: the default admits the own and federated trust
// domains and refuses others; an allow list admits only its IDs. A refused
// caller's bytes never reach the app.
func TestInboundPolicy(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east", "north"}, [][2]string{{"west", "east"}})
	west, east, north := doms["west"], doms["east"], doms["north"]

	dflt := startBackend(t, east, "default", []spiffeid.TrustDomain{west.TD}, nil)
	listed := startBackend(t, east, "listed", []spiffeid.TrustDomain{west.TD}, []spiffeid.ID{west.ID("web")})

	tests := []struct {
		name   string
		caller *gatewaytest.Domain
		as     string
		target *backend
		ok     bool
	}{
		{"own trust domain", east, "web", dflt, true},
		{"federated trust domain", west, "web", dflt, true},
		{"other trust domain", north, "web", dflt, false},
		{"allow list admits its id", west, "web", listed, true},
		{"allow list refuses the rest of its domain", west, "rogue", listed, false},
		{"allow list refuses the own domain", east, "web", listed, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.target.app.hits.Load()
			src := tt.caller.Source(t, tt.as)
			// The caller trusts the server's domain, as a mesh client would.
			cfg := mtls.ClientConfig(src, mtls.MemberOf(east.TD))
			conn, err := net.DialTimeout("tcp", tt.target.inbound, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			tc := tls.Client(conn, cfg)
			body := ""
			err = tc.Handshake()
			if err == nil {
				_, err = io.WriteString(tc, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
			}
			if err == nil {
				var b []byte
				b, err = io.ReadAll(tc)
				body = string(b)
			}
			got := err == nil && strings.HasPrefix(body, "HTTP/1.1 200")
			if got != tt.ok {
				t.Fatalf("admitted=%v (err %v, answer %.40q), want %v", got, err, body, tt.ok)
			}
			if hits := tt.target.app.hits.Load() - before; !tt.ok && hits != 0 {
				t.Errorf("refused caller reached the app %d times", hits)
			}
		})
	}
	if n := metricSum(t, listed.sc.reg, "fedmesh_sidecar_inbound_connections_total"); n == 0 {
		t.Error("no inbound connection counted")
	}
}

// TestRetryBudgetUnderTotalOutage: every endpoint answers 503; retries
// stop at the default budget (20% of requests plus 10 per second), far
// below MaxAttempts per request. Attempts are counted at the apps.
func TestRetryBudgetUnderTotalOutage(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	var bs []*backend
	for _, n := range []string{"w1", "w2", "w3"} {
		b := startBackend(t, west, n, nil, nil)
		b.app.fail.Store(503)
		bs = append(bs, b)
	}
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{{Name: "west", Endpoints: eps(bs...)}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src,
		MaxAttempts: 5, NoActiveChecks: true, // default budget: 20% + 10/s over 10s
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	const n = 600
	start := time.Now()
	all := <-load("http://"+client.UpstreamAddr(0).String()+"/", 4, time.Millisecond, n, nil)
	elapsed := time.Since(start)
	var attempts int64
	for _, b := range bs {
		attempts += b.app.hits.Load()
	}
	for _, r := range all {
		if r.err != nil || r.status != 503 {
			t.Fatalf("request: status %d, err %v; want the endpoints' 503 passed through", r.status, r.err)
		}
	}
	// The run fits in one 10 s window, so every retry decision saw all
	// requests and retries so far: retries <= 0.2*n + 10/s*10s.
	if elapsed > 9*time.Second {
		t.Fatalf("run took %s, longer than the budget window: the bound below would not hold", elapsed)
	}
	limit := int64(float64(n)*1.2 + 100)
	retries := metricSum(t, client.reg, "fedmesh_sidecar_retries_total")
	exhausted := metricSum(t, client.reg, "fedmesh_sidecar_retry_budget_exhausted_total")
	t.Logf("%d requests in %s: %d attempts (limit %d, %d without a budget), %v retries, budget exhausted %v times",
		n, elapsed.Round(time.Millisecond), attempts, limit, n*5, retries, exhausted)
	if attempts > limit {
		t.Errorf("%d attempts for %d requests, budget allows at most %d", attempts, n, limit)
	}
	if attempts <= n || exhausted == 0 {
		t.Errorf("%d attempts, budget exhausted %v times: want retries up to the budget, then refusals", attempts, exhausted)
	}
	if int64(retries) != attempts-n {
		t.Errorf("retries metric %v, want %d", retries, attempts-n)
	}
}

// TestBadRemoteEndpointEjectedAlone: one of three directly reachable east
// endpoints answers 500; it alone is ejected, no request fails, the others
// keep serving.
func TestBadRemoteEndpointEjectedAlone(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	var bs []*backend
	for _, n := range []string{"east-1", "east-2", "east-3"} {
		bs = append(bs, startBackend(t, east, n, []spiffeid.TrustDomain{west.TD}, nil))
	}
	// The bad pod fails fast, the good ones take 2ms: latency-aware
	// balancing alone would favour the bad one (a black hole), so only
	// outlier detection keeps traffic away from it.
	bs[1].app.fail.Store(500)
	bs[0].app.delay.Store(int64(2 * time.Millisecond))
	bs[2].app.delay.Store(int64(2 * time.Millisecond))
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "west"}, // no local endpoints
		{Name: "east", RTT: endpoints.Duration(time.Millisecond), Endpoints: eps(bs...)},
	}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src,
		Outlier:   health.Config{BaseEjection: time.Minute}, // stays out for the test
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	all := <-load("http://"+client.UpstreamAddr(0).String()+"/", 4, time.Millisecond, 400, nil)
	for _, r := range all {
		if r.err != nil || r.status != 200 {
			t.Fatalf("request failed: status %d, err %v", r.status, r.err)
		}
	}
	st := client.State().Upstreams[0]
	for _, e := range st.Targets {
		wantEjected := e.Name == "east-2"
		if e.Outlier.Ejected != wantEjected {
			t.Errorf("%s ejected=%v (%+v), want %v", e.Name, e.Outlier.Ejected, e.Outlier, wantEjected)
		}
	}
	// Up to workers-1 requests may have been sent to it while the fifth
	// 5xx was on its way back.
	if got := bs[1].app.hits.Load(); got < health.DefaultConsecutive5xx || got > health.DefaultConsecutive5xx+3 {
		t.Errorf("bad endpoint got %d requests, want %d..%d before its ejection", got, health.DefaultConsecutive5xx, health.DefaultConsecutive5xx+3)
	}
	if bs[0].app.hits.Load() == 0 || bs[2].app.hits.Load() == 0 {
		t.Errorf("good endpoints served %d and %d requests, want both > 0", bs[0].app.hits.Load(), bs[2].app.hits.Load())
	}
}

// TestSheddingEndpointDoesNotDrawTraffic: of two endpoints, one refuses
// every request fast with 429 (a rate limit), the other answers 200 more
// slowly. Counted at its real latency the refusing one would look best and
// P2C over two endpoints would send it nearly everything; counted as slow
// (twice its EWMA per refusal) it gets a minority.
func TestSheddingEndpointDoesNotDrawTraffic(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	shed := startBackend(t, west, "shed", nil, nil)
	shed.app.fail.Store(http.StatusTooManyRequests)
	slow := startBackend(t, west, "slow", nil, nil)
	slow.app.delay.Store(int64(2 * time.Millisecond))
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{{Name: "west", Endpoints: eps(shed, slow)}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)
	// Paced like real traffic (each of 2 callers waits 5 ms between
	// requests), not a closed loop: there a fast refusal frees its caller
	// at once to send again, and refusals win by count whatever the picker.
	const n = 300
	all := <-load("http://"+client.UpstreamAddr(0).String()+"/", 2, 5*time.Millisecond, n, nil)
	ok := 0
	for _, r := range all {
		if r.err == nil && r.status == 200 {
			ok++
		}
	}
	t.Logf("%d requests: %d answered 200 by the slow endpoint, %d refused by the shedding one (hits %d / %d)",
		len(all), ok, len(all)-ok, slow.app.hits.Load(), shed.app.hits.Load())
	if ok < len(all)*3/4 {
		t.Errorf("only %d of %d requests reached the endpoint that serves: the shedding endpoint drew the traffic", ok, len(all))
	}
}
