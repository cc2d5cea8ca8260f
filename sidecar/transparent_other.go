//go:build !linux

package sidecar

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
)

var errNotLinux = errors.New("transparent mode needs Linux (iptables and SO_ORIGINAL_DST)")

func originalDst(net.Conn) (netip.AddrPort, error) { return netip.AddrPort{}, errNotLinux }

func bindEphemeral(string, syscall.RawConn) (uint16, error) { return 0, nil }
