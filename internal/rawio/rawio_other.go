//go:build !linux

package rawio

import "net"

// Wrap returns c: raw socket I/O is implemented on Linux only.
func Wrap(c net.Conn) net.Conn { return c }

// WrapMode returns c: raw socket I/O is implemented on Linux only.
func WrapMode(c net.Conn, m Mode) net.Conn { return c }

// Busy reports false: there is no raw socket I/O to choose here.
func Busy() bool { return false }
