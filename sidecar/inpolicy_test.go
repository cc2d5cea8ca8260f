package sidecar_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// policyServer is an app behind a server sidecar that serves shop/checkout
// on port 8080 and takes its inbound policy from src.
func policyServer(t *testing.T, dom *gatewaytest.Domain, name, proto string, federated []spiffeid.TrustDomain, src endpoints.Source) *backend {
	t.Helper()
	a := startApp(t, name, "")
	sc := startSidecar(t, name, sidecar.Config{
		Cluster: dom.Cluster, TrustDomain: dom.TD, Federated: federated,
		Source: dom.Source(t, "web"), InboundAddr: "127.0.0.1:0", AppAddr: a.addr(),
		Service: sidecar.ServiceName{Namespace: "shop", Name: "checkout"}, ServicePort: 8080,
		InboundProtocol: proto, Endpoints: src,
	})
	return &backend{name: name, app: a, sc: sc, inbound: sc.InboundAddr().String(), appAddr: a.addr()}
}

// caller is a workload's mTLS client to a server sidecar's inbound.
func callerConfig(t *testing.T, dom *gatewaytest.Domain, as string, server spiffeid.TrustDomain) *tls.Config {
	return mtls.ClientConfig(dom.Source(t, as), mtls.MemberOf(server))
}

// exchange sends raw HTTP requests on one mTLS connection and returns the
// answers, or the error that ended the connection.
func exchange(t *testing.T, cfg *tls.Config, addr string, reqs ...string) ([]*http.Response, error) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, err
	}
	br := bufio.NewReader(tc)
	var out []*http.Response
	for _, r := range reqs {
		if _, err := io.WriteString(tc, r); err != nil {
			return out, err
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return out, err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body = io.NopCloser(strings.NewReader(string(b)))
		out = append(out, resp)
	}
	return out, nil
}

func isResetErr(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func request(method, path string, hdr ...string) string {
	return method + " " + path + " HTTP/1.1\r\nHost: checkout\r\n" + strings.Join(hdr, "") + "\r\n"
}

// TestInboundAuthorizationPolicy: under an AuthorizationPolicy a caller an
// ID rule admits passes on HTTP and TCP inbounds; a caller only method/path
// rules admit gets 403 on HTTP for other requests (naming it and the
// policy) and a reset on TCP; a caller no rule admits, or only a rule for
// another port, gets 403 on HTTP (an HTTP answer, which its sidecar passes
// on, rather than a reset it would retry in another cluster) and is reset
// on TCP right after the handshake. Refused bytes never reach the app.
func TestInboundAuthorizationPolicy(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Policy: &policy.Service{
		Namespace: "shop", Name: "checkout",
		Authz: &policy.Authorization{Policies: []string{"shop/web", "shop/public", "shop/metrics"}, Rules: []policy.AuthzRule{
			{Policy: "shop/web", IDs: []string{west.ID("web").String()}},
			{Policy: "shop/public", TrustDomains: []string{east.TD.Name()}, Methods: []string{"GET"},
				Paths: []policy.PathMatch{{Type: policy.PathPrefix, Value: "/public"}}},
			{Policy: "shop/metrics", Prefixes: []string{west.ID("rogue").String()}, Ports: []uint16{9090}},
		}},
	}})
	fed := []spiffeid.TrustDomain{east.TD}
	httpSrv := policyServer(t, west, "http", sidecar.ProtocolHTTP, fed, src)
	tcpSrv := policyServer(t, west, "tcp", sidecar.ProtocolTCP, fed, src)
	waitFor(t, "policy in force", 5*time.Second, func() bool {
		resps, err := exchange(t, callerConfig(t, west, "rogue", west.TD), httpSrv.inbound, request("GET", "/"))
		return err == nil && len(resps) == 1 && resps[0].StatusCode == http.StatusForbidden
	})

	tests := []struct {
		name    string
		caller  *gatewaytest.Domain
		as      string
		srv     *backend
		req     string
		want    int // status; 0 = reset
		wantIn  []string
		reaches bool
	}{
		{"id rule, http", west, "web", httpSrv, request("POST", "/private", "Content-Length: 2\r\n") + "ok", 200, nil, true},
		{"id rule, tcp", west, "web", tcpSrv, request("GET", "/private"), 200, nil, true},
		{"path rule admits its path", east, "web", httpSrv, request("GET", "/public/x"), 200, nil, true},
		{"path rule: other path", east, "web", httpSrv, request("GET", "/private"), 403, []string{east.ID("web").String(), "shop/web,shop/public,shop/metrics"}, false},
		{"path rule: segment semantics", east, "web", httpSrv, request("GET", "/publicity"), 403, nil, false},
		{"path rule: other method", east, "web", httpSrv, request("DELETE", "/public/x"), 403, nil, false},
		{"path rule cannot admit tcp", east, "web", tcpSrv, request("GET", "/public/x"), 0, nil, false},
		{"only a rule for another port, http", west, "rogue", httpSrv, request("GET", "/public/x"), 403, []string{west.ID("rogue").String()}, false},
		{"only a rule for another port, tcp", west, "rogue", tcpSrv, request("GET", "/"), 0, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.srv.app.hits.Load()
			resps, err := exchange(t, callerConfig(t, tt.caller, tt.as, west.TD), tt.srv.inbound, tt.req)
			if tt.want == 0 {
				if err == nil || !isResetErr(err) {
					t.Fatalf("got %d answers, err %v; want a reset", len(resps), err)
				}
			} else {
				if err != nil {
					t.Fatalf("err %v, want status %d", err, tt.want)
				}
				body, _ := io.ReadAll(resps[0].Body)
				if resps[0].StatusCode != tt.want {
					t.Fatalf("status %d (%s), want %d", resps[0].StatusCode, body, tt.want)
				}
				for _, s := range tt.wantIn {
					if !strings.Contains(string(body), s) {
						t.Errorf("body %q does not name %q", body, s)
					}
				}
			}
			if hits := tt.srv.app.hits.Load() - before; (hits > 0) != tt.reaches {
				t.Errorf("app hits %d, want reached=%v", hits, tt.reaches)
			}
		})
	}

	t.Run("keep-alive mixes admitted and refused requests", func(t *testing.T) {
		resps, err := exchange(t, callerConfig(t, east, "web", west.TD), httpSrv.inbound,
			request("GET", "/public/a"), request("GET", "/admin"), request("GET", "/public/b"))
		if err != nil {
			t.Fatal(err)
		}
		var got []int
		for _, r := range resps {
			got = append(got, r.StatusCode)
		}
		if fmt.Sprint(got) != "[200 403 200]" {
			t.Errorf("statuses %v, want [200 403 200]", got)
		}
	})
	if n := metricSum(t, httpSrv.sc.reg, "fedmesh_sidecar_authz_decisions_total"); n == 0 {
		t.Error("no authz decision counted")
	}
	if n := strings.Count(httpSrv.sc.logs.String(), "refused by policy"); n == 0 || n > 2 {
		t.Errorf("refusals logged %d times, want once per caller (2 callers)", n)
	}
}

// TestInboundRateLimit: a shared limit of 40/s with a burst of 10 holds
// within 5% under 3 s of load far above it; refused requests get 429 with
// Retry-After; a per-caller limit gives each caller its own bucket and
// answers gRPC with RESOURCE_EXHAUSTED; a TCP inbound resets a connection
// over its limit.
func TestInboundRateLimit(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	shared, perCaller, tcp := &endpoints.Static{}, &endpoints.Static{}, &endpoints.Static{}
	set := func(src *endpoints.Static, l policy.RateLimit) {
		src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080,
			Policy: &policy.Service{Namespace: "shop", Name: "checkout", RateLimits: []policy.RateLimit{l}}})
	}
	const rate, burst = 40, 10
	set(shared, policy.RateLimit{Policy: "shop/shared", RequestsPerSecond: rate, Burst: burst})
	set(perCaller, policy.RateLimit{Policy: "shop/per-caller", RequestsPerSecond: 0.2, Burst: 1, PerCaller: true})
	set(tcp, policy.RateLimit{Policy: "shop/tcp", Port: 8080, RequestsPerSecond: 0.2, Burst: 1})
	sharedSrv := policyServer(t, west, "shared", sidecar.ProtocolHTTP, nil, shared)
	perSrv := policyServer(t, west, "per-caller", sidecar.ProtocolHTTP, nil, perCaller)
	tcpSrv := policyServer(t, west, "tcp", sidecar.ProtocolTCP, nil, tcp)
	for _, b := range []*backend{sharedSrv, perSrv, tcpSrv} {
		waitFor(t, "policy in force", 5*time.Second, func() bool { return strings.Contains(b.sc.logs.String(), "rateLimits=1") })
	}

	t.Run("shared limit under load", func(t *testing.T) {
		cfg := callerConfig(t, west, "web", west.TD)
		tr := &http.Transport{MaxIdleConnsPerHost: 8, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", sharedSrv.inbound)
			if err != nil {
				return nil, err
			}
			tc := tls.Client(c, cfg)
			return tc, tc.HandshakeContext(ctx)
		}}
		defer tr.CloseIdleConnections()
		client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
		var ok, limited, other atomic.Int64
		var badRetry atomic.Value
		var mu sync.Mutex
		var first, last time.Time // sends: the bucket is full at the first one
		const d = 3 * time.Second
		stop := time.Now().Add(d)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for n := 0; n < 5000 && time.Now().Before(stop); n++ {
					sent := time.Now()
					mu.Lock()
					if first.IsZero() || sent.Before(first) {
						first = sent
					}
					if sent.After(last) {
						last = sent
					}
					mu.Unlock()
					resp, err := client.Get("http://checkout/")
					if err != nil {
						other.Add(1)
						continue
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					switch resp.StatusCode {
					case 200:
						ok.Add(1)
					case 429:
						limited.Add(1)
						if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || ra < 1 {
							badRetry.Store(resp.Header.Get("Retry-After"))
						}
					default:
						other.Add(1)
					}
					time.Sleep(time.Millisecond)
				}
			})
		}
		wg.Wait()
		elapsed := last.Sub(first)
		want := rate*elapsed.Seconds() + burst
		t.Logf("%s: %d admitted (expected %.0f), %d limited, %d other", elapsed.Round(time.Millisecond), ok.Load(), want, limited.Load(), other.Load())
		if got := float64(ok.Load()); got > want*1.05 || got < want*0.95 {
			t.Errorf("%v admitted, want %.0f ± 5%%", got, want)
		}
		if limited.Load() < 4*int64(want) || other.Load() != 0 {
			t.Errorf("%d limited, %d other: the load was not well above the limit or requests failed", limited.Load(), other.Load())
		}
		if v := badRetry.Load(); v != nil {
			t.Errorf("429 with Retry-After %q", v)
		}
		if got := sharedSrv.app.hits.Load(); got != ok.Load() {
			t.Errorf("app saw %d requests, %d were admitted", got, ok.Load())
		}
		if n := metricSum(t, sharedSrv.sc.reg, "fedmesh_sidecar_ratelimited_total"); int64(n) != limited.Load() {
			t.Errorf("fedmesh_sidecar_ratelimited_total = %v, want %d", n, limited.Load())
		}
	})

	t.Run("per caller", func(t *testing.T) {
		a := callerConfig(t, west, "web", west.TD)
		resps, err := exchange(t, a, perSrv.inbound, request("GET", "/"), request("GET", "/"),
			request("POST", "/shop.Checkout/Pay", "Content-Type: application/grpc+proto\r\nContent-Length: 0\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		if resps[0].StatusCode != 200 || resps[1].StatusCode != 429 || resps[1].Header.Get("Retry-After") != "5" {
			t.Errorf("statuses %d, %d (Retry-After %q), want 200 then 429 after 5s", resps[0].StatusCode, resps[1].StatusCode, resps[1].Header.Get("Retry-After"))
		}
		g := resps[2]
		if g.StatusCode != 200 || g.Header.Get("Grpc-Status") != "8" || g.Header.Get("Grpc-Message") == "" {
			t.Errorf("gRPC answer %d %v, want 200 with grpc-status 8 and a message", g.StatusCode, g.Header)
		}
		b := callerConfig(t, west, "rogue", west.TD)
		if resps, err := exchange(t, b, perSrv.inbound, request("GET", "/")); err != nil || resps[0].StatusCode != 200 {
			t.Errorf("second caller: %v, %v; want its own bucket", resps, err)
		}
	})

	t.Run("tcp connection over the limit is reset", func(t *testing.T) {
		cfg := callerConfig(t, west, "web", west.TD)
		if resps, err := exchange(t, cfg, tcpSrv.inbound, request("GET", "/")); err != nil || resps[0].StatusCode != 200 {
			t.Fatalf("first connection: %v, %v", resps, err)
		}
		before := tcpSrv.app.hits.Load()
		if _, err := exchange(t, cfg, tcpSrv.inbound, request("GET", "/")); !isResetErr(err) {
			t.Fatalf("second connection: err %v, want a reset", err)
		}
		if tcpSrv.app.hits.Load() != before {
			t.Error("a limited connection reached the app")
		}
	})
}

// TestInboundPolicyChangeAppliesToOpenConnections: a caller admitted on a
// connection that stays open (a pooled keep-alive connection of its
// sidecar) is refused as soon as a new policy refuses it: the next HTTP
// request on the same connection gets 403, and a spliced TCP connection is
// reset.
func TestInboundPolicyChangeAppliesToOpenConnections(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	src := &endpoints.Static{}
	only := func(id string) {
		src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Policy: &policy.Service{
			Namespace: "shop", Name: "checkout",
			Authz: &policy.Authorization{Policies: []string{"shop/only"}, Rules: []policy.AuthzRule{{Policy: "shop/only", IDs: []string{id}}}},
		}})
	}
	only(west.ID("web").String())
	httpSrv := policyServer(t, west, "http", sidecar.ProtocolHTTP, nil, src)
	tcpSrv := policyServer(t, west, "tcp", sidecar.ProtocolTCP, nil, src)
	for _, b := range []*backend{httpSrv, tcpSrv} {
		waitFor(t, "policy in force", 5*time.Second, func() bool { return strings.Contains(b.sc.logs.String(), "authz=true") })
	}
	cfg := callerConfig(t, west, "web", west.TD)
	open := func(addr string) (*tls.Conn, *bufio.Reader) {
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Client(conn, cfg)
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		return tc, bufio.NewReader(tc)
	}
	get := func(tc *tls.Conn, br *bufio.Reader) (int, error) {
		if _, err := io.WriteString(tc, request("GET", "/")); err != nil {
			return 0, err
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	hc, hbr := open(httpSrv.inbound)
	tcc, tbr := open(tcpSrv.inbound)
	for _, c := range []struct {
		tc *tls.Conn
		br *bufio.Reader
	}{{hc, hbr}, {tcc, tbr}} {
		if code, err := get(c.tc, c.br); err != nil || code != 200 {
			t.Fatalf("admitted caller before the change: %d, %v", code, err)
		}
	}

	only(west.ID("someone-else").String())
	waitFor(t, "new policy in force", 5*time.Second, func() bool {
		return strings.Count(httpSrv.sc.logs.String(), "inbound policy updated") >= 2 &&
			strings.Count(tcpSrv.sc.logs.String(), "inbound policy updated") >= 2
	})
	if code, err := get(hc, hbr); err != nil || code != http.StatusForbidden {
		t.Errorf("HTTP: next request on the open connection: %d, %v; want 403", code, err)
	}
	if code, err := get(tcc, tbr); err == nil {
		t.Errorf("TCP: the open connection still carries bytes (status %d); want it reset", code)
	}
}
