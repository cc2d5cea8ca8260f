package mtls_test

import (
	"context"
	"crypto/x509"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/identity/issuer"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/identity/workload"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	east     = spiffeid.RequireTrustDomainFromString("east.fedmesh.test")
	west     = spiffeid.RequireTrustDomainFromString("west.fedmesh.test")
	gateway  = spiffeid.RequireFromString("spiffe://east.fedmesh.test/ns/fedmesh-system/sa/gateway")
	checkout = spiffeid.RequireFromString("spiffe://east.fedmesh.test/ns/shop/sa/checkout")
)

func TestAuthorizers(t *testing.T) {
	tests := []struct {
		name  string
		authz func(spiffeid.ID, [][]*x509.Certificate) error
		id    spiffeid.ID
		ok    bool
	}{
		{"member of local", mtls.MemberOf(east, west), gateway, true},
		{"member of federated", mtls.MemberOf(east, west), spiffeid.RequireFromPath(west, "/ns/a/sa/b"), true},
		{"not a member", mtls.MemberOf(west), gateway, false},
		{"no trust domains admits nobody", mtls.MemberOf(), gateway, false},
		{"exact id", mtls.OneOf(checkout, gateway), gateway, true},
		{"other id", mtls.OneOf(checkout), gateway, false},
		{"no ids admits nobody", mtls.OneOf(), gateway, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.authz(tt.id, nil)
			if (err == nil) != tt.ok {
				t.Fatalf("authorize %s: %v, want ok=%v", tt.id, err, tt.ok)
			}
			if err != nil && !strings.Contains(err.Error(), tt.id.String()) {
				t.Errorf("error %q does not name the peer", err)
			}
		})
	}
}

// sources starts an east issuer with two identities (gateway on its own
// socket, checkout on the main one) and returns a Workload API source each.
func sources(t *testing.T) (gw, co *workload.X509Source, mainAddr string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "fm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	gwSock := filepath.Join(dir, "gw.sock")
	iss, err := issuer.New(issuer.Config{
		TrustDomain: east,
		DataDir:     filepath.Join(dir, "data"),
		SocketPath:  filepath.Join(dir, "api.sock"),
		Entries: []issuer.Entry{
			{SPIFFEID: checkout.String(), Selectors: []string{"unix:uid:" + strconv.Itoa(os.Getuid())}},
			{SPIFFEID: gateway.String(), Socket: gwSock},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(iss.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	mainAddr = "unix://" + filepath.Join(dir, "api.sock")
	co, err = mtls.NewSource(ctx, mainAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { co.Close() })
	t.Setenv(mtls.EndpointSocketEnv, "unix://"+gwSock)
	gw, err = mtls.NewSource(ctx, "") // from SPIFFE_ENDPOINT_SOCKET
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close() })
	return gw, co, mainAddr
}

func TestNewSourceNeedsAnAddress(t *testing.T) {
	t.Setenv(mtls.EndpointSocketEnv, "")
	_, err := mtls.NewSource(context.Background(), "")
	if err == nil || !strings.Contains(err.Error(), mtls.EndpointSocketEnv) {
		t.Fatalf("error %v, want one naming %s", err, mtls.EndpointSocketEnv)
	}
}

// TestQUIC: the configs work for quic-go as they are: mTLS with SVIDs from
// the Workload API, ALPN enforced, authorizer enforced, peer ID readable.
func TestQUIC(t *testing.T) {
	gw, co, _ := sources(t)
	const alpn = "fedmesh-tunnel/1"
	tests := []struct {
		name       string
		serverALPN string
		clientALPN string
		clientAuth func(spiffeid.ID, [][]*x509.Certificate) error // client's view of the server
		serverAuth func(spiffeid.ID, [][]*x509.Certificate) error
		wantErr    bool
	}{
		{"admitted", alpn, alpn, mtls.OneOf(gateway), mtls.MemberOf(east), false},
		{"alpn mismatch", alpn, "h3", mtls.OneOf(gateway), mtls.MemberOf(east), true},
		{"server refuses client", alpn, alpn, mtls.OneOf(gateway), mtls.OneOf(gateway), true},
		{"client refuses server", alpn, alpn, mtls.OneOf(checkout), mtls.MemberOf(east), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Transports of the test's own, closed at its end: one that
			// quic.ListenAddr made outlives its listener until quic-go
			// retires the closed connections' IDs.
			tr := func() *quic.Transport {
				udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
				if err != nil {
					t.Fatal(err)
				}
				tr := &quic.Transport{Conn: udp}
				t.Cleanup(func() { tr.Close(); udp.Close() })
				return tr
			}
			ln, err := tr().Listen(mtls.QUICServerConfig(gw, tt.serverAuth, tt.serverALPN), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()

			type accepted struct {
				peer spiffeid.ID
				err  error
			}
			done := make(chan accepted, 1)
			go func() {
				conn, err := ln.Accept(ctx)
				if err != nil {
					done <- accepted{err: err}
					return
				}
				defer conn.CloseWithError(0, "")
				id, err := mtls.PeerID(conn.ConnectionState().TLS)
				if err == nil {
					// Serve one stream so the client can see we accepted it.
					var s *quic.Stream
					if s, err = conn.AcceptStream(ctx); err == nil {
						_, err = io.Copy(s, s)
						s.Close()
						// Let the client read the echo and close first.
						select {
						case <-conn.Context().Done():
						case <-ctx.Done():
						}
					}
				}
				done <- accepted{id, err}
			}()

			conn, err := tr().Dial(ctx, ln.Addr(), mtls.QUICClientConfig(co, tt.clientAuth, tt.clientALPN), nil)
			if err == nil {
				err = roundTrip(ctx, conn)
				conn.CloseWithError(0, "")
			}
			if tt.wantErr {
				if err == nil {
					t.Fatal("handshake succeeded, want refusal")
				}
				cancel() // unblock the server
				<-done
				return
			}
			if err != nil {
				t.Fatalf("client: %v", err)
			}
			got := <-done
			if got.err != nil || got.peer != checkout {
				t.Fatalf("server saw peer %s (%v), want %s", got.peer, got.err, checkout)
			}
			if p := conn.ConnectionState().TLS.NegotiatedProtocol; p != alpn {
				t.Errorf("negotiated %q, want %q", p, alpn)
			}
		})
	}
}

func roundTrip(ctx context.Context, conn *quic.Conn) error {
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return err
	}
	if _, err := s.Write([]byte("ping")); err != nil {
		return err
	}
	s.Close()
	buf, err := io.ReadAll(s)
	if err != nil {
		return err
	}
	if string(buf) != "ping" {
		return io.ErrUnexpectedEOF
	}
	return nil
}

func TestPeerIDFromConnNeedsTLS(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := mtls.PeerIDFromConn(a); err == nil {
		t.Fatal("peer id from a plain connection")
	}
	if _, err := mtls.PeerIDFromConn(nil); err == nil {
		t.Fatal("peer id from nil")
	}
}
