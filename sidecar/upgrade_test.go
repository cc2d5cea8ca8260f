package sidecar_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
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

// upgradeApp answers a request with Upgrade: fedmesh-echo by switching
// protocols and then echoing every line it reads, prefixed with "echo ";
// a POST gets its body back (and, through net/http, a 100 Continue when it
// asked for one); anything else gets "plain".
func upgradeApp(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Header.Get("Upgrade") == "fedmesh-echo":
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Errorf("hijack: %v", err)
				return
			}
			defer c.Close()
			_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: fedmesh-echo\r\nConnection: Upgrade\r\n\r\n")
			_ = brw.Flush()
			for {
				line, err := brw.ReadString('\n')
				if err != nil {
					return
				}
				_, _ = brw.WriteString("echo " + line)
				_ = brw.Flush()
			}
		case r.Method == http.MethodPost:
			_, _ = io.Copy(w, r.Body)
		default:
			_, _ = io.WriteString(w, "plain")
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// meshTo runs a server sidecar in front of appAddr (its inbound HTTP loop
// when loop is true, which a Service with an inbound policy uses, the
// policy from policies if not nil; else the spliced fast path) and a
// client sidecar with an HTTP upstream to it, and returns the client's
// listener and the server.
func meshTo(t *testing.T, dom *gatewaytest.Domain, appAddr string, loop bool, policies endpoints.Source) (string, *runningSidecar) {
	t.Helper()
	cfg := sidecar.Config{
		Cluster: dom.Cluster, TrustDomain: dom.TD, Source: dom.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: appAddr,
	}
	if loop {
		cfg.Service = sidecar.ServiceName{Namespace: "shop", Name: "checkout"}
		cfg.ServicePort = 8080
		cfg.InboundProtocol = sidecar.ProtocolHTTP
		cfg.Endpoints = policies
		if policies == nil {
			cfg.Endpoints = &endpoints.Static{}
		}
	}
	server := startSidecar(t, "server", cfg)
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: dom.Cluster, Endpoints: []endpoints.Endpoint{{Name: "s", Addr: server.InboundAddr().String(), Ready: true}}},
	}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: dom.Cluster, TrustDomain: dom.TD, Source: dom.Source(t, "web"), Endpoints: src,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)
	return client.UpstreamAddr(0).String(), server
}

// throughEachPath runs check against a client sidecar in front of a
// server sidecar and upgradeApp: with the server's spliced inbound, with
// its HTTP loop, and in another cluster through a real gateway pair; each
// time on a fresh connection c to the client sidecar at addr.
func throughEachPath(t *testing.T, check func(t *testing.T, addr string, c net.Conn)) {
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	appAddr := upgradeApp(t)
	for _, via := range []string{"inbound-splice", "inbound-loop", "gateways"} {
		t.Run(via, func(t *testing.T) {
			var addr string
			if via == "gateways" {
				addr = meshThroughGateways(t, doms["west"], doms["east"], appAddr)
			} else {
				addr, _ = meshTo(t, doms["west"], appAddr, via == "inbound-loop", nil)
			}
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			check(t, addr, c)
		})
	}
}

// meshThroughGateways puts a server sidecar for appAddr in east, behind
// east's gateway, and a client sidecar in west whose only endpoints are
// east's, reached through west's gateway; it returns the client's listener.
func meshThroughGateways(t *testing.T, west, east *gatewaytest.Domain, appAddr string) string {
	t.Helper()
	server := startSidecar(t, "east-server", sidecar.Config{
		Cluster: east.Cluster, TrustDomain: east.TD, Federated: []spiffeid.TrustDomain{west.TD},
		Source: east.Source(t, "web"), InboundAddr: "127.0.0.1:0", AppAddr: appAddr,
	})
	eastCat := &gateway.StaticCatalog{}
	eastCat.Set("shop", "checkout", 8080, gateway.Endpoint{Name: "east-1", Addr: netip.MustParseAddrPort(server.InboundAddr().String())})
	eastGW := startGateway(t, east, eastCat, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(t, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "east", Gateway: true, Endpoints: []endpoints.Endpoint{{Name: "east-1", Ready: true}}},
	}})
	client := startSidecar(t, "west-client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)
	return client.UpstreamAddr(0).String()
}

// TestUpgradeThroughSidecars: a protocol upgrade (as a WebSocket handshake
// does) is answered 101 through both sidecars, after which the connection
// carries the new protocol both ways, half-closes included; plain
// requests are served as before afterwards.
func TestUpgradeThroughSidecars(t *testing.T) {
	testutil.CheckGoroutines(t)
	throughEachPath(t, func(t *testing.T, addr string, c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		// The first line of the new protocol goes with the handshake,
		// before the 101 came back: it must not be lost.
		if _, err := io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: checkout\r\nConnection: Upgrade\r\nUpgrade: fedmesh-echo\r\n\r\nfirst\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "fedmesh-echo" {
			t.Fatalf("handshake answered %s, Upgrade %q; want 101, fedmesh-echo", resp.Status, resp.Header.Get("Upgrade"))
		}
		for _, line := range []string{"first", "second", strings.Repeat("x", 100_000)} {
			if line != "first" {
				if _, err := io.WriteString(c, line+"\n"); err != nil {
					t.Fatal(err)
				}
			}
			got, err := br.ReadString('\n')
			if err != nil || got != "echo "+line+"\n" {
				t.Fatalf("after the upgrade: read %.40q, %v; want the echo of %.20q", got, err, line)
			}
		}
		// Half-close: the app sees the end, closes, and the client sees
		// the end too.
		_ = c.(*net.TCPConn).CloseWrite()
		if b, err := br.ReadByte(); err != io.EOF {
			t.Fatalf("after CloseWrite: read %q, %v; want EOF", b, err)
		}
		// Plain HTTP is served as before.
		for range 3 {
			body, err := getBody("http://" + addr + "/")
			if err != nil || body != "plain" {
				t.Fatalf("plain request after the tunnel: %q, %v", body, err)
			}
		}
	})
}

// TestExpectContinue: a client that waits for 100 Continue before sending
// its body gets it at once from its sidecar, not after its own timeout,
// and the app's own 100 Continue does not end the exchange early.
func TestExpectContinue(t *testing.T) {
	testutil.CheckGoroutines(t)
	throughEachPath(t, func(t *testing.T, addr string, c net.Conn) {
		br := bufio.NewReader(c)
		for i := range 2 { // two requests on one connection
			body := fmt.Sprintf("body %d", i)
			if _, err := fmt.Fprintf(c, "POST /p HTTP/1.1\r\nHost: checkout\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n", len(body)); err != nil {
				t.Fatal(err)
			}
			// Wait for 100 Continue, as curl does (for a second).
			_ = c.SetReadDeadline(time.Now().Add(900 * time.Millisecond))
			interim, err := http.ReadResponse(br, nil)
			if err != nil || interim.StatusCode != http.StatusContinue {
				t.Fatalf("request %d: before the body: %v, %v; want 100 Continue within 900ms", i, interim, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, body); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || string(got) != body {
				t.Fatalf("request %d answered %s %q; want 200 %q", i, resp.Status, got, body)
			}
		}
	})
}

func getBody(url string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestUpgradedConnectionFollowsPolicy: a connection that switched protocols
// at an inbound with an authorization policy stays open while the policy
// in force admits its upgrade request, and is reset once a new one refuses
// it.
func TestUpgradedConnectionFollowsPolicy(t *testing.T) {
	testutil.CheckGoroutines(t)
	dom := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	appAddr := upgradeApp(t)
	src := &endpoints.Static{}
	admit := func(ids ...string) {
		src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Policy: &policy.Service{
			Namespace: "shop", Name: "checkout",
			Authz: &policy.Authorization{Policies: []string{"shop/ws"}, Rules: []policy.AuthzRule{{
				Policy: "shop/ws", IDs: ids, Methods: []string{"GET"}, Paths: []policy.PathMatch{{Type: policy.PathExact, Value: "/ws"}},
			}}},
		}})
	}
	admit(dom.ID("web").String())
	addr, server := meshTo(t, dom, appAddr, true, src)
	waitFor(t, "policy in force", 5*time.Second, func() bool { return strings.Contains(server.logs.String(), "authz=true") })
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(c)
	if _, err := io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: checkout\r\nConnection: Upgrade\r\nUpgrade: fedmesh-echo\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v; want 101", resp, err)
	}
	echo := func(line string) error {
		if _, err := io.WriteString(c, line+"\n"); err != nil {
			return err
		}
		got, err := br.ReadString('\n')
		if err == nil && got != "echo "+line+"\n" {
			return fmt.Errorf("read %q", got)
		}
		return err
	}
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}
	// A policy that still admits the request leaves the connection alone.
	admit(dom.ID("web").String(), dom.ID("other").String())
	waitFor(t, "second policy in force", 5*time.Second, func() bool { return strings.Count(server.logs.String(), "inbound policy updated") >= 2 })
	if err := echo("still admitted"); err != nil {
		t.Fatalf("after a policy that still admits the upgrade: %v", err)
	}
	// One that refuses it resets the connection.
	admit(dom.ID("other").String())
	waitFor(t, "third policy in force", 5*time.Second, func() bool { return strings.Count(server.logs.String(), "inbound policy updated") >= 3 })
	waitFor(t, "tunnel reset", 5*time.Second, func() bool { return echo("after") != nil })
	if !strings.Contains(server.logs.String(), "inbound connections reset") {
		t.Fatalf("server did not log the reset:\n%s", server.logs.String())
	}
}
