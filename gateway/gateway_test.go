package gateway

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/peer"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// TestEndToEndTLS: a west sidecar's TLS conversation with a server in east
// crosses west egress, the QUIC tunnel and east ingress. The client verifies
// the server's own certificate, which neither gateway holds a key for, so
// the gateways carried the TLS bytes without terminating them. The admin
// endpoint and metrics reflect the stream.
func TestEndToEndTLS(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, nil)
	cert, pool := selfSigned(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c) // echo until the client half-closes
	})
	p.eastCat.Set("shop", "checkout", 8443, Endpoint{Addr: netip.MustParseAddrPort(ln.Addr().String())})

	conn, err := p.client.Dial(ctxT(t, 10*time.Second), req(8443))
	if err != nil {
		t.Fatalf("dial through gateways: %v", err)
	}
	tc := tls.Client(conn, &tls.Config{RootCAs: pool, ServerName: "checkout.shop"})
	_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("end-to-end tls handshake: %v", err)
	}
	if got := tc.ConnectionState().PeerCertificates[0]; !got.Equal(cert.Leaf) {
		t.Fatalf("client saw certificate %q, not the server's", got.Subject)
	}
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	var got bytes.Buffer
	readDone := make(chan error, 1)
	go func() { _, err := io.Copy(&got, tc); readDone <- err }()
	if _, err := tc.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := tc.CloseWrite(); err != nil { // TLS close_notify, then the stream's FIN
		t.Fatal(err)
	}
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := <-readDone; err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got.Bytes(), payload) {
		t.Fatalf("echo of %d bytes differs (got %d)", len(payload), got.Len())
	}

	waitFor(t, "east counted the stream", 5*time.Second, func() bool {
		return metric(t, p.east.reg, "fedmesh_gateway_streams_total", map[string]string{"direction": "ingress", "result": "ok"}) == 1
	})
	if b := metric(t, p.east.reg, "fedmesh_gateway_bytes_total", map[string]string{"direction": "ingress", "flow": "to_target"}); b < 1<<20 {
		t.Errorf("east counted %v bytes to the target, want >= 1 MiB", b)
	}

	// Admin: west sees east up with RTT samples; east sees west's gateway.
	waitFor(t, "rtt samples", 5*time.Second, func() bool {
		st := p.west.State()
		return len(st.Clusters) == 1 && len(st.Clusters[0].Replicas) == 1 && st.Clusters[0].Replicas[0].RTTSamples > 0
	})
	var ws State
	getJSON(t, "http://"+p.west.AdminAddr().String()+"/state", &ws)
	if len(ws.Clusters) != 1 || ws.Clusters[0].Cluster != "east" || !ws.Clusters[0].Up || ws.Clusters[0].Replicas[0].RTTP50MS <= 0 {
		t.Errorf("west state: %+v", ws)
	}
	var es State
	getJSON(t, "http://"+p.east.AdminAddr().String()+"/state", &es)
	if len(es.Inbound) != 1 || es.Inbound[0].ID != "spiffe://west.fedmesh.test/ns/fedmesh-system/sa/gateway" {
		t.Errorf("east inbound: %+v", es.Inbound)
	}
	resp, err := http.Get("http://" + p.east.AdminAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"fedmesh_gateway_streams_total", "fedmesh_gateway_bytes_total", "fedmesh_gateway_udp_buffer_bytes"} {
		if !strings.Contains(string(body), name) {
			t.Errorf("/metrics lacks %s", name)
		}
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("decode %s: %v", url, err)
	}
}

// closedPort is a loopback address that refuses connections.
func closedPort(t *testing.T) Endpoint {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	return Endpoint{Addr: addr, Name: "dead"}
}

// TestRefusals: every refusal arrives as its code before any byte, and a
// dead endpoint is skipped (and ejected) in favour of a live one.
func TestRefusals(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, nil)
	echo := newLineEcho(t)
	p.eastCat.Set("shop", "empty", 81)
	p.eastCat.Set("shop", "checkout", 82, closedPort(t), closedPort(t))
	p.eastCat.Set("shop", "checkout", 83, closedPort(t), echo.endpoint())

	for _, tc := range []struct {
		name string
		req  tunnel.Request
		code tunnel.Code
	}{
		{"not exported", req(9999), tunnel.CodeNotExported},
		{"no endpoints", tunnel.Request{Cluster: "east", Namespace: "shop", Service: "empty", Port: 81}, tunnel.CodeNoHealthyEndpoint},
		{"every endpoint dead", req(82), tunnel.CodeNoHealthyEndpoint},
		{"unknown cluster", tunnel.Request{Cluster: "north", Namespace: "shop", Service: "checkout", Port: 80}, tunnel.CodeUnknownCluster},
		{"own cluster", tunnel.Request{Cluster: "west", Namespace: "shop", Service: "checkout", Port: 80}, tunnel.CodeBadRequest},
	} {
		for _, cl := range p.clients() {
			t.Run(cl.name+"/"+tc.name, func(t *testing.T) {
				_, err := cl.c.Dial(ctxT(t, 10*time.Second), tc.req)
				var te *tunnel.Error
				if !errors.As(err, &te) || te.Code != tc.code {
					t.Fatalf("error %v, want code %s", err, tc.code)
				}
			})
		}
	}
	if n := metric(t, p.east.reg, "fedmesh_gateway_streams_total", map[string]string{"direction": "ingress", "result": "not_exported"}); n != 2 {
		t.Errorf("east not_exported count %v, want 2 (one per egress transport)", n)
	}

	t.Run("retry another endpoint", func(t *testing.T) {
		before := metric(t, p.east.reg, "fedmesh_gateway_endpoint_dial_failures_total", nil)
		for i := range 10 {
			c, err := p.client.Dial(ctxT(t, 10*time.Second), req(83))
			if err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
			if err := roundTrip(c, "hello"); err != nil {
				t.Fatalf("round trip %d: %v", i, err)
			}
			c.Close()
		}
		// The dead endpoint failed at most once: then it was ejected.
		if d := metric(t, p.east.reg, "fedmesh_gateway_endpoint_dial_failures_total", nil) - before; d > 1 {
			t.Errorf("%v dial failures, want at most 1 (ejection)", d)
		}
	})
}

// TestEndpointRequest: a request naming an endpoint (tunnel.FlagEndpoint)
// reaches exactly that endpoint of the exported service, over both egress
// transports; an address that is not one of its ready endpoints is refused
// with no_healthy_endpoint, never dialed.
func TestEndpointRequest(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, nil)
	a, b := newLineEcho(t), newLineEcho(t)
	p.eastCat.Set("shop", "checkout", 84, a.endpoint(), b.endpoint())
	for _, cl := range p.clients() {
		t.Run(cl.name, func(t *testing.T) {
			for _, e := range []*lineEcho{a, b, a, b} {
				r := req(84)
				r.Endpoint = e.endpoint().Addr.String()
				c, err := cl.c.Dial(ctxT(t, 10*time.Second), r)
				if err != nil {
					t.Fatalf("dial endpoint %s: %v", r.Endpoint, err)
				}
				if err := roundTrip(c, "hello"); err != nil {
					t.Fatal(err)
				}
				c.Close()
				if ev := e.event(t); ev != "eof" {
					t.Fatalf("endpoint %s saw %q, want the connection", r.Endpoint, ev)
				}
			}
			r := req(84)
			r.Endpoint = "127.0.0.1:1"
			_, err := cl.c.Dial(ctxT(t, 10*time.Second), r)
			var te *tunnel.Error
			if !errors.As(err, &te) || te.Code != tunnel.CodeNoHealthyEndpoint || !strings.Contains(te.Reason, "not a ready endpoint") {
				t.Fatalf("endpoint outside the service: %v, want no_healthy_endpoint", err)
			}
		})
	}
}

// withBundles overrides a source's bundles: a client that trusts a server
// out of band, so that only the server's verdict is tested.
type withBundles struct {
	mtls.Source
	bundles x509bundle.Source
}

func (w withBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return w.bundles.GetX509BundleForTrustDomain(td)
}

// TestIdentityRefused: east's tunnel refuses a gateway of an unfederated
// trust domain (untrusted chain) and a federated workload that is not a
// gateway (unauthorized); east's egress refuses a sidecar of another trust
// domain. None of them gets a stream through.
func TestIdentityRefused(t *testing.T) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east", "north"}, [][2]string{{"west", "east"}})
	echo := newLineEcho(t)
	cat := &StaticCatalog{}
	cat.Set("shop", "checkout", 80, echo.endpoint())
	east := startGateway(t, doms["east"], cat, nil, func(c *Config) { c.Federated = []spiffeid.TrustDomain{doms["west"].TD} })
	eastPeer := []Peer{{Cluster: "east", TrustDomain: doms["east"].TD, Addrs: []string{east.TunnelAddr().String()}}}

	// north trusts east out of band (it holds east's bundle), so the only
	// refusal can come from east.
	northSrc := withBundles{Source: doms["north"].Source(t, "gateway"), bundles: x509bundle.NewSet(mustBundle(t, doms["east"].Source(t, "gateway"), doms["east"].TD))}
	north := startGateway(t, doms["north"], &StaticCatalog{}, eastPeer, func(c *Config) {
		c.Source = northSrc
		c.DeadAfter = 200 * time.Millisecond
	})
	rogue := startGateway(t, doms["west"], &StaticCatalog{}, eastPeer, func(c *Config) {
		c.Source = doms["west"].Source(t, "rogue")
		c.DeadAfter = 200 * time.Millisecond
	})
	waitFor(t, "east refused north as untrusted", 10*time.Second, func() bool {
		return metric(t, east.reg, "fedmesh_gateway_handshake_failures_total", map[string]string{"listener": "tunnel", "reason": "untrusted"}) > 0
	})
	waitFor(t, "east refused the rogue workload as unauthorized", 10*time.Second, func() bool {
		return metric(t, east.reg, "fedmesh_gateway_handshake_failures_total", map[string]string{"listener": "tunnel", "reason": "unauthorized"}) > 0
	})
	// Neither link ever came up: the welcome never arrived.
	for name, g := range map[string]*testGW{"north": north, "rogue": rogue} {
		if g.ClusterUp("east") || metric(t, g.reg, "fedmesh_gateway_peer_connects_total", nil) != 0 {
			t.Errorf("%s connected to east", name)
		}
	}
	if in := east.State().Inbound; len(in) != 0 {
		t.Errorf("east holds inbound connections: %+v", in)
	}
	if n := metric(t, east.reg, "fedmesh_gateway_streams_total", map[string]string{"direction": "ingress", "result": "ok"}); n != 0 {
		t.Errorf("east carried %v streams", n)
	}

	// A west sidecar may not use east's egress, over either transport.
	for i, tr := range []Transport{TCP, QUIC} {
		c, err := NewClient(doms["west"].Source(t, "web"), doms["east"].ID("gateway"), east.EgressAddr().String(), WithTransport(tr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Dial(ctxT(t, 5*time.Second), tunnel.Request{Cluster: "west", Namespace: "shop", Service: "checkout", Port: 80}); err == nil {
			t.Fatalf("east egress served a west sidecar over %s", tr)
		}
		waitFor(t, "east egress refusal counted", 5*time.Second, func() bool {
			return metric(t, east.reg, "fedmesh_gateway_handshake_failures_total", map[string]string{"listener": "egress", "reason": "unauthorized"}) > float64(i)
		})
	}
}

func mustBundle(t *testing.T, src mtls.Source, td spiffeid.TrustDomain) *x509bundle.Bundle {
	t.Helper()
	b, err := src.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestHalfCloseAndReset: half-closes travel independently in each
// direction, and a reset on either end reaches the other.
func TestHalfCloseAndReset(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, nil)
	echo := newLineEcho(t)
	p.eastCat.Set("shop", "checkout", 80, echo.endpoint())
	for _, cl := range p.clients() {
		t.Run(cl.name, func(t *testing.T) { halfCloseAndReset(t, cl.c, echo) })
	}
}

func halfCloseAndReset(t *testing.T, client *Client, echo *lineEcho) {
	dial := func() *Conn {
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, "hi"); err != nil {
			t.Fatal(err)
		}
		return c
	}

	t.Run("client half-closes first", func(t *testing.T) {
		c := dial()
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if ev := echo.event(t); ev != "eof" {
			t.Fatalf("server saw %q, want eof", ev)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		rest, err := io.ReadAll(c) // the server closed after its EOF
		if err != nil || len(rest) != 0 {
			t.Fatalf("client read %q, %v; want clean EOF", rest, err)
		}
	})
	t.Run("server half-closes first", func(t *testing.T) {
		c := dial()
		if _, err := io.WriteString(c, "bye\n"); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "bye\n" {
			t.Fatalf("client read %q, %v; want bye and EOF", got, err)
		}
		// Our direction is still open: the server reads our EOF only now.
		select {
		case ev := <-echo.events:
			t.Fatalf("server ended early: %s", ev)
		case <-time.After(100 * time.Millisecond):
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if ev := echo.event(t); ev != "eof" {
			t.Fatalf("server saw %q, want eof", ev)
		}
	})
	t.Run("client resets", func(t *testing.T) {
		c := dial()
		c.Abort()
		if ev := echo.event(t); ev != "reset" {
			t.Fatalf("server saw %q, want reset", ev)
		}
	})
	t.Run("server resets", func(t *testing.T) {
		c := dial()
		if _, err := io.WriteString(c, "rst\n"); err != nil {
			t.Fatal(err)
		}
		if ev := echo.event(t); ev != "sent reset" {
			t.Fatalf("server: %q", ev)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadAll(c)
		var se *quic.StreamError
		if !errors.Is(err, syscall.ECONNRESET) && (!errors.As(err, &se) || se.ErrorCode != resetCode) {
			t.Fatalf("client read error %v, want a connection or stream reset", err)
		}
	})
}

// TestBadHeaders: garbage, oversized, other-version, truncated and stalled
// headers are answered with bad_request and a reason, on the tunnel and on
// egress, and the stream ends: never a stuck stream, and the gateway keeps
// serving.
func TestBadHeaders(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, func(_ string, c *Config) { c.HeaderTimeout = 300 * time.Millisecond })
	echo := newLineEcho(t)
	p.eastCat.Set("shop", "checkout", 80, echo.endpoint())

	tunnelConn := rawDial(t, p.doms["west"].Source(t, "gateway"), p.doms["east"].ID("gateway"), tunnel.ALPNTunnel, p.east.TunnelAddr())
	egressConn := rawDial(t, p.doms["west"].Source(t, "web"), p.doms["west"].ID("gateway"), tunnel.ALPNEgress, p.west.EgressAddr())
	valid, _ := tunnel.AppendRequest(nil, &tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
	for _, tc := range []struct {
		name   string
		send   []byte
		fin    bool
		reason string
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: checkout\r\n\r\n"), false, "bad magic"},
		{"version 9", append([]byte("FM\x09"), valid[3:]...), false, "unsupported version 9"},
		{"oversized", []byte("FM\x01\x00\xff\xff"), false, "exceeds"},
		{"bad label", bytes.Replace(valid, []byte("shop"), []byte("SHOP"), 1), false, "not a DNS label"},
		{"truncated", valid[:9], true, "stream ended inside the header"},
		{"stalled", valid[:9], false, "no complete header within 300ms"},
	} {
		for _, side := range []struct {
			name string
			conn *quic.Conn
		}{{"tunnel", tunnelConn}, {"egress", egressConn}} {
			t.Run(side.name+"/"+tc.name, func(t *testing.T) {
				s, err := side.conn.OpenStreamSync(ctxT(t, 5*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				_ = s.SetDeadline(time.Now().Add(5 * time.Second))
				start := time.Now()
				if _, err := s.Write(tc.send); err != nil {
					t.Fatal(err)
				}
				if tc.fin {
					s.Close()
				}
				err = tunnel.ReadResponse(s)
				var te *tunnel.Error
				if !errors.As(err, &te) || te.Code != tunnel.CodeBadRequest || !strings.Contains(te.Reason, tc.reason) {
					t.Fatalf("response %v, want bad_request %q", err, tc.reason)
				}
				if rest, err := io.ReadAll(s); err != nil || len(rest) != 0 {
					t.Fatalf("after the refusal: %q, %v; want EOF", rest, err)
				}
				// The gateway reset our send side: writes fail soon.
				waitFor(t, "write refused", 5*time.Second, func() bool {
					_, err := s.Write([]byte("x"))
					return err != nil
				})
				if tc.name == "stalled" && time.Since(start) > 3*time.Second {
					t.Errorf("stalled header refused after %s", time.Since(start))
				}
			})
		}
	}
	c, err := p.client.Dial(ctxT(t, 10*time.Second), req(80))
	if err != nil {
		t.Fatalf("gateway stopped serving: %v", err)
	}
	if err := roundTrip(c, "still here"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := metric(t, p.east.reg, "fedmesh_gateway_drops_total", map[string]string{"reason": "header_timeout"}); n != 1 {
		t.Errorf("east header_timeout drops %v, want 1", n)
	}
}

func rawDial(t *testing.T, src mtls.Source, server spiffeid.ID, alpn string, addr net.Addr) *quic.Conn {
	t.Helper()
	c, err := quic.DialAddr(ctxT(t, 10*time.Second), addr.String(), mtls.QUICClientConfig(src, mtls.OneOf(server), alpn), &quic.Config{})
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.CloseWithError(0, "") })
	return c
}

// TestFaultRelay: with delay, jitter and loss between the gateways the link
// stays up and RTT shows the delay; a full partition is detected within the
// default 1 s bound, streams meanwhile fail fast as unreachable, and after
// the heal the link and streams come back.
func TestFaultRelay(t *testing.T) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	echo := newLineEcho(t)
	cat := &StaticCatalog{}
	cat.Set("shop", "checkout", 80, echo.endpoint())
	west, _, relay := relayedPair(t, doms, cat, faultnet.Faults{}, nil)
	client := newClient(t, doms["west"], "web", west)
	waitFor(t, "link up", 10*time.Second, func() bool { return west.ClusterUp("east") })
	check := func(what string) {
		t.Helper()
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatalf("%s: dial: %v", what, err)
		}
		defer c.Close()
		if err := roundTrip(c, what); err != nil {
			t.Fatalf("%s: round trip: %v", what, err)
		}
	}
	check("clean")

	// Degraded WAN: 15 ms each way with jitter and 3% loss.
	if err := relay.SetFaults(faultnet.Faults{Delay: 15 * time.Millisecond, Jitter: 5 * time.Millisecond, Loss: 0.03}); err != nil {
		t.Fatal(err)
	}
	connects := metric(t, west.reg, "fedmesh_gateway_peer_connects_total", nil)
	for i := range 10 {
		check("degraded " + string(rune('a'+i)))
		time.Sleep(100 * time.Millisecond)
	}
	if !west.ClusterUp("east") || metric(t, west.reg, "fedmesh_gateway_peer_connects_total", nil) != connects {
		t.Fatal("link flapped under delay and 3% loss")
	}
	if st := west.State().Clusters[0].Replicas[0]; st.RTTP50 < 30*time.Millisecond {
		t.Errorf("rtt p50 %s under 15ms-each-way delay", st.RTTP50)
	}
	// Three 200 kB round trips are some 500 packets from west: at 3% loss
	// (p of none lost < 1e-6) the link must report lost packets.
	func() {
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatalf("bulk under loss: dial: %v", err)
		}
		defer c.Close()
		for range 3 {
			if err := roundTrip(c, strings.Repeat("x", 200_000)); err != nil {
				t.Fatalf("bulk under loss: %v", err)
			}
		}
	}()
	if st := west.State().Clusters[0].Replicas[0]; st.PacketsLost == 0 || st.LossPct <= 0 || st.LossPct > 20 {
		t.Errorf("under 3%% loss the link reports %d of %d packets lost (%.2f%%)", st.PacketsLost, st.PacketsSent, st.LossPct)
	} else {
		t.Logf("under 3%% loss: %d of %d packets lost (%.2f%%)", st.PacketsLost, st.PacketsSent, st.LossPct)
	}

	// Partition.
	if err := relay.SetFaults(faultnet.Faults{Partition: true}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitFor(t, "dead peer detected", 5*time.Second, func() bool { return !west.ClusterUp("east") })
	detected := time.Since(start)
	t.Logf("partition detected after %s (bound %s)", detected.Round(time.Millisecond), peer.DefaultDeadAfter)
	if detected > peer.DefaultDeadAfter+250*time.Millisecond {
		t.Errorf("dead peer detected after %s, bound %s", detected, peer.DefaultDeadAfter)
	}
	if st := west.State(); st.Clusters[0].Up {
		t.Errorf("state says east is up: %+v", st.Clusters[0])
	}
	dialStart := time.Now()
	_, err := client.Dial(ctxT(t, 10*time.Second), req(80))
	var te *tunnel.Error
	if !errors.As(err, &te) || te.Code != tunnel.CodeUnreachable || time.Since(dialStart) > 500*time.Millisecond {
		t.Fatalf("dial during partition: %v after %s, want unreachable at once", err, time.Since(dialStart))
	}

	// Heal.
	if err := relay.SetFaults(faultnet.Faults{}); err != nil {
		t.Fatal(err)
	}
	healed := time.Now()
	waitFor(t, "link back after heal", 10*time.Second, func() bool { return west.ClusterUp("east") })
	t.Logf("link back %s after heal", time.Since(healed).Round(time.Millisecond))
	check("healed")
}

// TestDialEarly: a client may write before the gateway answered; the bytes
// reach the target once it is connected, and a refusal surfaces on the
// first Read with its code.
func TestDialEarly(t *testing.T) {
	checkLeaks(t)
	p := newPair(t, nil)
	echo := newLineEcho(t)
	p.eastCat.Set("shop", "checkout", 80, echo.endpoint())

	for _, cl := range p.clients() {
		t.Run(cl.name, func(t *testing.T) { dialEarly(t, cl.c) })
	}
}

func dialEarly(t *testing.T, client *Client) {
	c, err := client.DialEarly(ctxT(t, 10*time.Second), req(80))
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c, "early bird"); err != nil {
		t.Fatalf("early write: %v", err)
	}
	c.Close()

	c, err = client.DialEarly(ctxT(t, 10*time.Second), req(81))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, "lost\n")
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 8))
	var te *tunnel.Error
	if !errors.As(err, &te) || te.Code != tunnel.CodeNotExported {
		t.Fatalf("read after refusal: %v, want not_exported", err)
	}
}

// TestWrongClusterWelcome: a link configured for cluster north whose address
// answers as east's gateway (trusted, right identity, wrong cluster) never
// comes up, so streams for north cannot land in east.
func TestWrongClusterWelcome(t *testing.T) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	east := startGateway(t, doms["east"], &StaticCatalog{}, nil, func(c *Config) { c.Federated = []spiffeid.TrustDomain{doms["west"].TD} })
	west := startGateway(t, doms["west"], &StaticCatalog{}, []Peer{{
		Cluster: "north", TrustDomain: doms["east"].TD, Addrs: []string{east.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "the welcome refused", 10*time.Second, func() bool {
		st := west.State()
		return strings.Contains(st.Clusters[0].Replicas[0].LastError, `serves cluster "east", this link expects "north"`)
	})
	if west.ClusterUp("north") {
		t.Fatal("link to north is up")
	}
}

// TestIdleLinkRTT: a link that carries only keepalives reads the path's RTT,
// not the peer's ack delay (25 ms; see peer/ping.go), and follows a delay
// added and removed on the WAN.
func TestIdleLinkRTT(t *testing.T) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, _, relay := relayedPair(t, doms, &StaticCatalog{}, faultnet.Faults{}, nil)
	waitFor(t, "link up", 10*time.Second, func() bool { return west.ClusterUp("east") })
	link := func() peer.Status { return west.State().Clusters[0].Replicas[0] }
	// 30 samples of an idle link, one per 100 ms.
	waitFor(t, "30 RTT samples", 10*time.Second, func() bool { return link().RTTSamples >= 30 })
	st := link()
	t.Logf("idle link: p50 %s p99 %s recent %s over %d samples", st.RTTP50, st.RTTP99, st.RTTRecent, st.RTTSamples)
	// Ack-delayed samples read 25 ms and more: with quic-go's samples the
	// p50 was among them in 2 runs of 3 (peer.TestIdleLinkSamples counts
	// them). The p99 is not checked: under CI's load a few echoes are late.
	if st.RTTP50 >= 10*time.Millisecond || st.RTTRecent >= 10*time.Millisecond {
		t.Fatalf("idle loopback link reads p50 %s, recent %s over %d samples; want both under 10ms", st.RTTP50, st.RTTRecent, st.RTTSamples)
	}
	if err := relay.SetFaults(faultnet.Faults{Delay: 20 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "recent RTT with 20ms each way", 10*time.Second, func() bool { return link().RTTRecent >= 40*time.Millisecond })
	if err := relay.SetFaults(faultnet.Faults{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "recent RTT back under 10ms", 10*time.Second, func() bool { return link().RTTRecent < 10*time.Millisecond })
}
