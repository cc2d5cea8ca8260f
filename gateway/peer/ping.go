package peer

import (
	"context"
	"encoding/binary"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// RTT is measured with the link's own pings, sent as QUIC datagrams
// (RFC 9221) and echoed by the peer gateway, instead of with quic-go's
// latest RTT sample. On a link that carries only keepalives the peer
// acknowledges each PING after its ack delay (max_ack_delay, 25 ms), and
// quic-go takes the ack delay off a sample only when what remains is at
// least the connection's minimum RTT (RFC 9002, 5.3). When the remainder
// comes out a few µs under that minimum, the sample keeps the whole 25 ms:
// idle links between two gateways on one host read 25-27 ms, links with
// traffic 0.3 ms. An echo is sent at once, so the ping's RTT has no ack
// delay in it. A peer that does not support datagrams (an older gateway)
// is measured with quic-go's samples, as before.
//
// A ping is the byte pingType and the sender's clock (ns since pingEpoch,
// big-endian); the echo is the same 9 bytes with pongType.
const (
	pingType = 'p'
	pongType = 'P'
	pingLen  = 9
	// minEchoGap bounds the echoes one connection gets: a peer sending
	// more pings than that is answered for the first of each gap only.
	minEchoGap = time.Millisecond
	// inFlight is how many of its last pings a link accepts an echo of;
	// an echo of anything else (a forged or repeated one) is dropped.
	inFlight = 16
)

var pingEpoch = time.Now()

// sincePingEpoch is the monotonic clock of pings.
func sincePingEpoch() time.Duration { return time.Since(pingEpoch) }

// datagramsOn reports whether both ends of conn negotiated datagrams.
func datagramsOn(conn *quic.Conn) bool {
	s := conn.ConnectionState().SupportsDatagrams
	return s.Local && s.Remote
}

// sendPing sends one ping on conn and returns its clock; an error (e.g.
// the connection is closing) loses only this sample.
func sendPing(conn *quic.Conn) time.Duration {
	var b [pingLen]byte
	b[0] = pingType
	at := sincePingEpoch()
	binary.BigEndian.PutUint64(b[1:], uint64(at))
	_ = conn.SendDatagram(b[:])
	return at
}

// pings remembers a link's last pings, so that only their echoes count.
type pings struct {
	mu   sync.Mutex
	sent [inFlight]time.Duration
	n    int
}

func (p *pings) add(at time.Duration) {
	p.mu.Lock()
	p.sent[p.n%inFlight] = at
	p.n++
	p.mu.Unlock()
}

// echoed returns the RTT of the ping sent at at, once: false for a ping
// this link did not send lately, or one already echoed.
func (p *pings) echoed(at time.Duration) (time.Duration, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.sent {
		if p.sent[i] == at && at != 0 {
			p.sent[i] = 0
			return sincePingEpoch() - at, true
		}
	}
	return 0, false
}

// ServeDatagrams answers the pings a peer gateway sends on conn until conn
// or ctx ends, and hands the clock of every echo it receives to onEcho
// (nil: this side does not ping). Datagrams that are neither are dropped;
// they cannot disturb the connection's streams.
func ServeDatagrams(ctx context.Context, conn *quic.Conn, onEcho func(sent time.Duration)) {
	var lastEcho time.Time
	for {
		b, err := conn.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		if len(b) != pingLen {
			continue
		}
		switch b[0] {
		case pingType:
			if now := time.Now(); now.Sub(lastEcho) >= minEchoGap {
				lastEcho = now
				b[0] = pongType
				_ = conn.SendDatagram(b)
			}
		case pongType:
			if onEcho != nil {
				onEcho(time.Duration(binary.BigEndian.Uint64(b[1:])))
			}
		}
	}
}
