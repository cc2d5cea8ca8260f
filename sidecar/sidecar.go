// Package sidecar is the proxy next to every workload: it is what lets a
// workload keep being served when its own cluster's copies fail. Outbound,
// it listens on one explicit address per upstream service, picks an
// endpoint by locality and health (package balancer, package health), and
// speaks mTLS with the workload's SPIFFE SVID to the server's sidecar,
// directly in the own cluster or inside a stream through the local
// gateway's egress to a remote cluster. For HTTP it retries idempotent
// requests within a budget and fails a request over to the next priority,
// so the death of every local backend costs no request. Inbound, it
// terminates mTLS, admits callers by SPIFFE ID and hands plaintext to the
// app on localhost. In transparent mode (Kubernetes, iptables) it also
// takes every outbound TCP connection of the workload on one listener and
// finds the service from the connection's original destination in the
// cluster's service directory; what is no service passes through. Its DNS
// server answers the Multi-Cluster Services names of that directory
// (svc.clusterset.local) and forwards every other query.
package sidecar

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/fedmesh/fedmesh/gateway/egress"
	"github.com/fedmesh/fedmesh/identity/mtls"
	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/internal/rawio"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// Protocols of an upstream.
const (
	// ProtocolHTTP: HTTP/1.1 parsed per request (retries, failover); a
	// client that opens with the HTTP/2 preface is served as ProtocolHTTP2.
	ProtocolHTTP = "http"
	// ProtocolHTTP2: HTTP/2 without TLS from the app (prior knowledge, as
	// gRPC clients speak it), HTTP/2 over the mTLS connection between
	// sidecars; gRPC status codes drive retries and outlier detection.
	ProtocolHTTP2 = "http2"
	// ProtocolGRPC is ProtocolHTTP2 under the name users write.
	ProtocolGRPC = "grpc"
	ProtocolTCP  = "tcp" // opaque bytes; failover only before the first byte
)

// Upstream is a service this workload calls, on an explicit local listener.
type Upstream struct {
	Namespace string
	Service   string
	Port      uint16
	Listen    string // e.g. "127.0.0.1:18080"
	Protocol  string // ProtocolHTTP (default), ProtocolHTTP2/ProtocolGRPC or ProtocolTCP
}

func (u Upstream) String() string { return fmt.Sprintf("%s/%s:%d", u.Namespace, u.Service, u.Port) }

// Defaults.
const (
	DefaultAttemptTimeout   = 5 * time.Second
	DefaultRequestTimeout   = 30 * time.Second
	DefaultMaxAttempts      = 5
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultMaxRequests      = 10_000
	DefaultMaxConnections   = 1024
	DefaultMaxPending       = 1024
	DefaultMaxIdlePerTarget = 64
)

// Config configures a Sidecar. Zero values of optional fields mean defaults.
type Config struct {
	Cluster     string               // own cluster (required): its endpoints are priority 0
	TrustDomain spiffeid.TrustDomain // own trust domain (required)
	// Federated trust domains: their workloads may call this one and serve
	// its calls.
	Federated []spiffeid.TrustDomain
	Source    mtls.Source      // the workload's SVID and bundles (required)
	Endpoints endpoints.Source // required when Upstreams are set

	Upstreams []Upstream

	// OutboundAddr is the transparent outbound listener (e.g. ":15001"),
	// where iptables redirects the workload's outbound TCP; "" disables
	// it. Each connection's original destination is looked up in
	// Directory: a service's virtual IP and port is proxied like an
	// explicit upstream of that service port, anything else is passed
	// through unchanged. Explicit Upstreams keep working beside it.
	OutboundAddr string
	// Directory is the service directory; required with OutboundAddr.
	Directory DirectorySource

	// DNSAddr is the DNS server, UDP and TCP (e.g. "127.0.0.1:15053"),
	// where iptables redirects the workload's DNS queries; "" disables it.
	// It needs OutboundAddr: <name>.<ns>.svc.clusterset.local is answered
	// from Directory (the ServiceImport's clusterset IPs), every other
	// query is forwarded unchanged to DNSServers. The host "localhost"
	// listens on 127.0.0.1 and ::1, where iptables and ip6tables redirect
	// to. See dns.go.
	DNSAddr string
	// DNSServers are the nameservers (host:port) queries are forwarded to;
	// empty means those of ResolvConf (DefaultResolvConf).
	DNSServers []string
	ResolvConf string
	// DNSTimeout is how long a forwarded query waits for a nameserver
	// before it tries the next one (2s).
	DNSTimeout time.Duration

	// InboundAddr is the mTLS listener; "" disables inbound.
	InboundAddr string
	// AppAddr is the app's plaintext address, e.g. "127.0.0.1:8080".
	AppAddr string
	// Allow, when not empty, is the only callers the inbound admits. When
	// empty the inbound admits every workload of TrustDomain and Federated.
	// An AuthorizationPolicy of Service replaces it while in force.
	Allow []spiffeid.ID

	// Service is the service this workload serves (optional). When set,
	// the sidecar watches it through Endpoints for its AuthorizationPolicy
	// and RateLimitPolicy, enforced at the inbound.
	Service ServiceName
	// ServicePort is the service port the inbound serves: policy rules
	// limited to other ports do not apply (rules limited to ports never
	// apply when it is 0).
	ServicePort uint16
	// InboundProtocol is ProtocolTCP (default: bytes are spliced to the
	// app) or ProtocolHTTP (requests are parsed when a policy needs
	// per-request checks: methods, paths, rate limits per request).
	InboundProtocol string

	// GatewayEgress is the local gateway's egress (TCP+mTLS by default,
	// QUIC on the same port number); needed for clusters whose endpoint
	// sets say Gateway.
	GatewayEgress string
	// GatewayID is the gateway's SPIFFE ID (default: TrustDomain +
	// egress.DefaultGatewayPath).
	GatewayID spiffeid.ID

	// AdminAddr serves /live, /ready, /state and /metrics; "" disables it.
	AdminAddr string

	AttemptTimeout   time.Duration // one attempt until the response head (5s)
	RequestTimeout   time.Duration // a whole request (30s)
	MaxAttempts      int           // attempts per HTTP request, including the first (5)
	HandshakeTimeout time.Duration // mTLS handshakes (5s)
	MaxRequests      int           // outstanding requests per upstream before 503 (10,000)
	MaxIdlePerTarget int           // pooled idle connections per endpoint (64)
	// MaxConnections bounds an upstream's open HTTP/1.1 and TCP
	// connections to its endpoints (1,024); MaxPending the requests
	// waiting for one (1,024). See limits.go.
	MaxConnections int
	MaxPending     int
	Budget         RetryBudget
	Outlier        health.Config
	// Checks configures active checks (an mTLS handshake, which the
	// inbound accepts only while its app does) of directly dialed endpoints;
	// NoActiveChecks turns them off.
	Checks         health.CheckConfig
	NoActiveChecks bool
	// SocketIO is how proxied connections read and write their sockets
	// (internal/rawio): Auto (the zero value) takes the Go scheduler's
	// syscall path while the sidecar's sockets read under 7,000 times a
	// second (about 3,500 req/s), for a lower median on VMs, and raw system
	// calls above, for some 25% less CPU per request and a higher
	// throughput ceiling; Raw and Std are one or the other always (see
	// docs/sidecar.md, "Raw socket I/O").
	SocketIO rawio.Mode

	Logger *slog.Logger
	// AccessLog, when set, gets one line per HTTP request (HTTP/1.1 and
	// HTTP/2) through the outbound: see accessLog in trace.go.
	AccessLog *slog.Logger
	// Registry gets the sidecar's metrics, served on the admin handler's
	// /metrics; nil means a private one.
	Registry *imetrics.Registry
}

func (c *Config) setDefaults() {
	if c.GatewayID.IsZero() && !c.TrustDomain.IsZero() {
		c.GatewayID = spiffeid.RequireFromPath(c.TrustDomain, egress.DefaultGatewayPath)
	}
	if c.AttemptTimeout <= 0 {
		c.AttemptTimeout = DefaultAttemptTimeout
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.MaxRequests <= 0 {
		c.MaxRequests = DefaultMaxRequests
	}
	if c.MaxConnections <= 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.MaxPending <= 0 {
		c.MaxPending = DefaultMaxPending
	}
	if c.MaxIdlePerTarget <= 0 {
		c.MaxIdlePerTarget = DefaultMaxIdlePerTarget
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = imetrics.NewRegistry()
	}
	if c.ResolvConf == "" {
		c.ResolvConf = DefaultResolvConf
	}
	if c.InboundProtocol == "" {
		c.InboundProtocol = ProtocolTCP
	}
	for i := range c.Upstreams {
		if c.Upstreams[i].Protocol == "" {
			c.Upstreams[i].Protocol = ProtocolHTTP
		}
	}
}

func (c *Config) validate() error {
	var errs []error
	if c.Cluster == "" {
		errs = append(errs, errors.New("no cluster name"))
	}
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("no trust domain"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("no svid source"))
	}
	if len(c.Upstreams) > 0 && c.Endpoints == nil {
		errs = append(errs, errors.New("upstreams without an endpoint source"))
	}
	if c.OutboundAddr != "" && c.Endpoints == nil {
		errs = append(errs, errors.New("transparent outbound without an endpoint source"))
	}
	if c.OutboundAddr != "" && c.Directory == nil {
		errs = append(errs, errors.New("transparent outbound without a service directory"))
	}
	if c.DNSAddr != "" && c.OutboundAddr == "" {
		errs = append(errs, errors.New("dns server without the transparent outbound (its service directory answers clusterset.local)"))
	}
	if !c.Service.IsZero() && (c.Service.Namespace == "" || c.Service.Name == "") {
		errs = append(errs, fmt.Errorf("service %s: namespace and name are required", c.Service))
	}
	if !c.Service.IsZero() && c.Endpoints == nil {
		errs = append(errs, errors.New("service without an endpoint source (its policy comes from there)"))
	}
	if c.InboundProtocol != ProtocolHTTP && c.InboundProtocol != ProtocolTCP {
		errs = append(errs, fmt.Errorf("unknown inbound protocol %q", c.InboundProtocol))
	}
	if c.InboundAddr != "" && c.AppAddr == "" {
		errs = append(errs, errors.New("inbound without an app address"))
	}
	for _, u := range c.Upstreams {
		if u.Namespace == "" || u.Service == "" || u.Port == 0 || u.Listen == "" {
			errs = append(errs, fmt.Errorf("upstream %s: namespace, service, port and listen address are required", u))
		}
		if !validProtocol(u.Protocol) {
			errs = append(errs, fmt.Errorf("upstream %s: unknown protocol %q (want http, http2, grpc or tcp)", u, u.Protocol))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("invalid sidecar config: %w", err)
	}
	return nil
}

// Sidecar is one workload's proxy.
type Sidecar struct {
	cfg       Config
	log       *slog.Logger
	m         *metrics
	clientTLS *tls.Config
	serverTLS *tls.Config

	inbound     net.Listener
	admin       net.Listener
	upstreams   []*upstream
	transparent *transparent // nil unless OutboundAddr is set
	dns         *dnsServer   // nil unless DNSAddr is set

	gwOnce sync.Once
	gw     *egress.Client
	gwErr  error

	// inPolicy is the own service's inbound policy; nil means defaults.
	inPolicy atomic.Pointer[inboundPolicy]
	denials  denyLog
	// tcpIn is every spliced TCP inbound connection with its caller, so a
	// new policy can reset the ones it no longer admits.
	tcpIn inboundConns
	epoch time.Time // the rate limiters' monotonic clock starts here

	closed atomic.Bool
	mu     sync.Mutex
	conns  map[net.Conn]struct{} // every proxied connection, closed on shutdown

	own *owner // goroutines off the request path, pools, upstreams (lifetime.go)
}

// New validates cfg and binds the sidecar's listeners; Run serves them.
func New(cfg Config) (*Sidecar, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	tds := append([]spiffeid.TrustDomain{cfg.TrustDomain}, cfg.Federated...)
	members := mtls.MemberOf(tds...)
	callers := members
	if len(cfg.Allow) > 0 {
		callers = mtls.OneOf(cfg.Allow...)
	}
	s := &Sidecar{
		cfg: cfg, log: cfg.Logger,
		clientTLS: mtls.ClientConfig(cfg.Source, mtls.MemberOf(tds...)),
		conns:     map[net.Conn]struct{}{},
		epoch:     time.Now(),
		own:       newOwner(),
	}
	if len(cfg.Allow) > 0 && !cfg.Service.IsZero() {
		// Under an AuthorizationPolicy the handshake checks trust domain
		// membership only; the policy decides right after it.
		allow := callers
		callers = func(id spiffeid.ID, chains [][]*x509.Certificate) error {
			if p := s.inPolicy.Load(); p != nil && p.authz != nil {
				return members(id, chains)
			}
			return allow(id, chains)
		}
	}
	var err error
	if s.m, err = newMetrics(cfg.Registry); err != nil {
		return nil, err
	}
	if err := cfg.Registry.NewGaugeFunc("fedmesh_sidecar_socket_io_raw",
		"1 while proxied sockets are read and written with raw system calls (--socket-io raw, or auto while the sidecar is busy), 0 while through the Go scheduler's syscall path.",
		func() float64 {
			if s.rawSocketIO() {
				return 1
			}
			return 0
		}); err != nil {
		return nil, fmt.Errorf("register sidecar metrics: %w", err)
	}
	s.serverTLS = mtls.ServerConfig(cfg.Source, s.countRefusals(callers))
	s.clientTLS.MinVersion = tls.VersionTLS13
	s.serverTLS.MinVersion = tls.VersionTLS13

	var lns []net.Listener
	fail := func(err error) (*Sidecar, error) {
		for _, ln := range lns {
			ln.Close()
		}
		return nil, err
	}
	for _, u := range cfg.Upstreams {
		ln, err := net.Listen("tcp", u.Listen)
		if err != nil {
			return fail(fmt.Errorf("listen for upstream %s: %w", u, err))
		}
		lns = append(lns, ln)
		s.upstreams = append(s.upstreams, newUpstream(s, u, ln))
	}
	if cfg.OutboundAddr != "" {
		ln, err := net.Listen("tcp", cfg.OutboundAddr)
		if err != nil {
			return fail(fmt.Errorf("listen transparent outbound: %w", err))
		}
		lns = append(lns, ln)
		if s.transparent, err = newTransparent(s, ln); err != nil {
			return fail(err)
		}
	}
	if cfg.DNSAddr != "" {
		if s.dns, err = newDNSServer(s, s.transparent); err != nil {
			return fail(err)
		}
	}
	if cfg.InboundAddr != "" {
		if s.inbound, err = net.Listen("tcp", cfg.InboundAddr); err != nil {
			s.closeDNS()
			return fail(fmt.Errorf("listen inbound: %w", err))
		}
		lns = append(lns, s.inbound)
	}
	if cfg.AdminAddr != "" {
		if s.admin, err = net.Listen("tcp", cfg.AdminAddr); err != nil {
			s.closeDNS()
			return fail(fmt.Errorf("listen admin: %w", err))
		}
	}
	return s, nil
}

// InboundAddr is the bound inbound address, nil when disabled.
func (s *Sidecar) InboundAddr() net.Addr {
	if s.inbound == nil {
		return nil
	}
	return s.inbound.Addr()
}

// OutboundAddr is the bound transparent outbound listener, nil when
// disabled.
func (s *Sidecar) OutboundAddr() net.Addr {
	if s.transparent == nil {
		return nil
	}
	return s.transparent.ln.Addr()
}

// UpstreamAddr is the bound outbound listener of the i-th upstream.
func (s *Sidecar) UpstreamAddr(i int) net.Addr { return s.upstreams[i].ln.Addr() }

// DNSAddr is the bound DNS address (UDP; TCP has the same), the first
// when there are several, nil when disabled.
func (s *Sidecar) DNSAddr() net.Addr {
	if s.dns == nil {
		return nil
	}
	return s.dns.pcs[0].LocalAddr()
}

func (s *Sidecar) closeDNS() {
	if s.dns != nil {
		s.dns.close()
	}
}

// AdminAddr is the bound admin address, nil when disabled.
func (s *Sidecar) AdminAddr() net.Addr {
	if s.admin == nil {
		return nil
	}
	return s.admin.Addr()
}

// Run serves until ctx ends, then closes listeners and connections. It
// returns once every goroutine it started (and every goroutine those
// started) has ended and every connection it opened is closed.
func (s *Sidecar) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, u := range s.upstreams {
		ch, err := s.cfg.Endpoints.Watch(ctx, u.cfg.Namespace, u.cfg.Service)
		if err != nil {
			cancel()
			s.closeAll()
			wg.Wait()
			s.shutdown()
			return fmt.Errorf("watch endpoints of %s: %w", u.cfg, err)
		}
		wg.Go(func() { u.watch(ctx, ch, &wg) })
		wg.Go(func() { u.serve(ctx) })
	}
	if !s.cfg.Service.IsZero() {
		ch, err := s.cfg.Endpoints.Watch(ctx, s.cfg.Service.Namespace, s.cfg.Service.Name)
		if err != nil {
			cancel()
			s.closeAll()
			wg.Wait()
			s.shutdown()
			return fmt.Errorf("watch own service %s: %w", s.cfg.Service, err)
		}
		wg.Go(func() { s.watchOwn(ctx, ch) })
	}
	if s.transparent != nil {
		if err := s.transparent.run(ctx, &wg); err != nil {
			cancel()
			s.closeAll()
			wg.Wait()
			s.shutdown()
			return err
		}
	}
	if s.dns != nil {
		s.dns.run(ctx, &wg)
	}
	if s.inbound != nil {
		wg.Go(func() { s.serveInbound(ctx) })
	}
	var adminSrv *http.Server
	if s.admin != nil {
		adminSrv = &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 5 * time.Second}
		wg.Go(func() { _ = adminSrv.Serve(s.admin) })
	}
	s.log.Info("sidecar running", "cluster", s.cfg.Cluster, "upstreams", len(s.upstreams), "inbound", addrString(s.InboundAddr()),
		"transparent", addrString(s.OutboundAddr()), "dns", addrString(s.DNSAddr()))
	<-ctx.Done()
	if adminSrv != nil {
		_ = adminSrv.Close()
	}
	s.closeAll()
	wg.Wait()
	s.shutdown()
	return nil
}

// shutdown ends what Run's own goroutines leave behind once they have
// returned: the goroutines spawned off the request path (waited for), every
// pool's connections, every upstream's HTTP/2 server, and last the gateway
// client those used.
func (s *Sidecar) shutdown() {
	s.own.stop()
	s.gwOnce.Do(func() { s.gwErr = errors.New("sidecar stopped") }) // no client made from now on
	if s.gw != nil {
		_ = s.gw.Close()
	}
}

func (s *Sidecar) closeAll() {
	s.closed.Store(true)
	for _, u := range s.upstreams {
		_ = u.ln.Close()
		u.closeIdle()
	}
	if s.transparent != nil {
		s.transparent.close()
	}
	s.closeDNS()
	if s.inbound != nil {
		_ = s.inbound.Close()
	}
	s.mu.Lock()
	for c := range s.conns {
		_ = c.Close()
	}
	s.mu.Unlock()
}

// track registers a connection to close at shutdown; the returned func
// forgets it.
func (s *Sidecar) track(c net.Conn) func() {
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}
}

func (s *Sidecar) gateway() (*egress.Client, error) {
	s.gwOnce.Do(func() {
		if s.cfg.GatewayEgress == "" {
			s.gwErr = errors.New("no gateway egress configured")
			return
		}
		s.gw, s.gwErr = egress.NewClient(s.cfg.Source, s.cfg.GatewayID, s.cfg.GatewayEgress, egress.WithSocketIO(s.cfg.SocketIO))
	})
	return s.gw, s.gwErr
}

// callerID is this workload's SPIFFE ID, for the tunnel header.
func (s *Sidecar) callerID() string {
	svid, err := s.cfg.Source.GetX509SVID()
	if err != nil {
		return ""
	}
	return svid.ID.String()
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func (s *Sidecar) countRefusals(a tlsconfig.Authorizer) tlsconfig.Authorizer {
	return func(id spiffeid.ID, chains [][]*x509.Certificate) error {
		if err := a(id, chains); err != nil {
			s.m.inbound.WithLabelValues("refused").Inc()
			s.log.Warn("inbound caller refused", "caller", id.String(), "err", err)
			return err
		}
		return nil
	}
}

// socket returns c for proxying, reading and writing as Config.SocketIO
// says.
func (s *Sidecar) socket(c net.Conn) net.Conn { return rawio.WrapMode(c, s.cfg.SocketIO) }

// rawSocketIO reports whether proxied sockets make raw system calls now.
func (s *Sidecar) rawSocketIO() bool {
	return s.cfg.SocketIO == rawio.Raw || s.cfg.SocketIO == rawio.Auto && rawio.Busy()
}
