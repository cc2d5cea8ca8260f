// Package egress is the sidecar's side of its gateway's TCP egress: one
// TLS 1.3 connection (SPIFFE mTLS, ALPN fedmesh-egress/1) per proxied
// connection, the tunnel header, the answer, then the bytes in frames
// (tunnel.FrameReader), with ready and reused connections so a new proxied
// connection rarely pays a handshake.
//
// It exists apart from package gateway so that a sidecar reaches its
// gateway without linking quic-go: the gateway's own Client, which can also
// use the QUIC egress, wraps this one for TCP.
package egress

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/rawio"
)

// DefaultGatewayPath is the SPIFFE ID path of gateways in every trust
// domain: a sidecar's gateway is spiffe://<its trust domain><path>.
const DefaultGatewayPath = "/ns/fedmesh-system/sa/gateway"

// DefaultSpares is the number of ready connections: a new proxied
// connection takes one and writes its header at once, so the TLS handshake
// (about 1 ms of CPU on both ends here) is off its path. Spares are made only
// after a Dial and expire after SpareMaxAge without one, so an idle sidecar
// holds none.
const DefaultSpares = 2

// SpareMaxAge is how long a ready connection is kept; it stays below the
// gateway's egress idle timeout (1 minute).
const SpareMaxAge = 20 * time.Second

// Option configures a Client.
type Option func(*Client)

// WithSpares sets how many handshaken connections the client keeps ready
// while it is in use (default DefaultSpares; 0 disables them, so every Dial
// pays the TLS handshake).
func WithSpares(n int) Option { return func(c *Client) { c.nSpares = max(n, 0) } }

// WithSocketIO sets how the client reads and writes its TCP connections
// (internal/rawio; default rawio.Auto; see docs/sidecar.md, "Raw socket
// I/O").
func WithSocketIO(m rawio.Mode) Option { return func(c *Client) { c.sockIO = m } }

// Client dials proxied connections through the local gateway's TCP egress.
type Client struct {
	addr     string
	tls      *tls.Config
	nSpares  int
	sockIO   rawio.Mode
	spares   chan spare
	refill   chan struct{}
	ctx      context.Context // ends with Close
	stop     context.CancelFunc
	start    sync.Once
	lastDial atomic.Int64 // unix nanoseconds
	draining atomic.Int32 // closed connections waiting for the gateway's end

	// mu guards closed and every wg.Add: Close waits for wg only after
	// closed is set, so no goroutine starts while (or after) it waits.
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// NewClient returns a client of the gateway egress at addr (TCP host:port)
// whose SPIFFE ID must be gatewayID.
func NewClient(src mtls.Source, gatewayID spiffeid.ID, addr string, opts ...Option) (*Client, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("gateway egress address %s: %w", addr, err)
	}
	c := &Client{addr: addr, nSpares: DefaultSpares, refill: make(chan struct{}, 1)}
	c.ctx, c.stop = context.WithCancel(context.Background())
	for _, o := range opts {
		o(c)
	}
	c.tls = TLSConfig(mtls.QUICClientConfig(src, mtls.OneOf(gatewayID), tunnel.ALPNEgress))
	// Resume sessions with the gateway (its session tickets rotate).
	c.tls.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	// Room for connections that come back after a clean end beside the
	// ones made ahead (see keepSpares).
	c.spares = make(chan spare, 2*c.nSpares)
	return c, nil
}

// TLSConfig adapts a TLS 1.3 + ALPN config (mtls.QUIC*Config) for the TCP
// egress, a hop inside one node (loopback or a veth), on both ends:
//   - full-size records from the first byte, since both ends are bulk copy
//     loops;
//   - P-256 ECDHE only. Every proxied connection is a (resumed) handshake,
//     and the default hybrid X25519MLKEM768 key exchange was most of its
//     CPU in profiles (ML-KEM key generation and a generic X25519), while
//     P-256 has an assembly implementation. The hop never leaves the node,
//     so it gives up post-quantum key exchange there only; the tunnel
//     between gateways keeps Go's defaults.
func TLSConfig(c *tls.Config) *tls.Config {
	c.DynamicRecordSizingDisabled = true
	c.CurvePreferences = []tls.CurveID{tls.CurveP256}
	return c
}

// Close closes the ready connections and waits for the client's
// goroutines (spare handshakes, drains of closed connections). Connections
// already returned by Dial stay open; one closed later is closed at once
// instead of being drained for reuse.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
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

// Pool reports the connections ready for the next Dial, and the closed
// ones still waiting for the gateway's end before they join them.
func (c *Client) Pool() (ready, draining int) {
	return len(c.spares), int(c.draining.Load())
}

// Dial opens a proxied connection to req's target through the gateway and
// waits for the answer. A refusal is returned as a *tunnel.Error with its
// code; any other error means the gateway could not be reached or the
// connection to it failed before an answer.
func (c *Client) Dial(ctx context.Context, req tunnel.Request) (*Conn, error) {
	return c.dial(ctx, &req, false)
}

// DialEarly opens a proxied connection to req's target and returns without
// waiting for the gateway's answer: the caller may write right away (a TLS
// ClientHello, a request), saving a round trip to the gateway on every new
// connection. The header goes with the first write (or before the first
// read, or the end), in one TLS record, and the gateway forwards the bytes
// that came with it along with the header, before the answer. The answer
// is read by the first Read, which returns a refusal as a *tunnel.Error;
// writes before a refusal are discarded by the gateways, which never
// forward bytes to a target that is not connected.
func (c *Client) DialEarly(ctx context.Context, req tunnel.Request) (*Conn, error) {
	return c.dial(ctx, &req, true)
}

// dial takes a ready connection (or makes one), writes the header and,
// unless early, reads the answer, all under ctx. A ready connection that
// turns out dead before the answer (the gateway restarted) is replaced by a
// fresh one: no byte of the caller's was forwarded.
func (c *Client) dial(ctx context.Context, req *tunnel.Request, early bool) (*Conn, error) {
	hdr, err := tunnel.AppendRequest(nil, req)
	if err != nil {
		return nil, fmt.Errorf("dial %s in %s through gateway: %w", req.Target(), req.Cluster, err)
	}
	for attempt := 1; ; attempt++ {
		sp, reused, err := c.take(ctx)
		if err != nil {
			return nil, err
		}
		conn := &Conn{tls: sp.tls, tcp: sp.tcp, pending: true, client: c}
		conn.fr.R, conn.fw.W = sp.tls, sp.tls
		if c.nSpares > 0 {
			// Top the spares up once this connection has its answer: their
			// handshakes then do not compete for CPU with it.
			conn.answered = c.wantSpares
		}
		if early {
			conn.fw.Prefix(hdr)
			conn.early = true
			return conn, nil
		}
		if dl, ok := ctx.Deadline(); ok {
			_ = sp.tcp.SetDeadline(dl)
		}
		_, err = sp.tls.Write(hdr)
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

// spare is a handshaken connection that has not sent a header.
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
		c.start.Do(func() { c.spawn(c.keepSpares) })
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

// wantSpares wakes keepSpares when the pool is short (a connection that is
// draining will come back): not on every answer, which is on the path of
// the caller's first bytes.
func (c *Client) wantSpares() {
	if len(c.spares)+int(c.draining.Load()) >= c.nSpares {
		return
	}
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
	// Reads and writes go through internal/rawio as WithSocketIO says; tc
	// stays for the liveness peek and Close.
	tlsConn := tls.Client(rawio.WrapMode(tc, c.sockIO), c.tls)
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

// spawn runs f in a goroutine Close waits for; false (f not run) once
// Close has begun.
func (c *Client) spawn(f func()) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Go(f)
	return true
}

// drain reads a closed connection (whose end frame was sent) to the
// gateway's end frame, discarding the bytes, and puts it back in the pool.
// After Close it closes the connection instead.
func (c *Client) drain(conn *Conn) {
	c.draining.Add(1)
	started := c.spawn(func() {
		defer c.draining.Add(-1)
		stop := context.AfterFunc(c.ctx, func() { _ = conn.tcp.SetReadDeadline(time.Now()) })
		defer stop()
		_ = conn.tcp.SetReadDeadline(time.Now().Add(drainTimeout))
		err := conn.readAnswer()
		if err == nil {
			bp := tunnel.FramePool.Get().(*[]byte)
			for err == nil {
				_, err = conn.fr.Read(*bp)
			}
			tunnel.FramePool.Put(bp)
		}
		if !conn.fr.Ended() || !stop() {
			conn.Abort()
			return
		}
		_ = conn.tcp.SetDeadline(time.Time{})
		c.putBack(spare{tls: conn.tls, tcp: conn.tcp, at: time.Now()})
	})
	if !started {
		c.draining.Add(-1)
		_ = conn.tcp.Close()
	}
}
