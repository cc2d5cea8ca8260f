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

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// Client is the sidecar side of egress: one QUIC connection to the local
// gateway, redialed on demand, and one stream per proxied connection.
type Client struct {
	addr *net.UDPAddr
	tls  *tls.Config
	quic *quic.Config
	tr   *quic.Transport

	mu   sync.Mutex
	conn *quic.Conn
}

// NewClient returns a client of the gateway at addr (UDP) whose SPIFFE ID
// must be gatewayID. It binds a local UDP socket; Close releases it.
func NewClient(src mtls.Source, gatewayID spiffeid.ID, addr string) (*Client, error) {
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
	return &Client{
		addr: ua, tr: &quic.Transport{Conn: uc}, quic: q,
		tls: mtls.QUICClientConfig(src, mtls.OneOf(gatewayID), tunnel.ALPNEgress),
	}, nil
}

// Close closes the connection and the socket.
func (c *Client) Close() error {
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
	conn, err := c.tr.Dial(ctx, c.addr, c.tls, c.quic)
	if err != nil {
		return nil, fmt.Errorf("dial gateway egress %s: %w", c.addr, err)
	}
	c.conn = conn
	return conn, nil
}

// Dial opens a stream to req's target through the gateway and waits for the
// answer. A refusal is returned as a *tunnel.Error with its code.
func (c *Client) Dial(ctx context.Context, req tunnel.Request) (*Conn, error) {
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
	return &Conn{Stream: s, local: conn.LocalAddr(), remote: conn.RemoteAddr()}, nil
}

// DialEarly opens a stream to req's target and returns at once, without
// waiting for the gateway's answer: the caller may write right away (a TLS
// ClientHello, a request), saving a round trip to the gateway on every new
// connection. The answer is read by the first Read, which returns the
// refusal as a *tunnel.Error; writes before a refusal are discarded by the
// gateway, which never forwards bytes before the target is connected.
func (c *Client) DialEarly(ctx context.Context, req tunnel.Request) (*Conn, error) {
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
	return &Conn{Stream: s, local: conn.LocalAddr(), remote: conn.RemoteAddr(), pending: true}, nil
}

// Conn is a proxied connection: a net.Conn over a tunnel stream.
type Conn struct {
	*quic.Stream
	local, remote net.Addr

	pending bool // DialEarly: the answer is still to be read
	once    sync.Once
	answer  error
}

// Read reads application bytes, after the gateway's answer when the
// connection came from DialEarly.
func (c *Conn) Read(p []byte) (int, error) {
	if c.pending {
		c.once.Do(func() { c.answer = tunnel.ReadResponse(c.Stream) })
		if c.answer != nil {
			return 0, c.answer
		}
	}
	return c.Stream.Read(p)
}

var _ net.Conn = (*Conn)(nil)

// CloseWrite half-closes: the target reads EOF after the last byte.
func (c *Conn) CloseWrite() error { return c.Stream.Close() }

// Close ends both directions gracefully.
func (c *Conn) Close() error {
	err := c.Stream.Close()
	c.Stream.CancelRead(0)
	return err
}

// Abort resets the connection both ways: the target sees a TCP reset.
func (c *Conn) Abort() {
	c.Stream.CancelRead(resetCode)
	c.Stream.CancelWrite(resetCode)
}

// LocalAddr is the client's UDP address.
func (c *Conn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the gateway's UDP address.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }
