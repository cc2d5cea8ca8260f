package gateway

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

// Transport is how a Client reaches its local gateway's egress. Both listen
// on the same port number (TCP and UDP), with the same SPIFFE mTLS and the
// same authorization.
type Transport int

const (
	// TCP (the default): one TCP connection with TLS 1.3 per proxied
	// connection. The local hop is kernel TCP on loopback or a veth, so the
	// path carries one user-space QUIC hop (gateway to gateway) instead of
	// two; a new connection pays a TLS handshake with the local gateway.
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
// keeps ready while it is in use (default DefaultSpares; 0 disables them,
// so every Dial pays the TLS handshake).
func WithSpares(n int) ClientOption { return func(c *Client) { c.nSpares = max(n, 0) } }

// DefaultSpares is the number of ready TCP egress connections: a new proxied
// connection takes one and writes its header at once, so the TLS handshake
// (about 1 ms of CPU on both ends here) is off its path. Spares are made only
// after a Dial and expire after SpareMaxAge without one, so an idle sidecar
// holds none.
const DefaultSpares = 2

// SpareMaxAge is how long a ready connection is kept; it stays below the
// gateway's EgressIdleTimeout.
const SpareMaxAge = 20 * time.Second

// Client is the sidecar side of egress. Over TCP (the default) each proxied
// connection is its own mTLS connection to the local gateway; over QUIC it
// is one stream on a connection to the gateway, redialed on demand.
type Client struct {
	transport Transport
	addr      string

	// TCP
	tcpTLS   *tls.Config
	nSpares  int
	spares   chan spare
	refill   chan struct{}
	ctx      context.Context // ends with Close
	stop     context.CancelFunc
	start    sync.Once
	lastDial atomic.Int64 // unix nanoseconds
	draining atomic.Int32 // closed connections waiting for the gateway's end
	wg       sync.WaitGroup

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
	c := &Client{addr: addr, nSpares: DefaultSpares, refill: make(chan struct{}, 1)}
	c.ctx, c.stop = context.WithCancel(context.Background())
	for _, o := range opts {
		o(c)
	}
	if c.transport == TCP {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("gateway egress address %s: %w", addr, err)
		}
		c.tcpTLS = egressTLS(mtls.QUICClientConfig(src, mtls.OneOf(gatewayID), tunnel.ALPNEgress))
		// Resume sessions with the gateway (see TicketKeyPeriod).
		c.tcpTLS.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		// Room for connections that come back after a clean end beside
		// the ones made ahead (see keepSpares).
		c.spares = make(chan spare, 2*c.nSpares)
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

// egressTLS adapts a TLS 1.3 + ALPN config (mtls.QUIC*Config) for the TCP
// egress, a hop inside one node (loopback or a veth):
//   - full-size records from the first byte, since both ends are bulk copy
//     loops;
//   - P-256 ECDHE only. Every proxied connection is a (resumed) handshake,
//     and the default hybrid X25519MLKEM768 key exchange was most of its
//     CPU in profiles (ML-KEM key generation and a generic X25519), while
//     P-256 has an assembly implementation. The hop never leaves the node,
//     so it gives up post-quantum key exchange there only; the tunnel
//     between gateways keeps Go's defaults.
func egressTLS(c *tls.Config) *tls.Config {
	c.DynamicRecordSizingDisabled = true
	c.CurvePreferences = []tls.CurveID{tls.CurveP256}
	return c
}

// Close closes the QUIC connection and the socket, or the spare TCP
// connections. Connections already returned by Dial stay open.
func (c *Client) Close() error {
	if c.transport == TCP {
		c.stop()
		c.wg.Wait()
		for {
			select {
			case sp := <-c.spares:
				_ = sp.tcp.Close()
			default:
				return nil
			}
		}
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
	if c.transport == TCP {
		return c.dialTCP(ctx, &req, false)
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
// gateway, which never forwards bytes before the target is connected.
func (c *Client) DialEarly(ctx context.Context, req tunnel.Request) (*Conn, error) {
	if c.transport == TCP {
		return c.dialTCP(ctx, &req, true)
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

// dialTCP takes a ready connection (or makes one), writes the header and,
// unless early, reads the answer, all under ctx. A ready connection that
// turns out dead before the answer (the gateway restarted) is replaced by a
// fresh one: no byte of the caller's was forwarded.
//
// Early, the header is not written yet: it goes with the caller's first
// write (or before its first read or close) in one TLS record, so that the
// gateway forwards both in one packet (see tlsEnd.early).
func (c *Client) dialTCP(ctx context.Context, req *tunnel.Request, early bool) (*Conn, error) {
	var hdr []byte
	if early {
		var err error
		if hdr, err = tunnel.AppendRequest(nil, req); err != nil {
			return nil, fmt.Errorf("dial %s in %s through gateway: %w", req.Target(), req.Cluster, err)
		}
	}
	for attempt := 1; ; attempt++ {
		sp, reused, err := c.take(ctx)
		if err != nil {
			return nil, err
		}
		conn := &Conn{tls: sp.tls, tcp: sp.tcp, local: sp.tcp.LocalAddr(), remote: sp.tcp.RemoteAddr(), pending: true, client: c}
		conn.fr.r, conn.fw.w = sp.tls, sp.tls
		if c.nSpares > 0 {
			// Top the spares up once this connection has its answer: their
			// handshakes then do not compete for CPU with it.
			conn.answered = c.wantSpares
		}
		if early {
			conn.hdr = hdr
			conn.hdrPending.Store(true)
			return conn, nil
		}
		if dl, ok := ctx.Deadline(); ok {
			_ = sp.tcp.SetDeadline(dl)
		}
		err = tunnel.WriteRequest(sp.tls, req)
		if err == nil {
			err = conn.readAnswer()
		}
		if err == nil {
			_ = sp.tcp.SetDeadline(time.Time{})
			return conn, nil
		}
		if conn.answered != nil {
			conn.answered()
		}
		var te *tunnel.Error
		if errors.As(err, &te) {
			_ = sp.tcp.Close()
			return nil, err
		}
		conn.Abort()
		if !reused || attempt == 3 || ctx.Err() != nil {
			return nil, fmt.Errorf("dial %s in %s through gateway: %w", req.Target(), req.Cluster, err)
		}
	}
}

// spare is a handshaken TCP egress connection that has not sent a header.
type spare struct {
	tls *tls.Conn
	tcp *net.TCPConn
	at  time.Time
}

// take returns a ready connection if one is alive, or handshakes a new one,
// and asks for the spares to be topped up.
func (c *Client) take(ctx context.Context) (spare, bool, error) {
	if c.nSpares > 0 {
		c.lastDial.Store(time.Now().UnixNano())
		c.start.Do(func() { c.wg.Go(c.keepSpares) })
		for {
			select {
			case sp := <-c.spares:
				if time.Since(sp.at) < SpareMaxAge && alive(sp.tcp) {
					return sp, true, nil
				}
				_ = sp.tcp.Close()
				continue
			default:
			}
			break
		}
	}
	sp, err := c.handshake(ctx)
	return sp, false, err
}

func (c *Client) wantSpares() {
	select {
	case c.refill <- struct{}{}:
	default:
	}
}

// handshake connects to the TCP egress and completes the mTLS handshake.
func (c *Client) handshake(ctx context.Context) (spare, error) {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return spare{}, fmt.Errorf("dial gateway egress %s: %w", c.addr, err)
	}
	tc := raw.(*net.TCPConn)
	tlsConn := tls.Client(tc, c.tcpTLS)
	if err := tlsConn.HandshakeContext(ctx); err != nil {
		_ = tc.Close()
		return spare{}, fmt.Errorf("gateway egress %s handshake: %w", c.addr, err)
	}
	return spare{tls: tlsConn, tcp: tc, at: time.Now()}, nil
}

// keepSpares tops the spares up after each Dial, and lets them expire once
// the client has not dialed for SpareMaxAge. A gateway that cannot be
// reached is retried only on the next Dial.
func (c *Client) keepSpares() {
	expire := time.NewTicker(SpareMaxAge / 4)
	defer expire.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-expire.C:
			for range len(c.spares) {
				select {
				case sp := <-c.spares:
					if time.Since(sp.at) < SpareMaxAge {
						c.spares <- sp // room: nothing else fills the channel meanwhile
						continue
					}
					_ = sp.tcp.Close()
				default:
				}
			}
			continue
		case <-c.refill:
		}
		// Connections being drained come back to the pool by themselves.
		for len(c.spares)+int(c.draining.Load()) < c.nSpares && time.Since(time.Unix(0, c.lastDial.Load())) < SpareMaxAge {
			hctx, hcancel := context.WithTimeout(c.ctx, 5*time.Second)
			sp, err := c.handshake(hctx)
			hcancel()
			if err != nil {
				break
			}
			c.putBack(sp)
		}
	}
}

// putBack offers a ready connection to the pool, closing it when the pool
// is full or the client closed.
func (c *Client) putBack(sp spare) {
	if c.ctx.Err() == nil {
		select {
		case c.spares <- sp:
			return
		default:
		}
	}
	_ = sp.tcp.Close()
}

// drainTimeout bounds how long a closed connection waits for the gateway's
// end frame before it is reset instead of reused.
const drainTimeout = 2 * time.Second

// drain reads a closed connection (whose end frame was sent) to the
// gateway's end frame, discarding the bytes, and puts it back in the pool.
func (c *Client) drain(conn *Conn) {
	c.draining.Add(1)
	c.wg.Go(func() {
		defer c.draining.Add(-1)
		stop := context.AfterFunc(c.ctx, func() { _ = conn.tcp.SetReadDeadline(time.Now()) })
		defer stop()
		_ = conn.tcp.SetReadDeadline(time.Now().Add(drainTimeout))
		err := conn.readAnswer()
		if err == nil {
			bp := framePool.Get().(*[]byte)
			for err == nil {
				_, err = conn.fr.Read(*bp)
			}
			framePool.Put(bp)
		}
		if !conn.fr.ended || !stop() {
			conn.Abort()
			return
		}
		_ = conn.tcp.SetDeadline(time.Time{})
		c.putBack(spare{tls: conn.tls, tcp: conn.tcp, at: time.Now()})
	})
}

// Conn is a proxied connection: a net.Conn over an egress TLS connection
// or a QUIC stream.
type Conn struct {
	// exactly one of stream and tls (over tcp) is set
	stream *quic.Stream
	tls    *tls.Conn
	tcp    *net.TCPConn

	local, remote net.Addr

	pending bool // the answer is still to be read
	// DialEarly over TCP: the encoded header, sent with the first write
	// (or before the first read or the end) under hdrMu.
	hdrMu      sync.Mutex
	hdr        []byte
	hdrPending atomic.Bool
	once       sync.Once
	answer     error
	answered   func() // called once the answer is read, if set

	// TCP egress: application bytes travel in frames after the answer (see
	// frameReader), so a connection whose both directions ended cleanly
	// goes back to client's pool.
	client    *Client
	fr        frameReader
	fw        frameWriter
	closeOnce sync.Once
	aborted   atomic.Bool
}

var _ net.Conn = (*Conn)(nil)

func (c *Conn) readAnswer() error {
	c.once.Do(func() {
		if c.stream != nil {
			c.answer = tunnel.ReadResponse(c.stream)
		} else {
			c.answer = tunnel.ReadResponse(c.tls)
		}
		if c.answered != nil {
			c.answered()
		}
	})
	return c.answer
}

// sendHeader writes the pending header of a DialEarly connection with the
// first frame of p and, if end, the end frame, in one TLS write, then the
// rest of p. sent is false when another call already sent the header.
func (c *Conn) sendHeader(p []byte, end bool) (n int, sent bool, err error) {
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	if c.hdr == nil {
		return 0, false, nil
	}
	c.fw.mu.Lock()
	defer c.fw.mu.Unlock()
	if c.fw.err != nil {
		return 0, true, c.fw.err
	}
	bp := framePool.Get().(*[]byte)
	defer framePool.Put(bp)
	msg := append((*bp)[:0], c.hdr...)
	c.hdr = nil
	c.hdrPending.Store(false)
	if len(p) > 0 {
		n = min(len(p), cap(msg)-len(msg)-2)
		msg = binary.BigEndian.AppendUint16(msg, uint16(n))
		msg = append(msg, p[:n]...)
	}
	if end && n == len(p) {
		msg = append(msg, 0, 0)
		c.fw.ended = true
	}
	if _, err := c.tls.Write(msg); err != nil {
		c.fw.err = err
		return 0, true, err
	}
	if n < len(p) {
		m, err := c.fw.writeLocked(p[n:])
		return n + m, true, err
	}
	return n, true, nil
}

// Read reads application bytes, after the gateway's answer when the
// connection came from DialEarly.
func (c *Conn) Read(p []byte) (int, error) {
	if c.hdrPending.Load() {
		if _, _, err := c.sendHeader(nil, false); err != nil {
			return 0, err
		}
	}
	if c.pending {
		if err := c.readAnswer(); err != nil {
			return 0, err
		}
	}
	if c.stream != nil {
		return c.stream.Read(p)
	}
	return c.fr.Read(p)
}

// Write writes application bytes.
func (c *Conn) Write(p []byte) (int, error) {
	if c.stream != nil {
		return c.stream.Write(p)
	}
	if c.hdrPending.Load() {
		if n, sent, err := c.sendHeader(p, false); sent {
			return n, err
		}
	}
	return c.fw.Write(p)
}

// CloseWrite half-closes: the target reads EOF after the last byte.
func (c *Conn) CloseWrite() error {
	if c.stream != nil {
		return c.stream.Close()
	}
	return c.end()
}

// end writes the end frame. Like crypto/tls's close_notify it ignores a
// write deadline in the past (an inner tls.Conn sets one after its own
// close_notify, so that later writes fail; after the end frame they fail
// anyway), and it leaves no deadline, so the connection can be reused.
func (c *Conn) end() error {
	_ = c.tcp.SetWriteDeadline(time.Now().Add(5 * time.Second))
	var err error
	if _, sent, herr := c.sendHeader(nil, true); herr != nil || !sent {
		err = c.fw.end()
	}
	_ = c.tcp.SetWriteDeadline(time.Time{})
	return err
}

// Close ends both directions gracefully. Over TCP it half-closes, and the
// connection is reused for another Dial once the gateway's end arrives
// (read in the background for up to 2 s, the bytes discarded); the target
// sees a half-close.
func (c *Conn) Close() error {
	if c.stream != nil {
		err := c.stream.Close()
		c.stream.CancelRead(0)
		return err
	}
	var err error
	c.closeOnce.Do(func() {
		if c.aborted.Load() {
			return
		}
		if err = c.end(); err != nil || c.client.nSpares == 0 {
			_ = c.tcp.Close()
			return
		}
		c.client.drain(c)
	})
	return err
}

// Abort resets the connection both ways: the target sees a TCP reset.
func (c *Conn) Abort() {
	if c.stream != nil {
		c.stream.CancelRead(resetCode)
		c.stream.CancelWrite(resetCode)
		return
	}
	c.aborted.Store(true)
	_ = c.tcp.SetLinger(0) // Close sends RST
	_ = c.tcp.Close()
}

// LocalAddr is the client's address (UDP or TCP per transport).
func (c *Conn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the gateway's egress address.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	if c.stream != nil {
		return c.stream.SetDeadline(t)
	}
	return c.tcp.SetDeadline(t)
}

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.stream != nil {
		return c.stream.SetReadDeadline(t)
	}
	return c.tcp.SetReadDeadline(t)
}

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.stream != nil {
		return c.stream.SetWriteDeadline(t)
	}
	return c.tcp.SetWriteDeadline(t)
}
