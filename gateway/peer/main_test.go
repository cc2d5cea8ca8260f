package peer

import (
	"crypto/tls"
	"net"
	"testing"

	"github.com/quic-go/quic-go"
	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine a test started is still
// running after the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// listen is quic.ListenAddr on loopback with a transport of the test's own,
// closed at its end: one that quic.ListenAddr made outlives its listener
// until quic-go retires the closed connections' IDs.
func listen(t *testing.T, tlsConf *tls.Config, q *quic.Config) *quic.Listener {
	t.Helper()
	ln, err := transport(t).Listen(tlsConf, q)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// transport is a QUIC transport on a loopback UDP socket, both closed when
// the test ends.
func transport(t *testing.T) *quic.Transport {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: udp}
	t.Cleanup(func() { tr.Close(); udp.Close() })
	return tr
}
