//go:build !linux

package gateway

import "net"

func setUDPBuffers(c *net.UDPConn, want int) (rcv, snd int, err error) {
	_ = c.SetReadBuffer(want)
	_ = c.SetWriteBuffer(want)
	return want, want, nil
}
