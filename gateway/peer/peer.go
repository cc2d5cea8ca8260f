// Package peer keeps one long-lived QUIC connection from this gateway to one
// peer gateway, so that proxied connections never pay for a handshake: each
// becomes a stream on a connection that is already up.
//
// A Link dials, keeps the connection alive with QUIC keepalives, declares the
// peer dead when nothing has been heard from it for DeadAfter (1 s by
// default), and redials with jittered exponential backoff. It samples the
// connection's RTT so that the gateway can publish per-peer liveness and RTT
// percentiles: the cluster-wide "gateway to cluster X unreachable" signal
// that sidecars use.
package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

// Defaults.
const (
	DefaultDeadAfter  = time.Second
	DefaultMinBackoff = 50 * time.Millisecond
	DefaultMaxBackoff = time.Second
	rttSamples        = 256
	// RecentRTTSamples is the window of Status.RTTRecent (3.2 s at the
	// default sampling interval of dead-after/10).
	RecentRTTSamples = 32
)

// ErrDown is returned by OpenStream when the link has no live connection.
var ErrDown = errors.New("peer link is down")

// Config configures a Link. The zero value of every optional field means its
// default.
type Config struct {
	Cluster   string          // the peer's cluster, for logs and status
	Addr      string          // host:port of the peer gateway's tunnel (UDP)
	Transport *quic.Transport // local UDP socket to dial from (required)
	TLS       *tls.Config     // client config, ALPN set, authorizing the peer (required)
	// QUIC is the base QUIC config; the idle timeout and keepalive are
	// overwritten from DeadAfter.
	QUIC *quic.Config
	// DeadAfter is how long the peer may stay silent before the connection
	// is declared dead. Keepalives are sent every DeadAfter/4.
	DeadAfter  time.Duration
	MinBackoff time.Duration // first redial delay
	MaxBackoff time.Duration // redial delay cap
	Logger     *slog.Logger
	// OnChange, if set, is called after the link goes up or down.
	OnChange func(l *Link, up bool)
}

func (c *Config) setDefaults() {
	if c.DeadAfter == 0 {
		c.DeadAfter = DefaultDeadAfter
	}
	if c.MinBackoff == 0 {
		c.MinBackoff = DefaultMinBackoff
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = DefaultMaxBackoff
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.QUIC == nil {
		c.QUIC = &quic.Config{}
	}
}

func (c *Config) validate() error {
	switch {
	case c.Transport == nil:
		return errors.New("no transport")
	case c.TLS == nil:
		return errors.New("no tls config")
	case c.Addr == "":
		return errors.New("no address")
	case c.DeadAfter < 10*time.Millisecond:
		return fmt.Errorf("dead-after %s is under 10ms", c.DeadAfter)
	case c.MinBackoff <= 0 || c.MaxBackoff < c.MinBackoff:
		return fmt.Errorf("backoff %s..%s is not a range", c.MinBackoff, c.MaxBackoff)
	}
	return nil
}

// Timeouts are the QUIC idle timeout and keepalive period that detect a
// silent peer within deadAfter. quic-go restarts its idle timer at the first
// ack-eliciting packet sent after the last one received, which may be a
// keepalive up to one period later: detection takes at most idle+keepalive.
func Timeouts(deadAfter time.Duration) (idle, keepAlive time.Duration) {
	return deadAfter * 7 / 10, deadAfter / 4
}

// Link is the connection to one peer gateway.
type Link struct {
	cfg  Config
	qcfg *quic.Config
	log  *slog.Logger

	conn    atomic.Pointer[quic.Conn]
	streams atomic.Int64 // open streams, maintained by Acquire/Release

	mu         sync.Mutex
	up         bool
	since      time.Time
	reconnects uint64
	lastErr    string
	rtts       [rttSamples]time.Duration
	nrtt       int
}

// New validates cfg and returns a link; Run drives it.
func New(cfg Config) (*Link, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("new peer link %s (%s): %w", cfg.Cluster, cfg.Addr, err)
	}
	q := cfg.QUIC.Clone()
	q.MaxIdleTimeout, q.KeepAlivePeriod = Timeouts(cfg.DeadAfter)
	q.EnableDatagrams = true // RTT pings (ping.go)
	if q.HandshakeIdleTimeout == 0 {
		q.HandshakeIdleTimeout = max(2*cfg.DeadAfter, 2*time.Second)
	}
	return &Link{cfg: cfg, qcfg: q, log: cfg.Logger.With("peer_cluster", cfg.Cluster, "peer_addr", cfg.Addr), since: time.Now()}, nil
}

// Cluster is the peer's cluster name.
func (l *Link) Cluster() string { return l.cfg.Cluster }

// Addr is the peer gateway's address.
func (l *Link) Addr() string { return l.cfg.Addr }

// Run dials and redials until ctx ends, then closes the connection.
func (l *Link) Run(ctx context.Context) {
	backoff := l.cfg.MinBackoff
	for ctx.Err() == nil {
		conn, err := l.dial(ctx)
		if err == nil {
			start := time.Now()
			l.serve(ctx, conn)
			if time.Since(start) >= l.cfg.DeadAfter {
				// The connection lived: its loss is a fresh incident,
				// redial at once. One that died right after the handshake
				// (e.g. the peer refused our identity) backs off instead.
				backoff = l.cfg.MinBackoff
				continue
			}
		} else {
			if ctx.Err() != nil {
				return
			}
			l.setErr(err)
			l.log.Debug("dial peer gateway failed", "err", err)
		}
		// Jitter in [backoff/2, backoff]: peers that lost each other at
		// the same moment do not redial in lockstep.
		d := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, l.cfg.MaxBackoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}

func (l *Link) dial(ctx context.Context) (*quic.Conn, error) {
	addr, err := net.ResolveUDPAddr("udp", l.cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("resolve peer gateway %s: %w", l.cfg.Addr, err)
	}
	conn, err := l.cfg.Transport.Dial(ctx, addr, l.cfg.TLS, l.qcfg)
	if err != nil {
		return nil, fmt.Errorf("dial peer gateway %s: %w", l.cfg.Addr, err)
	}
	if err := l.awaitWelcome(ctx, conn); err != nil {
		_ = conn.CloseWithError(0, "no welcome")
		return nil, fmt.Errorf("dial peer gateway %s: %w", l.cfg.Addr, err)
	}
	return conn, nil
}

// awaitWelcome waits for the acceptor's welcome. In TLS 1.3 the client
// finishes its handshake before the server has checked the client's
// certificate, so a completed Dial does not mean the peer accepted us: the
// welcome does, and it names the peer's cluster, which must be the one this
// link expects.
func (l *Link) awaitWelcome(ctx context.Context, conn *quic.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, l.qcfg.HandshakeIdleTimeout)
	defer cancel()
	us, err := conn.AcceptUniStream(ctx)
	if err != nil {
		return fmt.Errorf("await welcome: %w", err)
	}
	_ = us.SetReadDeadline(time.Now().Add(l.qcfg.HandshakeIdleTimeout))
	code, cluster, err := tunnel.ReadAnswer(us)
	switch {
	case err != nil:
		return fmt.Errorf("await welcome: %w", err)
	case code != tunnel.CodeOK:
		return fmt.Errorf("peer refused: %w", &tunnel.Error{Code: code, Reason: cluster})
	case l.cfg.Cluster != "" && cluster != l.cfg.Cluster:
		return fmt.Errorf("peer gateway serves cluster %q, this link expects %q", cluster, l.cfg.Cluster)
	}
	return nil
}

// serve holds one connection until it dies or ctx ends, sampling RTT:
// with a ping every tick when the peer echoes datagrams (ping.go), else
// from quic-go's latest sample.
func (l *Link) serve(ctx context.Context, conn *quic.Conn) {
	l.conn.Store(conn)
	l.setUp(true, "")
	tick := time.NewTicker(max(l.cfg.DeadAfter/10, 10*time.Millisecond))
	defer tick.Stop()
	var pp *pings
	if datagramsOn(conn) {
		pp = &pings{}
		dctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			ServeDatagrams(dctx, conn, func(sent time.Duration) {
				if rtt, ok := pp.echoed(sent); ok {
					l.addRTT(rtt)
				}
			})
		}()
		defer func() { stop(); <-done }()
		pp.add(sendPing(conn))
	}
	for {
		select {
		case <-ctx.Done():
			l.conn.Store(nil)
			_ = conn.CloseWithError(0, "gateway shutting down")
			l.setUp(false, "shutting down")
			return
		case <-conn.Context().Done():
			l.conn.Store(nil)
			cause := context.Cause(conn.Context())
			l.setUp(false, cause.Error())
			l.log.Warn("peer gateway connection lost", "err", cause)
			return
		case <-tick.C:
			if pp != nil {
				pp.add(sendPing(conn))
			} else if rtt := conn.ConnectionStats().LatestRTT; rtt > 0 {
				l.addRTT(rtt)
			}
		}
	}
}

func (l *Link) addRTT(rtt time.Duration) {
	l.mu.Lock()
	l.rtts[l.nrtt%rttSamples] = rtt
	l.nrtt++
	l.mu.Unlock()
}

func (l *Link) setUp(up bool, reason string) {
	l.mu.Lock()
	changed := l.up != up
	l.up = up
	if changed {
		l.since = time.Now()
		if up {
			l.reconnects++
			l.nrtt = 0
		}
	}
	if reason != "" {
		l.lastErr = reason
	}
	l.mu.Unlock()
	if changed {
		if up {
			l.log.Info("peer gateway connected")
		}
		if l.cfg.OnChange != nil {
			l.cfg.OnChange(l, up)
		}
	}
}

func (l *Link) setErr(err error) {
	l.mu.Lock()
	l.lastErr = err.Error()
	l.mu.Unlock()
}

// Up reports whether the link has a live connection.
func (l *Link) Up() bool { return l.conn.Load() != nil }

// OpenStream opens a stream on the live connection, waiting at most until
// ctx ends for the peer to grant stream credit. It returns ErrDown when
// there is no live connection. Call Release when the stream is done.
func (l *Link) OpenStream(ctx context.Context) (*quic.Stream, error) {
	conn := l.conn.Load()
	if conn == nil {
		return nil, ErrDown
	}
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open stream to %s: %w", l.cfg.Addr, err)
	}
	l.streams.Add(1)
	return s, nil
}

// Release marks a stream from OpenStream as done.
func (l *Link) Release() { l.streams.Add(-1) }

// OpenStreams is the number of streams opened and not yet released.
func (l *Link) OpenStreams() int64 { return l.streams.Load() }

// Status is a snapshot of a link for the admin endpoint.
type Status struct {
	Cluster    string        `json:"cluster"`
	Addr       string        `json:"addr"`
	Up         bool          `json:"up"`
	Since      time.Time     `json:"since"`
	RTTP50     time.Duration `json:"-"`
	RTTP99     time.Duration `json:"-"`
	RTTP50MS   float64       `json:"rtt_p50_ms"`
	RTTP99MS   float64       `json:"rtt_p99_ms"`
	RTTSamples int           `json:"rtt_samples"`
	// RTTRecent is the median of the last RecentRTTSamples samples: what
	// the gateway publishes for ordering clusters, so a changed path shows
	// within seconds instead of half the window.
	RTTRecent   time.Duration `json:"-"`
	RTTRecentMS float64       `json:"rtt_recent_ms"`
	OpenStreams int64         `json:"open_streams"`
	Connects    uint64        `json:"connects"`
	LastError   string        `json:"last_error,omitempty"`
	// PacketsSent and PacketsLost are the live connection's (quic-go's
	// loss detection: packets declared lost, which were retransmitted).
	PacketsSent uint64  `json:"packets_sent"`
	PacketsLost uint64  `json:"packets_lost"`
	LossPct     float64 `json:"loss_pct"`
}

// Status returns the link's state and RTT percentiles over the last 256
// samples of the current connection.
func (l *Link) Status() Status {
	l.mu.Lock()
	n := min(l.nrtt, rttSamples)
	s := slices.Clone(l.rtts[:n])
	recent := make([]time.Duration, 0, RecentRTTSamples)
	for i := l.nrtt - 1; i >= 0 && i >= l.nrtt-min(n, RecentRTTSamples); i-- {
		recent = append(recent, l.rtts[i%rttSamples])
	}
	st := Status{
		Cluster: l.cfg.Cluster, Addr: l.cfg.Addr, Up: l.up, Since: l.since,
		RTTSamples: n, OpenStreams: l.streams.Load(), Connects: l.reconnects, LastError: l.lastErr,
	}
	l.mu.Unlock()
	if conn := l.conn.Load(); conn != nil {
		cs := conn.ConnectionStats()
		st.PacketsSent, st.PacketsLost = cs.PacketsSent, cs.PacketsLost
		if cs.PacketsSent > 0 {
			st.LossPct = 100 * float64(cs.PacketsLost) / float64(cs.PacketsSent)
		}
	}
	if n > 0 {
		slices.Sort(s)
		st.RTTP50 = s[(n-1)/2]
		st.RTTP99 = s[(n-1)*99/100]
		st.RTTP50MS = float64(st.RTTP50) / 1e6
		st.RTTP99MS = float64(st.RTTP99) / 1e6
		slices.Sort(recent)
		st.RTTRecent = recent[(len(recent)-1)/2]
		st.RTTRecentMS = float64(st.RTTRecent) / 1e6
	}
	return st
}
