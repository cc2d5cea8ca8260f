package rawio

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Conn is a TCP connection whose reads and writes are raw system calls on
// the non-blocking socket, waiting on Go's network poller as net.TCPConn
// does when the socket has nothing to read or no room to write.
//
// Why: net.TCPConn enters every read and write through the scheduler's
// syscall path (entersyscall/exitsyscall). When the process was idle, that
// path wakes the runtime's sysmon thread, which then polls every 20 µs
// until the process is idle again; a proxy at load goes idle and busy
// thousands of times a second, and each time pays for waking sysmon and
// its sleeps. A read or write on a non-blocking socket never blocks, so it
// need not tell the scheduler. See docs/sidecar.md, "Raw socket I/O".
//
// Like a net.Conn, a Conn may be used by several goroutines at once:
// concurrent Reads (and concurrent Writes) take turns.
type Conn struct {
	tc *net.TCPConn
	rc syscall.RawConn
	rd op
	wr op
}

// op is one read or write in flight; fn is bound once, so an operation
// allocates nothing.
type op struct {
	mu    sync.Mutex // one operation of this direction at a time
	p     []byte
	n     int
	err   syscall.Errno
	stuck bool // a write the kernel took nothing of, without an error
	fn    func(fd uintptr) bool
}

// Wrap returns c as a *Conn when it is a *net.TCPConn, else c itself.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	rc2 := &Conn{tc: tc, rc: rc}
	rc2.rd.fn = rc2.rd.read
	rc2.wr.fn = rc2.wr.write
	return rc2
}

func (o *op) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&o.p[0])), uintptr(len(o.p)))
		switch e {
		case 0:
			o.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			o.err = e
			return true
		}
	}
}

func (o *op) write(fd uintptr) bool {
	for o.n < len(o.p) {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&o.p[o.n])), uintptr(len(o.p)-o.n))
		switch e {
		case 0:
			if n == 0 { // as poll.FD.Write: never loop on a write that takes nothing
				o.stuck = true
				return true
			}
			o.n += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			o.err = e
			return true
		}
	}
	return true
}

// Read reads like net.TCPConn.Read: deadlines and Close apply.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	o := &c.rd
	o.mu.Lock()
	o.p, o.n, o.err = p, 0, 0
	err := c.rc.Read(o.fn)
	n, e := o.n, o.err
	o.p = nil
	o.mu.Unlock()
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case e != 0:
		return 0, c.opError("read", os.NewSyscallError("read", e))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of p unless an error (a deadline, Close, a reset)
// stops it, like net.TCPConn.Write.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	o := &c.wr
	o.mu.Lock()
	o.p, o.n, o.err, o.stuck = p, 0, 0, false
	err := c.rc.Write(o.fn)
	n, e, stuck := o.n, o.err, o.stuck
	o.p = nil
	o.mu.Unlock()
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case e != 0:
		return n, c.opError("write", os.NewSyscallError("write", e))
	case stuck:
		return n, c.opError("write", io.ErrUnexpectedEOF)
	}
	return n, nil
}

// opError shapes err as net.TCPConn would: a *net.OpError naming the op,
// so errors.Is(err, net.ErrClosed / os.ErrDeadlineExceeded) and
// net.Error's Timeout keep working.
func (c *Conn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok { // from RawConn: deadline, closed
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.tc.LocalAddr(), Addr: c.tc.RemoteAddr(), Err: err}
}

func (c *Conn) Close() error                       { return c.tc.Close() }
func (c *Conn) CloseWrite() error                  { return c.tc.CloseWrite() }
func (c *Conn) CloseRead() error                   { return c.tc.CloseRead() }
func (c *Conn) LocalAddr() net.Addr                { return c.tc.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr               { return c.tc.RemoteAddr() }
func (c *Conn) SetDeadline(t time.Time) error      { return c.tc.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.tc.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.tc.SetWriteDeadline(t) }
func (c *Conn) SetLinger(sec int) error            { return c.tc.SetLinger(sec) }
func (c *Conn) SetNoDelay(on bool) error           { return c.tc.SetNoDelay(on) }

// SyscallConn is the underlying socket's, for socket options.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }

// TCPConn is the wrapped connection.
func (c *Conn) TCPConn() *net.TCPConn { return c.tc }
