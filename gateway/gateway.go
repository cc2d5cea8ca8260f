// Package gateway is fedmesh's east-west gateway: the only way bytes cross
// from one cluster to another.
//
// Each gateway holds one long-lived QUIC connection (mTLS with SPIFFE SVIDs,
// ALPN fedmesh-tunnel/1) to every replica of every peer cluster's gateway,
// and carries each proxied TCP connection as one stream on it: multiplexing
// without head-of-line blocking and no handshake on the request path.
//
//   - Egress: local sidecars open one TLS 1.3 connection over TCP per
//     proxied connection, reused after a clean end (package egress), or one
//     stream on a QUIC connection to their gateway (mTLS, ALPN
//     fedmesh-egress/1, callers must belong to the local trust domain),
//     starting with a tunnel.Request naming the remote cluster and target.
//     The gateway opens a stream on a live link to that cluster, spreading
//     streams over the peer's replicas, sends the header with the bytes that
//     came with it, and retries another replica if the stream dies before
//     the peer answered.
//   - Ingress: streams from peer gateways (whose SPIFFE ID must be the
//     gateway identity of a federated trust domain) are forwarded only to
//     services this cluster exports, to a ready, non-ejected endpoint, dialed
//     with a timeout; a failed dial moves to another endpoint before any byte
//     was sent.
//
// The gateway never terminates the inner end-to-end TLS between sidecars:
// after the one-byte response it splices opaque bytes, propagating
// half-closes and resets both ways.
package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/fedmesh/fedmesh/gateway/egress"
	"github.com/fedmesh/fedmesh/gateway/peer"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// Defaults.
const (
	DefaultGatewayPath   = egress.DefaultGatewayPath
	DefaultDialTimeout   = time.Second
	DefaultHeaderTimeout = 5 * time.Second
	DefaultEjectFor      = 10 * time.Second
	DefaultMaxStreams    = 100_000
	// DesiredUDPBuffer is what quic-go recommends for its sockets (7 MiB).
	DesiredUDPBuffer = 7 << 20
	maxDialAttempts  = 3
)

// Peer is a remote cluster and the tunnel addresses of its gateway replicas.
type Peer struct {
	Cluster     string
	TrustDomain spiffeid.TrustDomain
	Addrs       []string
}

// Config configures a Gateway. Zero values of optional fields mean defaults.
type Config struct {
	Cluster     string               // this cluster's name (required)
	TrustDomain spiffeid.TrustDomain // this cluster's trust domain (required)
	Source      mtls.Source          // the gateway's SVID and bundles (required)
	// Federated lists the trust domains whose gateways may open tunnels to
	// this one. Default: the trust domains of Peers.
	Federated []spiffeid.TrustDomain
	// GatewayPath is the SPIFFE ID path of gateways in every trust domain.
	GatewayPath string
	Peers       []Peer
	Catalog     Catalog // exported services and endpoints (required for ingress)

	TunnelAddr string // UDP address for peer tunnels, e.g. ":15443" (required)
	EgressAddr string // UDP address for sidecars; "" disables egress
	AdminAddr  string // TCP address of the admin HTTP endpoint; "" disables it

	DeadAfter     time.Duration // peer silence before it is declared dead (1s)
	DialTimeout   time.Duration // dial to a local endpoint (1s)
	HeaderTimeout time.Duration // to receive a stream's header (5s)
	EjectFor      time.Duration // an endpoint whose dial failed is skipped this long (10s)
	MaxStreams    int           // open streams per direction before CodeOverloaded (100,000)
	// QUIC overrides the QUIC config (flow-control windows etc.). The idle
	// timeout and keepalive always come from DeadAfter.
	QUIC *quic.Config
	// StatelessResetKey, kept across restarts (see LoadStatelessResetKey),
	// lets a restarted replica reset connections it no longer knows at once,
	// so sidecars and peers redial in a round trip instead of waiting for
	// an idle timeout. Nil: no stateless resets.
	StatelessResetKey *quic.StatelessResetKey
	// PublishRTT, when set, makes this replica write its RTT to each peer
	// cluster on the gateway Service (AnnotationPeerRTT) for the federation
	// controller. Nil: not published.
	PublishRTT *RTTPublication

	Logger   *slog.Logger
	Registry prometheus.Registerer // metrics; /metrics is served when it is also a Gatherer
}

func (c *Config) setDefaults() {
	if c.GatewayPath == "" {
		c.GatewayPath = DefaultGatewayPath
	}
	if c.DeadAfter == 0 {
		c.DeadAfter = peer.DefaultDeadAfter
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.HeaderTimeout == 0 {
		c.HeaderTimeout = DefaultHeaderTimeout
	}
	if c.EjectFor == 0 {
		c.EjectFor = DefaultEjectFor
	}
	if c.MaxStreams == 0 {
		c.MaxStreams = DefaultMaxStreams
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Federated == nil {
		for _, p := range c.Peers {
			if !slices.Contains(c.Federated, p.TrustDomain) {
				c.Federated = append(c.Federated, p.TrustDomain)
			}
		}
	}
	if c.QUIC == nil {
		c.QUIC = DefaultQUICConfig()
	}
}

func (c *Config) validate() error {
	var errs []error
	if c.Cluster == "" {
		errs = append(errs, errors.New("no cluster name"))
	}
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("no trust domain"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("no SVID source"))
	}
	if c.Catalog == nil {
		errs = append(errs, errors.New("no catalog"))
	}
	if c.TunnelAddr == "" {
		errs = append(errs, errors.New("no tunnel address"))
	}
	if _, err := spiffeid.FromPath(c.TrustDomain, c.GatewayPath); err != nil && !c.TrustDomain.IsZero() {
		errs = append(errs, fmt.Errorf("gateway path %q: %w", c.GatewayPath, err))
	}
	seen := map[string]bool{}
	for _, p := range c.Peers {
		switch {
		case p.Cluster == "" || p.Cluster == c.Cluster:
			errs = append(errs, fmt.Errorf("peer cluster %q: empty or this cluster", p.Cluster))
		case seen[p.Cluster]:
			errs = append(errs, fmt.Errorf("peer cluster %q given twice", p.Cluster))
		case p.TrustDomain.IsZero():
			errs = append(errs, fmt.Errorf("peer cluster %q: no trust domain", p.Cluster))
		case len(p.Addrs) == 0:
			errs = append(errs, fmt.Errorf("peer cluster %q: no gateway address", p.Cluster))
		}
		seen[p.Cluster] = true
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"dead-after", c.DeadAfter}, {"dial timeout", c.DialTimeout}, {"header timeout", c.HeaderTimeout}, {"eject-for", c.EjectFor}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s %s is negative", d.name, d.v))
		}
	}
	if c.DeadAfter > 0 && c.DeadAfter < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("dead-after %s is under 10ms", c.DeadAfter))
	}
	if c.PublishRTT != nil {
		if err := c.PublishRTT.validate(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// DefaultQUICConfig is sized for bulk throughput on one stream: stream and
// connection windows large enough for a few Gbit/s at LAN and moderate WAN
// RTTs, and enough concurrent streams for thousands of proxied connections.
func DefaultQUICConfig() *quic.Config {
	return &quic.Config{
		InitialStreamReceiveWindow:     1 << 20,
		MaxStreamReceiveWindow:         16 << 20,
		InitialConnectionReceiveWindow: 4 << 20,
		MaxConnectionReceiveWindow:     64 << 20,
		MaxIncomingStreams:             1 << 20,
		MaxIncomingUniStreams:          4, // the tunnel's welcome
	}
}

// Gateway is one gateway replica.
type Gateway struct {
	cfg Config
	log *slog.Logger
	m   *metrics

	tunnelConn *net.UDPConn
	tunnelTr   *quic.Transport
	tunnelLn   *quic.Listener
	egressConn *net.UDPConn
	egressTr   *quic.Transport
	egressLn   *quic.Listener
	egressTCP  *net.TCPListener
	egressTLS  *tls.Config
	ticketKeys [][32]byte // newest first; only the rotating goroutine writes after New
	adminLn    net.Listener

	links map[string][]*peer.Link // by cluster

	ingressOpen atomic.Int64
	egressOpen  atomic.Int64

	mu      sync.Mutex
	ejected map[string]time.Time // endpoint addr -> until
	inbound map[*quic.Conn]*inboundConn

	udpRcv, udpSnd int
}

type inboundConn struct {
	ID      string    `json:"id"`
	Remote  string    `json:"remote"`
	Since   time.Time `json:"since"`
	streams atomic.Int64
}

// New validates cfg and binds the gateway's sockets; Run serves them.
func New(cfg Config) (*Gateway, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("configure gateway: %w", err)
	}
	g := &Gateway{
		cfg: cfg, log: cfg.Logger.With("cluster", cfg.Cluster), m: newMetrics(cfg.Registry),
		links: map[string][]*peer.Link{}, ejected: map[string]time.Time{}, inbound: map[*quic.Conn]*inboundConn{},
	}
	ok := false
	defer func() {
		if !ok {
			g.closeSockets()
		}
	}()

	var err error
	g.tunnelConn, err = g.listenUDP("tunnel", cfg.TunnelAddr)
	if err != nil {
		return nil, err
	}
	g.tunnelTr = &quic.Transport{Conn: g.tunnelConn, StatelessResetKey: cfg.StatelessResetKey}
	g.tunnelLn, err = g.tunnelTr.Listen(g.tunnelServerTLS(), g.quicConfig())
	if err != nil {
		return nil, fmt.Errorf("listen tunnel %s: %w", cfg.TunnelAddr, err)
	}
	if cfg.EgressAddr != "" {
		g.egressConn, g.egressTCP, err = g.listenEgress(cfg.EgressAddr)
		if err != nil {
			return nil, err
		}
		g.egressTr = &quic.Transport{Conn: g.egressConn, StatelessResetKey: cfg.StatelessResetKey}
		tlsCfg := mtls.QUICServerConfig(cfg.Source, markAuthz(mtls.MemberOf(cfg.TrustDomain)), tunnel.ALPNEgress)
		g.countHandshakeFailures(tlsCfg, "egress")
		g.egressLn, err = g.egressTr.Listen(tlsCfg, g.quicConfig())
		if err != nil {
			return nil, fmt.Errorf("listen egress %s: %w", cfg.EgressAddr, err)
		}
		// The TCP egress: same identity, ALPN and authorization.
		g.egressTLS = egress.TLSConfig(mtls.QUICServerConfig(cfg.Source, markAuthz(mtls.MemberOf(cfg.TrustDomain)), tunnel.ALPNEgress))
		if err := g.rotateTicketKeys(); err != nil {
			return nil, err
		}
		g.countHandshakeFailures(g.egressTLS, "egress")
	}
	if cfg.AdminAddr != "" {
		g.adminLn, err = net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			return nil, fmt.Errorf("listen admin %s: %w", cfg.AdminAddr, err)
		}
	}
	for _, p := range cfg.Peers {
		gwID, err := spiffeid.FromPath(p.TrustDomain, cfg.GatewayPath)
		if err != nil {
			return nil, fmt.Errorf("peer %s gateway id: %w", p.Cluster, err)
		}
		tlsCfg := mtls.QUICClientConfig(cfg.Source, markAuthz(mtls.OneOf(gwID)), tunnel.ALPNTunnel)
		g.countHandshakeFailures(tlsCfg, "dial")
		for _, addr := range p.Addrs {
			l, err := peer.New(peer.Config{
				Cluster: p.Cluster, Addr: addr, Transport: g.tunnelTr, TLS: tlsCfg, QUIC: g.quicConfig(),
				DeadAfter: cfg.DeadAfter, Logger: g.log, OnChange: g.linkChanged,
			})
			if err != nil {
				return nil, err
			}
			g.links[p.Cluster] = append(g.links[p.Cluster], l)
			g.m.peerUp.WithLabelValues(p.Cluster, addr).Set(0)
		}
	}
	ok = true
	return g, nil
}

func (g *Gateway) quicConfig() *quic.Config {
	q := g.cfg.QUIC.Clone()
	q.MaxIdleTimeout, q.KeepAlivePeriod = peer.Timeouts(g.cfg.DeadAfter)
	q.EnableDatagrams = true // peer links' RTT pings, echoed by acceptTunnel
	return q
}

func (g *Gateway) listenUDP(name, addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve %s address %s: %w", name, addr, err)
	}
	c, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("listen %s %s: %w", name, addr, err)
	}
	rcv, snd, err := setUDPBuffers(c, DesiredUDPBuffer)
	if err != nil {
		g.log.Warn("cannot read UDP buffer sizes", "socket", name, "err", err)
	}
	g.m.udpBuffer.WithLabelValues(name, "rcv").Set(float64(rcv))
	g.m.udpBuffer.WithLabelValues(name, "snd").Set(float64(snd))
	if name == "tunnel" {
		g.udpRcv, g.udpSnd = rcv, snd
	}
	if rcv < DesiredUDPBuffer || snd < DesiredUDPBuffer {
		g.log.Warn("the OS caps UDP socket buffers below what quic-go recommends; throughput will suffer under load "+
			"(raise net.core.rmem_max and net.core.wmem_max to at least 7340032, or run with CAP_NET_ADMIN)",
			"socket", name, "rcv_bytes", rcv, "snd_bytes", snd, "want_bytes", DesiredUDPBuffer)
	}
	return c, nil
}

// errUnauthorized marks authorizer refusals, to tell them from untrusted
// chains in the handshake failure metric.
type errUnauthorized struct{ err error }

func (e errUnauthorized) Error() string { return e.err.Error() }
func (e errUnauthorized) Unwrap() error { return e.err }

// tunnelServerTLS accepts exactly the gateway identity of each federated
// trust domain.
func (g *Gateway) tunnelServerTLS() *tls.Config {
	var ids []spiffeid.ID
	for _, td := range g.cfg.Federated {
		if id, err := spiffeid.FromPath(td, g.cfg.GatewayPath); err == nil {
			ids = append(ids, id)
		}
	}
	c := mtls.QUICServerConfig(g.cfg.Source, markAuthz(mtls.OneOf(ids...)), tunnel.ALPNTunnel)
	g.countHandshakeFailures(c, "tunnel")
	return c
}

// countHandshakeFailures wraps the peer verification of a go-spiffe config to
// count refusals by reason.
func (g *Gateway) countHandshakeFailures(c *tls.Config, listener string) {
	verify := c.VerifyPeerCertificate
	if verify == nil {
		return
	}
	c.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		err := verify(raw, chains)
		if err != nil {
			reason := "untrusted"
			if isAuthzError(err) {
				reason = "unauthorized"
			}
			g.m.handshakeFail.WithLabelValues(listener, reason).Inc()
			g.log.Warn("mtls peer refused", "listener", listener, "reason", reason, "err", err)
		}
		return err
	}
}

// markAuthz tags an authorizer's refusals, so that the handshake failure
// metric tells "trusted chain, identity not allowed" from "untrusted chain".
func markAuthz(a tlsconfig.Authorizer) tlsconfig.Authorizer {
	return func(id spiffeid.ID, chains [][]*x509.Certificate) error {
		if err := a(id, chains); err != nil {
			return errUnauthorized{err}
		}
		return nil
	}
}

func isAuthzError(err error) bool {
	var u errUnauthorized
	return errors.As(err, &u)
}

// TunnelAddr is the bound tunnel address.
func (g *Gateway) TunnelAddr() *net.UDPAddr { return g.tunnelConn.LocalAddr().(*net.UDPAddr) }

// EgressAddr is the bound egress address, nil when egress is disabled.
func (g *Gateway) EgressAddr() *net.UDPAddr {
	if g.egressConn == nil {
		return nil
	}
	return g.egressConn.LocalAddr().(*net.UDPAddr)
}

// AdminAddr is the bound admin address, nil when disabled.
func (g *Gateway) AdminAddr() net.Addr {
	if g.adminLn == nil {
		return nil
	}
	return g.adminLn.Addr()
}

func (g *Gateway) closeSockets() {
	for _, c := range []interface{ Close() error }{g.tunnelLn, g.egressLn, g.tunnelTr, g.egressTr, g.adminLn} {
		if c != nil && !isNilInterface(c) {
			_ = c.Close()
		}
	}
	for _, c := range []*net.UDPConn{g.tunnelConn, g.egressConn} {
		if c != nil {
			_ = c.Close()
		}
	}
	if g.egressTCP != nil {
		_ = g.egressTCP.Close()
	}
}

func isNilInterface(c interface{ Close() error }) bool {
	switch v := c.(type) {
	case *quic.Listener:
		return v == nil
	case *quic.Transport:
		return v == nil
	case net.Listener:
		return v == nil
	}
	return false
}

// Run serves until ctx ends, then closes every connection and socket. It
// returns nil after a shutdown by ctx.
func (g *Gateway) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, ls := range g.links {
		for _, l := range ls {
			wg.Go(func() { l.Run(ctx) })
		}
	}
	wg.Go(func() { g.acceptTunnel(ctx, &wg) })
	if g.egressLn != nil {
		wg.Go(func() { g.acceptEgress(ctx, &wg) })
		wg.Go(func() { g.acceptEgressTCP(ctx, &wg) })
	}
	var srv *http.Server
	if g.adminLn != nil {
		srv = &http.Server{Handler: g.AdminHandler(), ReadHeaderTimeout: 5 * time.Second}
		wg.Go(func() {
			if err := srv.Serve(g.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				g.log.Error("admin endpoint stopped", "err", err)
			}
		})
	}
	wg.Go(func() { g.publishRTT(ctx) })
	if g.cfg.PublishRTT != nil {
		p := newRTTPublisher(g.cfg.PublishRTT, g.PeerRTTs, g.log, func(result string) { g.m.rttPublications.WithLabelValues(result).Inc() })
		wg.Go(func() { p.run(ctx) })
	}
	if g.egressTLS != nil {
		wg.Go(func() { g.keepRotatingTicketKeys(ctx) })
	}
	g.log.Info("gateway serving", "tunnel", g.TunnelAddr().String(), "egress", addrString(g.EgressAddr()), "admin", addrString(g.AdminAddr()))
	<-ctx.Done()
	if srv != nil {
		_ = srv.Close()
	}
	_ = g.tunnelLn.Close()
	if g.egressLn != nil {
		_ = g.egressLn.Close()
		_ = g.egressTCP.Close()
	}
	g.mu.Lock()
	for c := range g.inbound {
		_ = c.CloseWithError(0, "gateway shutting down")
	}
	g.mu.Unlock()
	wg.Wait()
	g.closeSockets()
	return nil
}

func addrString(a net.Addr) string {
	if a == nil || isNilAddr(a) {
		return ""
	}
	return a.String()
}

func isNilAddr(a net.Addr) bool {
	u, ok := a.(*net.UDPAddr)
	return ok && u == nil
}

func (g *Gateway) linkChanged(l *peer.Link, up bool) {
	v := 0.0
	if up {
		v = 1
		g.m.peerConnects.WithLabelValues(l.Cluster(), l.Addr()).Inc()
	}
	g.m.peerUp.WithLabelValues(l.Cluster(), l.Addr()).Set(v)
}

func (g *Gateway) publishRTT(ctx context.Context) {
	every(ctx, time.Second, func() {
		for _, ls := range g.links {
			for _, l := range ls {
				st := l.Status()
				g.m.peerRTT.WithLabelValues(st.Cluster, st.Addr).Set(st.RTTP50.Seconds())
			}
		}
	})
}

// every calls f every d until ctx ends.
func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// acceptTunnel accepts connections from peer gateways. The mTLS handshake
// (with the authorizer) completed inside Accept.
func (g *Gateway) acceptTunnel(ctx context.Context, wg *sync.WaitGroup) {
	for {
		conn, err := g.tunnelLn.Accept(ctx)
		if err != nil {
			return
		}
		id, err := mtls.PeerID(conn.ConnectionState().TLS)
		if err != nil { // cannot happen after go-spiffe verification; refuse anyway
			_ = conn.CloseWithError(1, "no spiffe id")
			continue
		}
		// The welcome tells the dialer we accepted its identity (see
		// peer.Link), and which cluster we serve.
		if us, err := conn.OpenUniStream(); err == nil {
			_ = tunnel.WriteResponse(us, tunnel.CodeOK, g.cfg.Cluster)
			_ = us.Close()
		}
		ic := &inboundConn{ID: id.String(), Remote: conn.RemoteAddr().String(), Since: time.Now()}
		g.mu.Lock()
		g.inbound[conn] = ic
		g.mu.Unlock()
		g.log.Info("peer gateway connected in", "peer_id", ic.ID, "remote", ic.Remote)
		wg.Go(func() {
			// Streams of this connection end with it: their splices abort.
			cctx, done := connContext(ctx, conn)
			defer done()
			wg.Go(func() { peer.ServeDatagrams(cctx, conn, nil) }) // echo the dialer's RTT pings
			defer func() {
				g.mu.Lock()
				delete(g.inbound, conn)
				g.mu.Unlock()
			}()
			for {
				s, err := conn.AcceptStream(cctx)
				if err != nil {
					g.log.Info("peer gateway connection ended", "peer_id", ic.ID, "err", context.Cause(conn.Context()))
					return
				}
				ic.streams.Add(1)
				wg.Go(func() {
					defer ic.streams.Add(-1)
					g.serveIngress(cctx, s, id)
				})
			}
		})
	}
}

// serveIngress owns one stream from a peer gateway.
func (g *Gateway) serveIngress(ctx context.Context, s *quic.Stream, from spiffeid.ID) {
	if n := g.ingressOpen.Add(1); n > int64(g.cfg.MaxStreams) {
		g.ingressOpen.Add(-1)
		g.finish("ingress", tunnel.CodeOverloaded)
		g.m.drops.WithLabelValues("overloaded").Inc()
		refuse(s, tunnel.CodeOverloaded, "ingress stream limit reached")
		return
	}
	g.m.streamsOpen.WithLabelValues("ingress").Inc()
	defer func() {
		g.ingressOpen.Add(-1)
		g.m.streamsOpen.WithLabelValues("ingress").Dec()
	}()
	req, ok := g.readHeader(streamEnd{s}, "ingress")
	if !ok {
		return
	}
	log := g.log.With("target", req.Target(), "source_cluster", req.SourceCluster, "peer_id", from.String())
	if req.Cluster != g.cfg.Cluster {
		g.finish("ingress", tunnel.CodeForbidden)
		refuse(s, tunnel.CodeForbidden, fmt.Sprintf("this gateway serves cluster %s, not %s", g.cfg.Cluster, req.Cluster))
		return
	}
	eps, exported := g.cfg.Catalog.Lookup(req.Namespace, req.Service, int32(req.Port))
	if !exported {
		g.finish("ingress", tunnel.CodeNotExported)
		refuse(s, tunnel.CodeNotExported, fmt.Sprintf("%s is not exported by cluster %s", req.Target(), g.cfg.Cluster))
		return
	}
	if req.Endpoint != "" {
		// The caller's sidecar balances this cluster's pods itself and
		// asks for one: only that one, and only if it is a ready endpoint
		// of the exported service.
		i := slices.IndexFunc(eps, func(e Endpoint) bool { return e.Addr.String() == req.Endpoint })
		if i < 0 {
			g.finish("ingress", tunnel.CodeNoHealthyEndpoint)
			refuse(s, tunnel.CodeNoHealthyEndpoint, fmt.Sprintf("%s is not a ready endpoint of %s in %s", req.Endpoint, req.Target(), g.cfg.Cluster))
			return
		}
		eps = eps[i : i+1]
	}
	conn, err := g.dialEndpoint(ctx, eps)
	if err != nil {
		log.Warn("no endpoint accepted the connection", "err", err)
		g.finish("ingress", tunnel.CodeNoHealthyEndpoint)
		refuse(s, tunnel.CodeNoHealthyEndpoint, fmt.Sprintf("%s in %s: %v", req.Target(), g.cfg.Cluster, err))
		return
	}
	if err := tunnel.WriteResponse(s, tunnel.CodeOK, ""); err != nil {
		_ = conn.Close()
		streamEnd{s}.abort()
		g.finish("ingress", tunnel.CodeOK)
		return
	}
	err = splice(ctx, streamEnd{s}, tcpEnd{conn}, g.counter("ingress"))
	g.finishSpliced("ingress", err)
}

// readHeader reads a stream's header under the header deadline and refuses
// the stream (with a reason) when it is malformed or late.
func (g *Gateway) readHeader(d downstream, direction string) (tunnel.Request, bool) {
	_ = d.SetReadDeadline(time.Now().Add(g.cfg.HeaderTimeout))
	req, err := tunnel.ReadRequest(d)
	_ = d.SetReadDeadline(time.Time{})
	if err == nil {
		return req, true
	}
	var te *tunnel.Error
	reason := "bad_header"
	if !errors.As(err, &te) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			reason = "header_timeout"
			te = &tunnel.Error{Code: tunnel.CodeBadRequest, Reason: fmt.Sprintf("no complete header within %s", g.cfg.HeaderTimeout)}
		} else {
			reason = "header_cut"
			te = &tunnel.Error{Code: tunnel.CodeBadRequest, Reason: "stream ended inside the header"}
		}
	}
	g.m.drops.WithLabelValues(reason).Inc()
	g.finish(direction, te.Code)
	g.log.Debug("refused stream header", "direction", direction, "reason", te.Reason)
	d.refuse(te.Code, te.Reason)
	return tunnel.Request{}, false
}

func (g *Gateway) finish(direction string, code tunnel.Code) {
	g.m.streamsTotal.WithLabelValues(direction, code.String()).Inc()
}

func (g *Gateway) finishSpliced(direction string, err error) {
	result := "ok"
	if err != nil {
		result = "reset"
	}
	g.m.streamsTotal.WithLabelValues(direction, result).Inc()
}

func (g *Gateway) counter(direction string) func(bool, int) {
	toCaller := g.m.bytes.WithLabelValues(direction, "to_caller")
	toTarget := g.m.bytes.WithLabelValues(direction, "to_target")
	return func(aToB bool, n int) {
		if aToB {
			toTarget.Add(float64(n))
		} else {
			toCaller.Add(float64(n))
		}
	}
}

// dialEndpoint tries up to maxDialAttempts distinct endpoints in random order,
// skipping ejected ones (unless all are), and ejects each that fails.
func (g *Gateway) dialEndpoint(ctx context.Context, eps []Endpoint) (*net.TCPConn, error) {
	if len(eps) == 0 {
		return nil, errors.New("no ready endpoint")
	}
	now := time.Now()
	order := rand.Perm(len(eps))
	g.mu.Lock()
	slices.SortStableFunc(order, func(a, b int) int { // healthy first
		ea, eb := g.ejected[eps[a].Addr.String()].After(now), g.ejected[eps[b].Addr.String()].After(now)
		switch {
		case ea == eb:
			return 0
		case eb:
			return -1
		}
		return 1
	})
	g.mu.Unlock()
	var errs []error
	d := net.Dialer{Timeout: g.cfg.DialTimeout}
	for i, idx := range order {
		if i == maxDialAttempts {
			break
		}
		ep := eps[idx]
		c, err := d.DialContext(ctx, "tcp", ep.Addr.String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		g.m.dialFailures.Inc()
		g.mu.Lock()
		g.ejected[ep.Addr.String()] = time.Now().Add(g.cfg.EjectFor)
		g.mu.Unlock()
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("dial endpoints: %w", errors.Join(errs...))
}

// acceptEgress accepts connections from local sidecars.
func (g *Gateway) acceptEgress(ctx context.Context, wg *sync.WaitGroup) {
	for {
		conn, err := g.egressLn.Accept(ctx)
		if err != nil {
			return
		}
		id, err := mtls.PeerID(conn.ConnectionState().TLS)
		if err != nil {
			_ = conn.CloseWithError(1, "no spiffe id")
			continue
		}
		wg.Go(func() {
			cctx, done := connContext(ctx, conn)
			defer done()
			for {
				s, err := conn.AcceptStream(cctx)
				if err != nil {
					break
				}
				wg.Go(func() { g.serveEgress(cctx, streamEnd{s}, id) })
			}
			// The connection ended, or the gateway stops: then tell the
			// sidecar now rather than let it time out.
			if ctx.Err() != nil {
				_ = conn.CloseWithError(0, "gateway shutting down")
			}
		})
	}
}

// serveEgress owns one proxied connection from a local sidecar: a QUIC
// stream or a TLS connection of the TCP egress.
func (g *Gateway) serveEgress(ctx context.Context, s downstream, caller spiffeid.ID) {
	if n := g.egressOpen.Add(1); n > int64(g.cfg.MaxStreams) {
		g.egressOpen.Add(-1)
		g.finish("egress", tunnel.CodeOverloaded)
		g.m.drops.WithLabelValues("overloaded").Inc()
		s.refuse(tunnel.CodeOverloaded, "egress stream limit reached")
		return
	}
	g.m.streamsOpen.WithLabelValues("egress").Inc()
	defer func() {
		g.egressOpen.Add(-1)
		g.m.streamsOpen.WithLabelValues("egress").Dec()
	}()
	req, ok := g.readHeader(s, "egress")
	if !ok {
		return
	}
	if req.Cluster == g.cfg.Cluster {
		g.finish("egress", tunnel.CodeBadRequest)
		s.refuse(tunnel.CodeBadRequest, fmt.Sprintf("target cluster %s is this cluster: connect to the endpoint directly", req.Cluster))
		return
	}
	links := g.links[req.Cluster]
	if len(links) == 0 {
		g.finish("egress", tunnel.CodeUnknownCluster)
		s.refuse(tunnel.CodeUnknownCluster, fmt.Sprintf("cluster %s is not a peer of %s", req.Cluster, g.cfg.Cluster))
		return
	}
	req.SourceCluster = g.cfg.Cluster
	req.Caller = caller.String()
	early, done := s.early()
	defer done()
	ps, link, err := g.openUpstream(ctx, links, &req, early)
	if err != nil {
		var te *tunnel.Error
		if !errors.As(err, &te) {
			te = &tunnel.Error{Code: tunnel.CodeUnreachable, Reason: fmt.Sprintf("cluster %s: %v", req.Cluster, err)}
		}
		g.finish("egress", te.Code)
		s.refuse(te.Code, te.Reason)
		return
	}
	defer link.Release()
	if err := tunnel.WriteResponse(s, tunnel.CodeOK, ""); err != nil {
		streamEnd{ps}.abort()
		s.abort()
		g.finish("egress", tunnel.CodeOK)
		return
	}
	s.startData()
	count := g.counter("egress")
	if len(early) > 0 {
		count(true, len(early))
	}
	done()
	err = splice(ctx, s, streamEnd{ps}, count)
	g.finishSpliced("egress", err)
}

// openUpstream opens a stream to the target cluster, sends the header with
// early (the bytes that came with the sidecar's header, see
// downstream.early) in one write, and waits for the peer's answer. The
// sidecar's other bytes are not read before the answer, so when a stream
// dies without one (a replica that died and is not yet declared dead) the
// next live replica is tried with the same header and early bytes, and
// nothing is lost. A refusal from the peer is returned as a *tunnel.Error.
func (g *Gateway) openUpstream(ctx context.Context, links []*peer.Link, req *tunnel.Request, early []byte) (*quic.Stream, *peer.Link, error) {
	msg, err := tunnel.AppendRequest(make([]byte, 0, tunnel.HeaderPrefixLen+tunnel.MaxBodyLen+len(early)), req)
	if err != nil {
		return nil, nil, err
	}
	msg = append(msg, early...)
	var errs []error
	tried := make([]bool, len(links))
	for range links {
		l := pick(links, tried)
		if l == nil {
			break
		}
		octx, cancel := context.WithTimeout(ctx, g.cfg.DeadAfter+g.cfg.HeaderTimeout)
		ps, err := l.OpenStream(octx)
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if _, err := ps.Write(msg); err == nil {
			err = tunnel.ReadResponse(ps)
			if err == nil {
				return ps, l, nil
			}
			var te *tunnel.Error
			if errors.As(err, &te) {
				ps.CancelWrite(quic.StreamErrorCode(te.Code))
				ps.CancelRead(quic.StreamErrorCode(te.Code))
				l.Release()
				return nil, nil, err
			}
			errs = append(errs, err)
		} else {
			errs = append(errs, err)
		}
		streamEnd{ps}.abort()
		l.Release()
	}
	if len(errs) == 0 {
		return nil, nil, errors.New("no live gateway connection")
	}
	return nil, nil, errors.Join(errs...)
}

// pick is power-of-two-choices by open streams among live, untried links.
func pick(links []*peer.Link, tried []bool) *peer.Link {
	var cand []int
	for i, l := range links {
		if !tried[i] && l.Up() {
			cand = append(cand, i)
		}
	}
	if len(cand) == 0 {
		return nil
	}
	i := cand[rand.IntN(len(cand))]
	if len(cand) > 1 {
		j := cand[rand.IntN(len(cand))]
		if links[j].OpenStreams() < links[i].OpenStreams() {
			i = j
		}
	}
	tried[i] = true
	return links[i]
}

// State is what the admin endpoint serves as JSON, and what `fedctl status`
// reads.
type State struct {
	Cluster     string           `json:"cluster"`
	TrustDomain string           `json:"trust_domain"`
	Tunnel      string           `json:"tunnel_addr"`
	Egress      string           `json:"egress_addr,omitempty"`
	Clusters    []ClusterState   `json:"clusters"`
	Inbound     []InboundState   `json:"inbound"`
	Streams     map[string]int64 `json:"open_streams"`
	UDPBuffers  map[string]int   `json:"udp_buffer_bytes"`
}

// ClusterState is the liveness of one remote cluster: Up when at least one
// of its gateway replicas is connected.
type ClusterState struct {
	Cluster  string        `json:"cluster"`
	Up       bool          `json:"up"`
	Replicas []peer.Status `json:"replicas"`
}

// InboundState is a connection from a peer gateway.
type InboundState struct {
	ID          string    `json:"id"`
	Remote      string    `json:"remote"`
	Since       time.Time `json:"since"`
	OpenStreams int64     `json:"open_streams"`
}

// State returns a snapshot of the gateway.
func (g *Gateway) State() State {
	st := State{
		Cluster: g.cfg.Cluster, TrustDomain: g.cfg.TrustDomain.Name(), Tunnel: g.TunnelAddr().String(),
		Egress:     addrString(g.EgressAddr()),
		Streams:    map[string]int64{"ingress": g.ingressOpen.Load(), "egress": g.egressOpen.Load()},
		UDPBuffers: map[string]int{"rcv": g.udpRcv, "snd": g.udpSnd},
		Clusters:   []ClusterState{}, Inbound: []InboundState{},
	}
	for _, p := range g.cfg.Peers {
		cs := ClusterState{Cluster: p.Cluster}
		for _, l := range g.links[p.Cluster] {
			ls := l.Status()
			cs.Up = cs.Up || ls.Up
			cs.Replicas = append(cs.Replicas, ls)
		}
		st.Clusters = append(st.Clusters, cs)
	}
	g.mu.Lock()
	for _, ic := range g.inbound {
		st.Inbound = append(st.Inbound, InboundState{ID: ic.ID, Remote: ic.Remote, Since: ic.Since, OpenStreams: ic.streams.Load()})
	}
	g.mu.Unlock()
	slices.SortFunc(st.Inbound, func(a, b InboundState) int {
		if a.Remote < b.Remote {
			return -1
		}
		if a.Remote > b.Remote {
			return 1
		}
		return 0
	})
	return st
}

// ClusterUp reports whether any replica of cluster's gateway is connected.
func (g *Gateway) ClusterUp(cluster string) bool {
	for _, l := range g.links[cluster] {
		if l.Up() {
			return true
		}
	}
	return false
}

// AdminHandler serves /state (JSON), /healthz and, when the registry is a
// Gatherer, /metrics.
func (g *Gateway) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /state", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(g.State())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	if gath, ok := g.cfg.Registry.(prometheus.Gatherer); ok {
		mux.Handle("GET /metrics", promhttp.HandlerFor(gath, promhttp.HandlerOpts{}))
	}
	return mux
}
