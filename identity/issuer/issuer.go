package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
)

// Defaults and limits. Zero values in Config mean the default.
const (
	DefaultSVIDTTL     = time.Hour
	MinSVIDTTL         = time.Minute
	DefaultJWTSVIDTTL  = 5 * time.Minute
	DefaultCATTL       = 24 * time.Hour
	DefaultRefreshHint = 5 * time.Minute
	// bundleFile is where the issuer writes its own current bundle (SPIFFE
	// bundle JSON) inside the data directory, for peers to bootstrap from.
	bundleFile = "bundle.spiffe.json"
)

// Config configures an Issuer. The zero value of every optional field means
// its default.
type Config struct {
	// TrustDomain is the trust domain the issuer is the authority of.
	TrustDomain spiffeid.TrustDomain
	// DataDir holds the CA keys (ca.json, mode 0600), the issuer's current
	// bundle (bundle.spiffe.json) and the last bundle fetched from each peer
	// (federated/<trust domain>.json).
	DataDir string
	// SocketPath is the main Workload API unix socket.
	SocketPath string
	// Entries are the registration entries (see Entry).
	Entries []Entry
	// SVIDTTL is the X.509-SVID lifetime; default 1h, at least 1m.
	SVIDTTL time.Duration
	// JWTSVIDTTL is the JWT-SVID lifetime; default 5m, at least 1m.
	JWTSVIDTTL time.Duration
	// CATTL is the lifetime of each CA generation; default 24h. A new CA is
	// published at half its predecessor's life and signs from three quarters,
	// so CATTL/4 must cover one SVIDTTL and two refresh hints.
	CATTL time.Duration
	// BundleEndpointAddr, if set, is the TCP address of the SPIFFE bundle
	// endpoint (https_spiffe), e.g. "127.0.0.1:8443".
	BundleEndpointAddr string
	// BundleEndpointListener, if set, is used instead of BundleEndpointAddr.
	// The issuer closes it on Stop.
	BundleEndpointListener net.Listener
	// BundleEndpointID is the SPIFFE ID the bundle endpoint presents;
	// default spiffe://<trust domain>/fedmesh/issuer.
	BundleEndpointID spiffeid.ID
	// RefreshHint is the refresh hint published in the bundle; default 5m.
	RefreshHint time.Duration
	// Peers are the trust domains this one federates with.
	Peers []Peer
	// Logger receives the issuer's logs; default: discarded.
	Logger *slog.Logger
	// Registry, if set, gets the issuer's fedmesh_issuer_* metrics.
	Registry prometheus.Registerer
	// Clock drives SVID renewal and CA rotation; default: the real clock.
	Clock Clock

	// UnsafeMinSVIDTTL lowers the MinSVIDTTL floor. Only failover drills on
	// a local federation (rotation every few seconds under load) set it;
	// never use it in production.
	UnsafeMinSVIDTTL time.Duration

	// minSVIDTTL lowers MinSVIDTTL; only tests and benchmarks set it.
	minSVIDTTL time.Duration
	// minRefresh is the shortest interval at which a peer is re-fetched,
	// whatever its refresh hint says; default 1s. Tests lower it.
	minRefresh time.Duration
}

// Peer is a federated trust domain.
type Peer struct {
	TrustDomain spiffeid.TrustDomain
	// BundleEndpointURL is the peer's bundle endpoint, https://...
	BundleEndpointURL string
	// EndpointID is the SPIFFE ID the peer's endpoint must present
	// (https_spiffe profile), e.g. spiffe://west.fedmesh.test/fedmesh/issuer.
	EndpointID spiffeid.ID
	// BundleFile is the peer's bundle (SPIFFE bundle JSON) obtained out of
	// band; it authenticates the first fetch. There is no trust on first use.
	// It may be empty only if a bundle fetched earlier is in the data dir.
	BundleFile string
}

func (c *Config) setDefaults() {
	if c.SVIDTTL == 0 {
		c.SVIDTTL = DefaultSVIDTTL
	}
	if c.JWTSVIDTTL == 0 {
		c.JWTSVIDTTL = DefaultJWTSVIDTTL
	}
	if c.CATTL == 0 {
		c.CATTL = DefaultCATTL
	}
	if c.RefreshHint == 0 {
		c.RefreshHint = DefaultRefreshHint
	}
	if c.BundleEndpointID.IsZero() && !c.TrustDomain.IsZero() {
		c.BundleEndpointID = spiffeid.RequireFromPath(c.TrustDomain, "/fedmesh/issuer")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	if c.minSVIDTTL == 0 {
		c.minSVIDTTL = MinSVIDTTL
		if c.UnsafeMinSVIDTTL > 0 {
			c.minSVIDTTL = c.UnsafeMinSVIDTTL
		}
	}
	if c.minRefresh == 0 {
		c.minRefresh = time.Second
	}
}

func (c *Config) validate() error {
	switch {
	case c.TrustDomain.IsZero():
		return errors.New("trust domain is required")
	case c.DataDir == "":
		return errors.New("data dir is required")
	case c.SocketPath == "":
		return errors.New("socket path is required")
	case !filepath.IsAbs(c.SocketPath):
		return fmt.Errorf("socket path %q must be absolute", c.SocketPath)
	case c.SVIDTTL < c.minSVIDTTL:
		return fmt.Errorf("svid ttl %s is under the minimum %s", c.SVIDTTL, c.minSVIDTTL)
	case c.JWTSVIDTTL < c.minSVIDTTL:
		return fmt.Errorf("jwt-svid ttl %s is under the minimum %s", c.JWTSVIDTTL, c.minSVIDTTL)
	case c.RefreshHint < time.Second || c.RefreshHint%time.Second != 0:
		return fmt.Errorf("refresh hint %s: must be a whole number of seconds, at least 1s (bundles carry it in seconds)", c.RefreshHint)
	case c.CATTL/4 < c.SVIDTTL:
		return fmt.Errorf("ca ttl %s is too short for svid ttl %s: a retired CA lives ca-ttl/4 after rotation and must outlive the SVIDs it signed (need ca ttl >= %s)", c.CATTL, c.SVIDTTL, 4*c.SVIDTTL)
	case c.CATTL/4 < 2*c.RefreshHint:
		return fmt.Errorf("ca ttl %s is too short for refresh hint %s: peers get ca-ttl/4 to fetch a new root before it signs (need ca ttl >= %s)", c.CATTL, c.RefreshHint, 8*c.RefreshHint)
	case c.BundleEndpointID.TrustDomain() != c.TrustDomain:
		return fmt.Errorf("bundle endpoint id %s is not in trust domain %s", c.BundleEndpointID, c.TrustDomain)
	}
	seen := map[spiffeid.TrustDomain]bool{}
	for _, p := range c.Peers {
		switch {
		case p.TrustDomain.IsZero():
			return errors.New("federated peer: trust domain is required")
		case p.TrustDomain == c.TrustDomain:
			return fmt.Errorf("federated peer %s: cannot federate with the issuer's own trust domain", p.TrustDomain)
		case seen[p.TrustDomain]:
			return fmt.Errorf("federated peer %s: listed twice", p.TrustDomain)
		case p.EndpointID.TrustDomain() != p.TrustDomain:
			return fmt.Errorf("federated peer %s: endpoint id %q must be in the peer's trust domain", p.TrustDomain, p.EndpointID)
		}
		if err := checkHTTPSURL(p.BundleEndpointURL); err != nil {
			return fmt.Errorf("federated peer %s: %w", p.TrustDomain, err)
		}
		seen[p.TrustDomain] = true
	}
	return nil
}

// Issuer is a running (or ready to run) issuer for one trust domain.
type Issuer struct {
	cfg      Config
	log      *slog.Logger
	clock    Clock
	ca       *ca
	entries  []*entry
	endpoint *entry // the bundle endpoint's own identity
	metrics  *metrics

	mu      sync.Mutex
	svids   map[int]*minted                  // by entry index
	subs    map[int]map[*subscriber]struct{} // by entry index
	allSubs map[*subscriber]struct{}         // every open stream
	own     *spiffebundle.Bundle             // this trust domain's bundle
	peers   map[spiffeid.TrustDomain]*spiffebundle.Bundle
	nudge   chan struct{}

	startOnce sync.Once
	stopOnce  sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	grpc      *grpc.Server
	http      *http.Server
	httpLn    net.Listener
}

// subscriber is one open Workload API stream waiting for changes.
type subscriber struct {
	c chan struct{} // capacity 1: a pending wake-up is never lost nor doubled
}

func (s *subscriber) wake() {
	select {
	case s.c <- struct{}{}:
	default:
	}
}

// New validates cfg, loads or creates the CA in cfg.DataDir and writes the
// trust domain's current bundle to <data dir>/bundle.spiffe.json. It binds
// nothing; Start does.
func New(cfg Config) (*Issuer, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("issuer config: %w", err)
	}
	entries, err := validateEntries(cfg.TrustDomain, cfg.SocketPath, cfg.minSVIDTTL, cfg.Peers, cfg.Entries)
	if err != nil {
		return nil, fmt.Errorf("issuer config: %w", err)
	}
	m, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, fmt.Errorf("register issuer metrics: %w", err)
	}
	now := cfg.Clock.Now()
	c, renewed, err := loadCA(cfg.TrustDomain, cfg.DataDir, cfg.CATTL, now)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if renewed {
		cfg.Logger.Warn("ca expired while the issuer was down; created a new root, peers must re-bootstrap this trust domain's bundle",
			"trust_domain", cfg.TrustDomain.Name())
	}
	i := &Issuer{
		cfg:      cfg,
		log:      cfg.Logger,
		clock:    cfg.Clock,
		ca:       c,
		entries:  entries,
		endpoint: &entry{index: -1, id: cfg.BundleEndpointID},
		metrics:  m,
		svids:    map[int]*minted{},
		subs:     map[int]map[*subscriber]struct{}{},
		allSubs:  map[*subscriber]struct{}{},
		peers:    map[spiffeid.TrustDomain]*spiffebundle.Bundle{},
		nudge:    make(chan struct{}, 1),
	}
	if err := i.publishOwnBundle(); err != nil {
		return nil, err
	}
	return i, nil
}

// TrustDomain is the issuer's trust domain.
func (i *Issuer) TrustDomain() spiffeid.TrustDomain { return i.cfg.TrustDomain }

// Bundle returns a copy of the trust domain's current bundle.
func (i *Issuer) Bundle() *spiffebundle.Bundle {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.own.Clone()
}

// BundleFile is where the issuer keeps its current bundle for peers.
func (i *Issuer) BundleFile() string { return filepath.Join(i.cfg.DataDir, bundleFile) }

// BundleEndpointURL is the https URL of the bundle endpoint, or "" when it is
// not served. Valid after Start.
func (i *Issuer) BundleEndpointURL() string {
	if i.httpLn == nil {
		return ""
	}
	return "https://" + i.httpLn.Addr().String()
}

// Start loads the federated peers' bundles, binds the Workload API sockets
// and the bundle endpoint, and starts serving, renewing and watching. It
// returns once everything is bound; Stop ends it.
func (i *Issuer) Start() error {
	err := errors.New("issuer already started")
	i.startOnce.Do(func() { err = i.start() })
	return err
}

func (i *Issuer) start() (err error) {
	ctx, cancel := context.WithCancel(context.Background())
	i.cancel = cancel
	defer func() {
		if err != nil {
			i.Stop()
		}
	}()
	for _, p := range i.cfg.Peers {
		b, err := i.loadPeerBundle(p)
		if err != nil {
			return err
		}
		i.mu.Lock()
		i.peers[p.TrustDomain] = b
		i.mu.Unlock()
	}

	i.grpc = grpc.NewServer(
		grpc.Creds(peerCredentials{onConn: i.metrics.connections.Inc}),
		// Workload API messages are a few kB and every workload holds a
		// connection: gRPC's default 32 kB read and write buffers would cost
		// 64 kB per workload.
		grpc.ReadBufferSize(4<<10),
		grpc.WriteBufferSize(4<<10),
		grpc.ChainUnaryInterceptor(i.unaryInterceptor),
		grpc.ChainStreamInterceptor(i.streamInterceptor),
	)
	workload.RegisterSpiffeWorkloadAPIServer(i.grpc, &workloadAPI{i: i})

	// The main socket is open to every local user: attestation decides who
	// gets what. A per-workload socket is the issuer user's alone; its
	// permissions are the access control.
	type socket struct {
		path string
		mode os.FileMode
	}
	sockets := []socket{{i.cfg.SocketPath, 0o666}}
	for _, e := range i.entries {
		if e.socket != "" {
			sockets = append(sockets, socket{e.socket, 0o600})
		}
	}
	for _, s := range sockets {
		ln, err := listenUnix(s.path, s.mode)
		if err != nil {
			return err
		}
		i.wg.Add(1)
		go func() {
			defer i.wg.Done()
			// Serve returns when Stop closes the listener.
			_ = i.grpc.Serve(ln)
		}()
	}

	if err := i.startBundleEndpoint(); err != nil {
		return err
	}
	for _, p := range i.cfg.Peers {
		i.wg.Add(1)
		go func() {
			defer i.wg.Done()
			i.watchPeer(ctx, p)
		}()
	}
	i.wg.Add(1)
	go func() {
		defer i.wg.Done()
		i.rotate(ctx)
	}()
	i.log.Info("issuer started", "trust_domain", i.cfg.TrustDomain.Name(), "socket", i.cfg.SocketPath,
		"entries", len(i.entries), "peers", len(i.cfg.Peers), "bundle_endpoint", i.BundleEndpointURL())
	return nil
}

// Stop closes every socket and stream, stops the background work and waits
// for it. It is safe to call more than once.
func (i *Issuer) Stop() {
	i.stopOnce.Do(func() {
		if i.cancel != nil {
			i.cancel()
		}
		if i.grpc != nil {
			i.grpc.Stop()
		}
		if i.http != nil {
			// Close, not Shutdown: responses are tiny and a peer that dialled
			// but never sent its request (its fetch was cancelled) would
			// hold Shutdown for 5s.
			_ = i.http.Close()
		} else if i.cfg.BundleEndpointListener != nil {
			_ = i.cfg.BundleEndpointListener.Close()
		}
		i.wg.Wait()
	})
}

// listenUnix binds a unix socket, replacing a stale socket file left by a
// previous run (but never a regular file).
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir for %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", path, err)
	}
	return ln, nil
}

// ttlFor is the X.509-SVID lifetime for an entry.
func (i *Issuer) ttlFor(e *entry) time.Duration {
	if e.ttl != 0 {
		return e.ttl
	}
	return i.cfg.SVIDTTL
}

// svidFor returns the entry's current X.509-SVID, issuing it on first use.
func (i *Issuer) svidFor(e *entry) (*minted, error) {
	i.mu.Lock()
	m := i.svids[e.index]
	i.mu.Unlock()
	if m != nil {
		return m, nil
	}
	m, err := i.mint(e)
	if err != nil {
		return nil, err
	}
	i.mu.Lock()
	if cur := i.svids[e.index]; cur != nil {
		m = cur // another caller won the race; serve one SVID per entry
	} else {
		i.svids[e.index] = m
	}
	i.mu.Unlock()
	i.wakeRotator()
	return m, nil
}

func (i *Issuer) mint(e *entry) (*minted, error) {
	start := time.Now()
	m, err := mintX509(i.ca.signer(), e.id, i.ttlFor(e), i.clock.Now())
	if err != nil {
		return nil, err
	}
	i.metrics.issueSeconds.Observe(time.Since(start).Seconds())
	i.metrics.x509Issued.Inc()
	return m, nil
}

func (i *Issuer) wakeRotator() {
	select {
	case i.nudge <- struct{}{}:
	default:
	}
}

// subscribe registers a stream's interest in the given entries' SVIDs and in
// every bundle change.
func (i *Issuer) subscribe(entries []*entry) *subscriber {
	s := &subscriber{c: make(chan struct{}, 1)}
	i.mu.Lock()
	defer i.mu.Unlock()
	i.allSubs[s] = struct{}{}
	for _, e := range entries {
		if i.subs[e.index] == nil {
			i.subs[e.index] = map[*subscriber]struct{}{}
		}
		i.subs[e.index][s] = struct{}{}
	}
	return s
}

func (i *Issuer) unsubscribe(s *subscriber, entries []*entry) {
	i.mu.Lock()
	defer i.mu.Unlock()
	delete(i.allSubs, s)
	for _, e := range entries {
		delete(i.subs[e.index], s)
		if len(i.subs[e.index]) == 0 {
			delete(i.subs, e.index)
		}
	}
}

// rotate renews SVIDs at half-life and steps the CA rotation, sleeping until
// the earliest thing that is due.
func (i *Issuer) rotate(ctx context.Context) {
	for {
		now := i.clock.Now()
		next := i.rotateCA(now)
		if n := i.renewDue(now); n.Before(next) {
			next = n
		}
		t := i.clock.NewTimer(next.Sub(now))
		select {
		case <-t.C():
		case <-i.nudge:
		case <-ctx.Done():
			t.Stop()
			return
		}
		t.Stop()
	}
}

// rotateCA takes every CA rotation step that is due and returns when the
// next one is.
func (i *Issuer) rotateCA(now time.Time) time.Time {
	for range 4 { // at most prune, prepare, activate in one pass
		st, next := i.ca.due(now)
		if st == stepNone {
			return next
		}
		if err := i.caStep(st, now); err != nil {
			i.log.Error("ca rotation step failed; retrying in a minute", "error", err)
			return now.Add(time.Minute)
		}
	}
	return now.Add(time.Minute)
}

// caStep takes one CA rotation step and publishes its effect.
func (i *Issuer) caStep(st step, now time.Time) error {
	var changed bool
	var err error
	var name string
	switch st {
	case stepPrepare:
		name = "prepare"
		changed, err = i.ca.prepare(now)
	case stepActivate:
		name = "activate"
		changed, err = i.ca.activate(now)
	case stepPrune:
		name = "prune"
		changed, err = i.ca.prune(now)
	default:
		return fmt.Errorf("unknown ca rotation step %d", st)
	}
	if err != nil {
		return fmt.Errorf("ca %s: %w", name, err)
	}
	if !changed {
		return nil
	}
	if err := i.publishOwnBundle(); err != nil {
		return err
	}
	i.metrics.caSteps.WithLabelValues(name).Inc()
	i.log.Info("ca rotation step", "step", name, "trust_domain", i.cfg.TrustDomain.Name())
	if st == stepActivate {
		// Re-issue everything under the new CA now rather than at half-life.
		i.mu.Lock()
		for _, m := range i.svids {
			m.renewAt = now
		}
		i.mu.Unlock()
		i.wakeRotator()
	}
	return nil
}

// renewDue re-issues every cached SVID that reached its renewal time and has
// someone listening (the bundle endpoint always does); SVIDs nobody streams
// any more are dropped and issued afresh on next use. It returns when the
// next renewal is due.
func (i *Issuer) renewDue(now time.Time) time.Time {
	next := now.Add(24 * time.Hour)
	var due []*entry
	i.mu.Lock()
	for idx, m := range i.svids {
		if now.Before(m.renewAt) {
			if m.renewAt.Before(next) {
				next = m.renewAt
			}
			continue
		}
		if idx != i.endpoint.index && len(i.subs[idx]) == 0 {
			delete(i.svids, idx)
			continue
		}
		due = append(due, i.entryAt(idx))
	}
	i.mu.Unlock()

	for _, e := range due {
		m, err := i.mint(e)
		if err != nil {
			i.log.Error("renew x509-svid failed; retrying in 5s", "spiffe_id", e.id.String(), "error", err)
			if r := now.Add(5 * time.Second); r.Before(next) {
				next = r
			}
			continue
		}
		i.mu.Lock()
		i.svids[e.index] = m
		for s := range i.subs[e.index] {
			s.wake()
		}
		i.mu.Unlock()
		if m.renewAt.Before(next) {
			next = m.renewAt
		}
	}
	return next
}

func (i *Issuer) entryAt(idx int) *entry {
	if idx == i.endpoint.index {
		return i.endpoint
	}
	return i.entries[idx]
}

// publishOwnBundle recomputes the trust domain's bundle from the CA, wakes
// every stream and rewrites bundle.spiffe.json.
func (i *Issuer) publishOwnBundle() error {
	b := i.ca.bundle(i.cfg.RefreshHint)
	data, err := b.Marshal()
	if err != nil {
		return fmt.Errorf("marshal own bundle: %w", err)
	}
	i.mu.Lock()
	i.own = b
	for s := range i.allSubs {
		s.wake()
	}
	i.mu.Unlock()
	return writeFileAtomic(i.BundleFile(), data, 0o644)
}
