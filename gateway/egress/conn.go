package egress

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

// Conn is a proxied connection over an egress TLS connection. After the
// answer its bytes travel in frames (tunnel.FrameReader), so a connection
// whose both directions ended cleanly goes back to the client's pool.
type Conn struct {
	tls *tls.Conn
	tcp *net.TCPConn

	early    bool // DialEarly: the header may still wait in fw
	pending  bool // the answer is still to be read
	once     sync.Once
	answer   error
	answered func() // called once the answer is read, if set

	client    *Client
	fr        tunnel.FrameReader
	fw        tunnel.FrameWriter
	closeOnce sync.Once
	aborted   atomic.Bool
	// rmu and wmu are held by Read and Write; closed is set under both.
	// A Close that finds either busy (another goroutine blocked in Read,
	// as a TLS handshake interrupted by its context is) resets the
	// connection instead of draining it for reuse: draining would read
	// the frames concurrently with that Read.
	rmu, wmu sync.Mutex
	closed   bool
}

var _ net.Conn = (*Conn)(nil)

// readAnswer reads the gateway's answer once, after writing the header if
// it still waits for a first write.
func (c *Conn) readAnswer() error {
	c.once.Do(func() {
		if c.early {
			c.answer = c.fw.Flush()
		}
		if c.answer == nil {
			c.answer = tunnel.ReadResponse(c.tls)
		}
		if c.answered != nil {
			c.answered()
		}
	})
	return c.answer
}

// Read reads application bytes, after the gateway's answer when the
// connection came from DialEarly.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	if c.pending {
		if err := c.readAnswer(); err != nil {
			return 0, err
		}
	}
	return c.fr.Read(p)
}

// Write writes application bytes.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.fw.Write(p)
}

// CloseWrite half-closes: the target reads EOF after the last byte.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	return c.end()
}

// end writes the end frame. Like crypto/tls's close_notify it ignores a
// write deadline in the past (an inner tls.Conn sets one after its own
// close_notify, so that later writes fail; after the end frame they fail
// anyway), and it leaves no deadline, so the connection can be reused.
func (c *Conn) end() error {
	_ = c.tcp.SetWriteDeadline(time.Now().Add(5 * time.Second))
	err := c.fw.End()
	_ = c.tcp.SetWriteDeadline(time.Time{})
	return err
}

// Close ends both directions gracefully: it half-closes, and the connection
// is reused for another Dial once the gateway's end arrives (read in the
// background for up to 2 s, the bytes discarded); the target sees a
// half-close.
func (c *Conn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		if c.aborted.Load() {
			return
		}
		if !c.rmu.TryLock() {
			c.Abort() // a Read is in progress: see rmu
			return
		}
		if !c.wmu.TryLock() {
			c.rmu.Unlock()
			c.Abort()
			return
		}
		c.closed = true
		c.wmu.Unlock()
		c.rmu.Unlock()
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
	c.aborted.Store(true)
	_ = c.tcp.SetLinger(0) // Close sends RST
	_ = c.tcp.Close()
}

// NetConn returns the TCP connection under c. Like tls.Conn.NetConn, reading
// or writing it directly corrupts the connection; closing it is a
// truncation, which resets the target.
func (c *Conn) NetConn() *net.TCPConn { return c.tcp }

// LocalAddr is the client's TCP address.
func (c *Conn) LocalAddr() net.Addr { return c.tcp.LocalAddr() }

// RemoteAddr is the gateway's egress address.
func (c *Conn) RemoteAddr() net.Addr { return c.tcp.RemoteAddr() }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.tcp.SetDeadline(t) }

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.tcp.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.tcp.SetWriteDeadline(t) }
