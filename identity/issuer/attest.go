package issuer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// peerCredentials is a gRPC transport "security" layer that does no
// encryption (the unix socket is local) but records who connected: the
// kernel's SO_PEERCRED for the connection and the socket it arrived on.
type peerCredentials struct {
	onConn func() // counts attested connections; may be nil
}

var _ credentials.TransportCredentials = peerCredentials{}

// peerInfo is the credentials.AuthInfo the Workload API handlers read.
type peerInfo struct {
	credentials.CommonAuthInfo
	uid, gid uint32
	pid      int32
	socket   string
}

func (peerInfo) AuthType() string { return "unix-peercred" }

func (pc peerCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("attest caller: connection is %T, want a unix socket", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("attest caller: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, fmt.Errorf("attest caller: %w", err)
	}
	if credErr != nil {
		return nil, nil, fmt.Errorf("attest caller: read SO_PEERCRED: %w", credErr)
	}
	if pc.onConn != nil {
		pc.onConn()
	}
	return conn, peerInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		uid:            cred.Uid, gid: cred.Gid, pid: cred.Pid,
		socket: uc.LocalAddr().String(),
	}, nil
}

func (peerCredentials) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peer credentials are server-side only")
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "unix-peercred"}
}

func (pc peerCredentials) Clone() credentials.TransportCredentials { return pc }

//nolint:staticcheck // required by the interface
func (peerCredentials) OverrideServerName(string) error { return nil }

// callerFromContext attests the caller of an RPC. The executable path is read
// per call from /proc/<pid>/exe: it may be missing (process gone, or not
// ours to inspect), in which case path selectors simply do not match.
//
// Like every SO_PEERCRED-based attestor (SPIRE's unix attestor included), a
// process that exits and whose pid is reused between connect and call could
// be misattributed; the window is the life of one connection.
func callerFromContext(ctx context.Context) (caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return caller{}, errors.New("no peer in context")
	}
	info, ok := p.AuthInfo.(peerInfo)
	if !ok {
		return caller{}, fmt.Errorf("peer auth info is %T, want unix peer credentials", p.AuthInfo)
	}
	c := caller{uid: info.uid, gid: info.gid, pid: info.pid, socket: info.socket}
	if exe, err := os.Readlink("/proc/" + strconv.Itoa(int(info.pid)) + "/exe"); err == nil {
		c.path = exe
	}
	return c, nil
}
