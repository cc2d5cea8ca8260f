package sidecar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h),
// which x/sys/unix does not define.
const ip6tSOOriginalDst = 80

// originalDst is where a connection redirected by iptables (nat REDIRECT)
// was going: SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for IPv6, read
// from the connection's conntrack entry. A connection that was not
// redirected has no entry (ENOENT) or its own local address.
func originalDst(c net.Conn) (netip.AddrPort, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original destination: %T is not a TCP connection", c)
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	v4 := tc.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().Is4()
	var dst netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v4 {
			// struct sockaddr_in comes back in the 16 bytes of an ipv6_mreq.
			var m *unix.IPv6Mreq
			if m, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST); serr != nil {
				return
			}
			b := m.Multiaddr
			dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4]))
			return
		}
		// struct sockaddr_in6 comes back in the first 28 bytes of an ip6_mtuinfo.
		var m *unix.IPv6MTUInfo
		if m, serr = unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, ip6tSOOriginalDst); serr != nil {
			return
		}
		var pb [2]byte // the port's bytes in memory are in network order
		binary.NativeEndian.PutUint16(pb[:], m.Addr.Port)
		port := binary.BigEndian.Uint16(pb[:])
		dst = netip.AddrPortFrom(netip.AddrFrom16(m.Addr.Addr).Unmap(), port)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	return dst, nil
}

// bindEphemeral binds a socket about to connect to an ephemeral port of
// the unspecified address and returns the port, so the sidecar knows its
// own passthrough connections if they ever come back to it.
func bindEphemeral(network string, rc syscall.RawConn) (uint16, error) {
	var port uint16
	var serr error
	err := rc.Control(func(fd uintptr) {
		var sa unix.Sockaddr = &unix.SockaddrInet4{}
		if network == "tcp6" {
			sa = &unix.SockaddrInet6{}
		}
		if serr = unix.Bind(int(fd), sa); serr != nil {
			return
		}
		var got unix.Sockaddr
		if got, serr = unix.Getsockname(int(fd)); serr != nil {
			return
		}
		switch a := got.(type) {
		case *unix.SockaddrInet4:
			port = uint16(a.Port)
		case *unix.SockaddrInet6:
			port = uint16(a.Port)
		default:
			serr = errors.New("unexpected socket address family")
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return 0, fmt.Errorf("bind passthrough socket: %w", err)
	}
	return port, nil
}
