package gateway

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// TestTCPEgress: the TCP+mTLS egress (the Client's default) with real
// sockets and real SVIDs: it shares the UDP egress's port number, admits
// exactly the local trust domain's workloads, insists on TLS 1.3 and the
// egress ALPN, passes refusals on with their codes, and the client's ready
// connections outlive the gateway's header timeout and a gateway restart, a
// connection whose both directions ended is reused, and one cut without an
// end frame resets the target.
func TestTCPEgress(t *testing.T) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east", "north"}, [][2]string{{"west", "east"}})
	echo := newLineEcho(t)
	cat := &StaticCatalog{}
	cat.Set("shop", "checkout", 80, echo.endpoint())
	east := startGateway(t, doms["east"], cat, nil, func(c *Config) { c.Federated = []spiffeid.TrustDomain{doms["west"].TD} })
	dead, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}) // a "north" gateway that never answers
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	peers := []Peer{
		{Cluster: "east", TrustDomain: doms["east"].TD, Addrs: []string{east.TunnelAddr().String()}},
		{Cluster: "north", TrustDomain: doms["north"].TD, Addrs: []string{dead.LocalAddr().String()}},
	}
	tweak := func(c *Config) { c.HeaderTimeout = 200 * time.Millisecond }
	west := startGateway(t, doms["west"], &StaticCatalog{}, peers, tweak)
	waitFor(t, "west connected to east", 10*time.Second, func() bool { return west.ClusterUp("east") })
	client := newClient(t, doms["west"], "web", west)

	t.Run("same port as the UDP egress", func(t *testing.T) {
		if u, tc := west.EgressAddr(), west.EgressTCPAddr(); u.Port != tc.Port || !u.IP.Equal(tc.IP) {
			t.Fatalf("udp egress %s, tcp egress %s", u, tc)
		}
	})

	t.Run("authorized sidecar", func(t *testing.T) {
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatal(err)
		}
		if ra, ok := c.RemoteAddr().(*net.TCPAddr); !ok || ra.Port != west.EgressAddr().Port {
			t.Errorf("connection to %v, want the tcp egress", c.RemoteAddr())
		}
		if err := roundTrip(c, "over tcp"); err != nil {
			t.Fatal(err)
		}
		c.Close()
		waitFor(t, "west counted the egress connection", 5*time.Second, func() bool {
			return metric(t, west.reg, "fedmesh_gateway_streams_total", map[string]string{"direction": "egress", "result": "ok"}) == 1
		})
	})

	t.Run("refusal codes", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			req  tunnel.Request
			code tunnel.Code
		}{
			{"not exported", req(81), tunnel.CodeNotExported},
			{"unknown cluster", tunnel.Request{Cluster: "south", Namespace: "shop", Service: "checkout", Port: 80}, tunnel.CodeUnknownCluster},
			{"unreachable", tunnel.Request{Cluster: "north", Namespace: "shop", Service: "checkout", Port: 80}, tunnel.CodeUnreachable},
		} {
			// Dial reads the answer; DialEarly's first Read returns it.
			_, err := client.Dial(ctxT(t, 10*time.Second), tc.req)
			var te *tunnel.Error
			if !errors.As(err, &te) || te.Code != tc.code {
				t.Errorf("%s: Dial error %v, want code %s", tc.name, err, tc.code)
			}
			c, err := client.DialEarly(ctxT(t, 10*time.Second), tc.req)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = c.Write([]byte("dropped\n"))
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 8))
			if !errors.As(err, &te) || te.Code != tc.code {
				t.Errorf("%s: DialEarly read %v, want code %s", tc.name, err, tc.code)
			}
			c.Close()
		}
	})

	t.Run("identities refused", func(t *testing.T) {
		for _, tc := range []struct {
			name, reason string
			src          mtls.Source
			gateway      spiffeid.ID
		}{
			// An unfederated trust domain: the chain does not verify. It
			// trusts west out of band, so only west can refuse.
			{"untrusted", "untrusted", withBundles{Source: doms["north"].Source(t, "web"), bundles: doms["west"].Source(t, "web")}, doms["west"].ID("gateway")},
			// A federated trust domain's workload: not a local sidecar.
			{"unauthorized", "unauthorized", doms["east"].Source(t, "web"), doms["west"].ID("gateway")},
			// The client refuses a gateway with another identity.
			{"wrong gateway identity", "", doms["west"].Source(t, "web"), doms["west"].ID("checkout")},
		} {
			before := metric(t, west.reg, "fedmesh_gateway_handshake_failures_total", map[string]string{"listener": "egress", "reason": tc.reason})
			c, err := NewClient(tc.src, tc.gateway, west.EgressAddr().String(), WithSpares(0))
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Dial(ctxT(t, 5*time.Second), req(80))
			var te *tunnel.Error
			if err == nil || errors.As(err, &te) {
				t.Errorf("%s: Dial error %v, want a handshake failure", tc.name, err)
			}
			if tc.reason != "" {
				waitFor(t, tc.name+" counted", 5*time.Second, func() bool {
					return metric(t, west.reg, "fedmesh_gateway_handshake_failures_total", map[string]string{"listener": "egress", "reason": tc.reason}) > before
				})
			}
			c.Close()
		}
	})

	t.Run("TLS 1.3 and the egress ALPN only", func(t *testing.T) {
		base := mtls.ClientConfig(doms["west"].Source(t, "web"), mtls.OneOf(doms["west"].ID("gateway")))
		tls12 := base.Clone()
		tls12.MaxVersion = tls.VersionTLS12
		tls12.NextProtos = []string{tunnel.ALPNEgress}
		noALPN := base.Clone()
		for name, cfg := range map[string]*tls.Config{"tls 1.2": tls12, "no alpn": noALPN} {
			conn, err := tls.Dial("tcp", west.EgressTCPAddr().String(), cfg)
			if err != nil {
				continue // refused in the handshake
			}
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			if err := tunnel.WriteRequest(conn, &tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80}); err == nil {
				// The gateway closes the connection: no answer, no hang.
				_, err := conn.Read(make([]byte, 1))
				var ne net.Error
				if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
					t.Errorf("%s: read %v, want the connection closed", name, err)
				}
			}
			conn.Close()
		}
	})

	t.Run("ready connections outlive the header timeout", func(t *testing.T) {
		if _, err := client.Dial(ctxT(t, 10*time.Second), req(81)); err == nil {
			t.Fatal("want a refusal") // any Dial makes the client keep spares
		}
		waitFor(t, "spares ready", 5*time.Second, func() bool { ready, _ := client.tcp.Pool(); return ready >= DefaultSpares })
		time.Sleep(500 * time.Millisecond) // > HeaderTimeout
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := roundTrip(c, "from a spare"); err != nil {
			t.Fatal(err)
		}
		if n := metric(t, west.reg, "fedmesh_gateway_drops_total", map[string]string{"reason": "header_timeout"}); n != 0 {
			t.Errorf("%v idle spares dropped as header timeouts", n)
		}
	})

	// Earlier subtests closed connections; their events are not of
	// interest. Once the echo server has no connection left, every event
	// of theirs is in the channel.
	drainEvents := func() {
		waitFor(t, "the echo server's connections of earlier subtests ended", 10*time.Second, func() bool { return echo.open.Load() == 0 })
		for len(echo.events) > 0 {
			<-echo.events
		}
	}
	t.Run("a connection that ended cleanly is reused", func(t *testing.T) {
		drainEvents()
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, "first"); err != nil {
			t.Fatal(err)
		}
		local := c.LocalAddr().String()
		c.Close() // half-closes; the echo server closes; the gateway's end comes back
		if ev := echo.event(t); ev != "eof" {
			t.Fatalf("server saw %q, want eof", ev)
		}
		waitFor(t, "the connection back in the pool", 5*time.Second, func() bool {
			_, draining := client.tcp.Pool()
			return draining == 0
		})
		ready, _ := client.tcp.Pool()
		reused := false
		for i := range ready { // the pool is first in, first out: one of these takes it
			c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
			if err != nil {
				t.Fatal(err)
			}
			reused = reused || c.LocalAddr().String() == local
			if err := roundTrip(c, "again"); err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
			c.Abort()
			if ev := echo.event(t); ev != "reset" {
				t.Fatalf("server saw %q after an abort, want reset", ev)
			}
		}
		if !reused {
			t.Errorf("the connection from %s was not reused by the next %d dials", local, ready)
		}
	})

	t.Run("a connection cut without an end frame resets the target", func(t *testing.T) {
		drainEvents()
		c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, "cut"); err != nil {
			t.Fatal(err)
		}
		_ = c.tcp.NetConn().Close() // a FIN, as when the sidecar dies
		if ev := echo.event(t); ev != "reset" {
			t.Fatalf("server saw %q, want reset", ev)
		}
	})

	t.Run("gateway restart", func(t *testing.T) {
		waitFor(t, "spares ready", 5*time.Second, func() bool { ready, _ := client.tcp.Pool(); return ready >= DefaultSpares })
		addr := west.EgressAddr().String()
		west.cancel()
		err := <-west.done
		west.done <- err // for its cleanup
		west2 := startGateway(t, doms["west"], &StaticCatalog{}, peers, func(c *Config) {
			tweak(c)
			c.EgressAddr = addr
		})
		waitFor(t, "new west connected to east", 10*time.Second, func() bool { return west2.ClusterUp("east") })
		for i := range 2 * DefaultSpares {
			c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
			if err != nil {
				t.Fatalf("dial %d after the restart: %v", i, err)
			}
			if err := roundTrip(c, "after restart"); err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
	})
}

// TestEarlyBytes: a DialEarly connection sends its header with the first
// write in one TLS record (a tunnel.FrameWriter with the header as its
// prefix, as in egress.Conn), and the egress gets those bytes, without
// blocking, to forward them with the header; with no early bytes, early
// returns at once, and the end frame that came early is kept.
func TestEarlyBytes(t *testing.T) {
	checkLeaks(t)
	cert, pool := selfSigned(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hdr, err := tunnel.AppendRequest(nil, &tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		send  func(fw *tunnel.FrameWriter) error
		early string
		eof   bool // the end frame came early too
	}{
		{"first write", func(fw *tunnel.FrameWriter) error { _, err := fw.Write([]byte("hello")); return err }, "hello", false},
		{"write and half-close", func(fw *tunnel.FrameWriter) error {
			if _, err := fw.Write([]byte("bye")); err != nil {
				return err
			}
			return fw.End()
		}, "bye", true},
		{"header alone", func(fw *tunnel.FrameWriter) error { return fw.Flush() }, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			srv, err := ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			_ = srv.SetDeadline(time.Now().Add(10 * time.Second))
			cc := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: "checkout.shop", MinVersion: tls.VersionTLS13})
			br := &batchReader{TCPConn: srv}
			sc := tls.Server(br, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
			errc := make(chan error, 1)
			go func() { errc <- cc.Handshake() }()
			if err := sc.Handshake(); err != nil {
				t.Fatal(err)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			fw := &tunnel.FrameWriter{W: cc}
			fw.Prefix(hdr)
			if err := tc.send(fw); err != nil {
				t.Fatal(err)
			}

			e := &tlsEnd{c: sc, tcp: srv, br: br}
			got, err := tunnel.ReadRequest(e)
			if err != nil || got.Service != "checkout" {
				t.Fatalf("header: %+v, %v", got, err)
			}
			start := time.Now()
			early, done := e.early()
			defer done()
			if string(early) != tc.early {
				t.Errorf("early bytes %q, want %q", early, tc.early)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("early took %s: it must not wait", d)
			}
			if tc.eof {
				if n, err := e.Read(make([]byte, 8)); n != 0 || !errors.Is(err, io.EOF) {
					t.Errorf("read after the early end frame: %d, %v, want EOF", n, err)
				}
				return
			}
			// Later bytes still arrive, in frames.
			if _, err := fw.Write([]byte("later")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 16)
			n, err := e.Read(buf)
			if err != nil || string(buf[:n]) != "later" {
				t.Errorf("read after early: %q, %v", buf[:n], err)
			}
		})
	}
}
