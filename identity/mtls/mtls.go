// Package mtls exists so that every fedmesh hop (sidecar to sidecar, gateway
// to gateway over QUIC, controller to sidecar) authenticates peers the same
// way: SPIFFE X.509-SVIDs from the Workload API, verified by go-spiffe, and
// authorized by trust domain or exact SPIFFE ID.
//
// It deliberately holds nothing but thin helpers over go-spiffe's tlsconfig
// and x509svid packages. Identities come only from the Workload API
// (identity/workload's X509Source, a lean client of the standard API), so
// the same binaries run against fedmesh's own issuer (identity/issuer) or a
// real SPIRE agent with no code change: the source follows
// SPIFFE_ENDPOINT_SOCKET, SVIDs rotate underneath live configs, and
// federated bundles arrive through the same stream.
package mtls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/fedmesh/fedmesh/identity/workload"
)

// EndpointSocketEnv is the standard variable naming the Workload API socket.
const EndpointSocketEnv = "SPIFFE_ENDPOINT_SOCKET"

// Source is what the configs need: the workload's own SVID and the bundles
// to verify peers with. *workload.X509Source is one (and so is go-spiffe's
// *workloadapi.X509Source).
type Source interface {
	x509svid.Source
	x509bundle.Source
}

var _ Source = (*workload.X509Source)(nil)

// NewSource connects to the Workload API at addr ("unix:///path/to.sock"),
// or at $SPIFFE_ENDPOINT_SOCKET when addr is empty, and waits for the first
// SVID. Close the source when done.
func NewSource(ctx context.Context, addr string) (*workload.X509Source, error) {
	if addr == "" {
		addr = os.Getenv(EndpointSocketEnv)
		if addr == "" {
			return nil, fmt.Errorf("connect to workload api: no address given and %s is not set", EndpointSocketEnv)
		}
	}
	src, err := workload.NewX509Source(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("connect to workload api at %s: %w", addr, err)
	}
	return src, nil
}

// MemberOf authorizes peers whose SPIFFE ID is in any of the trust domains,
// typically the local one and every one it federates with. With no trust
// domains it authorizes nobody.
func MemberOf(tds ...spiffeid.TrustDomain) tlsconfig.Authorizer {
	tds = slices.Clone(tds)
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if slices.Contains(tds, id.TrustDomain()) {
			return nil
		}
		names := make([]string, len(tds))
		for i, td := range tds {
			names[i] = td.Name()
		}
		return fmt.Errorf("peer %s: trust domain %s is not one of [%s]", id, id.TrustDomain().Name(), strings.Join(names, " "))
	}
}

// OneOf authorizes exactly the given SPIFFE IDs.
func OneOf(ids ...spiffeid.ID) tlsconfig.Authorizer {
	ids = slices.Clone(ids)
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if slices.Contains(ids, id) {
			return nil
		}
		return fmt.Errorf("peer %s is not an allowed identity", id)
	}
}

// ServerConfig is a TLS server config that presents the source's SVID,
// requires a client SVID that chains to one of the source's bundles, and
// admits it if authz does.
func ServerConfig(src Source, authz tlsconfig.Authorizer) *tls.Config {
	return tlsconfig.MTLSServerConfig(src, src, authz)
}

// ClientConfig is the client side of ServerConfig: it presents the source's
// SVID and admits the server if its SVID verifies and authz agrees.
func ClientConfig(src Source, authz tlsconfig.Authorizer) *tls.Config {
	return tlsconfig.MTLSClientConfig(src, src, authz)
}

// QUICServerConfig is ServerConfig for quic-go: TLS 1.3 only and the given
// ALPN protocols (QUIC requires both).
func QUICServerConfig(src Source, authz tlsconfig.Authorizer, alpn ...string) *tls.Config {
	return forQUIC(ServerConfig(src, authz), alpn)
}

// QUICClientConfig is ClientConfig for quic-go, like QUICServerConfig.
func QUICClientConfig(src Source, authz tlsconfig.Authorizer, alpn ...string) *tls.Config {
	return forQUIC(ClientConfig(src, authz), alpn)
}

func forQUIC(c *tls.Config, alpn []string) *tls.Config {
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = slices.Clone(alpn)
	return c
}

// PeerID is the SPIFFE ID the peer presented in a completed handshake.
func PeerID(state tls.ConnectionState) (spiffeid.ID, error) {
	if len(state.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("read peer spiffe id: no peer certificate")
	}
	id, err := x509svid.IDFromCert(state.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("read peer spiffe id: %w", err)
	}
	return id, nil
}

// PeerIDFromConn is PeerID for a *tls.Conn, or any connection that exposes
// its tls.ConnectionState. The handshake must have completed.
func PeerIDFromConn(conn net.Conn) (spiffeid.ID, error) {
	if conn == nil {
		return spiffeid.ID{}, errors.New("read peer spiffe id: nil connection")
	}
	tc, ok := conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return spiffeid.ID{}, fmt.Errorf("read peer spiffe id: %T is not a TLS connection", conn)
	}
	return PeerID(tc.ConnectionState())
}
