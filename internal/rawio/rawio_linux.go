package rawio

import (
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
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
// What it costs: each sysmon wake-up keeps a CPU from halting for a
// while, and on a VM a moderately loaded proxy answers faster for it. A
// Conn in Auto mode therefore takes the scheduler's path while the
// process's Conns read fewer than busyAbove times a second, and raw system
// calls above: at such rates the CPUs stay awake anyway, and CPU time is
// what limits throughput.
//
// Like a net.Conn, a Conn may be used by several goroutines at once:
// concurrent Reads (and concurrent Writes) take turns.
type Conn struct {
	tc   *net.TCPConn
	rc   syscall.RawConn
	auto bool
	rd   op
	wr   op
}

// Auto mode's thresholds, in reads per second by all of the process's
// Conns in Auto mode (about two per proxied request), with a gap between
// them so that a load near one does not flip the mode back and forth. See
// docs/sidecar.md, "Raw socket I/O", for the measurements they come from.
const (
	busyAbove   = 7000
	idleBelow   = 5000
	sampleReads = 128                    // reads between two looks at the clock
	sampleEvery = 20 * time.Millisecond  // shortest span a rate is measured over
	smoothOver  = 100 * time.Millisecond // time constant of the rate's moving average
)

// load is the process's read rate, sampled by whichever Read comes to a
// sample first.
var load struct {
	reads atomic.Uint64
	mu    sync.Mutex // the sampler; others skip the sample
	wall  time.Duration
	n     uint64  // load.reads at the last sample
	rate  float64 // moving average of reads per second
	busy  atomic.Bool
}

var epoch = time.Now()

// countRead counts one read and reports whether the process is busy.
func countRead() bool {
	if n := load.reads.Add(1); n%sampleReads == 0 && load.mu.TryLock() {
		sample(time.Since(epoch), n)
		load.mu.Unlock()
	}
	return load.busy.Load()
}

// sample updates load.busy from the reads since the last sample, if that
// was sampleEvery ago or more. The rate is averaged over about smoothOver
// (a span that long or longer counts alone), so a burst of a few ms does
// not flip the mode; the rates of light and heavy load lie far apart
// (some 4,000 and 30,000 a second in the HTTP benchmark), so a real change
// crosses a threshold within a sample or two. Called with load.mu held.
func sample(now time.Duration, reads uint64) {
	span := now - load.wall
	if span < sampleEvery {
		return
	}
	rate := float64(reads-load.n) / span.Seconds()
	load.rate += min(1, float64(span)/float64(smoothOver)) * (rate - load.rate)
	switch {
	case load.rate >= busyAbove:
		load.busy.Store(true)
	case load.rate < idleBelow:
		load.busy.Store(false)
	}
	load.wall, load.n = now, reads
}

// Busy reports whether Auto mode currently makes raw system calls.
func Busy() bool { return load.busy.Load() }

// op is one read or write in flight; fn is bound once, so an operation
// allocates nothing.
type op struct {
	mu    sync.Mutex // one operation of this direction at a time
	p     []byte
	n     int
	err   syscall.Errno
	stuck bool // a write the kernel took nothing of, without an error
	sched bool // through the scheduler's syscall path (Auto mode, not busy)
	fn    func(fd uintptr) bool
}

// sys makes one system call, raw or through the scheduler's syscall path.
func (o *op) sys(trap, a1, a2, a3 uintptr) (uintptr, uintptr, syscall.Errno) {
	if o.sched {
		return syscall.Syscall(trap, a1, a2, a3)
	}
	return syscall.RawSyscall(trap, a1, a2, a3)
}

// Wrap returns c as a *Conn in Raw mode when it is a *net.TCPConn, else c
// itself.
func Wrap(c net.Conn) net.Conn { return WrapMode(c, Raw) }

// WrapMode returns c as a *Conn in mode m when it is a *net.TCPConn and m
// is not Std, else c itself.
func WrapMode(c net.Conn, m Mode) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok || m == Std {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	rc2 := &Conn{tc: tc, rc: rc, auto: m == Auto}
	rc2.rd.fn = rc2.rd.read
	rc2.wr.fn = rc2.wr.write
	return rc2
}

func (o *op) read(fd uintptr) bool {
	for {
		n, _, e := o.sys(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&o.p[0])), uintptr(len(o.p)))
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
		n, _, e := o.sys(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&o.p[o.n])), uintptr(len(o.p)-o.n))
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
	o.sched = c.auto && !countRead()
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
	o.sched = c.auto && !load.busy.Load()
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
