package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

// bufSize is the copy buffer: large enough that a QUIC stream write fills
// many packets and a TCP write is one syscall for a burst.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// end is one side of a spliced conversation.
type end interface {
	io.Reader
	io.Writer
	closeWrite()    // half-close: FIN after the last byte
	abort()         // reset both directions
	release() error // free resources once both directions are done
}

// resetCode is the QUIC stream error code of a reset that propagates a reset
// from the other side (as opposed to a refusal, whose code is the
// tunnel.Code).
const resetCode = quic.StreamErrorCode(0x100)

type streamEnd struct{ s *quic.Stream }

func (e streamEnd) Read(p []byte) (int, error)  { return e.s.Read(p) }
func (e streamEnd) Write(p []byte) (int, error) { return e.s.Write(p) }
func (e streamEnd) closeWrite()                 { _ = e.s.Close() }
func (e streamEnd) abort() {
	e.s.CancelRead(resetCode)
	e.s.CancelWrite(resetCode)
}
func (e streamEnd) release() error                    { return nil }
func (e streamEnd) SetReadDeadline(t time.Time) error { return e.s.SetReadDeadline(t) }
func (e streamEnd) refuse(code tunnel.Code, reason string) {
	refuse(e.s, code, reason)
}
func (e streamEnd) startData()              {}
func (e streamEnd) early() ([]byte, func()) { return nil, func() {} }

// downstream is the sidecar's end of an egress connection (a QUIC stream
// or a TLS connection), or a peer's stream at ingress: the header is read
// from it under a deadline, and it can be refused with a code.
type downstream interface {
	end
	SetReadDeadline(t time.Time) error
	refuse(code tunnel.Code, reason string)
	// early returns, without blocking, the application bytes that arrived
	// with the header (at most maxEarly), to be forwarded with it before
	// the answer; done releases them and may be called more than once.
	early() (b []byte, done func())
	startData() // the ok answer was written: application bytes follow
}

// maxEarly bounds the bytes early returns: a first flight (a TLS
// ClientHello, a request) fits.
const maxEarly = 16 << 10

var (
	_ downstream = streamEnd{}
	_ downstream = (*tlsEnd)(nil)
)

// tlsEnd is a sidecar's connection to the TCP egress: TLS over TCP, which
// crypto/tls reads through br. pre holds bytes already read from it (the
// header's first byte).
type tlsEnd struct {
	c   *tls.Conn
	tcp *net.TCPConn
	br  *batchReader
	pre []byte

	frames  bool // after the header, the sidecar's bytes come in frames (see tunnel.FrameReader)
	data    bool // after the answer: frames both ways
	fr      tunnel.FrameReader
	fw      tunnel.FrameWriter
	aborted atomic.Bool
}

func (e *tlsEnd) startData() {
	e.frames, e.data = true, true
	e.fr.R, e.fw.W = e.c, e.c
}

// early returns the application bytes the sidecar sent right after its
// header (Client.DialEarly sends its first write in the same TLS record)
// that are already received: in crypto/tls's buffer, the batch buffer or
// the socket, read without blocking. The gateway forwards them with the
// header, so the first flight reaches the target one gateway-to-gateway
// round trip sooner, and keeps them until the answer to resend them if it
// retries on another replica.
func (e *tlsEnd) early() ([]byte, func()) {
	e.frames, e.fr.R = true, e.c
	if e.br == nil {
		return nil, func() {}
	}
	bp := bufPool.Get().(*[]byte)
	buf := (*bp)[:maxEarly]
	e.br.nonblock = true
	n := 0
	for n < len(buf) {
		m, err := e.Read(buf[n:])
		n += m
		// Nothing more without blocking, the end frame, or an error: a
		// failure repeats on the next Read, after the answer.
		if err != nil || m == 0 {
			break
		}
	}
	e.br.nonblock = false
	var once sync.Once
	return buf[:n], func() { once.Do(func() { bufPool.Put(bp) }) }
}

// reusable reports whether both directions ended with end frames, so the
// connection can carry the sidecar's next proxied connection.
func (e *tlsEnd) reusable() bool {
	return e.data && e.fr.Ended() && e.fw.Clean() && !e.aborted.Load()
}

// maxTLSRecord is the largest TLS 1.3 record on the wire: 2^14 bytes of
// plaintext plus 256 of expansion and the 5-byte header.
const maxTLSRecord = 1<<14 + 256 + 5

// Read returns one record's bytes, and then, as long as the next records
// are already buffered (so it never blocks), theirs too: crypto/tls hands
// out one record (16 KiB) per Read, and the QUIC stream this feeds costs a
// handoff to quic-go's send loop per Write, so bulk transfers write up to
// bufSize at once instead.
func (e *tlsEnd) Read(p []byte) (int, error) {
	if len(e.pre) > 0 {
		n := copy(p, e.pre)
		e.pre = e.pre[n:]
		return n, nil
	}
	if !e.frames {
		return e.c.Read(p) // the header
	}
	n, err := e.fr.Read(p)
	for err == nil && len(p)-n >= 1<<14 && e.br != nil && e.br.buffered() >= maxTLSRecord {
		var m int
		m, err = e.fr.Read(p[n:])
		n += m
	}
	if n > 0 {
		return n, nil // the end, a truncation or a failure repeats on the next Read
	}
	return n, err
}

// batchReader is the TCP connection under an egress tls.Conn: one read
// syscall fills a pooled buffer, held only while it has unread bytes, so
// the bytes of several records arrive with one syscall and tlsEnd.Read
// can tell that a whole record is there without blocking.
type batchReader struct {
	*net.TCPConn
	buf  *[]byte // nil when empty
	r, w int
	// nonblock: when empty, read only what the socket holds, and fail
	// with os.ErrDeadlineExceeded (a temporary error to crypto/tls, which
	// keeps its state) instead of waiting.
	nonblock bool
}

const batchReadSize = 128 << 10

var batchPool = sync.Pool{New: func() any { b := make([]byte, batchReadSize); return &b }}

func (b *batchReader) Read(p []byte) (int, error) {
	if b.buf == nil {
		bp := batchPool.Get().(*[]byte)
		var n int
		var err error
		if b.nonblock {
			n, err = readNow(b.TCPConn, *bp)
		} else {
			n, err = b.TCPConn.Read(*bp)
		}
		if n <= 0 {
			batchPool.Put(bp)
			return 0, err
		}
		b.buf, b.r, b.w = bp, 0, n
	}
	n := copy(p, (*b.buf)[b.r:b.w])
	b.r += n
	if b.r == b.w {
		batchPool.Put(b.buf)
		b.buf = nil
	}
	return n, nil
}

func (b *batchReader) buffered() int {
	if b.buf == nil {
		return 0
	}
	return b.w - b.r
}

func (e *tlsEnd) Write(p []byte) (int, error) {
	if !e.data {
		return e.c.Write(p)
	}
	return e.fw.Write(p)
}
func (e *tlsEnd) SetReadDeadline(t time.Time) error { return e.tcp.SetReadDeadline(t) }

// release closes the connection unless it can carry another proxied
// connection (serveEgressTCP then waits for its next header).
func (e *tlsEnd) release() error {
	if e.reusable() {
		return nil
	}
	return e.tcp.Close()
}

func (e *tlsEnd) closeWrite() { _ = e.fw.End() }

func (e *tlsEnd) abort() {
	e.aborted.Store(true)
	_ = e.tcp.SetLinger(0) // Close sends RST
	_ = e.tcp.Close()
}

// refuse answers with a refusal and ends the connection: the response and
// a close_notify and FIN are delivered; bytes the sidecar wrote early are
// not read, so the kernel resets the connection, and the sidecar's pending
// writes fail fast.
func (e *tlsEnd) refuse(code tunnel.Code, reason string) {
	_ = e.tcp.SetWriteDeadline(time.Now().Add(time.Second))
	_ = tunnel.WriteResponse(e.c, code, reason)
	_ = e.c.CloseWrite() // close_notify
	_ = e.tcp.CloseWrite()
	_ = e.tcp.Close()
}

type tcpEnd struct{ c *net.TCPConn }

func (e tcpEnd) Read(p []byte) (int, error)  { return e.c.Read(p) }
func (e tcpEnd) Write(p []byte) (int, error) { return e.c.Write(p) }
func (e tcpEnd) closeWrite()                 { _ = e.c.CloseWrite() }
func (e tcpEnd) abort() {
	_ = e.c.SetLinger(0) // Close sends RST
	_ = e.c.Close()
}
func (e tcpEnd) release() error { return e.c.Close() }

// splice copies both ways between a and b until both directions end. An EOF
// on one side half-closes the other; a read or write error (a reset) resets
// both sides, and so does the end of ctx (the QUIC connection carrying the
// stream died, or the gateway stops): a direction blocked reading a TCP peer
// after the other one half-closed would otherwise never notice. count is
// called after each chunk with the direction (true for a to b) and its size.
// It returns the first error, nil after two clean half-closes.
func splice(ctx context.Context, a, b end, count func(aToB bool, n int)) error {
	stop := afterFunc(ctx, func() {
		a.abort()
		b.abort()
	})
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- pipe(b, a, func(n int) { count(true, n) }) }()
	err := pipe(a, b, func(n int) { count(false, n) })
	if err2 := <-errc; err == nil {
		err = err2
	}
	if err == nil {
		err = a.release()
		if err2 := b.release(); err == nil {
			err = err2
		}
	} else {
		_ = a.release()
		_ = b.release()
	}
	return err
}

// pipe copies src to dst with a pooled buffer. It does not use io.Copy,
// whose ReaderFrom/WriterTo shortcuts would allocate a buffer per call for
// these types.
func pipe(dst, src end, count func(int)) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.abort()
				dst.abort()
				return werr
			}
			count(n)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				dst.closeWrite()
				return nil
			}
			dst.abort()
			src.abort()
			return rerr
		}
	}
}

// refuse answers a stream with a refusal and closes it: the response is
// delivered (FIN, not a reset, on the send side) and the receive side is
// reset with the code, so the peer's pending writes fail fast.
func refuse(s *quic.Stream, code tunnel.Code, reason string) {
	_ = tunnel.WriteResponse(s, code, reason)
	_ = s.Close()
	s.CancelRead(quic.StreamErrorCode(code))
}

// connContext ends with parent or when the QUIC connection ends, whichever
// comes first; call the returned function when done with it.
func connContext(parent context.Context, conn *quic.Conn) (context.Context, func()) {
	ctx, cancel := context.WithCancel(parent)
	stop := afterFunc(conn.Context(), cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// afterFunc is context.AfterFunc whose stop, when f has already started,
// waits for f to return: f (an abort, a close) never runs on what its owner
// tore down or reused after stop returned, and no goroutine outlives the
// owner. stop may be called more than once.
func afterFunc(ctx context.Context, f func()) (stop func()) {
	ran := make(chan struct{})
	stopf := context.AfterFunc(ctx, func() {
		defer close(ran)
		f()
	})
	var once sync.Once
	return func() {
		once.Do(func() {
			if !stopf() {
				<-ran
			}
		})
	}
}
