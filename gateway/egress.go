package gateway

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// EgressIdleTimeout is how long a TCP egress connection may wait, after its
// handshake, for the first byte of its header: a client's ready connection
// (see Client) lives this long at most.
const EgressIdleTimeout = time.Minute

// maxEgressBindAttempts bounds the search for a port number free in both
// TCP and UDP when the egress address asks for any port (":0").
const maxEgressBindAttempts = 10

// listenEgress binds the egress address in UDP (QUIC egress) and the same
// port number in TCP (TCP+mTLS egress): TCP and UDP ports are distinct
// namespaces, so sidecars need one address for either transport.
func (g *Gateway) listenEgress(addr string) (*net.UDPConn, *net.TCPListener, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("resolve egress address %s: %w", addr, err)
	}
	for attempt := 1; ; attempt++ {
		uc, err := g.listenUDP("egress", addr)
		if err != nil {
			return nil, nil, err
		}
		port := uc.LocalAddr().(*net.UDPAddr).Port
		tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: ua.IP, Port: port, Zone: ua.Zone})
		if err == nil {
			return uc, tl, nil
		}
		_ = uc.Close()
		if ua.Port != 0 || attempt == maxEgressBindAttempts {
			return nil, nil, fmt.Errorf("listen egress %s (tcp, port %d): %w", addr, port, err)
		}
	}
}

// EgressTCPAddr is the bound TCP egress address (the same port as
// EgressAddr), nil when egress is disabled.
func (g *Gateway) EgressTCPAddr() *net.TCPAddr {
	if g.egressTCP == nil {
		return nil
	}
	return g.egressTCP.Addr().(*net.TCPAddr)
}

// acceptEgressTCP accepts TCP connections from local sidecars until the
// listener closes; each one is served on its own goroutine.
func (g *Gateway) acceptEgressTCP(ctx context.Context, wg *sync.WaitGroup) {
	for {
		c, err := g.egressTCP.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off a little
			// instead of spinning.
			g.log.Warn("egress accept failed", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		wg.Go(func() { g.serveEgressTCP(ctx, c) })
	}
}

// serveEgressTCP owns one TCP connection from a local sidecar: the mTLS
// handshake (same authorization as the QUIC egress) and the header have
// --header-timeout together, then it is one proxied connection. It ends
// with the gateway.
func (g *Gateway) serveEgressTCP(ctx context.Context, c *net.TCPConn) {
	stop := afterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	_ = c.SetNoDelay(true)
	_ = c.SetDeadline(time.Now().Add(g.cfg.HeaderTimeout))
	br := &batchReader{TCPConn: c}
	tc := tls.Server(br, g.egressTLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		// Identity refusals are counted and logged by the verifier.
		g.log.Debug("egress handshake failed", "remote", c.RemoteAddr().String(), "err", err)
		_ = c.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	st := tc.ConnectionState()
	if st.NegotiatedProtocol != tunnel.ALPNEgress { // as strict as QUIC, where ALPN is mandatory
		g.log.Debug("egress connection without ALPN "+tunnel.ALPNEgress, "remote", c.RemoteAddr().String())
		_ = c.Close()
		return
	}
	id, err := mtls.PeerID(st)
	if err != nil { // cannot happen after go-spiffe verification; refuse anyway
		_ = c.Close()
		return
	}
	// A client keeps ready connections (Client spares, and connections
	// whose proxied connection ended cleanly): the header's first byte may
	// take EgressIdleTimeout, the rest of it --header-timeout.
	for {
		var first [1]byte
		_ = c.SetReadDeadline(time.Now().Add(EgressIdleTimeout))
		if _, err := io.ReadFull(tc, first[:]); err != nil {
			_ = c.Close()
			return
		}
		e := &tlsEnd{c: tc, tcp: c, br: br, pre: first[:]}
		g.serveEgress(ctx, e, id)
		if !e.reusable() || ctx.Err() != nil {
			_ = c.Close()
			return
		}
	}
}

// TicketKeyPeriod is how often the TCP egress replaces its TLS session
// ticket key. A ticket lets a sidecar resume (no certificate signatures or
// verification on either end, most of a handshake's CPU) and is accepted
// under the current and the previous key only, so a session resumes at
// most 2 periods after the full handshake that authenticated and authorized
// it; crypto/tls also refuses it once the client's SVID has expired.
const TicketKeyPeriod = time.Minute

func (g *Gateway) rotateTicketKeys() error {
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		return fmt.Errorf("session ticket key: %w", err)
	}
	g.ticketKeys = append([][32]byte{key}, g.ticketKeys...)[:min(len(g.ticketKeys)+1, 2)]
	g.egressTLS.SetSessionTicketKeys(g.ticketKeys)
	return nil
}

func (g *Gateway) keepRotatingTicketKeys(ctx context.Context) {
	every(ctx, TicketKeyPeriod, func() {
		if err := g.rotateTicketKeys(); err != nil {
			g.log.Warn("cannot rotate the egress session ticket key", "err", err)
		}
	})
}
