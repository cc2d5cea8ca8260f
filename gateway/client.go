package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/egress"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// Transport is how a Client reaches its local gateway's egress. Both listen
// on the same port number (TCP and UDP), with the same SPIFFE mTLS and the
// same authorization.
type Transport int

const (
	// TCP (the default): one TCP connection with TLS 1.3 per proxied
	// connection (package egress). The local hop is kernel TCP on loopback
	// or a veth, so the path carries one user-space QUIC hop (gateway to
	// gateway) instead of two.
	TCP Transport = iota
	// QUIC: one long-lived QUIC connection to the gateway, one stream per
	// proxied connection (the original egress, kept for compatibility).
	QUIC
)

func (t Transport) String() string {
	if t == QUIC {
		return "quic"
	}
	return "tcp"
}

// ClientOption configures a Client.
type ClientOption func(*Client)

// WithTransport selects the egress transport (default TCP).
func WithTransport(t Transport) ClientOption { return func(c *Client) { c.transport = t } }

// WithSpares sets how many handshaken TCP egress connections the client
// keeps ready while it is in use (see egress.WithSpares).
func WithSpares(n int) ClientOption {
	return func(c *Client) { c.tcpOpts = append(c.tcpOpts, egress.WithSpares(n)) }
}

// DefaultSpares and SpareMaxAge: see package egress.
const (
	DefaultSpares = egress.DefaultSpares
	SpareMaxAge   = egress.SpareMaxAge
)

// Client is the sidecar side of egress, over either transport: over TCP
// (the default) it is an egress.Client, which sidecars use directly so as
// not to link quic-go; over QUIC each proxied connection is one stream on a
// connection to the gateway, redialed on demand.
type Client struct {
	transport Transport

	// TCP
	tcp     *egress.Client
	tcpOpts []egress.Option

	// QUIC
	udpAddr *net.UDPAddr
	tls     *tls.Config
	quic    *quic.Config
	tr      *quic.Transport

	mu   sync.Mutex
	conn *quic.Conn
}

// NewClient returns a client of the gateway egress at addr (host:port, TCP
// or UDP per transport) whose SPIFFE ID must be gatewayID. Over QUIC it
// binds a local UDP socket; Close releases it.
func NewClient(src mtls.Source, gatewayID spiffeid.ID, addr string, opts ...ClientOption) (*Client, error) {
	c := &Client{}
	for _, o := range opts {
		o(c)
	}
	if c.transport == TCP {
		tc, err := egress.NewClient(src, gatewayID, addr, c.tcpOpts...)
		if err != nil {
			return nil, err
		}
		c.tcp = tc
		return c, nil
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolve gateway egress %s: %w", addr, err)
	}
	uc, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, fmt.Errorf("bind egress client socket: %w", err)
	}
	_, _, _ = setUDPBuffers(uc, DesiredUDPBuffer)
	q := DefaultQUICConfig()
	// A gateway that vanished without a stateless reset is noticed within
	// the idle timeout; keepalives keep a healthy idle connection open.
	q.MaxIdleTimeout, q.KeepAlivePeriod = 3*time.Second, time.Second
	c.udpAddr, c.tr, c.quic = ua, &quic.Transport{Conn: uc}, q
	c.tls = mtls.QUICClientConfig(src, mtls.OneOf(gatewayID), tunnel.ALPNEgress)
	return c, nil
}

// Close closes the QUIC connection and the socket, or the ready TCP
// connections. Connections already returned by Dial stay open.
func (c *Client) Close() error {
	if c.tcp != nil {
		return c.tcp.Close()
	}
	c.mu.Lock()
	if c.conn != nil {
		_ = c.conn.CloseWithError(0, "client closed")
		c.conn = nil
	}
	c.mu.Unlock()
	err := c.tr.Close()
	_ = c.tr.Conn.Close()
	return err
}

func (c *Client) connection(ctx context.Context) (*quic.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil && c.conn.Context().Err() == nil {
		return c.conn, nil
	}
	conn, err := c.tr.Dial(ctx, c.udpAddr, c.tls, c.quic)
	if err != nil {
		return nil, fmt.Errorf("dial gateway egress %s: %w", c.udpAddr, err)
	}
	c.conn = conn
	return conn, nil
}

// Dial opens a proxied connection to req's target through the gateway and
// waits for the answer. A refusal is returned as a *tunnel.Error with its
// code; any other error means the gateway could not be reached or the
// connection to it failed before an answer.
func (c *Client) Dial(ctx context.Context, req tunnel.Request) (*Conn, error) {
	if c.tcp != nil {
		tc, err := c.tcp.Dial(ctx, req)
		if err != nil {
			return nil, err
		}
		return &Conn{tcp: tc}, nil
	}
	conn, err := c.connection(ctx)
	if err != nil {
		return nil, err
	}
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open egress stream: %w", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	err = tunnel.WriteRequest(s, &req)
	if err == nil {
		err = tunnel.ReadResponse(s)
	}
	if err != nil {
		s.CancelRead(resetCode)
		s.CancelWrite(resetCode)
		var te *tunnel.Error
		if errors.As(err, &te) {
			return nil, err
		}
		return nil, fmt.Errorf("dial %s in %s through gateway: %w", req.Target(), req.Cluster, err)
	}
	_ = s.SetDeadline(time.Time{})
	return &Conn{stream: s, local: conn.LocalAddr(), remote: conn.RemoteAddr()}, nil
}

// DialEarly opens a proxied connection to req's target and returns without
// waiting for the gateway's answer: the caller may write right away (a TLS
// ClientHello, a request), saving a round trip to the gateway on every new
// connection. The answer is read by the first Read, which returns the
// refusal as a *tunnel.Error; writes before a refusal are discarded by the
// gateway, which never forwards bytes before the target is connected. Over
// TCP the header goes with the first write (see egress.Client.DialEarly).
func (c *Client) DialEarly(ctx context.Context, req tunnel.Request) (*Conn, error) {
	if c.tcp != nil {
		tc, err := c.tcp.DialEarly(ctx, req)
		if err != nil {
			return nil, err
		}
		return &Conn{tcp: tc}, nil
	}
	conn, err := c.connection(ctx)
	if err != nil {
		return nil, err
	}
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open egress stream: %w", err)
	}
	if err := tunnel.WriteRequest(s, &req); err != nil {
		s.CancelRead(resetCode)
		s.CancelWrite(resetCode)
		return nil, fmt.Errorf("dial %s in %s through gateway: %w", req.Target(), req.Cluster, err)
	}
	return &Conn{stream: s, local: conn.LocalAddr(), remote: conn.RemoteAddr(), pending: true}, nil
}

// Conn is a proxied connection: an egress.Conn over TCP, or a QUIC stream.
type Conn struct {
	// exactly one of tcp and stream is set
	tcp    *egress.Conn
	stream *quic.Stream

	local, remote net.Addr
	pending       bool // the answer is still to be read
	once          sync.Once
	answer        error
}

var _ net.Conn = (*Conn)(nil)

// Read reads application bytes, after the gateway's answer when the
// connection came from DialEarly.
func (c *Conn) Read(p []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Read(p)
	}
	if c.pending {
		c.once.Do(func() { c.answer = tunnel.ReadResponse(c.stream) })
		if c.answer != nil {
			return 0, c.answer
		}
	}
	return c.stream.Read(p)
}

// Write writes application bytes.
func (c *Conn) Write(p []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Write(p)
	}
	return c.stream.Write(p)
}

// CloseWrite half-closes: the target reads EOF after the last byte.
func (c *Conn) CloseWrite() error {
	if c.tcp != nil {
		return c.tcp.CloseWrite()
	}
	return c.stream.Close()
}

// Close ends both directions gracefully. Over TCP the connection is reused
// once the gateway's end arrives (see egress.Conn.Close); the target sees a
// half-close.
func (c *Conn) Close() error {
	if c.tcp != nil {
		return c.tcp.Close()
	}
	err := c.stream.Close()
	c.stream.CancelRead(0)
	return err
}

// Abort resets the connection both ways: the target sees a reset.
func (c *Conn) Abort() {
	if c.tcp != nil {
		c.tcp.Abort()
		return
	}
	c.stream.CancelRead(resetCode)
	c.stream.CancelWrite(resetCode)
}

// LocalAddr is the client's address (UDP or TCP per transport).
func (c *Conn) LocalAddr() net.Addr {
	if c.tcp != nil {
		return c.tcp.LocalAddr()
	}
	return c.local
}

// RemoteAddr is the gateway's egress address.
func (c *Conn) RemoteAddr() net.Addr {
	if c.tcp != nil {
		return c.tcp.RemoteAddr()
	}
	return c.remote
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetDeadline(t)
	}
	return c.stream.SetDeadline(t)
}

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetReadDeadline(t)
	}
	return c.stream.SetReadDeadline(t)
}

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetWriteDeadline(t)
	}
	return c.stream.SetWriteDeadline(t)
}
