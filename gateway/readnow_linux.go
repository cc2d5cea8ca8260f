package gateway

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
)

// readNow reads what the socket already holds without waiting for more: it
// fails with os.ErrDeadlineExceeded when there is nothing.
func readNow(tc *net.TCPConn, p []byte) (int, error) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		n    int
		rerr error
	)
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), p)
		return true // never wait for readiness
	}); err != nil {
		return 0, err
	}
	switch {
	case errors.Is(rerr, syscall.EAGAIN):
		return 0, os.ErrDeadlineExceeded
	case rerr != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: tc.LocalAddr(), Addr: tc.RemoteAddr(), Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
