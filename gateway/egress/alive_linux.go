package egress

import (
	"errors"
	"net"
	"syscall"
)

// alive reports whether a spare's gateway has neither closed nor reset it
// (an EOF or an error when peeking). Readable bytes count as alive: they
// are a session ticket, or else a close_notify that Dial's retry absorbs.
func alive(tc *net.TCPConn) bool {
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	ok := false
	var buf [1]byte
	_ = rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		ok = errors.Is(err, syscall.EAGAIN) || (err == nil && n > 0)
		return true
	})
	return ok
}
