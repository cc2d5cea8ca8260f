package gateway

import (
	"net"
	"syscall"
)

// setUDPBuffers asks for want bytes of receive and send buffer, forcing past
// net.core.{r,w}mem_max when the process may (CAP_NET_ADMIN), and returns
// what the kernel granted (it reports double the usable size; the halved
// figure is returned).
func setUDPBuffers(c *net.UDPConn, want int) (rcv, snd int, err error) {
	_ = c.SetReadBuffer(want)
	_ = c.SetWriteBuffer(want)
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	cerr := raw.Control(func(fd uintptr) {
		if v, _ := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF); v/2 < want {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, want)
		}
		if v, _ := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF); v/2 < want {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, want)
		}
		rcv, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		if err == nil {
			snd, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
		}
	})
	if cerr != nil {
		return 0, 0, cerr
	}
	return rcv / 2, snd / 2, err
}
