package gateway

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/internal/testutil"
)

type testGW struct {
	*Gateway
	reg    *prometheus.Registry
	logs   *testutil.SyncBuffer
	cancel context.CancelFunc
	done   chan error
}

// startGateway runs a gateway for dom's cluster with its gateway SVID.
func startGateway(t testing.TB, dom *gatewaytest.Domain, cat Catalog, peers []Peer, tweak func(*Config)) *testGW {
	t.Helper()
	logs := &testutil.SyncBuffer{}
	reg := prometheus.NewRegistry()
	cfg := Config{
		Cluster: dom.Cluster, TrustDomain: dom.TD, Source: dom.Source(t, "gateway"),
		Peers: peers, Catalog: cat,
		TunnelAddr: "127.0.0.1:0", EgressAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0",
		Logger:   slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry: reg,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatalf("new gateway %s: %v", dom.Cluster, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tg := &testGW{Gateway: g, reg: reg, logs: logs, cancel: cancel, done: make(chan error, 1)}
	go func() { tg.done <- g.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-tg.done
		if t.Failed() {
			t.Logf("gateway %s logs:\n%s", dom.Cluster, logs.String())
		}
	})
	return tg
}

// pair is west and east gateways federated with each other, each knowing the
// other as a peer, and a client for a west sidecar (workload "web").
type pair struct {
	doms       map[string]*gatewaytest.Domain
	west, east *testGW
	eastCat    *StaticCatalog
	client     *Client // the default egress transport, TCP
	quicClient *Client // the QUIC egress
}

// clients names the pair's client of each egress transport, for tests that
// run on both.
func (p *pair) clients() []struct {
	name string
	c    *Client
} {
	return []struct {
		name string
		c    *Client
	}{{"tcp", p.client}, {"quic", p.quicClient}}
}

func newPair(t *testing.T, tweak func(cluster string, c *Config)) *pair {
	t.Helper()
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	p := &pair{doms: doms, eastCat: &StaticCatalog{}}
	// East listens first so that west knows where to dial.
	p.east = startGateway(t, doms["east"], p.eastCat, nil, func(c *Config) {
		c.Federated = []spiffeid.TrustDomain{doms["west"].TD}
		if tweak != nil {
			tweak("east", c)
		}
	})
	p.west = startGateway(t, doms["west"], &StaticCatalog{}, []Peer{{
		Cluster: "east", TrustDomain: doms["east"].TD, Addrs: []string{p.east.TunnelAddr().String()},
	}}, func(c *Config) {
		if tweak != nil {
			tweak("west", c)
		}
	})
	p.client = newClient(t, doms["west"], "web", p.west)
	p.quicClient = newClient(t, doms["west"], "web", p.west, WithTransport(QUIC))
	waitFor(t, "west connected to east", 10*time.Second, func() bool { return p.west.ClusterUp("east") })
	return p
}

func newClient(t testing.TB, dom *gatewaytest.Domain, workload string, g *testGW, opts ...ClientOption) *Client {
	t.Helper()
	c, err := NewClient(dom.Source(t, workload), dom.ID("gateway"), g.EgressAddr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func waitFor(t testing.TB, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func req(port uint16) tunnel.Request {
	return tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: port}
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// lineEcho serves TCP on loopback and echoes lines; it records the first
// line of every connection's "events" so tests can see resets and EOFs.
type lineEcho struct {
	ln     net.Listener
	events chan string
	wg     sync.WaitGroup
	open   atomic.Int64 // connections accepted and not yet ended
}

func newLineEcho(t testing.TB) *lineEcho {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &lineEcho{ln: ln, events: make(chan string, 1024)}
	e.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.open.Add(1)
			e.wg.Go(func() {
				defer e.open.Add(-1) // after the connection's last event
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						switch {
						case errors.Is(err, io.EOF):
							e.emit("eof")
						case strings.Contains(err.Error(), "connection reset"):
							e.emit("reset")
						default:
							e.emit("error: " + err.Error())
						}
						return
					}
					switch strings.TrimSpace(line) {
					case "bye": // reply, then half-close our side
						_, _ = c.Write([]byte("bye\n"))
						_ = c.(*net.TCPConn).CloseWrite()
					case "rst": // reset the connection
						_ = c.(*net.TCPConn).SetLinger(0)
						_ = c.Close()
						e.emit("sent reset")
						return
					default:
						if _, err := c.Write([]byte(line)); err != nil {
							return
						}
					}
				}
			})
		}
	})
	t.Cleanup(func() { ln.Close(); e.wg.Wait() })
	return e
}

// emit records an event for tests that read them. Load tests end thousands
// of connections and read none, so a full channel drops the event instead of
// blocking the handler (and the cleanup that waits for it) forever.
func (e *lineEcho) emit(ev string) {
	select {
	case e.events <- ev:
	default:
	}
}

func (e *lineEcho) endpoint() Endpoint {
	return Endpoint{Addr: netip.MustParseAddrPort(e.ln.Addr().String()), Name: "echo"}
}

func (e *lineEcho) event(t testing.TB) string {
	t.Helper()
	select {
	case ev := <-e.events:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event from the echo server within 5s")
		return ""
	}
}

// roundTrip writes a line and reads it back.
func roundTrip(c net.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	buf := make([]byte, len(msg)+1)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg+"\n" {
		return errors.New("echo mismatch: " + string(buf))
	}
	return nil
}

// selfSigned is a TLS server certificate for "checkout.shop" and a pool
// that trusts it: the inner, end-to-end TLS the gateways must not touch.
func selfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "checkout.shop"},
		DNSNames: []string{"checkout.shop"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// metric returns the value of a counter or gauge with the given labels, 0
// when absent.
func metric(t testing.TB, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				if !hasLabel(m, k, v) {
					continue next
				}
			}
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			return m.Gauge.GetValue()
		}
	}
	return 0
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

// relayedPair starts east (serving cat, federating west) and west, whose
// only peer is east through a fault relay with faults f from the start;
// westTweak may adjust west's config. The relay closes at cleanup.
func relayedPair(t testing.TB, doms map[string]*gatewaytest.Domain, cat Catalog, f faultnet.Faults, westTweak func(*Config)) (west, east *testGW, relay *faultnet.Relay) {
	t.Helper()
	east = startGateway(t, doms["east"], cat, nil, func(c *Config) { c.Federated = []spiffeid.TrustDomain{doms["west"].TD} })
	relay, err := faultnet.New("127.0.0.1:0", east.TunnelAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = relay.Close() })
	if err := relay.SetFaults(f); err != nil {
		t.Fatal(err)
	}
	west = startGateway(t, doms["west"], &StaticCatalog{}, []Peer{{Cluster: "east", TrustDomain: doms["east"].TD, Addrs: []string{relay.Addr().String()}}}, westTweak)
	return west, east, relay
}
